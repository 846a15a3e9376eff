"""`genie jobs submit agent|reactive|finetune|expert` on a real train worker: LAM-BC trains to a finished run with its
mappings, DAgger to a reactive expert that PPO then fine-tunes and whose episodes (and the planner's) record as datasets;
bad arguments are rejected before anything is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genie.agent.expert import ExpertConfig, record
from genie.data.shards import ShardedDataset
from genie.models.common import FrameSpec
from genie.models.lam import LatentActionModel, LatentActionModelConfig
from genie.nn.st_transformer import STTransformerConfig
from genie.nn.vq import VectorQuantizerConfig
from genie.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def agent_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agent-job")
    record(ExpertConfig(episodes=3, max_frames=24, candidates=4, horizon=12, commit=4), root / "expert", progress=False)
    st = STTransformerConfig(dim=32, depth=1, heads=2, ffn_mult=2, max_frames=5)
    torch.manual_seed(0)
    lam = LatentActionModel(LatentActionModelConfig(frame=FrameSpec(64, 64, 3), patch=16, encoder=st, decoder=st,
                                                    vq=VectorQuantizerConfig(num_codes=4, code_dim=8)))
    save_checkpoint(root / "world" / "lam", "lam", lam, 0)
    return {"data": root / "expert", "world": root / "world", "root": root}


@pytest.fixture(scope="module")
def worker(kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("agent-jobs")
    env = kit.env(root / "jobs")
    kit.worker("train", "train", env, root).wait_ready()
    client = kit.client(env)
    yield {"env": env, "client": client}
    client.close()


def test_agent_job_trains_lam_bc(worker, agent_inputs, kit, tmp_path):
    env, client = worker["env"], worker["client"]
    job = kit.submitted(kit.cli(env, "submit", "agent", "--data", str(agent_inputs["data"]), "--world",
                                str(agent_inputs["world"]), "--steps", "4", "--batch-size", "2", "--labelled", "5,20",
                                "--arch", "impala", "--width", "8", "--context", "3", "--augment", "2", "--lr", "1e-3",
                                "--out", str(tmp_path / "run")))
    st = client.wait(job, timeout=180)
    assert st.state == "SUCCESS", st.to_json()
    assert st.result["finished"] and st.result["step"] == 4 and st.result["num_actions"] == 4
    # the settings `genie agent train` takes reach the worker's run (the README's BC experiment runs as a job too)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["policy"]["arch"], cfg["policy"]["width_mult"], cfg["policy"]["context"]) == ("impala", 8, 3)
    assert (cfg["augment"], cfg["lr"]) == (2, 1e-3)
    mappings = json.loads((tmp_path / "run" / "mappings.json").read_text())["mappings"]
    assert set(mappings) == {"5", "20"}
    assert (tmp_path / "run" / "policy" / "model.safetensors").exists()


def test_bad_agent_jobs_are_rejected_before_queueing(worker, agent_inputs, kit, tmp_path):
    env = worker["env"]
    before = kit.queue_lengths()
    for args, needle in [
        (["--data", str(tmp_path / "nope")], "not a Genie dataset"),
        (["--data", str(agent_inputs["data"]), "--world", str(tmp_path)], "not a Genie checkpoint"),
        (["--data", str(agent_inputs["data"]), "--world", str(agent_inputs["world"]), "--steps", "0"], "steps"),
        (["--data", str(agent_inputs["data"]), "--world", str(agent_inputs["world"]), "--labelled", "a"], "labelled"),
        (["--data", str(agent_inputs["data"]), "--world", str(agent_inputs["world"]), "--context", "0"], "context"),
    ]:
        result = kit.cli(env, "submit", "agent", *args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert kit.queue_lengths() == before


def test_agent_spec_round_trips_and_routes_to_train(agent_inputs):
    from genie.agent.train import AgentTrainConfig
    from services.worker.app import app
    from services.worker.specs import AgentJobSpec

    spec = AgentJobSpec(AgentTrainConfig(data=str(agent_inputs["data"]), world=str(agent_inputs["world"]),
                                         labelled=(5, 7)), out="/x", threads=1)
    assert AgentJobSpec.from_json(spec.to_json()) == spec
    for bad in ({**spec.to_json(), "nope": 1}, {**spec.to_json(), "train": {"data": "d", "bogus": 1}},
                {**spec.to_json(), "threads": -1}):
        with pytest.raises(ValueError):
            AgentJobSpec.from_json(bad)
    assert app.amqp.router.route({}, "genie.agent")["queue"].name == "train"
    assert "genie.agent" in app.tasks


# Tiny DAgger and planner settings (tests/agent/test_reactive.py's TINY): seconds, not minutes.
REACTIVE_SET = ["--set", "candidates=1", "--set", "horizon=6", "--set", "batch_size=8", "--set", "width_mult=8",
                "--set", "workers=1", "--set", "max_frames=24"]


def test_reactive_expert_trains_and_records_as_jobs(worker, kit, tmp_path):
    """`genie jobs submit reactive` runs DAgger to a finished reactive expert; `genie jobs submit expert --reactive`
    records its episodes as a dataset, and without --reactive the planner's; the BC job can read either."""
    env, client = worker["env"], worker["client"]
    run = tmp_path / "reactive"
    job = kit.submitted(kit.cli(env, "submit", "reactive", "--out", str(run), "--iterations", "2", "--episodes", "2",
                                "--steps", "4", *REACTIVE_SET))
    st = client.wait(job, timeout=300)
    assert st.state == "SUCCESS", st.to_json()
    assert st.result["iterations"] == 2 and st.result["last"]["iteration"] == 1
    assert (run / "policy" / "model.safetensors").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    # `genie jobs submit finetune`: PPO from the DAgger run's policy, progress counted in updates
    tuned = tmp_path / "finetune"
    job = kit.submitted(kit.cli(env, "submit", "finetune", "--init", str(run), "--out", str(tuned), "--updates", "2",
                                "--envs", "2", "--rollout", "4", "--minibatches", "2", "--epochs", "1", "--threads", "1",
                                "--set", "value_warmup=1"))
    st = client.wait(job, timeout=300)
    assert st.state == "SUCCESS", st.to_json()
    assert (st.kind, st.done, st.total) == ("finetune", 2, 2)
    assert st.result["updates"] == 2 and st.result["last"]["update"] == 2 and st.result["last"]["frames"] == 2 * 2 * 4
    assert (tuned / "policy" / "model.safetensors").exists()
    assert [json.loads(x)["value_only"] for x in (tuned / "metrics.jsonl").read_text().splitlines()] == [True, False]
    # more --updates extend the run; a cancel stops it after the update in progress, with a checkpoint there
    job = kit.submitted(kit.cli(env, "submit", "finetune", "--init", str(run), "--out", str(tuned), "--updates", "500",
                                "--envs", "2", "--rollout", "4", "--minibatches", "2", "--epochs", "1", "--threads", "1",
                                "--set", "value_warmup=1"))
    kit.wait_for(lambda: client.status(job).done >= 3, "three more fine-tune updates", timeout=300)
    client.cancel(job)
    st = client.wait(job, timeout=120)
    assert st.state == "CANCELLED", st.to_json()
    done = len((tuned / "metrics.jsonl").read_text().splitlines())
    assert 3 < done < 500 and st.detail["done"] == done
    assert sorted(p.name for p in (tuned / "checkpoints").iterdir())[-1] == f"step_{done:08d}"

    for expert, extra in (("reactive", ["--reactive", str(run)]), ("planner", ["--set", "candidates=2", "--set",
                                                                                 "horizon=8", "--set", "commit=4"])):
        out = tmp_path / f"{expert}-data"
        job = kit.submitted(kit.cli(env, "submit", "expert", "--out", str(out), "--episodes", "2", "--max-frames", "24",
                                    *extra))
        st = client.wait(job, timeout=300)
        assert st.state == "SUCCESS", st.to_json()
        assert st.result["expert"] == expert and st.result["episodes"] == 2
        data = ShardedDataset(out)
        assert len(data.episodes) == 2 and data.info["num_true_actions"] == 15
        assert data.info["source"] == ("procgen-reactive-expert" if expert == "reactive" else "procgen-expert")


def test_bad_expert_reactive_and_finetune_jobs_are_rejected_before_queueing(worker, agent_inputs, kit, tmp_path):
    from genie.agent.policy import Policy, PolicyConfig
    from genie.agent.reactive import save_policy

    env = worker["env"]
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"episodes": 999}))
    save_policy(Policy(PolicyConfig(num_actions=15, width_mult=8)), tmp_path / "game-policy")
    save_policy(Policy(PolicyConfig(num_actions=4, width_mult=8)), tmp_path / "latent-policy")
    game, tiny = str(tmp_path / "game-policy"), ["--envs", "2", "--rollout", "4", "--minibatches", "2"]
    before = kit.queue_lengths()
    for args, needle in [
        (["expert", "--out", str(agent_inputs["data"])], "already holds a dataset"),
        (["expert", "--out", str(tmp_path / "d"), "--reactive", str(tmp_path / "nope")], "no finished reactive expert"),
        (["expert", "--out", str(tmp_path / "d"), "--set", "bogus=1"], "no such setting 'bogus'"),
        (["expert", "--out", str(tmp_path / "d"), "--set", "horizon=x"], "horizon: expected an integer"),
        (["expert", "--out", str(tmp_path / "d"), "--episodes", "0"], "episodes"),
        (["reactive", "--out", str(other)], "another config"),
        (["reactive", "--iterations", "0"], "iterations"),
        (["finetune", "--init", str(tmp_path / "nope")], "neither a policy directory nor a run with a finished policy/"),
        (["finetune", "--init", game, "--envs", "2", "--rollout", "4", "--minibatches", "3"], "must split into 3"),
        (["finetune", "--init", str(tmp_path / "latent-policy"), *tiny], "a game policy has 15"),
        (["finetune", "--init", game, "--out", str(other), *tiny], "another config"),
        (["finetune", "--init", game, "--updates", "0"], "updates"),
        (["finetune", "--init", game, "--set", "bogus=1"], "no such setting 'bogus'"),
    ]:
        result = kit.cli(env, "submit", *args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert kit.queue_lengths() == before


def test_expert_and_reactive_specs_round_trip_and_route_to_train():
    from genie.agent.expert import ExpertConfig
    from genie.agent.reactive import ReactiveConfig
    from services.worker.app import app
    from services.worker.specs import ExpertJobSpec, ReactiveJobSpec

    reactive = ReactiveJobSpec(ReactiveConfig(iterations=3, arch="impala"), out="/r", threads=1)
    expert = ExpertJobSpec(ExpertConfig(episodes=5, split="val"), out="/d", policy_run="/r", workers=2)
    assert ReactiveJobSpec.from_json(reactive.to_json()) == reactive
    assert ExpertJobSpec.from_json(expert.to_json()) == expert
    for bad in ({**reactive.to_json(), "nope": 1}, {**reactive.to_json(), "reactive": {"bogus": 1}},
                {**reactive.to_json(), "threads": -1}):
        with pytest.raises(ValueError):
            ReactiveJobSpec.from_json(bad)
    for bad in ({**expert.to_json(), "out": ""}, {**expert.to_json(), "expert": {"split": "nope"}},
                {**expert.to_json(), "workers": 0}):
        with pytest.raises(ValueError):
            ExpertJobSpec.from_json(bad)
    for task in ("genie.reactive", "genie.expert"):
        assert app.amqp.router.route({}, task)["queue"].name == "train" and task in app.tasks


def test_finetune_spec_round_trips_and_routes_to_train():
    from genie.agent.finetune import FinetuneConfig
    from services.worker.app import app
    from services.worker.specs import FinetuneJobSpec

    spec = FinetuneJobSpec(FinetuneConfig(init="/r", updates=7, envs=4, rollout=8, minibatches=2), out="/f", threads=1)
    assert FinetuneJobSpec.from_json(spec.to_json()) == spec
    for bad in ({**spec.to_json(), "nope": 1}, {**spec.to_json(), "finetune": {"init": "/r", "bogus": 1}},
                {**spec.to_json(), "finetune": {"envs": 2}}, {**spec.to_json(), "finetune": {"init": "/r", "envs": "2"}},
                {**spec.to_json(), "finetune": {"init": "/r", "minibatches": 5}}, {**spec.to_json(), "threads": -1}):
        with pytest.raises(ValueError):
            FinetuneJobSpec.from_json(bad)
    assert app.amqp.router.route({}, "genie.finetune")["queue"].name == "train" and "genie.finetune" in app.tasks
