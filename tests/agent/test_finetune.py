"""RL fine-tuning of the reactive expert (PPO): advantages, the update's direction, the run (resumable) and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from genie.agent.finetune import ActorCritic, FinetuneConfig, Rollout, advantages, ppo_update, run_finetune
from genie.agent.policy import Policy, PolicyConfig
from genie.agent.reactive import load_reactive_policy, save_policy
from genie.cli import main

pytest.importorskip("procgen")

TINY = dict(envs=2, rollout=8, minibatches=2, epochs=1, checkpoint_every=1, value_warmup=1)


def _init(tmp_path, num_actions: int = 15):
    torch.manual_seed(0)
    policy = Policy(PolicyConfig(num_actions=num_actions, width_mult=8))
    save_policy(policy, tmp_path / "init" / "policy")
    return tmp_path / "init"


def _rollout(rewards, dones, values, last_value) -> Rollout:
    t, n = np.shape(rewards)
    return Rollout(np.zeros((t, n, 2, 64, 64, 3), np.uint8), torch.zeros(t, n, dtype=torch.int64), torch.zeros(t, n),
                   torch.tensor(values, dtype=torch.float32), torch.tensor(rewards, dtype=torch.float32),
                   torch.tensor(dones, dtype=torch.float32), torch.tensor(last_value, dtype=torch.float32), [])


def test_advantages_stop_at_a_level_end_and_bootstrap_from_the_last_value():
    # one game, three frames: the level ends after the second action (reward 1), a new one starts at the third
    r = _rollout([[0.0], [1.0], [0.0]], [[0.0], [1.0], [0.0]], [[0.5], [0.2], [0.1]], [0.4])
    adv, returns = advantages(r, gamma=0.9, lam=0.5)
    d2 = 0.0 + 0.9 * 0.4 - 0.1  # the last frame bootstraps from last_value
    d1 = 1.0 - 0.2  # the level ended: nothing after it counts
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    expected = [d0 + 0.9 * 0.5 * d1, d1, d2]
    np.testing.assert_allclose(adv[:, 0].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(returns.numpy(), adv.numpy() + r.values.numpy(), rtol=1e-6)


def test_an_update_makes_the_rewarded_action_likelier_and_warmup_moves_only_the_value_head():
    torch.manual_seed(0)
    model = ActorCritic(Policy(PolicyConfig(num_actions=15, width_mult=8)))
    frames = np.random.default_rng(0).integers(0, 255, (1, 2, 64, 64, 3), dtype=np.uint8).repeat(16, 0)
    r = _rollout(np.tile([[1.0], [0.0]], (8, 1)), np.ones((16, 1)), np.zeros((16, 1)), [0.0])
    r.frames = frames[:, None]  # (16, 1, 2, 64, 64, 3): one frame; action 3 rewarded, action 5 not
    r.actions = torch.tensor([3, 5] * 8)[:, None]
    with torch.no_grad():
        logp0 = torch.log_softmax(model(torch.from_numpy(frames[:1]))[0], -1)[0]
    r.logp = logp0[r.actions]
    cfg = FinetuneConfig(init="unused", envs=1, rollout=16, minibatches=2, epochs=2, lr=1e-3)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    ppo_update(model, torch.optim.Adam(model.parameters(), lr=1e-3), r, cfg, value_only=True, gen=torch.Generator())
    assert all(torch.equal(before[k], v) for k, v in model.policy.state_dict().items())
    assert model.value.weight.abs().sum() > 0
    ppo_update(model, torch.optim.Adam(model.parameters(), lr=1e-3), r, cfg, value_only=False, gen=torch.Generator())
    with torch.no_grad():
        logp1 = torch.log_softmax(model(torch.from_numpy(frames[:1]))[0], -1)[0]
    assert logp1[3] - logp0[3] > 0.01 and logp1[5] < logp0[5]


def test_a_run_plays_the_game_resumes_and_saves_a_policy_the_eval_reads(tmp_path):
    init = _init(tmp_path)
    run = tmp_path / "ft"
    cfg = FinetuneConfig(init=str(init), updates=2, **TINY)
    run_finetune(cfg, run, progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in lines] == [1, 2] and [m["value_only"] for m in lines] == [True, False]
    assert lines[-1]["frames"] == 2 * 2 * 8 and lines[-1]["entropy"] > 0
    # warm-up only (update 1) left the policy as it was; update 2 changed it
    first = load_reactive_policy(init / "policy").state_dict()
    tuned = load_reactive_policy(run / "policy").state_dict()
    assert any(not torch.equal(first[k], tuned[k]) for k in first)
    # more updates extend the run from its newest checkpoint; another setting is refused
    last = run_finetune(FinetuneConfig(init=str(init), updates=3, **TINY), run, progress=False)
    assert last["update"] == 3 and len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    with pytest.raises(ValueError, match="another config"):
        run_finetune(FinetuneConfig(init=str(init), updates=3, **{**TINY, "envs": 4}), run, progress=False)
    # a finished run only re-saves its policy
    again = run_finetune(FinetuneConfig(init=str(init), updates=3, **TINY), run, progress=False)
    assert again["update"] == 3 and len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_bad_settings_and_inits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="minibatches"):
        FinetuneConfig(init="x", envs=3, rollout=5, minibatches=2)
    with pytest.raises(ValueError, match="gamma"):
        FinetuneConfig(init="x", gamma=0.0)
    with pytest.raises(ValueError, match="neither a policy directory"):
        run_finetune(FinetuneConfig(init=str(tmp_path / "none"), **TINY), tmp_path / "ft", progress=False)
    with pytest.raises(ValueError, match="a game policy has 15"):
        run_finetune(FinetuneConfig(init=str(_init(tmp_path, num_actions=8)), **TINY), tmp_path / "ft8", progress=False)


def test_cli_fine_tunes_and_reports_one_line_errors(tmp_path):
    init = _init(tmp_path)
    args = ["agent", "finetune", "--init", str(init), "--out", str(tmp_path / "ft"), "--updates", "1", "--envs", "2",
            "--rollout", "4", "--minibatches", "2", "--epochs", "1", "--quiet"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip().splitlines()[-1])["update"] == 1
    assert (tmp_path / "ft" / "policy" / "model.safetensors").is_file()
    out = CliRunner().invoke(main, ["agent", "finetune", "--init", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert out.exit_code == 2 and "neither a policy directory" in out.output
    out = CliRunner().invoke(main, [*args[:-1], "--envs", "3", "--rollout", "3"])
    assert out.exit_code == 2 and "minibatches" in out.output
