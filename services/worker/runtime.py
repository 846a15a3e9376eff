"""What every job task shares: idempotent redelivery, a lease against concurrent copies, cancel / deadline /
shutdown checks between steps, throttled progress, and continuation in a fresh delivery.

Why continuation: the solo pool cannot enforce Celery's time limits, and Redis hands an unacknowledged message to
another worker after the visibility timeout. So a delivery stops on its own before GENIE_TASK_TIME_LIMIT (checkpoint
first) and re-sends itself with the same task id and chord options; no delivery outlives the visibility timeout.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Task, signals
from celery.exceptions import Ignore
from celery.result import AsyncResult

from services.worker.metrics import METRICS
from services.worker.settings import WorkerSettings
from services.worker.store import JobStore, Lease

log = logging.getLogger(__name__)
CANCELLED = "CANCELLED"  # custom Celery state: the job stopped on request; not retried, not redelivered
PROGRESS = "PROGRESS"
_SHUTDOWN = threading.Event()  # set by the worker's warm-shutdown signal (SIGTERM): hand running jobs on


@signals.worker_shutting_down.connect(weak=False)
def _on_shutdown(**_) -> None:
    _SHUTDOWN.set()


class JobTask(Task):
    """Base class of the job tasks (bind=True). `settings` is set by services.worker.celery_app."""

    settings: WorkerSettings
    _store: JobStore | None = None

    @property
    def store(self) -> JobStore:
        if JobTask._store is None:
            JobTask._store = JobStore.from_settings(self.settings)
        return JobTask._store

    def stored_success(self) -> Any | None:
        """The result of an earlier delivery of this task that finished (killed after storing, before acking)."""
        result = AsyncResult(self.request.id, app=self.app)
        return result.result if result.state == "SUCCESS" else None

    def cancel_if_requested(self, job_id: str, meta: dict[str, Any]) -> None:
        """Ends this delivery as CANCELLED (see cancel) before any work when the job was cancelled while it waited."""
        if self.store.cancel_requested(job_id):
            self.cancel(job_id, meta)

    def execution(self, job_id: str, total: int) -> Execution:
        return Execution(self, job_id, total)

    def cancel(self, job_id: str, meta: dict[str, Any]) -> None:
        """Ends this run as CANCELLED (and the job, when this task is one part of it): stored, acked, never rerun."""
        meta = {**meta, "cancelled": True}
        self.update_state(state=CANCELLED, meta=meta)
        if job_id != self.request.id:
            self.backend.store_result(job_id, meta, CANCELLED)
        METRICS.set_outcome(self.request.id, CANCELLED)
        log.info("%s[%s]: cancelled at %s", self.name, self.request.id, meta)
        raise Ignore()

    def continue_later(self, reason: str, countdown: float = 0.0) -> None:
        """Re-sends this task (same id, args, chord membership and retry count) and ends this delivery."""
        self.signature_from_request(countdown=countdown).apply_async()
        METRICS.set_outcome(self.request.id, "DEFERRED" if reason == "busy" else "CONTINUED")
        log.info("%s[%s]: continues in a new delivery (%s)", self.name, self.request.id, reason)
        raise Ignore()


def once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a bound job task: a redelivery of a task whose earlier delivery finished (killed after storing its
    result, before acking) returns that result instead of running again."""
    @functools.wraps(fn)
    def wrapper(self: JobTask, *args: Any, **kwargs: Any) -> Any:
        stored = self.stored_success()
        return stored if stored is not None else fn(self, *args, **kwargs)
    return wrapper


class Execution:
    """One delivery of a job task. Use as a context manager; raises Busy if a live worker runs the same task."""

    def __init__(self, task: JobTask, job_id: str, total: int) -> None:
        self.task, self.job_id, self.total = task, job_id, max(1, total)
        self.deadline = time.monotonic() + task.settings.soft_deadline_s
        self.lease: Lease | None = None
        self._last_check = self._last_report = -1e9
        self._cancelled = False
        self.stopped: str | None = None  # the first stop reason step() saw (for end())

    def __enter__(self) -> Execution:
        holder = f"{self.task.request.hostname} pid {os.getpid()}"
        self.lease = self.task.store.lease(self.task.request.id, holder, self.task.settings.lease_ttl)
        if self.lease is None:
            # A live worker runs this task (its message was restored after the visibility timeout while it ran):
            # look again once its claim could have lapsed, rather than run the job twice at once.
            self.task.continue_later("busy", countdown=self.task.settings.lease_ttl)
        return self

    def __exit__(self, *exc) -> None:
        if self.lease is not None:
            self.lease.release()

    def stop_reason(self) -> str | None:
        """"cancelled", "deadline", "shutdown" or None; reads the cancel flag at most 5 times a second."""
        now = time.monotonic()
        if not self._cancelled and now - self._last_check >= 0.2:
            self._last_check = now
            self._cancelled = self.task.store.cancel_requested(self.job_id)
        if self._cancelled:
            return "cancelled"
        if _SHUTDOWN.is_set():
            return "shutdown"
        if now >= self.deadline:
            return "deadline"
        return None

    def report(self, done: int, force: bool = False, **meta: Any) -> None:
        """Stores PROGRESS (done/total + meta) for this task at most 4 times a second, and the metrics gauge."""
        METRICS.progress.labels(self.task.name).set(min(1.0, done / self.total))
        now = time.monotonic()
        if force or now - self._last_report >= 0.25:
            self._last_report = now
            self.task.update_state(state=PROGRESS, meta={"done": done, "total": self.total, **meta})

    def step(self, done: int, force: bool = False, **meta: Any) -> bool:
        """A job's per-step callback: reports progress, then True when the job must stop here (not finished, and a
        stop reason holds); the reason is kept in `stopped` for end()."""
        self.report(done, force=force, **meta)
        reason = self.stop_reason() if done < self.total else None
        if reason and self.stopped is None:
            self.stopped = reason
        return bool(reason)

    def end(self, reason: str, meta: dict[str, Any]) -> None:
        """Ends the delivery for a stop reason: cancel for good, or continue in a fresh delivery."""
        if reason == "cancelled":
            self.task.cancel(self.job_id, meta)
        self.task.continue_later(reason)


class AsyncRunner:
    """One event loop per worker process for the async model backends, which keep their batchers on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._backends: dict[tuple, Any] = {}

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def backend(self, settings: WorkerSettings, world: str, factory: Callable[[], Any]) -> Any:
        # One backend per world in process; on Triton one for the fixed models and one per catalogue version ("name@N").
        per_world = settings.rollout_backend == "inprocess" or "@" in world
        key = (settings.rollout_backend, world if per_world else "", settings.triton_url, settings.triton_model_urls)
        if key not in self._backends:
            backend = factory()
            try:
                self.run(backend.start())  # BackendUnavailable propagates: the task retries with backoff
            except BaseException:
                self.run(backend.close())  # its channels: each retry would otherwise leave one set open
                raise
            self._backends[key] = backend
        return self._backends[key]


RUNNER: AsyncRunner | None = None


def runner() -> AsyncRunner:
    global RUNNER
    if RUNNER is None:
        RUNNER = AsyncRunner()
    return RUNNER
