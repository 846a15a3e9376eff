"""Job specs as JSON task arguments, worker settings from the environment, and the Redis leases, without a worker."""

from __future__ import annotations

import time

import pytest

from genie.config import apply_overrides
from genie.presets import tiny
from services.worker.settings import WorkerSettings, celery_config
from services.worker.specs import RolloutJobSpec, TrainJobSpec, chunk_id
from services.worker.store import JobStore


def test_train_spec_round_trips_as_json_and_rejects_bad_fields():
    spec = TrainJobSpec("dynamics", apply_overrides(tiny(), ["train_dynamics.steps=7"]), run_root="/runs/a", lam="/ckpt/lam")
    assert TrainJobSpec.from_json(spec.to_json()) == spec and spec.steps == 7
    with pytest.raises(ValueError, match="unknown keys"):
        TrainJobSpec.from_json({**spec.to_json(), "extra": 1})
    with pytest.raises(ValueError, match="'threads' must be int"):
        TrainJobSpec.from_json({**spec.to_json(), "threads": "2"})
    with pytest.raises(ValueError, match="unknown model kind"):
        TrainJobSpec("vae")
    with pytest.raises(ValueError, match="dynamics training only"):
        TrainJobSpec("lam", tokenizer="/ckpt/tok")


def test_kubernetes_train_spec_fields_round_trip_and_are_checked():
    spec = TrainJobSpec("tokenizer", tiny(), backend="kubernetes", nodes=4)
    assert TrainJobSpec.from_json(spec.to_json()) == spec and spec.processes == 4
    assert TrainJobSpec("lam", backend="kubernetes", nodes=2, gpus_per_node=8).processes == 16
    with pytest.raises(ValueError, match="need --backend kubernetes"):
        TrainJobSpec("lam", nodes=2)
    with pytest.raises(ValueError, match="nodes must be >= 1"):
        TrainJobSpec("lam", backend="kubernetes", nodes=0)
    with pytest.raises(ValueError, match="unknown training backend"):
        TrainJobSpec("lam", backend="slurm")
    old = {k: v for k, v in spec.to_json().items() if k not in ("backend", "nodes", "gpus_per_node")}
    assert TrainJobSpec.from_json(old).backend == "local"  # specs queued before these fields still parse


def test_kubernetes_jobs_are_checked_before_queueing():
    from services.worker.jobs import check_train_spec

    with pytest.raises(ValueError, match="does not divide by world size 3"):
        check_train_spec(TrainJobSpec("tokenizer", tiny(), backend="kubernetes", nodes=3))  # batch 8
    with pytest.raises(ValueError, match="does not divide by world size 6"):  # 2 pods x 3 GPUs = 6 processes
        check_train_spec(TrainJobSpec("tokenizer", tiny(), backend="kubernetes", nodes=2, gpus_per_node=3))
    check_train_spec(TrainJobSpec("tokenizer", tiny(), backend="kubernetes", nodes=2))
    check_train_spec(TrainJobSpec("tokenizer", tiny(), backend="kubernetes", nodes=2, gpus_per_node=4))


def test_world_spec_round_trips_and_resolves_its_dirs(tmp_path):
    from services.worker.specs import WorldJobSpec, stage_id

    spec = WorldJobSpec(apply_overrides(tiny(), ["train_lam.steps=3"]), eval_clips=8)
    assert WorldJobSpec.from_json(spec.to_json()) == spec
    assert spec.stage_steps == {"tokenizer": 200, "lam": 3, "dynamics": 200} and spec.total == 404
    resolved = spec.resolved(tmp_path / "job")
    assert (resolved.out, resolved.run_root) == (str(tmp_path / "job" / "world"), str(tmp_path / "job" / "runs"))
    assert resolved.train_spec("lam").run_root == resolved.run_root and resolved.train_spec("lam").steps == 3
    assert stage_id("abc", "lam") == "abc-lam"
    with pytest.raises(ValueError, match="must be >= 0"):
        WorldJobSpec(eval_clips=-1)


def test_rollout_spec_items_seeds_and_chunks():
    spec = RolloutJobSpec(("a.png", "b.png", "c.png"), ((0, 1), (2,)), seed=10, chunk_size=4)
    assert RolloutJobSpec.from_json(spec.to_json()) == spec
    items = spec.items()
    assert [(i.prompt, i.actions, i.seed, i.name) for i in items[:3]] == [
        ("a.png", (0, 1), 10, "item_00000"), ("a.png", (2,), 11, "item_00001"), ("b.png", (0, 1), 12, "item_00002")]
    assert spec.total == 6 and spec.num_chunks == 2
    assert [i.index for i in spec.chunk(0)] == [0, 1, 2, 3] and [i.index for i in spec.chunk(1)] == [4, 5]
    assert chunk_id("job1", 1) == "job1-chunk-0001"
    for bad, message in [({"actions": [[0, True]]}, "lists of integers"), ({"actions": [[]]}, "non-empty"),
                         ({"chunk_size": 0}, "chunk_size"), ({"prompts": "a.png"}, "'prompts' must be list")]:
        with pytest.raises(ValueError, match=message):
            RolloutJobSpec.from_json({**spec.to_json(), **bad})


def test_settings_from_env_keep_the_visibility_timeout_above_the_time_limit():
    s = WorkerSettings.from_env({})
    assert (s.broker_url, s.backend_url, s.jobs_dir, s.metrics_port) == ("redis://127.0.0.1:6379/1",) * 2 + ("runs/jobs", 9100)
    assert s.visibility > s.task_time_limit and s.soft_deadline_s < s.task_time_limit
    s = WorkerSettings.from_env({"GENIE_TASK_TIME_LIMIT": "7200", "GENIE_RESULT_BACKEND": "redis://h:6379/2"})
    assert s.visibility == 7200 + 1800 and s.backend_url == "redis://h:6379/2" and s.store_url == s.broker_url
    with pytest.raises(ValueError, match="must exceed GENIE_TASK_TIME_LIMIT"):
        WorkerSettings.from_env({"GENIE_TASK_TIME_LIMIT": "600", "GENIE_VISIBILITY_TIMEOUT": "600"})
    with pytest.raises(ValueError, match="GENIE_WORKER_METRICS_PORT must be an integer"):
        WorkerSettings.from_env({"GENIE_WORKER_METRICS_PORT": "abc"})
    with pytest.raises(ValueError, match="inprocess or triton"):
        WorkerSettings.from_env({"GENIE_ROLLOUT_BACKEND": "onnx"})
    conf = celery_config(WorkerSettings.from_env({"GENIE_VISIBILITY_TIMEOUT": "5000"}))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"] and conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] == 5000 and conf["accept_content"] == ["json"]
    assert {q.name for q in conf["task_queues"]} == {"train", "rollout"}


def test_a_lease_is_exclusive_renewed_while_held_and_lapses_when_its_holder_dies(broker_url):
    store = JobStore(broker_url)
    store.redis.delete("genie:jobs:v1:lease:t1")
    lease = store.lease("t1", "worker-a", ttl=1)
    assert lease is not None and store.lease("t1", "worker-b", ttl=1) is None
    time.sleep(1.5)  # longer than the ttl: the holder's renewals keep it
    assert store.lease_holder("t1") == "worker-a"
    lease.release()
    assert store.lease_holder("t1") is None
    dead = store.lease("t1", "worker-c", ttl=1)
    dead._stop.set()  # its renewer stops, as when the process is killed
    assert store.lease_holder("t1") == "worker-c"
    time.sleep(1.3)
    assert store.lease_holder("t1") is None and store.lease("t1", "worker-d", ttl=1) is not None
    store.redis.delete("genie:jobs:v1:lease:t1")
    store.close()


def test_tasks_ack_late_retry_transient_errors_with_backoff_and_route_to_their_queues():
    from services.backends.backend import BackendUnavailable
    from services.worker.app import app

    chunk = app.tasks["genie.rollout.chunk"]
    assert BackendUnavailable in chunk.autoretry_for and OSError in chunk.autoretry_for
    assert chunk.retry_backoff and chunk.retry_jitter and chunk.max_retries == 5
    assert chunk.retry_backoff_max < app.conf.broker_transport_options["visibility_timeout"]  # a retry's ETA never outlives it
    assert ValueError not in app.tasks["genie.train"].autoretry_for  # bad specs and diverged runs fail for good
    assert app.conf.task_acks_late and app.conf.task_serializer == "json"
    router = app.amqp.router
    assert router.route({}, "genie.train")["queue"].name == "train"
    rollout_tasks = ("genie.rollout", "genie.rollout.chunk", "genie.rollout.manifest")
    assert {router.route({}, name)["queue"].name for name in rollout_tasks} == {"rollout"}


def test_rollout_workers_reach_triton_over_tls_when_the_env_says_so(tmp_path):
    from services.backends.factory import triton_tls
    from services.worker.tasks import rollout_backend_config

    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")  # only its path travels here; tritonclient reads it on connect

    plain = rollout_backend_config(WorkerSettings.from_env({"GENIE_ROLLOUT_BACKEND": "triton"}), "worlds/demo")
    assert plain.backend == "triton" and triton_tls(plain) is None
    env = {"GENIE_ROLLOUT_BACKEND": "triton", "GENIE_TRITON_CA": str(ca),
           "GENIE_ROLLOUT_DEVICE": "cpu", "GENIE_ROLLOUT_PRECISION": "fp32"}
    cfg = rollout_backend_config(WorkerSettings.from_env(env), "worlds/demo")
    tls = triton_tls(cfg)
    assert tls is not None and tls.ca == str(ca) and (cfg.device, cfg.precision) == ("cpu", "fp32")
    assert WorkerSettings.from_env({"GENIE_TRITON_TLS": "1"}).triton_tls and not WorkerSettings.from_env({}).triton_tls
