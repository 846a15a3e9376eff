"""A `genie.train` job on Kubernetes: the worker launches an Indexed Job of torchrun pods (genie.launch) and
supervises it instead of training in its own process. Progress is the newest checkpoint on the shared volume;
cancel deletes the Job; a worker's deadline or shutdown leaves the Job running and the next delivery re-attaches
(the submit of a redelivered job reuses the Job it finds)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from genie.config import to_dict
from services.worker.runtime import Execution
from services.worker.specs import TrainJobSpec

log = logging.getLogger(__name__)
LOG_LINES = 60  # torchrun's failure summary alone takes ~20 lines; the root cause is above it


def train_on_kubernetes(run: Execution, job: TrainJobSpec, job_id: str, root: Path, launcher: Any = None) -> dict[str, Any]:
    """Launches (or re-attaches to) the job's Kubernetes Job and follows it to its end; returns the same summary as a
    local training job. A failed Job raises with its reason and the index-0 pod's last log lines."""
    from genie.launch import KubeSettings
    from genie.launch.kubernetes import JobState, KubeLauncher, checkpoint_step_reader

    options = {k: v for k, v in (("tokenizer", job.tokenizer), ("lam", job.lam)) if v}
    options |= {"threads": job.threads, "tensorboard": job.tensorboard}
    spec = KubeSettings.from_env().spec(job_id, job.kind, to_dict(job.world), str(root), nodes=job.nodes,
                                        gpus_per_node=job.gpus_per_node, **options)  # ValueError: FAILURE
    launcher = launcher or KubeLauncher()
    submitted = launcher.submit(spec)
    read_step = checkpoint_step_reader(root / job.kind)
    meta = {"kind": job.kind, "run_dir": str(root / job.kind), "k8s_job": submitted.name, "namespace": spec.namespace}

    def on_progress(p) -> None:
        run.report(p.step or 0, force=True, kind=job.kind, step=p.step or 0, pods={"active": p.active, "ready": p.ready,
                   "succeeded": p.succeeded, "failed": p.failed}, **{k: meta[k] for k in ("k8s_job", "namespace")})

    outcome = launcher.watch(job_id, spec.namespace, on_progress=on_progress, read_step=read_step,
                             should_stop=lambda: run.stop_reason() == "cancelled",
                             should_detach=lambda: run.stop_reason() in ("deadline", "shutdown"))
    step = read_step() or 0
    if outcome.state == JobState.CANCELLED:
        run.end("cancelled", {"done": step, "step": step, "reason": outcome.reason, **meta})
    if outcome.state == JobState.TIMEOUT:  # detached: this delivery ends, the Job trains on, the next one re-attaches
        run.end(run.stop_reason() or "deadline", {"done": step, "step": step, **meta})
    if outcome.state == JobState.FAILED:
        raise RuntimeError(f"Kubernetes Job {spec.namespace}/{submitted.name} failed ({outcome.reason}): "
                           f"{outcome.message}{_log_tail(launcher, job_id, spec.namespace)}")
    from genie.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(root / job.kind)
    return {"job": job_id, "kind": job.kind, "run_dir": meta["run_dir"], "step": step, "total": job.steps,
            "checkpoint": str(latest) if latest else None, "backend": "kubernetes", "k8s_job": submitted.name,
            "namespace": spec.namespace, "nodes": job.nodes, "gpus_per_node": job.gpus_per_node}


def _log_tail(launcher: Any, job_id: str, namespace: str) -> str:
    try:
        text = launcher.logs(job_id, namespace, tail_lines=LOG_LINES)
    except Exception as exc:  # the failure itself is what matters; its logs are a courtesy
        log.warning("could not read the logs of %s: %s", job_id, exc)
        return ""
    return f"\n--- last log lines of pod 0 ---\n{text}" if text else ""
