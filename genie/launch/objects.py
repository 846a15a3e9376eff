"""What a multi-node training run looks like on Kubernetes: a validated spec and the plain-dict manifests built from it.

One training run is three objects, all named `genie-<job id as a DNS label>` and labelled with that name:

    ConfigMap   world.json (the training config), mounted read-only at /etc/genie
    Service     headless (clusterIP None): gives pod i of the Job the DNS name `<job>-<i>.<svc>`
    Job         Indexed, one pod per node; pod i runs `torchrun --node-rank i` and all of them meet at the c10d
                rendezvous that pod 0 hosts on port 29500, reached as `<job>-0.<svc>:29500`

Every rank reads and writes the same run directory on a shared PVC (rank 0 alone writes checkpoints), so a restarted
Job resumes from the newest checkpoint. Nothing here talks to a cluster: kubernetes.py submits these dicts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

KINDS = ("tokenizer", "lam", "dynamics")
NAME_PREFIX = "genie-"
MAX_NODES = 1000
CONFIG_DIR = "/etc/genie"  # the ConfigMap's mount: world.json lands here
CONFIG_FILE = "world.json"
RDZV_PORT_NAME = "c10d"
JOB_LABEL = "genie.dev/job"  # the object name (a valid label value); the raw job id is in the JOB_ID_ANNOTATION
KIND_LABEL = "genie.dev/kind"
JOB_ID_ANNOTATION = "genie.dev/job-id"
FINGERPRINT_ANNOTATION = "genie.dev/fingerprint"  # what the Job trains: a redelivered submit may reuse only its own Job
# A DNS-1123 label, and a DNS-1035 one too (Service names must start with a letter: the prefix sees to that).
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_MAX_LABEL = 63
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The security settings of every Genie pod (deploy/helm/genie/values.yaml: the image's user is 10001).
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}


def job_name(job_id: str) -> str:
    """The name of every object of a job: `genie-` + the job id made a DNS label, deterministically.

    Lower-cased, every run of other characters than [a-z0-9] turned into one '-', stripped of leading and trailing
    '-'. When that changed the id or the name would be too long, a short hash of the original id is appended, so two
    ids that differ only in case or punctuation never share a Job. The name leaves room for the pods' hostnames
    `<name>-<index>` (63 characters at most) whatever the number of nodes, so the id alone finds the Job."""
    if not isinstance(job_id, str) or not job_id.strip():
        raise ValueError(f"job_id must be a non-empty string, got {job_id!r}")
    slug = re.sub(r"[^a-z0-9]+", "-", job_id.lower()).strip("-")
    if not slug:
        raise ValueError(f"job_id {job_id!r} has no letters or digits: it cannot be made a DNS label")
    room = _MAX_LABEL - len(NAME_PREFIX) - len(f"-{MAX_NODES - 1}")  # the pod hostnames <name>-<index>
    if slug == job_id and len(slug) <= room:
        return NAME_PREFIX + slug
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]
    slug = slug[: room - len(digest) - 1].rstrip("-")
    return f"{NAME_PREFIX}{slug}-{digest}" if slug else f"{NAME_PREFIX}{digest}"


@dataclass(frozen=True, kw_only=True)
class KubeTrainSpec:
    """One training run as a Kubernetes Job: `nodes` pods, each running `procs_per_node` torchrun processes."""

    job_id: str
    kind: str  # tokenizer | lam | dynamics
    world: Mapping[str, Any]  # the world config as a JSON-able dict (`genie config`), written to world.json
    run_root: str  # on the shared volume: checkpoints go to RUN_ROOT/KIND/checkpoints/
    image: str
    claim: str  # the PVC holding run_root, mounted on every pod (ReadWriteMany when pods may land on several nodes)
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None  # None: gpus_per_node, or 1 without GPUs
    namespace: str = "default"
    mount_path: str = "/data/jobs"
    tokenizer: str | None = None  # checkpoint dirs for `genie train dynamics` (default: the newest under run_root)
    lam: str | None = None
    threads: int = 0  # torch threads per process (`genie train --threads`); 0 = torch's default
    tensorboard: bool = True  # scalars under RUN_ROOT/KIND/tb (written by rank 0)
    cpu: str = "2"  # requests per pod
    memory: str = "8Gi"  # request and limit per pod
    service_account: str = ""  # empty: the namespace's default (the training pods get no API token either way)
    backoff_limit: int = 3  # pod failures before the Job fails; every retry resumes from the newest checkpoint
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = 86400  # then the finished Job goes, its ConfigMap and Service with it
    rdzv_port: int = 29500
    pod_failure_policy: bool = True  # evictions and preemptions (DisruptionTarget) do not count against backoff_limit
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    image_pull_secrets: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # extra container env

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for what in ("nodes", "gpus_per_node", "threads", "backoff_limit", "rdzv_port"):
            if not isinstance(getattr(self, what), int) or isinstance(getattr(self, what), bool):
                raise ValueError(f"{what} must be an integer, got {getattr(self, what)!r}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes must be between 1 and {MAX_NODES}, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.procs_per_node is not None and (not isinstance(self.procs_per_node, int) or self.procs_per_node < 1):
            raise ValueError(f"procs_per_node must be >= 1 (or None for one per GPU), got {self.procs_per_node!r}")
        if self.gpus_per_node and self.procs > self.gpus_per_node:
            raise ValueError(f"procs_per_node={self.procs} is more than gpus_per_node={self.gpus_per_node}: "
                             "ranks would share a GPU")
        if self.backoff_limit < 0:
            raise ValueError(f"backoff_limit must be >= 0, got {self.backoff_limit}")
        for what in ("active_deadline_seconds", "ttl_seconds_after_finished"):
            value = getattr(self, what)
            if value is not None and (not isinstance(value, int) or value < (1 if what.startswith("active") else 0)):
                raise ValueError(f"{what} must be a positive integer or None, got {value!r}")
        if not 1 <= self.rdzv_port <= 65535:
            raise ValueError(f"rdzv_port must be a TCP port, got {self.rdzv_port}")
        job_name(self.job_id)  # raises when the id cannot be made a DNS label
        for what in ("namespace", "claim"):
            if not _LABEL.match(getattr(self, what) or "") or len(getattr(self, what)) > _MAX_LABEL:
                raise ValueError(f"{what} must be a DNS-1123 label (lower-case letters, digits, '-'), "
                                 f"got {getattr(self, what)!r}")
        if self.service_account and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", self.service_account):
            raise ValueError(f"service_account must be a DNS-1123 name, got {self.service_account!r}")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"image must be a container image reference, got {self.image!r}")
        for what in ("cpu", "memory"):
            if not _QUANTITY.match(str(getattr(self, what))):
                raise ValueError(f"{what} must be a Kubernetes quantity such as 2, 500m or 8Gi, got {getattr(self, what)!r}")
        mount = PurePosixPath(self.mount_path)
        if not mount.is_absolute() or mount == PurePosixPath("/"):
            raise ValueError(f"mount_path must be an absolute directory other than /, got {self.mount_path!r}")
        # Paths the pods use must be on the shared volume: anything else is the pod's own filesystem, lost with it.
        for what in ("run_root", "tokenizer", "lam"):
            value = getattr(self, what)
            if value is None and what != "run_root":
                continue
            path = PurePosixPath(value or "")
            if not path.is_absolute() or not path.is_relative_to(mount) or ".." in path.parts:
                raise ValueError(f"{what} {value!r} is not under the claim's mount path {self.mount_path}: "
                                 "every pod must read and write it on the shared volume")
        try:
            json.dumps(dict(self.world), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"world must be a JSON-able dict (the world config): {exc}") from exc
        for key in self.env:
            if not _ENV_NAME.match(key):
                raise ValueError(f"env name {key!r} is not a valid environment variable name")

    @property
    def name(self) -> str:
        """The name of the Job, its Service and its ConfigMap."""
        return job_name(self.job_id)

    @property
    def procs(self) -> int:
        """torchrun processes per pod: one per GPU, or `procs_per_node` CPU processes."""
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def rdzv_endpoint(self) -> str:
        # Pod 0 of an Indexed Job has hostname <job>-0; with subdomain <svc> and the headless Service, it resolves as
        # <job>-0.<svc> from every pod of the namespace (the resolver's search path adds <ns>.svc.<cluster domain>).
        return f"{self.name}-0.{self.name}:{self.rdzv_port}"

    @property
    def fingerprint(self) -> str:
        """What the Job trains: kind, run directory and config. Equal fingerprints make a resubmission a redelivery."""
        what = json.dumps([self.kind, self.run_root, self.tokenizer, self.lam, dict(self.world)], sort_keys=True)
        return hashlib.sha256(what.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class KubeSettings:
    """Where the worker launches training Jobs; the Helm chart sets these env vars on the train worker."""

    namespace: str = "default"
    image: str = ""
    claim: str = ""
    mount_path: str = "/data/jobs"
    service_account: str = ""
    cpu: str = "2"
    memory: str = "8Gi"
    image_pull_secrets: tuple[str, ...] = ()
    gpu_node_selector: Mapping[str, str] = field(default_factory=dict)  # placement of pods that ask for GPUs
    gpu_tolerations: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KubeSettings:
        """GENIE_K8S_NAMESPACE, _IMAGE, _CLAIM, _MOUNT, _SERVICE_ACCOUNT, _CPU, _MEMORY, _IMAGE_PULL_SECRETS (a, b),
        _GPU_NODE_SELECTOR and _GPU_TOLERATIONS (JSON); unset or empty: the defaults. The Helm chart sets them."""
        env = os.environ if env is None else env
        defaults = cls()

        def get(key: str, default: str = "") -> str:
            return env.get(f"GENIE_K8S_{key}") or default

        def get_json(key: str, default: Any, kind: type) -> Any:
            try:
                value = json.loads(get(key) or "null")
            except ValueError as exc:
                raise ValueError(f"GENIE_K8S_{key} is not JSON: {exc}") from exc
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"GENIE_K8S_{key} must be a JSON {kind.__name__}, got {value!r}")
            return default if value is None else value

        return cls(namespace=get("NAMESPACE", defaults.namespace), image=get("IMAGE"), claim=get("CLAIM"),
                   mount_path=get("MOUNT", defaults.mount_path), service_account=get("SERVICE_ACCOUNT"),
                   cpu=get("CPU", defaults.cpu), memory=get("MEMORY", defaults.memory),
                   image_pull_secrets=tuple(n.strip() for n in get("IMAGE_PULL_SECRETS").split(",") if n.strip()),
                   gpu_node_selector=get_json("GPU_NODE_SELECTOR", {}, dict),
                   gpu_tolerations=tuple(get_json("GPU_TOLERATIONS", [], list)))

    def spec(self, job_id: str, kind: str, world: Mapping[str, Any], run_root: str, nodes: int = 1,
             gpus_per_node: int = 0, **options: Any) -> KubeTrainSpec:
        """A KubeTrainSpec for one run in this namespace, image and claim; `options` are further KubeTrainSpec fields."""
        if not self.image:
            raise ValueError("GENIE_K8S_IMAGE is not set: the training pods need an image (the chart sets it when "
                             "worker.kubernetes.enabled)")
        if not self.claim:
            raise ValueError("GENIE_K8S_CLAIM is not set: the training pods need the PVC of the jobs volume")
        base = dict(namespace=self.namespace, image=self.image, claim=self.claim, mount_path=self.mount_path,
                    service_account=self.service_account, cpu=self.cpu, memory=self.memory,
                    image_pull_secrets=self.image_pull_secrets)
        if gpus_per_node:
            base |= dict(node_selector=self.gpu_node_selector, tolerations=self.gpu_tolerations)
        return KubeTrainSpec(job_id=job_id, kind=kind, world=world, run_root=str(run_root), nodes=nodes,
                             gpus_per_node=gpus_per_node, **(base | options))


# --- manifests ---------------------------------------------------------------------------------------------------


def labels(spec: KubeTrainSpec) -> dict[str, str]:
    """Labels of every object of the job (and of its pods): the Service selects the pods by these."""
    return {"app.kubernetes.io/name": "genie", "app.kubernetes.io/component": "train",
            "app.kubernetes.io/part-of": "genie", "app.kubernetes.io/managed-by": "genie-launcher",
            JOB_LABEL: spec.name, KIND_LABEL: spec.kind}


def _metadata(spec: KubeTrainSpec) -> dict[str, Any]:
    return {"name": spec.name, "namespace": spec.namespace, "labels": labels(spec),
            "annotations": {JOB_ID_ANNOTATION: spec.job_id, FINGERPRINT_ANNOTATION: spec.fingerprint}}


def selector(spec: KubeTrainSpec) -> dict[str, str]:
    return {JOB_LABEL: spec.name, "app.kubernetes.io/component": "train"}


def build_configmap(spec: KubeTrainSpec) -> dict[str, Any]:
    """The training config as world.json (what `genie train --config` reads)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(spec),
            "data": {CONFIG_FILE: json.dumps(dict(spec.world), indent=2, sort_keys=True)}}


def build_headless_service(spec: KubeTrainSpec) -> dict[str, Any]:
    """Headless Service whose only job is DNS: `<job>-<i>.<svc>` for every pod, ready or not."""
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _metadata(spec),
        "spec": {
            "clusterIP": "None",
            "selector": selector(spec),
            # Ranks look pod 0 up while it starts: before it is Ready, which a torchrun pod never reports anyway.
            "publishNotReadyAddresses": True,
            "ports": [{"name": RDZV_PORT_NAME, "port": spec.rdzv_port, "targetPort": spec.rdzv_port, "protocol": "TCP"}],
        },
    }


def torchrun_command(spec: KubeTrainSpec) -> list[str]:
    """The container's command; $(JOB_COMPLETION_INDEX) is the pod's index, which the Job controller sets in its env."""
    cmd = ["torchrun", "--nnodes", str(spec.nodes), "--nproc-per-node", str(spec.procs),
           "--node-rank", "$(JOB_COMPLETION_INDEX)", "--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint,
           "--rdzv-id", spec.name, "-m", "genie.cli", "train", spec.kind,
           "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--run-root", spec.run_root, "--quiet",
           # Explicit, so a pod without its GPUs fails at start instead of training on the CPU unnoticed.
           "--device", "cuda" if spec.gpus_per_node else "cpu"]
    for flag, path in (("--tokenizer", spec.tokenizer), ("--lam", spec.lam)):
        if path:
            cmd += [flag, path]
    if spec.threads:
        cmd += ["--threads", str(spec.threads)]
    if not spec.tensorboard:
        cmd.append("--no-tensorboard")
    return cmd


def build_job(spec: KubeTrainSpec) -> dict[str, Any]:
    """The Indexed batch/v1 Job: completions = parallelism = nodes, pod i is torchrun node i."""
    resources: dict[str, Any] = {"requests": {"cpu": spec.cpu, "memory": spec.memory}, "limits": {"memory": spec.memory}}
    if spec.gpus_per_node:
        resources["limits"]["nvidia.com/gpu"] = spec.gpus_per_node
    env = [
        {"name": "GENIE_JOB_ID", "value": spec.job_id},
        {"name": "HOME", "value": "/tmp"},  # a writable home on the read-only root filesystem
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # `kubectl logs` shows lines as they come
        *({"name": k, "value": str(v)} for k, v in sorted(spec.env.items())),
    ]
    container = {
        "name": "train",
        "image": spec.image,
        "command": torchrun_command(spec),
        "env": env,
        "ports": [{"name": RDZV_PORT_NAME, "containerPort": spec.rdzv_port, "protocol": "TCP"}],
        "resources": resources,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "jobs", "mountPath": spec.mount_path},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    pod: dict[str, Any] = {
        # Pod i gets hostname <job>-i; the subdomain makes it <job>-i.<svc> in DNS (the rendezvous endpoint).
        "subdomain": spec.name,
        "restartPolicy": "Never",  # the Job replaces failed pods; podFailurePolicy needs Never
        "automountServiceAccountToken": False,  # training never calls the API server
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": spec.name, "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}]}},
            {"name": "jobs", "persistentVolumeClaim": {"claimName": spec.claim}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            # DataLoader workers and NCCL share memory through /dev/shm; the container default (64 MiB) is too small.
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        ],
    }
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.nodes,
        "parallelism": spec.nodes,
        "backoffLimit": spec.backoff_limit,
        "template": {"metadata": {"labels": labels(spec), "annotations": {JOB_ID_ANNOTATION: spec.job_id}},
                     "spec": pod},
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    if spec.pod_failure_policy:
        job_spec["podFailurePolicy"] = {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(spec), "spec": job_spec}


def build_all(spec: KubeTrainSpec) -> list[dict[str, Any]]:
    """ConfigMap, Service, Job: in the order they are created."""
    return [build_configmap(spec), build_headless_service(spec), build_job(spec)]
