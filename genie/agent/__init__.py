"""Agents that learn from unlabelled video through latent actions: the CoinRun expert, latent-action behavioural
cloning (policy, latent -> real action mapping, the oracle) and their evaluation in the real game."""

from genie.agent.eval import AgentEvalConfig, evaluate_agents, write_report
from genie.agent.expert import ExpertConfig, episode_level, make_env, plan_episode, record
from genie.agent.policy import ActionMapping, Policy, PolicyConfig, label_latent_actions
from genie.agent.train import AgentTrainConfig, load_mappings, load_policy, train_agent

__all__ = [
    "ActionMapping", "AgentEvalConfig", "AgentTrainConfig", "ExpertConfig", "Policy", "PolicyConfig", "episode_level",
    "evaluate_agents", "label_latent_actions", "load_mappings", "load_policy", "make_env", "plan_episode", "record",
    "train_agent", "write_report",
]
