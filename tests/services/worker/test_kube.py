"""How a Kubernetes training job's outcome maps onto the Celery delivery (services/worker/kube.py), with a scripted
launcher: success -> summary from the shared volume's checkpoint; cancel -> the Job is stopped and the job ends
CANCELLED; a worker deadline or shutdown detaches (the Job trains on); a failed Job raises with its reason and logs.
The real client path, against a test double of the API server, is in test_kube_job.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genie.launch.kubernetes import JobOutcome, JobProgress, JobState, SubmittedJob
from genie.presets import tiny
from genie.train.checkpoint import build_model, save_checkpoint
from services.worker.kube import train_on_kubernetes
from services.worker.specs import TrainJobSpec

ENV = {"GENIE_K8S_IMAGE": "genie:test", "GENIE_K8S_CLAIM": "jobs", "GENIE_K8S_NAMESPACE": "ml"}


class Ended(Exception):
    def __init__(self, reason, meta):
        super().__init__(reason)
        self.reason, self.meta = reason, meta


class FakeRun:
    """The Execution surface train_on_kubernetes uses: stop_reason, report, end (which never returns)."""

    def __init__(self, reasons=()):
        self.reasons, self.reports = list(reasons), []

    def stop_reason(self):
        return self.reasons[0] if self.reasons else None

    def report(self, done, force=False, **meta):
        self.reports.append((done, meta))

    def end(self, reason, meta):
        raise Ended(reason, meta)


class ScriptedLauncher:
    def __init__(self, outcome: JobOutcome, progress=(), on_watch=None):
        self.outcome, self.progress, self.on_watch = outcome, progress, on_watch
        self.submitted, self.watch_kwargs = [], {}

    def submit(self, spec):
        self.submitted.append(spec)
        return SubmittedJob(spec.name, spec.namespace, "uid-1", True)

    def watch(self, job_id, namespace, **kw):
        self.watch_kwargs = {"job_id": job_id, "namespace": namespace, **kw}
        for p in self.progress:
            kw["on_progress"](p)
        if self.on_watch:
            self.on_watch(kw)
        return self.outcome

    def logs(self, job_id, namespace, tail_lines=50):
        return "Traceback ...\nValueError: the pod's own reason"


@pytest.fixture
def job(tmp_path, monkeypatch):
    for k, v in {**ENV, "GENIE_K8S_MOUNT": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    return TrainJobSpec("tokenizer", tiny(), backend="kubernetes", nodes=2), tmp_path / "job-1"


def _checkpoint(root: Path, step: int) -> None:
    model = build_model("tokenizer", tiny().tokenizer)
    save_checkpoint(root / "tokenizer" / "checkpoints" / f"step_{step:08d}", "tokenizer", model, step,
                    {"x": torch.zeros(1)}, {"step": step})


def test_success_reports_pods_and_returns_the_checkpoint(job):
    spec, root = job
    launcher = ScriptedLauncher(JobOutcome(JobState.SUCCEEDED), progress=[JobProgress(active=2, ready=1, step=None),
                                                                          JobProgress(active=2, ready=2, step=4)],
                                on_watch=lambda kw: _checkpoint(root, 6))
    run = FakeRun()
    summary = train_on_kubernetes(run, spec, "job-1", root, launcher)
    (sent,) = launcher.submitted
    assert (sent.nodes, sent.namespace, sent.image, sent.run_root) == (2, "ml", "genie:test", str(root))
    assert summary["step"] == 6 and summary["checkpoint"].endswith("step_00000006") and summary["backend"] == "kubernetes"
    assert [(d, m["pods"]["ready"]) for d, m in run.reports] == [(0, 1), (4, 2)]
    assert run.reports[0][1]["k8s_job"] == sent.name


def test_cancel_stops_the_job_and_ends_cancelled(job):
    spec, root = job
    launcher = ScriptedLauncher(JobOutcome(JobState.CANCELLED, "Cancelled"))
    run = FakeRun(["cancelled"])
    with pytest.raises(Ended) as ended:
        train_on_kubernetes(run, spec, "job-1", root, launcher)
    assert ended.value.reason == "cancelled"
    assert launcher.watch_kwargs["should_stop"]() is True and launcher.watch_kwargs["should_detach"]() is False


@pytest.mark.parametrize("reason", ["deadline", "shutdown"])
def test_deadline_or_shutdown_detaches_and_continues(job, reason):
    spec, root = job
    launcher = ScriptedLauncher(JobOutcome(JobState.TIMEOUT, "Detached"))
    run = FakeRun([reason])
    with pytest.raises(Ended) as ended:
        train_on_kubernetes(run, spec, "job-1", root, launcher)
    assert ended.value.reason == reason  # Execution.end(deadline|shutdown) re-sends the task: it re-attaches
    assert launcher.watch_kwargs["should_detach"]() is True and launcher.watch_kwargs["should_stop"]() is False


def test_a_failed_job_raises_with_its_reason_and_log_tail(job):
    spec, root = job
    launcher = ScriptedLauncher(JobOutcome(JobState.FAILED, "BackoffLimitExceeded", "Job has reached the backoff limit"))
    with pytest.raises(RuntimeError, match="BackoffLimitExceeded") as err:
        train_on_kubernetes(FakeRun(), spec, "job-1", root, launcher)
    assert "the pod's own reason" in str(err.value)


def test_missing_kubernetes_settings_fail_clearly(job, monkeypatch):
    spec, root = job
    monkeypatch.delenv("GENIE_K8S_IMAGE")
    with pytest.raises(ValueError, match="GENIE_K8S_IMAGE is not set"):
        train_on_kubernetes(FakeRun(), spec, "job-1", root, ScriptedLauncher(JobOutcome(JobState.SUCCEEDED)))
