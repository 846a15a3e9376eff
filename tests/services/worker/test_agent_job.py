"""`genie jobs submit agent` on a real train worker: LAM-BC trains to a finished run with its mappings; bad arguments
are rejected before anything is queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genie.agent.expert import ExpertConfig, record
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
                                "--out", str(tmp_path / "run")))
    st = client.wait(job, timeout=180)
    assert st.state == "SUCCESS", st.to_json()
    assert st.result["finished"] and st.result["step"] == 4 and st.result["num_actions"] == 4
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
