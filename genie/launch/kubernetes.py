"""Submit, watch and cancel training Jobs through the official Kubernetes client.

    launcher = KubeLauncher()                       # in-cluster ServiceAccount, else ~/.kube/config
    launcher.submit(spec)                           # ConfigMap + headless Service + Indexed Job (idempotent)
    outcome = launcher.watch(spec.job_id, spec.namespace, on_progress=print, should_stop=lambda: False,
                             read_step=checkpoint_step_reader(f"{spec.run_root}/{spec.kind}"))
    launcher.cancel(spec.job_id, spec.namespace)    # Foreground delete of the Job, then its ConfigMap and Service

The manifests come from objects.py. A Celery task may be delivered again after a worker dies: submit() then finds
the objects of the first delivery (HTTP 409) and reuses them, and watch() picks the same Job up where it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from genie.launch.objects import FINGERPRINT_ANNOTATION, JOB_LABEL, KubeTrainSpec, build_all, job_name

log = logging.getLogger(__name__)

StepReader = Callable[[], "int | None"]
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


_EPOCH = datetime.min.replace(tzinfo=UTC)


class LaunchError(RuntimeError):
    """A Kubernetes call failed; `status` is its HTTP status (None when no call was made)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class JobState(StrEnum):
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"  # should_stop() asked for it, or someone deleted the Job
    TIMEOUT = "TIMEOUT"  # watch() stopped waiting; the Job itself keeps running


@dataclass(frozen=True)
class JobProgress:
    """Pod counts of the Job, its true conditions, and the newest training step on the shared volume."""

    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    conditions: tuple[str, ...] = ()
    step: int | None = None


@dataclass(frozen=True)
class JobOutcome:
    state: JobState
    reason: str = ""  # the Job's condition reason, e.g. BackoffLimitExceeded, DeadlineExceeded
    message: str = ""
    progress: JobProgress | None = None


@dataclass(frozen=True)
class JobStatus:
    name: str
    progress: JobProgress
    outcome: JobOutcome | None  # None while the Job runs


@dataclass(frozen=True)
class SubmittedJob:
    name: str
    namespace: str
    uid: str
    created: bool  # False: a redelivered submit found the Job already there and reused it


def checkpoint_step_reader(run_dir: str | Path) -> StepReader:
    """A read_step for watch(): the step of the newest checkpoint under run_dir (RUN_ROOT/KIND), None before any."""

    def read() -> int | None:
        from genie.train.checkpoint import latest_step  # torch: imported only when used

        return latest_step(Path(run_dir))

    return read


def api_error(action: str, exc: ApiException) -> LaunchError:
    """One line: what failed, HTTP status and reason, the API server's message, and what a 401/403 means here."""
    detail = ""
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        detail = json.loads(exc.body or "{}").get("message", "")
    message = f"{action} failed: HTTP {exc.status} {exc.reason}" + (f": {detail}" if detail else "")
    if exc.status in (401, 403):
        message += (" (RBAC: the worker's ServiceAccount has no permission for this; install the chart with "
                    "worker.kubernetes.enabled=true, which grants it, see deploy/README.md)")
    return LaunchError(message, exc.status)


def load_apis() -> tuple[Any, Any]:
    """BatchV1Api and CoreV1Api from the in-cluster ServiceAccount, else from the kubeconfig."""
    errors = []
    loaders = (("in-cluster", kubernetes.config.load_incluster_config),
               # KUBECONFIG is read now: the client reads it once, when it is imported.
               ("kubeconfig", lambda: kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))))
    for what, loader in loaders:
        try:
            loader()
            return kubernetes.client.BatchV1Api(), kubernetes.client.CoreV1Api()
        except (kubernetes.config.ConfigException, OSError, TypeError) as exc:  # TypeError: an empty kubeconfig
            errors.append(f"{what}: {exc}")
    raise LaunchError("no Kubernetes configuration: not in a pod with a ServiceAccount token and no usable kubeconfig "
                      f"({'; '.join(errors)})")


def _progress(job: Any, read_step: StepReader | None) -> JobProgress:
    status = job.status or kubernetes.client.V1JobStatus()
    step = None
    if read_step is not None:
        try:
            step = read_step()
        except Exception as exc:  # a half-written checkpoint must not end the watch
            log.warning("reading the training step failed: %s", exc)
    return JobProgress(active=status.active or 0, ready=status.ready or 0, succeeded=status.succeeded or 0,
                       failed=status.failed or 0, step=step,
                       conditions=tuple(c.type for c in status.conditions or [] if c.status == "True"))


def _outcome(job: Any, progress: JobProgress) -> JobOutcome | None:
    """SUCCEEDED or FAILED once the Job has its terminal condition (Complete / Failed), else None."""
    for c in (job.status and job.status.conditions) or []:
        if c.status == "True" and c.type in ("Complete", "Failed"):
            state = JobState.SUCCEEDED if c.type == "Complete" else JobState.FAILED
            return JobOutcome(state, c.reason or c.type, c.message or "", progress)
    return None


class KubeLauncher:
    """Training Jobs through the Kubernetes API: submit(), watch(), status(), logs(), cancel().

    batch_api / core_api: kubernetes.client.BatchV1Api / CoreV1Api (default: from load_apis()).
    watch_factory: makes the Watch of each stream (default: the client's kubernetes.watch.Watch).
    poll_seconds: how long one watch stream lasts at most; should_stop(), the timeout and the training step are
    checked at every event and at least this often.
    """

    def __init__(self, batch_api: Any = None, core_api: Any = None, *, watch_factory: Callable[[], Any] | None = None,
                 poll_seconds: int = 15) -> None:
        if batch_api is None or core_api is None:
            batch, core = load_apis()
            batch_api, core_api = batch_api or batch, core_api or core
        self.batch, self.core = batch_api, core_api
        # return_type: what the events hold, named here rather than read from the list method's docstring.
        self.watch_factory = watch_factory or (lambda: kubernetes.watch.Watch(return_type="V1Job"))
        self.poll_seconds = max(1, int(poll_seconds))

    # --- submit ---------------------------------------------------------------------------------------------------

    def submit(self, spec: KubeTrainSpec) -> SubmittedJob:
        """Creates the ConfigMap, the headless Service and the Job; objects already there from an earlier delivery of
        the same run (same fingerprint) are reused. Raises LaunchError, and removes what this call created, when the
        Job cannot be created."""
        configmap, service, job = build_all(spec)
        ns, name = spec.namespace, spec.name
        made = []
        try:
            if self._create(self.core.create_namespaced_config_map, self.core.read_namespaced_config_map, configmap, spec):
                made.append(self.core.delete_namespaced_config_map)
            if self._create(self.core.create_namespaced_service, self.core.read_namespaced_service, service, spec):
                made.append(self.core.delete_namespaced_service)
            created = self._create(self.batch.create_namespaced_job, self.batch.read_namespaced_job, job, spec)
        except LaunchError:
            for delete in made:  # no Job, no use for these: do not leave them behind
                self._delete(delete, name, ns)
            raise
        uid = self._job(name, ns).metadata.uid
        self._own(name, ns, uid)
        log.info("%s Job %s/%s (%d node(s) x %d process(es))", "created" if created else "reusing", ns, name,
                 spec.nodes, spec.procs)
        return SubmittedJob(name, ns, uid, created)

    def _create(self, create: Callable, read: Callable, body: dict, spec: KubeTrainSpec) -> bool:
        """True when created; False when the same run's object already exists (409)."""
        what = f"{body['kind']} {spec.namespace}/{spec.name}"
        try:
            create(spec.namespace, body)
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise api_error(f"creating {what}", exc) from exc
        try:
            existing = read(spec.name, spec.namespace)
        except ApiException as exc:
            raise api_error(f"reading the existing {what}", exc) from exc
        theirs = (existing.metadata.annotations or {}).get(FINGERPRINT_ANNOTATION)
        if theirs != spec.fingerprint:
            raise LaunchError(f"{what} already exists for another training run (fingerprint {theirs}, this run "
                              f"{spec.fingerprint}): give this run its own job_id, or cancel the old one", 409)
        return False

    def _job(self, name: str, namespace: str) -> Any:
        try:
            return self.batch.read_namespaced_job(name, namespace)
        except ApiException as exc:
            raise api_error(f"reading Job {namespace}/{name}", exc) from exc

    def _own(self, name: str, namespace: str, uid: str) -> None:
        """Makes the Job own its ConfigMap and Service, so the garbage collector deletes them with it (also when the
        Job's ttlSecondsAfterFinished runs out). Best effort: the Job runs without it."""
        # blockOwnerDeletion stays unset: setting it needs update permission on jobs/finalizers.
        ref = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid}
        patch = [{"op": "add", "path": "/metadata/ownerReferences", "value": [ref]}]  # a list: sent as JSON Patch
        for what, method in (("ConfigMap", self.core.patch_namespaced_config_map),
                             ("Service", self.core.patch_namespaced_service)):
            try:
                method(name, namespace, patch)
            except ApiException as exc:
                log.warning("%s (it stays until cancel())", api_error(f"setting the owner of {what} {namespace}/{name}", exc))

    # --- watch ----------------------------------------------------------------------------------------------------

    def watch(self, job_id: str, namespace: str, *, on_progress: Callable[[JobProgress], None] | None = None,
              should_stop: Callable[[], bool] | None = None, timeout: float | None = None,
              read_step: StepReader | None = None, should_detach: Callable[[], bool] | None = None) -> JobOutcome:
        """Follows the Job until it succeeds or fails; returns its outcome.

        on_progress(progress) is called whenever the pod counts, conditions or the step from read_step() change.
        should_stop() is polled at every event and every poll_seconds: when true the Job is cancelled (CANCELLED).
        timeout: seconds to wait before returning TIMEOUT; the Job keeps running then (a later watch() resumes).
        should_detach() is polled like should_stop: when true, returns TIMEOUT at once and leaves the Job running
        (a worker shutting down hands the watch on without killing the training).
        The watch resumes when the API server ends a stream, and re-lists after 410 Gone (an expired resourceVersion).
        """
        name = job_name(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: JobProgress | None = None  # the newest progress seen
        job, version = None, None

        def report(job: Any) -> JobProgress:
            nonlocal last
            progress = _progress(job, read_step)
            if on_progress is not None and progress != last:
                on_progress(progress)
            last = progress
            return progress

        def interrupted() -> JobOutcome | None:
            if should_stop is not None and should_stop():
                self.cancel(job_id, namespace)
                return JobOutcome(JobState.CANCELLED, "Cancelled", "stopped on request; the Job was deleted", last)
            if deadline is not None and time.monotonic() >= deadline:
                return JobOutcome(JobState.TIMEOUT, "Timeout", f"still running after {timeout:g} s; the Job goes on",
                                  last)
            if should_detach is not None and should_detach():
                return JobOutcome(JobState.TIMEOUT, "Detached", "the watcher stopped; the Job goes on", last)
            return None

        while True:
            if stopped := interrupted():
                return stopped
            if version is None:  # the start, or an expired resourceVersion: list for the state and a fresh version
                job, version = self._list(name, namespace)
                if job is None:
                    return JobOutcome(JobState.FAILED, "NotFound", f"Job {namespace}/{name} does not exist",
                                      last)
                progress = report(job)
                if outcome := _outcome(job, progress):
                    return outcome
                continue  # checks should_stop/timeout before the first stream
            seconds = self.poll_seconds
            if deadline is not None:
                seconds = max(1, min(seconds, int(deadline - time.monotonic() + 1)))
            stream = self.watch_factory()
            try:
                for event in stream.stream(self.batch.list_namespaced_job, namespace,
                                           field_selector=f"metadata.name={name}", resource_version=version,
                                           timeout_seconds=seconds, _request_timeout=seconds + 30):
                    if event["type"] == "DELETED":
                        stream.stop()
                        return JobOutcome(JobState.CANCELLED, "Deleted", f"Job {namespace}/{name} was deleted",
                                          last)
                    if event["type"] not in ("ADDED", "MODIFIED"):
                        continue
                    job = event["object"]
                    version = job.metadata.resource_version or version
                    progress = report(job)
                    if outcome := _outcome(job, progress):
                        stream.stop()
                        return outcome
                    if stopped := interrupted():
                        stream.stop()
                        return stopped
            except ApiException as exc:
                if exc.status != 410:
                    raise api_error(f"watching Job {namespace}/{name}", exc) from exc
                log.info("watch of Job %s/%s expired (410 Gone): listing again", namespace, name)
                version = None
                continue
            report(job)  # the stream ended quietly: checkpoints may still have advanced

    def _list(self, name: str, namespace: str) -> tuple[Any, str | None]:
        try:
            jobs = self.batch.list_namespaced_job(namespace, field_selector=f"metadata.name={name}")
        except ApiException as exc:
            raise api_error(f"listing Job {namespace}/{name}", exc) from exc
        return (jobs.items[0] if jobs.items else None), jobs.metadata.resource_version

    # --- status, logs, cancel -------------------------------------------------------------------------------------

    def status(self, job_id: str, namespace: str, read_step: StepReader | None = None) -> JobStatus | None:
        """The Job's state, read once; None when there is no such Job."""
        name = job_name(job_id)
        try:
            job = self.batch.read_namespaced_job(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(f"reading Job {namespace}/{name}", exc) from exc
        progress = _progress(job, read_step)
        return JobStatus(name, progress, _outcome(job, progress))

    def logs(self, job_id: str, namespace: str, tail_lines: int = 50) -> str:
        """The last lines of the index-0 pod's log (the newest such pod); empty when there is none yet."""
        name = job_name(job_id)
        try:
            pods = self.core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={name}").items
            # The Job controller annotates each pod with its index (a label too, but only from Kubernetes 1.28).
            first = [p for p in pods if (p.metadata.annotations or {}).get(INDEX_ANNOTATION) == "0"]
            if not first:
                return ""
            # Newest first; creation times have 1 s resolution, so ties go to the pod that started last.
            newest = max(first, key=lambda p: (p.metadata.creation_timestamp or _EPOCH,
                                               (p.status.start_time if p.status else None) or _EPOCH))
            # Raw bytes: the client's own decoding (36.x) returns str(bytes), and turns JSON log lines into dict reprs.
            response = self.core.read_namespaced_pod_log(newest.metadata.name, namespace, container="train",
                                                         tail_lines=tail_lines, _preload_content=False)
            return response.data.decode("utf-8", errors="replace")
        except ApiException as exc:
            raise api_error(f"reading the log of Job {namespace}/{name}", exc) from exc

    def cancel(self, job_id: str, namespace: str) -> None:
        """Deletes the Job (Foreground: its pods go first), its Service and its ConfigMap; missing ones are fine."""
        name = job_name(job_id)
        self._delete(self.batch.delete_namespaced_job, name, namespace, propagation_policy="Foreground")
        self._delete(self.core.delete_namespaced_service, name, namespace)
        self._delete(self.core.delete_namespaced_config_map, name, namespace)

    @staticmethod
    def _delete(method: Callable, name: str, namespace: str, **options: Any) -> None:
        try:
            method(name, namespace, **options)
        except ApiException as exc:
            if exc.status != 404:  # 404: already gone
                raise api_error(f"{method.__name__} {namespace}/{name}", exc) from exc
