"""Workers that die mid-job: SIGKILL leaves the message unacknowledged, Redis hands it to a new worker after the
(short, here) visibility timeout, and the job finishes from its checkpoint / the items already on disk, with nothing
duplicated or missing. SIGTERM hands a running job on at once, from a checkpoint taken at that step."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.request
from pathlib import Path

import pytest

from genie.config import apply_overrides
from genie.presets import tiny
from genie.train.checkpoint import latest_checkpoint, list_checkpoints
from services.worker.specs import RolloutJobSpec, TrainJobSpec, chunk_id

# Each delivery may run 4 s (3.6 s before it hands on); Redis redelivers an unacknowledged message after 5 s; a
# killed worker's claim on its job lapses after 2 s.
FAST_REDELIVERY = {"GENIE_TASK_TIME_LIMIT": "4", "GENIE_VISIBILITY_TIMEOUT": "5", "GENIE_JOB_LEASE_TTL": "2"}
STEPS = 60


@pytest.fixture
def env(kit, tmp_path):
    """Each test starts from an empty DB 3 and stops its workers, so none takes the next test's jobs."""
    kit.flush()
    yield kit.env(tmp_path / "jobs", **FAST_REDELIVERY)
    kit.stop_all()


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _resumes(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"resuming lam from \S+ \(step (\d+)\)", log)]


def _train_spec(run_root: Path, ckpt_every: int) -> TrainJobSpec:
    world = apply_overrides(tiny(), [f"train_lam.steps={STEPS}", f"train_lam.ckpt_every={ckpt_every}",
                                     "train_lam.keep_checkpoints=3"])
    return TrainJobSpec("lam", world, run_root=str(run_root))


def test_sigkill_mid_training_resumes_from_checkpoint_on_a_new_worker(kit, env, tmp_path):
    first = kit.worker("train-a", "train", env, tmp_path).wait_ready()
    client = kit.client(env)
    run = tmp_path / "run"
    job = client.submit_train(_train_spec(run, ckpt_every=5))
    kit.wait_for(lambda: len(list_checkpoints(run / "lam")) >= 2, "two checkpoints")
    first.kill()
    killed_at = int(latest_checkpoint(run / "lam").name.split("_")[1])
    assert 0 < killed_at < STEPS, "the job finished before it could be killed; raise STEPS"
    assert kit.redis.hlen("unacked") == 1  # the message it held, not acknowledged

    second = kit.worker("train-b", "train", {**env, "GENIE_WORKER_METRICS_PORT": str(kit.port())}, tmp_path).wait_ready()
    st = client.wait(job, timeout=90)
    assert st.state == "SUCCESS", st.to_json()
    assert st.result["step"] == STEPS and st.result["checkpoint"].endswith(f"step_{STEPS:08d}")
    resumes = _resumes(second.log_text())
    assert resumes and resumes[0] >= killed_at > 0, (resumes, killed_at)  # resumed from the kill's checkpoint
    # No step ran twice on the new worker: it trained exactly from that checkpoint to the end, across its deliveries.
    assert _metric(second.metrics_port, 'genie_worker_train_steps_total{kind="lam"}') == STEPS - resumes[0]
    names = [p.name for p in list_checkpoints(run / "lam")]
    assert names == sorted(set(names)) and names[-1] == f"step_{STEPS:08d}" and len(names) <= 3
    assert not list((run / "lam" / "checkpoints").glob(".tmp-*"))
    assert kit.redis.hlen("unacked") == 0 and kit.queue_lengths() == {"train": 0, "rollout": 0}


def test_sigkill_mid_rollout_leaves_no_duplicate_or_missing_outputs(kit, env, tmp_path, trained_world_dir):
    first = kit.worker("rollout-a", "rollout", env, tmp_path).wait_ready()
    client = kit.client(env)
    out = tmp_path / "out"
    prompts = tuple(str(p) for p in sorted((trained_world_dir / "prompts").glob("*.png"))[:4])
    actions = (tuple(i % 4 for i in range(40)), tuple((3 * i + 1) % 4 for i in range(40)))
    spec = RolloutJobSpec(prompts, actions, seed=3, chunk_size=4, parallel=1, out=str(out))  # 8 items, 2 chunks
    job = client.submit_rollout(spec, trained_world_dir)
    items = out / "items"
    written = lambda: sorted(p.name for p in items.glob("item_*")) if items.is_dir() else []  # noqa: E731
    kit.wait_for(lambda: len(written()) >= 2, "two items on disk")
    first.kill()
    at_kill = {name: (items / name / "frames.npy").stat().st_ino for name in written()}
    assert len(at_kill) < spec.total, "the job finished before it could be killed; lengthen the action sequences"

    second = kit.worker("rollout-b", "rollout", {**env, "GENIE_WORKER_METRICS_PORT": str(kit.port())}, tmp_path).wait_ready()
    st = client.wait(job, timeout=90)
    assert st.state == "SUCCESS", st.to_json()
    expected = [f"item_{i:05d}" for i in range(spec.total)]
    assert sorted(p.name for p in items.iterdir()) == expected  # every item once, no temporary leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["name"] for e in manifest["items"]] == expected
    for entry in manifest["items"]:
        for f in entry["files"].values():
            assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    # Items written before the kill were kept, and the new worker generated exactly the others, each once.
    assert all((items / name / "frames.npy").stat().st_ino == ino for name, ino in at_kill.items())
    assert _metric(second.metrics_port, "genie_worker_rollout_items_total") == spec.total - len(at_kill)
    for k in range(spec.num_chunks):
        chunk = client.app.AsyncResult(chunk_id(job, k)).result
        assert chunk["skipped"] + chunk["written"] == len(chunk["items"]) == 4, chunk
    assert kit.redis.hlen("unacked") == 0 and kit.queue_lengths() == {"train": 0, "rollout": 0}


def test_sigterm_hands_a_running_job_on_without_waiting_for_redelivery(kit, env, tmp_path):
    first = kit.worker("train-c", "train", env, tmp_path).wait_ready()
    client = kit.client(env)
    run = tmp_path / "run"
    job = client.submit_train(_train_spec(run, ckpt_every=1000))  # no periodic checkpoint: only the handoff's
    kit.wait_for(lambda: client.status(job).done >= 5, "a few steps")
    assert first.stop() == 0
    handed_at = int(latest_checkpoint(run / "lam").name.split("_")[1])
    assert 5 <= handed_at < STEPS
    assert kit.redis.hlen("unacked") == 0 and kit.queue_lengths()["train"] == 1  # acked; its continuation is queued

    second = kit.worker("train-d", "train", {**env, "GENIE_WORKER_METRICS_PORT": str(kit.port())}, tmp_path).wait_ready()
    st = client.wait(job, timeout=90)
    assert st.state == "SUCCESS" and st.result["step"] == STEPS, st.to_json()
    assert _resumes(second.log_text())[0] == handed_at
