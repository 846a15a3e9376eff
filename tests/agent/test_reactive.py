"""The reactive expert (DAgger): the planner's label of a state, the iterations (resumable), recording and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from genie.agent.expert import ExpertConfig, _x_offset, episode_level, make_env
from genie.agent.reactive import (
    PREFERENCE,
    ReactiveConfig,
    critical_rows,
    least_action,
    load_reactive_policy,
    planner_choice,
    planner_targets,
    record_reactive,
    rollout,
    run_dagger,
)
from genie.cli import main
from genie.data.shards import ShardedDataset

pytest.importorskip("procgen")

TINY = dict(iterations=2, episodes=2, max_frames=24, candidates=1, horizon=6, steps=4, batch_size=8, width_mult=8,
            workers=1)


def test_planner_choice_is_an_action_and_leaves_the_game_where_it_was():
    env = make_env("coinrun", episode_level("train", 0, 0, 10_000), "easy")
    for _ in range(5):
        env.act(np.array([7]))
    before = env.get_state()[0]
    frame = env.observe()[1]["rgb"][0].copy()
    cfg = ReactiveConfig(candidates=2, horizon=8)
    choice = planner_choice(env, _x_offset(env), np.random.default_rng(0), cfg)
    assert choice in (7, 8, 5, 4, 1, 2)  # the planner's sequences are made of these
    assert env.get_state()[0] == before
    again, near = planner_targets(env, _x_offset(env), np.random.default_rng(0), cfg)
    assert again == choice and near.shape == (15,) and near[choice]
    assert set(np.flatnonzero(near)) <= {7, 8, 5, 4, 1, 2}
    np.testing.assert_array_equal(env.observe()[1]["rgb"][0], frame)


def test_least_action_keeps_the_first_preferred_action_of_each_set():
    near = np.zeros((3, 15), dtype=bool)
    near[0, [7, 8]] = True  # walking and jumping right both work: walk
    near[1, [8, 5]] = True  # only jumps work: jump right
    near[2, [1]] = True
    out = least_action(near)
    assert out.sum(1).tolist() == [1, 1, 1] and np.flatnonzero(out[0]) == [7] and np.flatnonzero(out[1]) == [8]
    assert np.flatnonzero(out[2]) == [1] and (out <= near).all()
    assert sorted(PREFERENCE) == list(range(15))


def test_critical_rows_are_those_whose_set_excludes_the_most_common_action():
    near = np.zeros((4, 15), dtype=bool)
    near[0, [7, 8]] = True
    near[1, [8]] = True
    near[2, [7]] = True
    near[3, [4, 8]] = True
    assert critical_rows(near).tolist() == [False, False, True, False]  # jumping right (8) is in 3 of 4 sets
    near[:, 8] = False  # now walking right is the default: rows without it are critical
    assert critical_rows(near).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="critical_weight"):
        ReactiveConfig(critical_weight=0)


def test_a_rollout_labels_every_kept_frame_and_is_reproducible():
    cfg = ReactiveConfig(**TINY)
    frames, labels, near, meta = rollout(cfg, 0, 0, None)
    assert frames.shape[1:] == (64, 64, 3) and labels.shape == (frames.shape[0] - 1,)
    assert near.shape == (len(labels), 15) and near[np.arange(len(labels)), labels].all()  # the choice is in its set
    assert meta["beta"] == 1.0 and meta["student_frames"] == 0 and meta["labels"] == len(labels)
    again = rollout(cfg, 0, 0, None)
    np.testing.assert_array_equal(again[0], frames)
    np.testing.assert_array_equal(again[1], labels)
    np.testing.assert_array_equal(again[2], near)


def test_dagger_iterations_resume_and_record(tmp_path):
    cfg = ReactiveConfig(**TINY)
    run = tmp_path / "run"
    last = run_dagger(cfg, run, progress=False)
    assert last["iteration"] == 1 and last["beta"] == 0.5
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [0, 1]
    assert lines[0]["student_frames"] == 0  # iteration 0: the planner plays
    data = ShardedDataset(run / "iteration_1")
    assert len(data.episodes) == 2 and data.info["source"] == "reactive-dagger"
    policy = load_reactive_policy(run / "policy")
    assert policy.cfg.num_actions == 15 and policy.cfg.context == 2

    stamp = (run / "iteration_1" / "policy" / "model.safetensors").stat().st_mtime_ns
    assert run_dagger(cfg, run, progress=False) == lines[-1]  # everything done: nothing re-run, the newest metrics
    assert (run / "iteration_1" / "policy" / "model.safetensors").stat().st_mtime_ns == stamp
    saved = json.loads((run / "config.json").read_text())
    for field in ("arch", "augment", "least_action", "critical_weight"):  # a run saved before these fields existed
        saved.pop(field)
    (run / "config.json").write_text(json.dumps(saved))
    assert run_dagger(cfg, run, progress=False) == lines[-1]
    with pytest.raises(ValueError, match="another config"):
        run_dagger(ReactiveConfig(**{**TINY, "steps": 5}), run, progress=False)
    seen = []
    stopped = run_dagger(ReactiveConfig(**{**TINY, "iterations": 4}), run, progress=False,
                         on_iteration=lambda done: seen.append(done) or True)  # asked to stop after each iteration
    assert stopped["iteration"] == 2 and stopped["stopped"] and seen == [3]
    assert not (run / "iteration_3").exists()
    extended = run_dagger(ReactiveConfig(**{**TINY, "iterations": 3}), run, progress=False)  # resumes: nothing left
    assert extended["iteration"] == 2 and extended["beta"] == 0.25
    assert (run / "iteration_1" / "policy" / "model.safetensors").stat().st_mtime_ns == stamp  # kept

    impala = run_dagger(ReactiveConfig(**{**TINY, "iterations": 1, "arch": "impala", "augment": 2}),
                        tmp_path / "impala", progress=False)
    assert impala["iteration"] == 0
    assert load_reactive_policy(tmp_path / "impala" / "policy").cfg.arch == "impala"
    least = run_dagger(ReactiveConfig(**{**TINY, "iterations": 1, "least_action": True, "critical_weight": 4.0}),
                       tmp_path / "least", progress=False)
    assert least["iteration"] == 0
    with pytest.raises(ValueError, match="augment"):
        ReactiveConfig(augment=-1)

    out = tmp_path / "rec"
    summary = record_reactive(policy, ExpertConfig(split="val", episodes=2, max_frames=20), out, workers=1, progress=False)
    rec = ShardedDataset(out)
    assert summary["episodes"] == 2 and len(rec.episodes) == 2 and rec.info["source"] == "procgen-reactive-expert"
    frames, actions = rec.episode(0)
    assert actions.shape == (frames.shape[0] - 1,) and actions.min() >= 0 and actions.max() < 15
    assert not (tmp_path / "rec.policy.tmp").exists()


def test_cli_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "run").mkdir()
    out = CliRunner().invoke(main, ["agent", "expert", "--reactive", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert out.exit_code != 0 and "no finished reactive expert" in out.output
    out = CliRunner().invoke(main, ["agent", "reactive", "--out", str(tmp_path / "r"), "--iterations", "0"])
    assert out.exit_code != 0 and "must be >= 1" in out.output
    # the labelling planner's search and the loss weight reach the config and are checked
    for flag in ("--horizon", "--candidates", "--critical-weight"):
        out = CliRunner().invoke(main, ["agent", "reactive", "--out", str(tmp_path / "r"), flag, "0"])
        assert out.exit_code != 0 and flag[2:].replace("-", "_") in out.output.lower(), out.output
    assert not (tmp_path / "r").exists()


def test_the_probe_benchmark_runs_on_a_tiny_run(tmp_path, capsys):
    """benchmarks/agent/reactive_probe.py against the code it probes: each subcommand prints its JSON line."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "agent" / "reactive_probe.py"
    spec = importlib.util.spec_from_file_location("reactive_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    run = tmp_path / "run"
    run_dagger(ReactiveConfig(**TINY), run, progress=False)
    probe.main(["retrain", "--run", str(run), "--iterations", "2", "--set", "critical_weight=3.0", "--threads", "1",
                "--out", str(tmp_path / "student")])
    probe.main(["accuracy", "--policy", str(tmp_path / "student"), "--labels", str(run / "iteration_1"), "--frames", "20"])
    probe.main(["play", "--policy", str(tmp_path / "student"), "--levels", "2", "--temperatures", "1,0"])
    probe.main(["play", "--policy", str(tmp_path / "student"), "--levels", "2", "--split", "val", "--mode", "hard"])
    probe.main(["planner", "--episodes", "2", "--workers", "1", "--set", "horizon=6", "--set", "candidates=1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [x["probe"] for x in lines] == ["retrain", "accuracy", "play", "play", "play", "planner", "planner"]
    assert 0 <= lines[1]["accuracy"] <= 1 and lines[1]["frames"] == 20
    assert {x["temperature"] for x in lines[2:4]} == {1.0, 0.0} and all(x["levels"] == 2 for x in lines[2:5])
    assert [(x["split"], x["mode"]) for x in lines[2:5]] == [("test", "easy")] * 2 + [("val", "hard")]
    assert [x["set"] for x in lines[5:]] == ["horizon=6", "candidates=1"] and all(x["episodes"] == 2 for x in lines[5:])
