"""The client side of jobs: resolve and validate specs before anything is queued, submit, status, cancel.

Validation reads the same paths the workers will (shared storage, the PVC in the chart): the world config and data,
checkpoints a training resumes from or depends on, prompt images, and the world's action count.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genie.config import WorldConfig, apply_overrides, from_dict, load_world_config
from services.worker.settings import WorkerSettings
from services.worker.specs import (
    AgentJobSpec,
    ExpertJobSpec,
    FinetuneJobSpec,
    ReactiveJobSpec,
    RolloutJobSpec,
    TrainJobSpec,
    WorldJobSpec,
    chunk_id,
    stage_id,
)
from services.worker.store import JobStore

TERMINAL = ("SUCCESS", "FAILURE", "CANCELLED")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def resolve_world(preset: str | None = None, config: Path | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> WorldConfig:
    """A world config as `genie train` resolves it: a preset (default demo) or a JSON file, then dotted overrides."""
    from genie.presets import get_preset

    if preset and config:
        raise ValueError("give --preset or --config, not both")
    cfg = load_world_config(config) if config else get_preset(preset or "demo")
    return apply_overrides(cfg, list(overrides))


def check_train_spec(spec: TrainJobSpec) -> None:
    """Raises ValueError for what would fail on the worker: missing data, an incompatible checkpoint to resume,
    missing or mismatched frozen tokenizer/LAM checkpoints for dynamics."""
    from genie.build import check_runs
    from genie.train.checkpoint import latest_checkpoint, read_meta

    if spec.backend == "kubernetes":
        from genie.train.distributed import check_batch

        cfg = spec.world.train_config(spec.kind)
        check_batch(cfg.batch_size, spec.processes, cfg.grad_accum)  # every torchrun process gets whole samples
    data = spec.world.data
    if data.source == "shards" and not Path(data.path).is_dir():
        raise ValueError(f"data.path {data.path!r} is not a dataset directory (`genie data generate` writes one)")
    root = Path(spec.run_root) if spec.run_root else None
    if root is not None:
        check_runs(spec.world, root, (spec.kind,))
    if spec.kind != "dynamics":
        return
    d = spec.world.dynamics
    for kind, explicit in (("tokenizer", spec.tokenizer), ("lam", spec.lam)):
        if explicit:
            ckpt = Path(explicit)
        elif root is None:
            raise ValueError(f"dynamics needs a trained {kind}: give --run-root holding RUN_ROOT/{kind} or --{kind} PATH")
        else:
            ckpt = latest_checkpoint(root / kind)
            if ckpt is None:
                raise ValueError(f"no {kind} checkpoint under {root / kind}; train it first or pass --{kind} PATH")
        meta = read_meta(ckpt)
        if meta["kind"] != kind:
            raise ValueError(f"{ckpt} holds a {meta['kind']} checkpoint, expected {kind}")
        model = from_dict(type(spec.world.model_config(kind)), meta["config"])
        if kind == "tokenizer" and (model.vq.num_codes, model.tokens_per_frame) != (d.num_tokens, d.tokens_per_frame):
            raise ValueError(f"tokenizer checkpoint {ckpt} does not match the dynamics config (codebook, tokens per frame)")
        if kind == "lam" and model.num_actions != d.num_actions:
            raise ValueError(f"LAM checkpoint {ckpt} has {model.num_actions} actions, dynamics expects {d.num_actions}")


def parse_actions(texts: list[str] | tuple[str, ...], num_actions: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """Each text is "3,1,0,2" or "random:N" (N actions drawn as `genie rollout --actions random --seed seed+k`)."""
    import torch

    out = []
    for k, text in enumerate(texts):
        text = text.strip()
        if text.startswith("random:"):
            n = text.partition(":")[2]
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"--actions {text!r}: expected random:N with N >= 1")
            gen = torch.Generator().manual_seed(seed + k)
            out.append(tuple(torch.randint(0, num_actions, (int(n),), generator=gen).tolist()))
            continue
        try:
            seq = tuple(int(a) for a in text.split(","))
        except ValueError:
            raise ValueError(f"--actions {text!r}: expected comma-separated integers or random:N") from None
        bad = [a for a in seq if not 0 <= a < num_actions]
        if bad:
            raise ValueError(f"--actions {text!r}: actions {bad} are out of range for the world ([0, {num_actions}))")
        out.append(seq)
    return tuple(out)


def resolve_prompts(prompts: list[str] | tuple[str, ...], world_dir: Path) -> tuple[str, ...]:
    """Paths stay paths; a bare number is the index of one of the world's prompts (WORLD/prompts/NN.png)."""
    from genie.worlds import load_prompts

    shipped = load_prompts(world_dir)
    out = []
    for p in prompts:
        if p.isdigit():
            if int(p) >= len(shipped):
                raise ValueError(f"the world ships {len(shipped)} prompts; --prompt {p} is out of range")
            out.append(str(shipped[int(p)]))
        else:
            out.append(p)
    return tuple(out)


def check_rollout_spec(spec: RolloutJobSpec, world_dir: Path) -> None:
    """Raises ValueError unless every prompt is a readable image and every action is in range for the world."""
    from genie.media import load_image
    from genie.worlds import load_world_config_of

    world = load_world_config_of(world_dir)
    num_actions = world.dynamics.num_actions
    for path in spec.prompts:
        if not Path(path).is_file():
            raise ValueError(f"prompt image {path} does not exist")
        try:
            load_image(Path(path), world.data.height, world.data.width)
        except ValueError as exc:
            raise ValueError(f"prompt {path}: {exc}") from None
    bad = sorted({a for seq in spec.actions for a in seq if a >= num_actions})
    if bad:
        raise ValueError(f"actions {bad} are out of range for the world {world_dir} ([0, {num_actions}))")


@dataclass
class JobStatus:
    job_id: str
    kind: str  # "train", "world" or "rollout"
    state: str  # QUEUED, PROGRESS, RETRY, SUCCESS, FAILURE, CANCELLING, CANCELLED
    done: int = 0  # steps or items
    total: int = 0
    detail: dict[str, Any] = field(default_factory=dict)  # the newest progress report
    result: dict[str, Any] | None = None
    error: str | None = None
    cancel_requested: bool = False
    worker: str | None = None  # the worker holding the job now
    submitted_at: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job_id, "kind": self.kind, "state": self.state, "done": self.done, "total": self.total,
                "detail": self.detail, "result": self.result, "error": self.error, "cancel_requested": self.cancel_requested,
                "worker": self.worker, "submitted_at": self.submitted_at}


class JobClient:
    """Submits jobs to the broker of `settings` and reads their state from its result backend."""

    def __init__(self, settings: WorkerSettings | None = None) -> None:
        self.settings = settings or WorkerSettings.from_env()
        self._app = None
        self.store = JobStore.from_settings(self.settings)

    @property
    def app(self):
        if self._app is None:
            from services.worker.settings import make_app

            self._app = make_app(self.settings)
        return self._app

    def submit_train(self, spec: TrainJobSpec, job_id: str | None = None) -> str:
        check_train_spec(spec)
        return self._send("train", "genie.train", spec.to_json(), spec.steps, job_id)

    def submit_rollout(self, spec: RolloutJobSpec, world_dir: Path | None = None, job_id: str | None = None) -> str:
        check_rollout_spec(spec, Path(world_dir or spec.world or self.settings.world))
        extra = {"chunks": spec.num_chunks, "chunk_size": spec.chunk_size}
        return self._send("rollout", "genie.rollout", spec.to_json(), spec.total, job_id, extra)

    def submit_world(self, spec: WorldJobSpec, job_id: str | None = None) -> str:
        """Queues `genie world build` as a chain; the data and any run root to resume are checked first."""
        check_world_spec(spec)
        extra = {"stages": spec.stage_steps}
        return self._send("world", "genie.world", spec.to_json(), spec.total, job_id, extra, queue="train")

    def submit_agent(self, spec: AgentJobSpec, job_id: str | None = None) -> str:
        """Queues `genie agent train` (queue train); its dataset and the world's LAM are checked first."""
        check_agent_spec(spec)
        return self._send("agent", "genie.agent", spec.to_json(), spec.steps, job_id, queue="train")

    def submit_reactive(self, spec: ReactiveJobSpec, job_id: str | None = None) -> str:
        """Queues `genie agent reactive` (queue train): DAgger iterations, progress counted in iterations."""
        check_reactive_spec(spec)
        return self._send("reactive", "genie.reactive", spec.to_json(), spec.steps, job_id, queue="train")

    def submit_finetune(self, spec: FinetuneJobSpec, job_id: str | None = None) -> str:
        """Queues `genie agent finetune` (queue train): PPO on a reactive expert, progress counted in updates."""
        check_finetune_spec(spec)
        return self._send("finetune", "genie.finetune", spec.to_json(), spec.steps, job_id, queue="train")

    def submit_expert(self, spec: ExpertJobSpec, job_id: str | None = None) -> str:
        """Queues `genie agent expert` (queue train): recording the planner's or a reactive expert's episodes."""
        check_expert_spec(spec)
        return self._send("expert", "genie.expert", spec.to_json(), spec.steps, job_id, queue="train")

    def _send(self, kind: str, task: str, args: dict, total: int, job_id: str | None, extra: dict | None = None,
              queue: str | None = None) -> str:
        job_id = job_id or uuid.uuid4().hex[:16]
        if not _JOB_ID.match(job_id):
            raise ValueError(f"job id {job_id!r} must be 1-64 letters, digits, '_', '-', '.'")
        if self.store.record(job_id) is not None:
            raise ValueError(f"job {job_id} exists already")
        # The record first: `status` knows the job from the moment its message can be taken.
        queue = queue or kind
        self.store.put_record(job_id, {"job": job_id, "kind": kind, "task": task, "queue": queue, "spec": args,
                                       "total": total, "submitted_at": time.time(), **(extra or {})})
        self.app.send_task(task, args=[args], task_id=job_id, queue=queue)
        return job_id

    def record(self, job_id: str) -> dict[str, Any]:
        record = self.store.record(job_id)
        if record is None:
            raise KeyError(f"no job {job_id!r} (unknown, or expired after 7 days)")
        return record

    def status(self, job_id: str) -> JobStatus:
        from celery.result import AsyncResult

        record = self.record(job_id)
        st = JobStatus(job_id, record["kind"], "QUEUED", total=record["total"], submitted_at=record["submitted_at"],
                       cancel_requested=self.store.cancel_requested(job_id))
        res = AsyncResult(job_id, app=self.app)
        state, info = res.state, res.info
        started = state != "PENDING"
        if isinstance(info, dict) and state != "SUCCESS":
            st.detail = info
            st.done = int(info.get("done", 0))
        if state == "SUCCESS":
            st.result, st.done = info, st.total
        elif state in ("FAILURE", "RETRY"):
            st.error = f"{type(info).__name__}: {info}"
        if record["kind"] == "rollout" and state != "SUCCESS":
            state, started = self._rollout_progress(st, record, state, started)
        elif record["kind"] == "world" and state != "SUCCESS":
            state, started = self._world_progress(st, record, state, started)
        else:
            st.worker = self.store.lease_holder(job_id)
        st.state = "QUEUED" if state == "PENDING" else state
        if st.cancel_requested and not st.terminal:
            # A queued job is dropped by the worker that takes it; a running one stops at its next step or item.
            st.state = "CANCELLING" if started else "CANCELLED"
        return st

    def _rollout_progress(self, st: JobStatus, record: dict[str, Any], state: str, started: bool) -> tuple[str, bool]:
        """Items done over the chunk tasks; the job is PROGRESS once a chunk started, FAILURE/CANCELLED with one."""
        from celery.result import AsyncResult

        done, size, total = 0, record["chunk_size"], record["total"]
        for k in range(record["chunks"]):
            res = AsyncResult(chunk_id(st.job_id, k), app=self.app)
            cs, info = res.state, res.info
            if cs == "SUCCESS":
                done += min(size, total - k * size)
            elif isinstance(info, dict):
                done += int(info.get("done", 0))
            if cs == "FAILURE" and state not in TERMINAL:
                state, st.error = "FAILURE", f"chunk {k}: {type(info).__name__}: {info}"
            elif cs == "CANCELLED" and state not in TERMINAL:
                state = "CANCELLED"
            elif cs != "PENDING" and state in ("PENDING", "PROGRESS"):
                state = "PROGRESS"
            started = started or cs != "PENDING"
            st.worker = st.worker or self.store.lease_holder(chunk_id(st.job_id, k))
        st.done = done
        st.detail = {**st.detail, "done": done, "total": total}
        return state, started

    def _world_progress(self, st: JobStatus, record: dict[str, Any], state: str, started: bool) -> tuple[str, bool]:
        """Training steps over the three stage tasks (then 1 for export + eval); FAILURE/CANCELLED with a stage."""
        from celery.result import AsyncResult

        done, stage = 0, None
        for kind, steps in record["stages"].items():
            res = AsyncResult(stage_id(st.job_id, kind), app=self.app)
            cs, info = res.state, res.info
            if cs == "SUCCESS":
                done += steps
                continue
            if isinstance(info, dict):
                done += int(info.get("done", 0))
                if cs == "PROGRESS":
                    stage = kind
                    st.detail = {**info, "stage": kind}
            if cs == "FAILURE":  # Celery fails the rest of the chain (the job id too) with the same error
                state, st.error = "FAILURE", f"{kind} stage: {type(info).__name__}: {info}"
            elif cs == "CANCELLED" and state not in TERMINAL:
                state = "CANCELLED"
            elif cs != "PENDING" and state in ("PENDING", "PROGRESS"):
                state, stage = "PROGRESS", stage or kind
            started = started or cs != "PENDING"
            st.worker = st.worker or self.store.lease_holder(stage_id(st.job_id, kind))
            break  # the later stages have not started
        st.worker = st.worker or self.store.lease_holder(st.job_id)
        st.done = max(st.done, done)
        st.detail = {**st.detail, "done": st.done, "total": st.total, "stage": stage or st.detail.get("stage")}
        return state, started

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.2) -> JobStatus:
        """Polls until the job is SUCCESS, FAILURE or CANCELLED; TimeoutError with the last status otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(job_id)
            if st.terminal:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {st.state} after {timeout:.0f} s ({st.done}/{st.total})")
            time.sleep(poll)

    def cancel(self, job_id: str) -> JobStatus:
        """Flags the job cancelled; a finished job is left as it is."""
        st = self.status(job_id)
        if not st.terminal:
            self.store.request_cancel(job_id)
            st = self.status(job_id)
        return st

    def close(self) -> None:
        self.store.close()


def submit_train(spec: TrainJobSpec, settings: WorkerSettings | None = None, job_id: str | None = None) -> str:
    """Validates and queues a training job; returns its id. ValueError (nothing queued) for bad arguments."""
    client = JobClient(settings)
    try:
        return client.submit_train(spec, job_id)
    finally:
        client.close()


def check_agent_spec(spec: AgentJobSpec) -> None:
    """The dataset opens and records true actions; a LAM-BC job's world has a LAM checkpoint."""
    from genie.data.shards import ShardedDataset
    from genie.train.checkpoint import read_meta

    if int(ShardedDataset(Path(spec.train.data)).info.get("num_true_actions", 0)) < 2:
        raise ValueError(f"{spec.train.data} records no true actions; record it with `genie agent expert`")
    if spec.train.target == "latent":
        read_meta(Path(spec.train.world) / "lam")


def check_reactive_spec(spec: ReactiveJobSpec) -> None:
    """A run dir given must not hold another config's run (more iterations extend one)."""
    from genie.agent.reactive import check_run

    if spec.out:
        check_run(spec.reactive, Path(spec.out))


def check_finetune_spec(spec: FinetuneJobSpec) -> None:
    """The init is a policy of the game's actions (a finished reactive run or a policy dir), and a run dir given does
    not hold another config's run (more updates extend one)."""
    from genie.agent.finetune import check_run, policy_dir

    policy_dir(spec.finetune.init)
    if spec.out:
        check_run(spec.finetune, Path(spec.out))


def check_expert_spec(spec: ExpertJobSpec) -> None:
    """The output is not a dataset already, and a reactive expert's run is finished."""
    if (Path(spec.out) / "index.json").exists():  # ShardWriter's own refusal, before anything is queued
        raise ValueError(f"{spec.out} already holds a dataset (index.json); choose a new --out")
    if spec.policy_run:
        from genie.agent.reactive import finished_policy_dir

        finished_policy_dir(Path(spec.policy_run))


def check_world_spec(spec: WorldJobSpec) -> None:
    """Raises ValueError for a world job that would fail on the worker: missing or mismatched data, a run root
    holding checkpoints of another config, an output path that is a file."""
    from genie.build import check_build

    check_build(spec.world, spec.out, Path(spec.run_root) if spec.run_root else None)


def submit_rollout(spec: RolloutJobSpec, settings: WorkerSettings | None = None, world_dir: Path | None = None,
                   job_id: str | None = None) -> str:
    """Validates and queues a rollout job; returns its id. ValueError (nothing queued) for bad arguments."""
    client = JobClient(settings)
    try:
        return client.submit_rollout(spec, world_dir, job_id)
    finally:
        client.close()
