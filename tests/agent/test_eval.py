"""`genie agent eval` pieces on the real game: intervals, seeded lock-step play, the report, the side-by-side GIF."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from genie.agent.eval import (
    AgentEvalConfig,
    evaluate_agents,
    marginal_chooser,
    play,
    pool_reports,
    random_chooser,
    summarise,
    wilson,
    write_report,
)
from genie.agent.policy import ActionMapping, Policy, PolicyConfig
from genie.agent.showcase import side_by_side
from genie.cli import main

SMALL = AgentEvalConfig(levels=3, max_frames=20)


def test_wilson_interval():
    lo, hi = wilson(57, 100)
    assert lo < 0.57 < hi and abs((hi - lo) - 0.19) < 0.01
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_summarise():
    eps = [{"return": 10.0, "success": True, "length": 50}, {"return": 0.0, "success": False, "length": 150}]
    s = summarise(eps)
    assert s["success_rate"] == 0.5 and s["mean_return"] == 5.0 and s["mean_length"] == 100
    assert s["return_ci95"][0] < 5 < s["return_ci95"][1]


def test_play_is_seeded_and_levels_are_held_out():
    a = play(random_chooser(), 1, SMALL, tag=0)
    assert a == play(random_chooser(), 1, SMALL, tag=0)
    assert a != play(random_chooser(), 1, AgentEvalConfig(levels=3, max_frames=20, seed=1), tag=0)
    assert all(r["level"] >= 2_000_000 and 1 <= r["length"] <= 19 for r in a)
    never_moves = play(marginal_chooser(np.eye(15)[4]), 1, SMALL, tag=0)  # NOOP only: never reaches the coin
    assert not any(r["success"] for r in never_moves) and all(r["length"] == 19 for r in never_moves)


def test_report_with_every_policy(tmp_path):
    torch.manual_seed(0)
    lam_bc, oracle = Policy(PolicyConfig(num_actions=4)), Policy(PolicyConfig(num_actions=15))
    counts = tuple(tuple(int(r == z + 5) for r in range(15)) for z in range(4))
    maps = {10: ActionMapping((5, 6, 7, 8), counts, 10)}
    report = evaluate_agents(AgentEvalConfig(levels=2, max_frames=10), oracle, lam_bc, maps,
                             expert_action_counts=np.ones(15))
    assert list(report["policies"]) == ["random", "expert_marginal", "expert", "oracle_bc", "lam_bc_k10"]
    assert all(len(p["per_level"]) == 2 for p in report["policies"].values())
    out = write_report(report, tmp_path)
    assert (tmp_path / "success_vs_k.png").stat().st_size > 1000
    assert "| lam_bc_k10 |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["config"]["levels"] == 2
    assert set(out["success_rate"]) == set(report["policies"])


def _report(seed: int, wins: list[bool], mode: str = "easy", names=("random", "oracle_bc")) -> dict:
    eps = [{"level": 2_000_000 + 1000 * seed + i, "return": 10.0 * w, "success": w, "length": 40} for i, w in
           enumerate(wins)]
    cfg = AgentEvalConfig(levels=len(wins), seed=seed, distribution_mode=mode)
    return {"config": asdict(cfg), "policies": {n: {**summarise(eps), "per_level": eps} for n in names}}


def test_pooled_reports_count_every_level_once_per_seed(tmp_path):
    a, b = _report(0, [True] * 3 + [False]), _report(1, [True] * 5 + [False] * 3)
    pooled = pool_reports([a, b])
    s = pooled["policies"]["oracle_bc"]
    assert (s["episodes"], s["success_rate"], s["per_seed"]) == (12, 8 / 12, [0.75, 5 / 8])
    assert s["success_ci95"] == list(wilson(8, 12)) and len(s["per_level"]) == 12
    assert (pooled["config"]["levels"], pooled["config"]["seed"], pooled["config"]["distinct_levels"]) == (12, [0, 1], 12)
    for bad, needle in [([a], ">= 2 reports"), ([a, a], "repeat a seed"),
                        ([a, _report(1, [True], mode="hard")], "distribution_mode"),
                        ([a, _report(1, [True], names=("random",))], "different policies")]:
        with pytest.raises(ValueError, match=needle):
            pool_reports(bad)

    # the CLI: reports (dirs or files) in, one pooled report with its table and plot out; bad input is one line
    for name, rep in (("s0", a), ("s1", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(rep))
    out = CliRunner().invoke(main, ["agent", "pool", str(tmp_path / "s0"), str(tmp_path / "s1" / "report.json"),
                                    "--out", str(tmp_path / "pooled")])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["success_rate"]["oracle_bc"] == 8 / 12
    assert "| oracle_bc | 0.67" in (tmp_path / "pooled" / "table.md").read_text()
    assert (tmp_path / "pooled" / "success_vs_k.png").stat().st_size > 1000
    (tmp_path / "broken.json").write_text("{")
    for args in ([str(tmp_path / "s0"), str(tmp_path / "s0")], [str(tmp_path / "s0"), str(tmp_path / "broken.json")],
                 [str(tmp_path / "s0"), str(tmp_path / "nope")]):
        out = CliRunner().invoke(main, ["agent", "pool", *args, "--out", str(tmp_path / "bad")])
        lines = out.output.strip().splitlines()
        assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.output
    assert not (tmp_path / "bad").exists()


class EchoEngine:
    """A stand-in world: every step returns the prompt again (the GIF's plumbing, not a model, is under test)."""

    num_actions, frame_shape = 4, (64, 64, 3)

    def reset(self, prompts, seeds):
        return [p for p in prompts], prompts.copy()

    def step(self, handles, actions):
        return list(handles), np.stack(handles)

    def close(self, handles):
        pass


def test_side_by_side_shows_game_and_world():
    torch.manual_seed(0)
    policy = Policy(PolicyConfig(num_actions=4))
    mapping = ActionMapping((7, 7, 8, 8), tuple(tuple([0] * 15) for _ in range(4)), 0)
    frames, captions = side_by_side(policy, mapping, EchoEngine(), steps=5)
    assert frames.shape == (6, 64, 132, 3) and len(captions) == 6
    np.testing.assert_array_equal(frames[0, :, :64], frames[0, :, 68:])  # the world starts from the game's frame
    assert not np.array_equal(frames[5, :, :64], frames[0, :, :64])  # the game moved (right) ...
    np.testing.assert_array_equal(frames[5, :, 68:], frames[0, :, 68:])  # ... the echo world did not


@pytest.mark.parametrize("args", [["agent", "gif", "--lam-bc", "/nonexistent"], ["agent", "gif", "--lam-bc", "x", "--steps", "0"]])
def test_gif_bad_arguments(args, tmp_path):
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a.gif")])
    assert result.exit_code == 2 and result.output.strip().startswith("error: ")
    assert len(result.output.strip().splitlines()) == 1
