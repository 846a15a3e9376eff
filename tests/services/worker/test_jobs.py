"""Jobs on real workers (one per queue, as deployed): training to a checkpoint, a rollout with every output and a
manifest, cancel, status with a progress bar, worker metrics; bad arguments rejected before anything is queued."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis

from genie.train.checkpoint import latest_checkpoint, list_checkpoints
from services.worker.specs import RolloutJobSpec
from tests.own_redis import OwnRedis

PROMPTS = ("0", "1", "2")
ACTIONS = ("0,1,2,3,3,2", "random:5")


@pytest.fixture(scope="module")
def deployed(kit, tmp_path_factory):
    """A train worker and a rollout worker sharing GENIE_JOBS_DIR, as the chart runs them."""
    root = tmp_path_factory.mktemp("jobs")
    env = kit.env(root / "jobs")
    train = kit.worker("train", "train", env, root)
    rollout = kit.worker("rollout", "rollout", {**env, "GENIE_WORKER_METRICS_PORT": str(kit.port())}, root)
    train.wait_ready()
    rollout.wait_ready()
    client = kit.client(env)
    yield {"env": env, "root": root, "train": train, "rollout": rollout, "client": client}
    client.close()


def test_train_job_runs_to_a_checkpoint(deployed, kit):
    env, client = deployed["env"], deployed["client"]
    job = kit.submitted(kit.cli(env, "submit", "train", "tokenizer", "--preset", "tiny", "--set", "train_tokenizer.steps=20",
                          "--set", "train_tokenizer.ckpt_every=10"))
    st = client.wait(job, timeout=120)
    assert st.state == "SUCCESS", st.to_json()
    result = st.result
    assert result["step"] == 20 and result["resumed_from"] == 0 and len(result["losses"]) == 20
    run_dir = Path(env["GENIE_JOBS_DIR"]) / job / "tokenizer"  # no --run-root: GENIE_JOBS_DIR/<job id>
    assert Path(result["checkpoint"]) == latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step_00000020"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000010", "step_00000020"]
    shown = kit.cli(env, "status", job)
    assert shown.exit_code == 0 and "SUCCESS" in shown.stdout and "[" + "#" * 30 + "] 20/20 100%" in shown.stdout


def test_dynamics_job_uses_the_run_roots_tokenizer_and_lam(deployed, trained_run, tmp_path, kit):
    env, client = deployed["env"], deployed["client"]
    for kind in ("tokenizer", "lam"):
        shutil.copytree(trained_run / kind / "checkpoints", tmp_path / kind / "checkpoints")
    job = kit.submitted(kit.cli(env, "submit", "train", "dynamics", "--preset", "tiny", "--run-root", str(tmp_path),
                          "--set", "train_dynamics.steps=4"))
    st = client.wait(job, timeout=120)
    assert st.state == "SUCCESS", st.to_json()
    assert st.result["step"] == 4 and latest_checkpoint(tmp_path / "dynamics").name == "step_00000004"


def test_rollout_job_writes_every_output_and_a_manifest(deployed, trained_world_dir, tmp_path, kit):
    env, client = deployed["env"], deployed["client"]
    args = ["submit", "rollout", "--chunk-size", "2", "--seed", "7", "--out", str(tmp_path / "out")]
    for p in PROMPTS:
        args += ["--prompt", p]
    for a in ACTIONS:
        args += ["--actions", a]
    job = kit.submitted(kit.cli(env, *args))
    st = client.wait(job, timeout=120)
    assert st.state == "SUCCESS", st.to_json()
    assert st.done == st.total == 6 and st.result["items"] == 6

    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 6 and [e["name"] for e in manifest["items"]] == [f"item_{i:05d}" for i in range(6)]
    assert sorted(p.name for p in (out / "items").iterdir()) == [f"item_{i:05d}" for i in range(6)]  # no .tmp leftovers
    spec = RolloutJobSpec.from_json(json.loads((out / "spec.json").read_text()))
    for entry, item in zip(manifest["items"], spec.items(), strict=True):
        assert (entry["prompt"], tuple(entry["actions"]), entry["seed"]) == (item.prompt, item.actions, 7 + item.index)
        for f in entry["files"].values():
            assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
        frames = np.load(out / entry["files"]["frames.npy"]["path"])
        tokens = np.load(out / entry["files"]["tokens.npy"]["path"])
        assert frames.shape == (1 + len(item.actions), 16, 16, 3) and frames.dtype == np.uint8
        assert tokens.shape == (1 + len(item.actions), 16) and tokens.dtype == np.int32
    # Deterministic given the seeds: the same as a rollout (`genie rollout`'s path) run here in process.
    expected = asyncio.run(_reference(trained_world_dir, spec.items()[5]))
    assert np.array_equal(np.load(out / "items/item_00005/frames.npy"), expected.frames)
    assert np.array_equal(np.load(out / "items/item_00005/tokens.npy"), expected.tokens)


async def _reference(world_dir, item):
    from genie.media import load_image
    from services.backends.inprocess import InProcessBackend
    from services.rollout import rollout_trace

    backend = InProcessBackend(world_dir)
    await backend.start()
    try:
        prompt = load_image(Path(item.prompt), 16, 16)[None]
        return await rollout_trace(backend, prompt, item.actions, item.seed)
    finally:
        await backend.close()


def test_cancel_running_and_queued_jobs(deployed, kit):
    env, client = deployed["env"], deployed["client"]
    long = ["submit", "train", "lam", "--preset", "tiny", "--set", "train_lam.steps=100000", "--set", "train_lam.ckpt_every=1000"]
    running = kit.submitted(kit.cli(env, *long))
    queued = kit.submitted(kit.cli(env, *long))
    kit.wait_for(lambda: client.status(running).done >= 3, "the first job to train a few steps")
    assert kit.cli(env, "cancel", queued).stdout.split()[2] == "CANCELLED"  # never started: dropped when taken
    assert client.status(running).state == "PROGRESS"
    cancelling = kit.cli(env, "cancel", running)
    assert cancelling.exit_code == 0 and cancelling.stdout.split()[2] in ("CANCELLING", "CANCELLED")

    st = client.wait(running, timeout=60)
    assert st.state == "CANCELLED" and 3 <= st.done < 100000
    # It stopped with a checkpoint at the step it reached, so resubmitting with the same run root continues from there.
    run_dir = Path(env["GENIE_JOBS_DIR"]) / running / "lam"
    assert latest_checkpoint(run_dir).name == f"step_{st.done:08d}"
    assert client.wait(queued, timeout=60).state == "CANCELLED"
    kit.wait_for(lambda: client.store.lease_holder(queued) is None and deployed["train"].log_text().count("cancelled at") == 2,
              "the queued job to be taken and dropped")
    assert not (Path(env["GENIE_JOBS_DIR"]) / queued).exists()  # it never trained
    shown = kit.cli(env, "status", running)
    assert "CANCELLED" in shown.stdout


def test_cancel_a_rollout_mid_way(deployed, trained_world_dir, tmp_path, kit):
    client = deployed["client"]
    prompt = str(trained_world_dir / "prompts" / "00.png")
    spec = RolloutJobSpec((prompt,) * 6, (tuple(i % 4 for i in range(60)),), chunk_size=1, parallel=1, out=str(tmp_path))
    job = client.submit_rollout(spec, trained_world_dir)
    kit.wait_for(lambda: len(list((tmp_path / "items").glob("item_*"))) >= 1, "a first item")
    client.cancel(job)
    st = client.wait(job, timeout=60)
    assert st.state == "CANCELLED" and 1 <= st.done < 6, st.to_json()
    kit.wait_for(lambda: client.status(job).worker is None and deployed["rollout"].log_text().count("cancelled at") >= 6 - st.done,
              "the remaining chunks to be dropped")
    assert 1 <= len(list((tmp_path / "items").iterdir())) < 6 and not (tmp_path / "manifest.json").exists()


def test_a_job_failing_on_the_worker_reports_why(deployed, trained_world_dir, tmp_path, kit):
    env, client = deployed["env"], deployed["client"]
    prompt = tmp_path / "prompt.png"
    shutil.copy(trained_world_dir / "prompts" / "00.png", prompt)
    spec = RolloutJobSpec((str(prompt),), ((0, 1),), out=str(tmp_path / "out"))
    job = client.submit_rollout(spec, trained_world_dir)  # valid when submitted...
    prompt.unlink()  # ...gone when the worker gets to it (the race only makes the test stricter: it must fail either way)
    st = client.wait(job, timeout=60)
    assert st.state == "FAILURE" and "prompt" in st.error, st.to_json()
    shown = kit.cli(env, "status", job)
    assert shown.exit_code == 0 and "FAILURE" in shown.stdout


def test_bad_arguments_are_rejected_before_queueing(deployed, kit, trained_run, tmp_path):
    env = deployed["env"]
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a PNG")
    other = tmp_path / "other"
    shutil.copytree(trained_run / "tokenizer" / "checkpoints", other / "tokenizer" / "checkpoints")
    before = kit.queue_lengths()
    records = set(kit.redis.keys("genie:jobs:v1:job:*"))
    cases = [
        (["submit", "train", "tokenizer", "--preset", "tiny", "--set", "tokenizer.nope=1"], "no such setting"),
        (["submit", "train", "tokenizer", "--preset", "nope"], "unknown preset"),
        (["submit", "train", "tokenizer", "--preset", "tiny", "--set", "train_tokenizer.steps=0"], "steps"),
        (["submit", "train", "dynamics", "--preset", "tiny"], "dynamics needs a trained tokenizer"),
        (["submit", "train", "dynamics", "--preset", "tiny", "--run-root", str(other)], "no lam checkpoint"),
        (["submit", "train", "tokenizer", "--preset", "tiny", "--run-root", str(other), "--set", "tokenizer.encoder.dim=64"],
         "different tokenizer config"),
        (["submit", "train", "lam", "--preset", "tiny", "--set", "data.source=shards", "--set", f"data.path={tmp_path / 'no'}"],
         "not a dataset directory"),
        (["submit", "rollout", "--prompt", str(tmp_path / "missing.png"), "--actions", "0"], "does not exist"),
        (["submit", "rollout", "--prompt", str(not_image), "--actions", "0"], "cannot read the prompt image"),
        (["submit", "rollout", "--prompt", "0", "--actions", "0,9"], "out of range"),
        (["submit", "rollout", "--prompt", "99", "--actions", "0"], "out of range"),
        (["submit", "rollout", "--prompt", "0", "--actions", "left,right"], "comma-separated integers"),
        (["submit", "rollout", "--prompt", "0", "--actions", "0", "--chunk-size", "0"], "chunk_size"),
        (["submit", "rollout", "--world", str(tmp_path), "--prompt", "0", "--actions", "0"], "not a world directory"),
        (["status", "no-such-job"], "no job"),
        (["cancel", "no-such-job"], "no job"),
    ]
    for args, message in cases:
        result = kit.cli(env, *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (args, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
    assert kit.queue_lengths() == before == {"train": 0, "rollout": 0}
    assert set(kit.redis.keys("genie:jobs:v1:job:*")) == records


def test_python_api_validates_too(deployed, trained_world_dir):
    from services.worker.jobs import submit_rollout

    spec = RolloutJobSpec(prompts=(str(trained_world_dir / "prompts" / "00.png"),), actions=((0, 7),))
    with pytest.raises(ValueError, match=r"actions \[7\] are out of range"):
        submit_rollout(spec, deployed["client"].settings, world_dir=trained_world_dir)
    with pytest.raises(ValueError, match="at least one prompt"):
        RolloutJobSpec(prompts=(), actions=((0,),))


def test_worker_metrics_count_tasks(deployed):
    train = _scrape(deployed["train"].metrics_port)
    rollout = _scrape(deployed["rollout"].metrics_port)
    assert train['genie_worker_tasks_total{state="SUCCESS",task="genie.train"}'] >= 2
    assert train['genie_worker_tasks_total{state="CANCELLED",task="genie.train"}'] == 2
    assert train['genie_worker_train_steps_total{kind="tokenizer"}'] == 20
    assert train['genie_worker_task_seconds_count{task="genie.train"}'] >= 4
    assert rollout['genie_worker_tasks_total{state="SUCCESS",task="genie.rollout.chunk"}'] >= 3
    assert rollout['genie_worker_tasks_total{state="CANCELLED",task="genie.rollout.chunk"}'] >= 1
    assert rollout['genie_worker_tasks_total{state="FAILURE",task="genie.rollout.chunk"}'] == 1
    assert rollout['genie_worker_tasks_total{state="SUCCESS",task="genie.rollout.manifest"}'] == 1
    assert rollout["genie_worker_rollout_items_total"] >= 7
    assert 'genie_worker_job_progress{task="genie.rollout.chunk"}' in rollout


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_a_rollout_onto_a_full_disk_fails_naming_it_at_once_and_runs_when_there_is_space(deployed, small_disk, kit):
    env, client = deployed["env"], deployed["client"]
    disk = small_disk("1m")
    disk.fill()
    args = ["submit", "rollout", "--seed", "7", "--out", str(disk.path / "out"), "--prompt", "0", "--actions", "0,1,2"]
    job = kit.submitted(kit.cli(env, *args))
    st = client.wait(job, timeout=60)
    assert st.state == "FAILURE" and "no space left" in st.error, st.to_json()
    # Failed, not retried: a full disk is not an outage that waiting fixes (OSErrors otherwise retry with backoff).
    logs = deployed["train"].log_text() + deployed["rollout"].log_text()
    assert not [line for line in logs.splitlines() if job in line and "retry" in line.lower()]
    assert disk.leftovers() == []
    disk.free()
    job = kit.submitted(kit.cli(env, *args))
    st = client.wait(job, timeout=120)
    assert st.state == "SUCCESS" and st.result["items"] == 1, st.to_json()


def test_submitting_to_a_full_broker_is_one_line_and_queues_nothing(tmp_path, kit):
    own = OwnRedis(tmp_path, "--save", "", "--appendonly", "no", "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    own.start()
    try:
        own.fill()
        env = kit.env(tmp_path / "jobs", GENIE_BROKER_URL=f"{own.url[:-2]}/1")
        result = kit.cli(env, "submit", "train", "lam", "--preset", "tiny")
        assert result.exit_code == 2 and result.output.count("error: ") == 1, result.output
        assert "is full" in result.output and "maxmemory" in result.output and "Traceback" not in result.output
        broker_db = redis.Redis(port=own.port, db=1)
        assert broker_db.dbsize() == 0  # nothing queued, no job record
        broker_db.close()
    finally:
        own.stop()


# After test_worker_metrics_count_tasks, whose counts of rollout tasks this test's jobs would change.
def test_a_rollout_job_pins_a_catalogue_version_and_records_its_digest(deployed, trained_world_dir, tmp_path, kit):
    from genie.catalog import DirectoryCatalog

    env, client = deployed["env"], deployed["client"]
    catalog = DirectoryCatalog(tmp_path / "registry")
    v1 = catalog.publish(trained_world_dir, "tiny")
    args = ["submit", "rollout", "--world-ref", "tiny", "--registry", str(catalog.root), "--prompt", "0",
            "--actions", "1,2,3", "--seed", "7"]
    job = kit.submitted(kit.cli(env, *args, "--out", str(tmp_path / "out")))
    st = client.wait(job, timeout=120)
    assert st.state == "SUCCESS", st.to_json()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["spec"]["world_ref"], manifest["spec"]["world_digest"]) == ("tiny@1", v1.digest)
    item = RolloutJobSpec.from_json(manifest["spec"]).items()[0]
    expected = asyncio.run(_reference(trained_world_dir, item))  # the version is the world it was published from
    assert np.array_equal(np.load(tmp_path / "out" / "items/item_00000/frames.npy"), expected.frames)

    (v1.path / "notes.txt").write_text("a file added after publishing")
    job = kit.submitted(kit.cli(env, *args[:-2], "--seed", "8", "--out", str(tmp_path / "again")))
    st = client.wait(job, timeout=120)
    assert st.state == "FAILURE" and "no longer has the digest" in st.error, st.to_json()
    for bad, message in ((["--world-ref", "tiny"], "needs a catalogue"),
                         (["--world-ref", "nope", "--registry", str(catalog.root)], "never published"),
                         (["--world-ref", "tiny", "--registry", str(catalog.root), "--world", str(trained_world_dir)],
                          "not both")):
        result = kit.cli({k: v for k, v in env.items() if k != "GENIE_REGISTRY"}, "submit", "rollout", *bad,
                         "--prompt", "0", "--actions", "0")
        assert result.exit_code == 2 and message in result.stderr, (bad, result.stderr)
