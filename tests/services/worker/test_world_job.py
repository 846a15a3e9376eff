"""`genie jobs submit world` on a real worker: the chain train(tokenizer) -> train(lam) -> train(dynamics) ->
world.finish builds a world; status follows the stages; cancel stops it with a checkpoint and a resubmit resumes;
a stage that fails on the worker fails the job with the stage named."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from celery.result import AsyncResult

from genie.catalog import DirectoryCatalog, file_digests, world_digest
from genie.data.shards import ShardWriter
from genie.train.checkpoint import latest_checkpoint
from genie.worlds import load_prompts
from services.gateway.api.client import GatewayClient
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.stores.memory_store import MemoryStore
from services.worker.specs import stage_id

SMALL = ["--preset", "tiny", "--eval-clips", "4", "--atlas-prompts", "1"]
for _kind, _steps in (("tokenizer", 4), ("lam", 4), ("dynamics", 4)):
    SMALL += ["--set", f"train_{_kind}.steps={_steps}", "--set", f"train_{_kind}.ckpt_every=2",
              "--set", f"train_{_kind}.warmup_steps=1"]


@pytest.fixture(scope="module")
def deployed(kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("world-jobs")
    env = kit.env(root / "jobs")
    worker = kit.worker("train-world", "train", env, root).wait_ready()
    client = kit.client(env)
    yield {"env": env, "root": root, "worker": worker, "client": client}
    client.close()


def test_world_job_builds_a_world_stage_by_stage_and_publishes_it(deployed, kit):
    env, client = deployed["env"], deployed["client"]
    registry = deployed["root"] / "registry"
    job = kit.submitted(kit.cli(env, "submit", "world", *SMALL, "--publish", "built", "--registry", str(registry)))
    seen: set[str] = set()

    def finished() -> bool:
        st = client.status(job)
        if st.detail.get("stage"):
            seen.add(st.detail["stage"])
        return st.terminal

    kit.wait_for(finished, "the world job", timeout=300)
    st = client.status(job)
    assert st.state == "SUCCESS", st.to_json()
    assert st.done == st.total == 4 + 4 + 4 + 1
    world = Path(env["GENIE_JOBS_DIR"]) / job / "world"  # no --out: GENIE_JOBS_DIR/<job>/world
    assert st.result["world"] == str(world)
    for name in ("world.json", "dynamics/model.safetensors", "eval/report.json", "actions.json", "build.json"):
        assert (world / name).is_file(), name
    assert len(st.result["action_names"]) == 4 and st.result["eval"]["tokenizer"]["psnr"] > 0
    assert seen & {"tokenizer", "lam", "dynamics", "eval"}  # status named the stage while it ran
    for kind in ("tokenizer", "lam", "dynamics"):
        stage = AsyncResult(stage_id(job, kind), app=client.app)
        assert stage.state == "SUCCESS" and stage.result["step"] == 4
    # train -> publish -> play, no hands: the job's world is the catalogue's first version, and a gateway on the
    # catalogue opens a session on it
    catalog = DirectoryCatalog(registry)
    (entry,) = catalog.versions("built")
    assert st.result["published"]["ref"] == entry.ref == "built@1" and entry.source == f"job {job}"
    assert entry.digest == world_digest(file_digests(world))
    assert asyncio.run(_first_frame(registry, world)).world == "built@1"


async def _first_frame(registry: Path, world: Path):
    token = "alice-token-0123456789"
    cfg = GatewayConfig(registry=str(registry), grpc_port=0, http_port=-1, metrics_port=-1, tokens=f"alice:{token}")
    gw = Gateway(cfg, store=MemoryStore())
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, token) as alice:
            return (await alice.open(image=load_prompts(world)[0].read_bytes(), world="built")).session
    finally:
        await gw.stop()


def test_cancel_mid_build_then_resubmit_resumes(deployed, tmp_path, kit):
    env, client = deployed["env"], deployed["client"]
    runs = tmp_path / "runs"
    long = [*SMALL, "--set", "train_dynamics.steps=100000", "--set", "train_dynamics.ckpt_every=1000",
            "--run-root", str(runs), "--out", str(tmp_path / "world")]
    job = kit.submitted(kit.cli(env, "submit", "world", *long))
    kit.wait_for(lambda: client.status(job).detail.get("stage") == "dynamics" and client.status(job).done >= 4 + 4 + 2,
              "the dynamics stage to train a few steps")
    client.cancel(job)
    st = client.wait(job, timeout=60)
    assert st.state == "CANCELLED", st.to_json()
    reached = int(latest_checkpoint(runs / "dynamics").name.split("_")[1])
    assert reached >= 2 and not (tmp_path / "world").exists()  # stopped with a checkpoint, before export

    short = [a.replace("steps=100000", f"steps={reached + 2}") for a in long]
    again = kit.submitted(kit.cli(env, "submit", "world", *short))
    st = client.wait(again, timeout=300)
    assert st.state == "SUCCESS", st.to_json()
    dyn = AsyncResult(stage_id(again, "dynamics"), app=client.app).result
    assert dyn["resumed_from"] == reached and dyn["step"] == reached + 2
    tok = AsyncResult(stage_id(again, "tokenizer"), app=client.app).result
    assert tok["resumed_from"] == 4 and tok["losses"] == []  # already trained: nothing retrained
    assert (tmp_path / "world" / "build.json").is_file()


def _write_clips(path: Path, size: int) -> None:
    writer = ShardWriter(path)
    rng = np.random.default_rng(0)
    for _ in range(3):
        writer.add(rng.integers(0, 255, (12, size, size, 3), dtype=np.uint8), None, {})
    writer.close({})


def test_a_failing_stage_fails_the_job_and_says_which(deployed, tmp_path, kit):
    env, client = deployed["env"], deployed["client"]
    data = tmp_path / "clips"
    _write_clips(data, 16)
    # Hold the worker with a long job so the world job waits in the queue; its data disappears meanwhile.
    blocker = kit.submitted(kit.cli(env, "submit", "train", "lam", "--preset", "tiny", "--set", "train_lam.steps=100000",
                              "--set", "train_lam.ckpt_every=1000"))
    kit.wait_for(lambda: client.status(blocker).state == "PROGRESS", "the blocking job to start")
    job = kit.submitted(kit.cli(env, "submit", "world", *SMALL, "--data", str(data)))
    shutil.rmtree(data)
    _write_clips(data, 32)  # replaced by 32x32 clips: the config the job was checked with expects 16x16
    client.cancel(blocker)
    st = client.wait(job, timeout=120)
    assert st.state == "FAILURE", st.to_json()
    assert st.error.startswith("tokenizer stage: ValueError") and "expects (16, 16, 3)" in st.error, st.error
    shown = kit.cli(env, "status", job)
    assert "FAILURE" in shown.stdout and "tokenizer stage" in shown.stdout


def test_bad_world_jobs_are_rejected_before_queueing(deployed, kit, tmp_path):
    env = deployed["env"]
    before = kit.queue_lengths()
    bad = kit.cli(env, "submit", "world", "--preset", "tiny", "--data", str(tmp_path / "missing"))
    assert bad.exit_code == 2 and "is not a dataset directory" in bad.stderr
    other = kit.cli(env, "submit", "world", "--preset", "tiny", "--eval-data", str(tmp_path))
    assert other.exit_code == 2 and "--eval-data needs --data" in other.stderr
    named = kit.cli(env, "submit", "world", "--preset", "tiny", "--publish", "Not A Name")
    assert named.exit_code == 2 and "a world name is" in named.stderr
    assert kit.queue_lengths() == before
