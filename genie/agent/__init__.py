"""Agents that learn from unlabelled video through latent actions: the CoinRun expert, latent-action behavioural
cloning (policy, latent -> real action mapping, the oracle) and their evaluation in the real game."""

from genie.agent.expert import ExpertConfig, episode_level, make_env, plan_episode, record

__all__ = ["ExpertConfig", "episode_level", "make_env", "plan_episode", "record"]
