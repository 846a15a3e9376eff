"""The job tasks: `genie.train`, `genie.agent`, `genie.reactive`, `genie.finetune` and `genie.expert` (queue train);
`genie.world` (queue train), which becomes a chain of three `genie.train` stages and `genie.world.finish`; and
`genie.rollout` (queue rollout), which splits into a chord of `genie.rollout.chunk` tasks and a final
`genie.rollout.manifest`. Thin: they parse JSON specs, call genie.train, genie.agent or
the rollout path over the shared model-backend interface, and return JSON summaries."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis
from celery import chain, chord

from genie.config import MODEL_KINDS, write_json_atomic
from genie.diskfull import fails_when_disk_full
from services.backends.backend import BackendCredentialsRejected, BackendUnavailable
from services.worker.celery_app import app, settings
from services.worker.metrics import METRICS
from services.worker.outputs import (
    build_manifest,
    item_done,
    missing_items,
    remove_partial_items,
    write_item,
)
from services.worker.runtime import PROGRESS, Execution, JobTask, once, runner
from services.worker.settings import WorkerSettings
from services.worker.specs import (
    AgentJobSpec,
    ExpertJobSpec,
    FinetuneJobSpec,
    ReactiveJobSpec,
    RolloutItem,
    RolloutJobSpec,
    TrainJobSpec,
    WorldJobSpec,
    chunk_id,
    resolve_dir,
    stage_id,
)

log = logging.getLogger(__name__)
# OSErrors retry with backoff; a full disk does not (fails_when_disk_full turns it into DiskFull, not an OSError).
_TRANSIENT = (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_RETRY = {"retry_backoff": True, "retry_backoff_max": min(600, settings.visibility // 2), "retry_jitter": True,
          "max_retries": 5}


class IncompleteRollout(Exception):
    """The manifest ran before every item was on disk; it retries until they are."""


@app.task(bind=True, base=JobTask, name="genie.train", autoretry_for=_TRANSIENT, **_RETRY)
@fails_when_disk_full
@once
def train(self: JobTask, spec: dict[str, Any], parent: str | None = None) -> dict[str, Any]:
    """Trains spec.kind under RUN_ROOT/KIND; a redelivery (or a continuation) resumes from the newest checkpoint.
    `parent`: the world job this is a stage of (its cancel flag applies), None for a train job of its own."""
    job_id = parent or self.request.id
    job = TrainJobSpec.from_json(spec)  # ValueError: FAILURE, never retried
    self.cancel_if_requested(job_id, {"done": 0, "total": job.steps})
    with self.execution(job_id, job.steps) as run:
        return _train(run, job, job_id)


def _train(run: Execution, job: TrainJobSpec, job_id: str) -> dict[str, Any]:

    from genie.train.checkpoint import latest_checkpoint, latest_step
    from genie.train.loop import train as run_train

    root = resolve_dir(job.run_root, settings.job_dir(job_id))
    if job.backend == "kubernetes":
        from services.worker.kube import train_on_kubernetes

        return train_on_kubernetes(run, job, job_id, root)  # threads and TensorBoard are the pods' (torchrun_command)
    frozen = {}
    if job.kind == "dynamics":
        frozen = {"tokenizer": Path(job.tokenizer) if job.tokenizer else latest_checkpoint(root / "tokenizer"),
                  "lam": Path(job.lam) if job.lam else latest_checkpoint(root / "lam")}
    total = job.steps
    run.report(latest_step(root / job.kind) or 0, force=True, kind=job.kind, run_dir=str(root / job.kind))

    def on_step(done: int, logs: dict[str, float]) -> bool:
        METRICS.train_steps.labels(job.kind).inc()
        return run.step(done, force=done == total, kind=job.kind, step=done, loss=logs["loss"])

    result = _with_threads(job.threads, lambda: run_train(job.kind, job.world, root / job.kind, frozen=frozen,
                                                          progress=False, tensorboard=job.tensorboard, on_step=on_step))
    summary = {
        "job": job_id, "kind": job.kind, "run_dir": str(root / job.kind), "step": result.step, "total": total,
        "resumed_from": result.resumed_from, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "seconds": round(result.seconds, 3), "loss": result.losses[-1] if result.losses else None,
        "logs": {k: round(v, 6) for k, v in result.logs.items()},
        "losses": result.losses[-1000:],  # this delivery's steps (the newest 1000)
    }
    if run.stopped:
        run.report(result.step, force=True, kind=job.kind, step=result.step, checkpoint=summary["checkpoint"])
        run.end(run.stopped, {"done": result.step, **{k: summary[k] for k in ("kind", "step", "total", "checkpoint", "run_dir")}})
    return summary


@app.task(bind=True, base=JobTask, name="genie.agent", autoretry_for=_TRANSIENT, **_RETRY)
@fails_when_disk_full
@once
def agent(self: JobTask, spec: dict[str, Any]) -> dict[str, Any]:
    """Trains one BC policy (`genie agent train`) in OUT; a redelivery resumes from its newest checkpoint."""
    from genie.agent.train import train_agent

    job_id = self.request.id
    job = AgentJobSpec.from_json(spec)  # ValueError: FAILURE, never retried
    self.cancel_if_requested(job_id, {"done": 0, "total": job.steps})
    out = resolve_dir(job.out, settings.job_dir(job_id))
    with self.execution(job_id, job.steps) as run:
        def on_step(done: int, loss: float) -> bool:
            return run.step(done, force=done == job.steps, target=job.train.target, step=done, loss=loss)

        summary = _with_threads(job.threads, lambda: train_agent(job.train, out, progress=False, on_step=on_step))
        if run.stopped:
            run.end(run.stopped, {"done": summary["step"], "total": job.steps, "run": str(out)})
    return {"job": job_id, **summary, "total": job.steps}


@app.task(bind=True, base=JobTask, name="genie.reactive", autoretry_for=_TRANSIENT, **_RETRY)
@fails_when_disk_full
@once
def reactive(self: JobTask, spec: dict[str, Any]) -> dict[str, Any]:
    """Distils the planner into a reactive expert by DAgger (`genie agent reactive`) in OUT; a redelivery keeps the
    iterations finished before it; a cancel stops after the iteration in progress."""
    from genie.agent.reactive import run_dagger

    job_id = self.request.id
    job = ReactiveJobSpec.from_json(spec)  # ValueError: FAILURE, never retried
    total = job.reactive.iterations
    self.cancel_if_requested(job_id, {"done": 0, "total": total})
    out = resolve_dir(job.out, settings.job_dir(job_id))
    with self.execution(job_id, total) as run:
        def on_iteration(done: int) -> bool:
            return run.step(done, force=True, iteration=done)

        last = _with_threads(job.threads, lambda: run_dagger(job.reactive, out, progress=False, on_iteration=on_iteration))
        if run.stopped:
            run.end(run.stopped, {"done": last.get("iteration", -1) + 1, "total": total, "run": str(out)})
    return {"job": job_id, "run": str(out), "policy": str(out / "policy"), "iterations": total, "last": last}


@app.task(bind=True, base=JobTask, name="genie.finetune", autoretry_for=_TRANSIENT, **_RETRY)
@fails_when_disk_full
@once
def finetune(self: JobTask, spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tunes a reactive expert by PPO in the real game (`genie agent finetune`) in OUT; a redelivery resumes
    from the newest checkpoint; a cancel stops after the update in progress (with a checkpoint there)."""
    from genie.agent.finetune import run_finetune

    job_id = self.request.id
    job = FinetuneJobSpec.from_json(spec)  # ValueError: FAILURE, never retried
    total = job.finetune.updates
    self.cancel_if_requested(job_id, {"done": 0, "total": total})
    out = resolve_dir(job.out, settings.job_dir(job_id))
    with self.execution(job_id, total) as run:
        def should_stop(done: int) -> bool:
            return run.step(done, force=True, update=done)

        last = _with_threads(job.threads, lambda: run_finetune(job.finetune, out, progress=False,
                                                               should_stop=should_stop))
        if run.stopped:
            run.end(run.stopped, {"done": last.get("update", 0), "total": total, "run": str(out)})
    return {"job": job_id, "run": str(out), "policy": str(out / "policy"), "updates": total, "last": last}


@app.task(bind=True, base=JobTask, name="genie.expert", autoretry_for=_TRANSIENT, **_RETRY)
@fails_when_disk_full
@once
def expert(self: JobTask, spec: dict[str, Any]) -> dict[str, Any]:
    """Records expert episodes (`genie agent expert [--reactive RUN]`) into the dataset OUT. The episodes are a pure
    function of the config, so a redelivery records them again; a dataset already closed is the result."""
    from genie.agent.expert import record
    from genie.data.shards import ShardedDataset

    job_id = self.request.id
    job = ExpertJobSpec.from_json(spec)  # ValueError: FAILURE, never retried
    total = job.expert.episodes
    self.cancel_if_requested(job_id, {"done": 0, "total": total})
    out = Path(job.out)
    with self.execution(job_id, total) as run:
        if not (out / "index.json").exists():  # a delivery that died after closing the dataset left it whole
            def go() -> None:
                if job.policy_run:
                    from genie.agent.reactive import finished_policy_dir, load_reactive_policy, record_reactive

                    policy_dir = finished_policy_dir(Path(job.policy_run))
                    record_reactive(load_reactive_policy(policy_dir), job.expert, out, workers=job.workers,
                                    progress=False, policy_dir=policy_dir)
                else:
                    record(job.expert, out, workers=job.workers, progress=False)

            _with_threads(job.threads, go)
        info = ShardedDataset(out).info
        run.report(total, force=True, episodes=total)
    return {"job": job_id, "out": str(out), "episodes": total, "expert": "reactive" if job.policy_run else "planner",
            "success_rate": info.get("success_rate")}


@app.task(bind=True, base=JobTask, name="genie.world", autoretry_for=_TRANSIENT, **_RETRY)
@fails_when_disk_full
@once
def world(self: JobTask, spec: dict[str, Any]) -> dict[str, Any]:
    """Replaces itself by the chain train(tokenizer) -> train(lam) -> train(dynamics) -> world.finish; the finish
    task inherits this task's id, so the job id's final result is the built world's summary."""
    job_id = self.request.id
    job = WorldJobSpec.from_json(spec).resolved(settings.job_dir(job_id))
    self.cancel_if_requested(job_id, {"done": 0, "total": job.total})
    self.update_state(state=PROGRESS, meta={"done": 0, "total": job.total, "stage": "tokenizer", "out": job.out})
    stages = [train.si(job.train_spec(kind).to_json(), parent=job_id).set(task_id=stage_id(job_id, kind), queue="train")
              for kind in MODEL_KINDS]
    METRICS.set_outcome(self.request.id, "SPLIT")
    return self.replace(chain(*stages, world_finish.si(job_id, job.to_json()).set(queue="train")))


@app.task(bind=True, base=JobTask, name="genie.world.finish", autoretry_for=_TRANSIENT, **_RETRY)
@fails_when_disk_full
@once
def world_finish(self: JobTask, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Exports the trained models to the world dir, evaluates it (report, atlas) and names its actions."""
    from genie.build import BuildConfig, build_world

    job = WorldJobSpec.from_json(spec)
    self.cancel_if_requested(job_id, {"done": job.total - 1, "total": job.total})
    cfg = BuildConfig(world=job.world, out=job.out, run_root=job.run_root, eval_clips=job.eval_clips,
                      drift_steps=job.drift_steps, atlas_prompts=job.atlas_prompts)
    with self.execution(job_id, job.total) as run:
        run.report(job.total - 1, force=True, stage="eval", out=job.out)
        # Every training stage is complete (the chain got here), so this runs export + eval only.
        result = _with_threads(job.threads, lambda: build_world(cfg))
        published = _publish(job, job_id) if job.publish else None
    summary = {"job": job_id, **result.summary(cfg), "done": job.total, "total": job.total}
    return summary if published is None else {**summary, "published": published}


def _publish(job: WorldJobSpec, job_id: str) -> dict[str, Any]:
    """Publishes the built world as the next version of `job.publish`, once: a redelivered finish task finds the
    version its first delivery published (same job, same digest) instead of publishing a second one."""
    from genie.catalog import DirectoryCatalog, file_digests, world_digest

    registry = job.registry or settings.registry
    if not registry:
        raise ValueError("the job asks to publish, but neither it nor the worker (GENIE_REGISTRY) names a registry")
    catalog = DirectoryCatalog(registry)
    source = f"job {job_id}"
    digest = world_digest(file_digests(Path(job.out)))
    for entry in catalog.versions(job.publish):
        if entry.source == source and entry.digest == digest:
            return entry.to_dict()
    return catalog.publish(Path(job.out), job.publish, source=source).to_dict()


def _with_threads(threads: int, fn):
    """fn() with `threads` torch threads (0 = as they are); a job's --threads must not outlive it in this worker."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@app.task(bind=True, base=JobTask, name="genie.rollout", autoretry_for=_TRANSIENT, **_RETRY)
@fails_when_disk_full
@once
def rollout(self: JobTask, spec: dict[str, Any]) -> dict[str, Any]:
    """Writes the spec to the output dir and replaces itself by a chord of chunk tasks + the manifest task, which
    inherits this task's id: the job id's final result is the manifest summary."""
    job = RolloutJobSpec.from_json(spec)
    job_id = self.request.id
    self.cancel_if_requested(job_id, {"done": 0, "total": job.total})
    out = resolve_dir(job.out, settings.job_dir(job_id))
    out.mkdir(parents=True, exist_ok=True)
    job = replace(job, out=str(out))
    write_json_atomic(out / "spec.json", job.to_json())  # chunks and manifest read it: their messages stay small
    self.update_state(state=PROGRESS, meta={"done": 0, "total": job.total, "chunks": job.num_chunks, "out": str(out)})
    header = [rollout_chunk.si(job_id, str(out), k).set(task_id=chunk_id(job_id, k)) for k in range(job.num_chunks)]
    METRICS.set_outcome(self.request.id, "SPLIT")
    return self.replace(chord(header, rollout_manifest.si(job_id, str(out))))


def _load_spec(out: str) -> RolloutJobSpec:
    return RolloutJobSpec.from_json(json.loads((Path(out) / "spec.json").read_text()))


# Triton being down or busy passes; a TLS certificate it refuses (or that does not verify) does not: fail the job now.
@app.task(bind=True, base=JobTask, name="genie.rollout.chunk", autoretry_for=(BackendUnavailable, *_TRANSIENT),
          dont_autoretry_for=(BackendCredentialsRejected,), **_RETRY)
@fails_when_disk_full
@once
def rollout_chunk(self: JobTask, job_id: str, out: str, index: int) -> dict[str, Any]:
    """Generates the chunk's items that are not on disk yet; each is written whole under its deterministic name."""
    job = _load_spec(out)
    items = job.chunk(index)
    self.cancel_if_requested(job_id, {"chunk": index, "done": 0, "total": len(items)})
    with self.execution(job_id, len(items)) as run:
        return _run_chunk(run, job, Path(out), index, items)


def rollout_backend_config(worker: WorkerSettings, world: str):
    """The BackendConfig of a rollout chunk's model backend: in process, or Triton (over TLS when configured)."""
    from services.backends.factory import BackendConfig

    return BackendConfig(world=world, backend=worker.rollout_backend, triton_url=worker.triton_url,
                         triton_model_urls=worker.triton_model_urls, device=worker.rollout_device,
                         precision=worker.rollout_precision, triton_tls=worker.triton_tls, triton_ca=worker.triton_ca,
                         triton_cert=worker.triton_cert, triton_key=worker.triton_key)


def _run_chunk(run: Execution, job: RolloutJobSpec, out: Path, index: int, items: list[RolloutItem]) -> dict[str, Any]:
    from genie.media import load_image
    from services.backends.factory import make_backend
    from services.rollout import rollout_trace

    t0 = time.perf_counter()
    world = job.world or settings.world
    version = None
    if job.world_digest:  # a catalogue version: the files must still be the ones the job pinned
        from genie.catalog import WorldVersion, file_digests, parse_ref, world_digest

        if world_digest(file_digests(Path(world))) != job.world_digest:
            raise ValueError(f"world {job.world_ref} at {world} no longer has the digest the job pinned "
                             f"({job.world_digest}): it was changed after publishing")
        name, number = parse_ref(job.world_ref)
        # On Triton, the version's own models (loaded into a Triton with explicit model control, as gateways do).
        version = WorldVersion(name, int(number or 0), job.world_digest, Path(world))
    cfg = rollout_backend_config(settings, world)
    backend = runner().backend(settings, job.world_ref or world, lambda: make_backend(cfg, version=version))
    spec = backend.spec
    bad = sorted({a for item in items for a in item.actions if a >= spec.num_actions})
    if bad:
        raise ValueError(f"actions {bad} are out of range for the served world ([0, {spec.num_actions}))")
    sampling = replace(spec.sampling, steps=job.sampling_steps) if job.sampling_steps else spec.sampling
    todo = [item for item in items if not item_done(out, item)]
    counts = {"done": len(items) - len(todo), "written": 0}
    stops: list[str] = []
    gate = asyncio.Semaphore(job.parallel)
    run.report(counts["done"], force=True, chunk=index)

    async def one(item: RolloutItem) -> None:
        async with gate:
            reason = run.stop_reason()
            if reason or stops:
                stops.append(reason or stops[0])
                return
            prompt = load_image(Path(item.prompt), spec.height, spec.width)[None]  # (1, H, W, C)
            result = await rollout_trace(backend, prompt, item.actions, item.seed, sampling)
            meta = {"sampling_steps": sampling.steps, "temperature": sampling.temperature}
            if write_item(out, item, result.frames, result.tokens, meta):
                counts["written"] += 1
                METRICS.rollout_items.inc()
                METRICS.rollout_frames.inc(len(result.frames) - 1)
            counts["done"] += 1
            run.report(counts["done"], chunk=index)

    async def every() -> list:
        return await asyncio.gather(*(one(item) for item in todo), return_exceptions=True)

    outcomes = runner().run(every())
    errors = [e for e in outcomes if isinstance(e, BaseException)]
    if errors:
        raise errors[0]
    if stops:
        run.end(stops[0], {"chunk": index, "done": counts["done"], "total": len(items)})
    run.report(counts["done"], force=True, chunk=index)
    return {"chunk": index, "items": [item.name for item in items], "written": counts["written"],
            "skipped": len(items) - len(todo), "seconds": round(time.perf_counter() - t0, 3)}


@app.task(bind=True, base=JobTask, name="genie.rollout.manifest", autoretry_for=(IncompleteRollout, *_TRANSIENT),
          **{**_RETRY, "max_retries": 12})
@fails_when_disk_full
@once
def rollout_manifest(self: JobTask, job_id: str, out: str) -> dict[str, Any]:
    """Checks every item is on disk, then writes manifest.json (rewriting it identically when redelivered)."""
    job = _load_spec(out)
    missing = missing_items(Path(out), job)
    self.cancel_if_requested(job_id, {"done": job.total - len(missing), "total": job.total})
    if missing:
        raise IncompleteRollout(f"{len(missing)} of {job.total} items are not written yet, e.g. {missing[:3]}")
    manifest = build_manifest(Path(out), job_id, job, settings.rollout_backend)
    write_json_atomic(Path(out) / "manifest.json", manifest)
    remove_partial_items(Path(out))
    return {"job": job_id, "out": out, "manifest": str(Path(out) / "manifest.json"), "items": manifest["count"],
            "done": job.total, "total": job.total, "frames": sum(e["frames"] for e in manifest["items"])}
