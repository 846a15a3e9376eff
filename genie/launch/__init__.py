"""Launching multi-node training outside this process: Kubernetes Jobs running torchrun (see objects.py)."""

from genie.launch.objects import (
    KubeSettings,
    KubeTrainSpec,
    build_configmap,
    build_headless_service,
    build_job,
    job_name,
)

__all__ = ["KubeSettings", "KubeTrainSpec", "build_configmap", "build_headless_service", "build_job", "job_name"]
