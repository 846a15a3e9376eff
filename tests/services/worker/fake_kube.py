"""TEST DOUBLE -- not Kubernetes. A fake Kubernetes API server (plain JSON over HTTP, on 127.0.0.1) plus a fake
kubelet that runs each pod's container command as a local process, so the real `kubernetes` client in a real worker
can launch, watch, read the logs of and delete training Jobs whose pods really train (torchrun, gloo).

It serves only what genie.launch.kubernetes uses, with the request paths of the official client:

    POST   /api/v1/namespaces/{ns}/{configmaps|services}            create (201; 409 AlreadyExists; 422 bad name)
    GET    /api/v1/namespaces/{ns}/{configmaps|services|pods}/{name} read (404 NotFound)
    PATCH  /api/v1/namespaces/{ns}/{configmaps|services}/{name}     JSON Patch (add/replace) or a merge patch
    DELETE /api/v1/namespaces/{ns}/{configmaps|services}/{name}     (the propagationPolicy is recorded)
    GET    /api/v1/namespaces/{ns}/pods?labelSelector=k=v,...       list
    GET    /api/v1/namespaces/{ns}/pods/{name}/log?container=&tailLines=   the pod's captured stdout+stderr
    POST   /apis/batch/v1/namespaces/{ns}/jobs                      create: the "job controller" starts the pods
    GET    /apis/batch/v1/namespaces/{ns}/jobs[/{name}]             list (fieldSelector=metadata.name=X) / read
    GET    /apis/batch/v1/namespaces/{ns}/jobs?watch=true&resourceVersion=&timeoutSeconds=
                                                                    newline-delimited {"type", "object"} events
    DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}               kills the pods' processes, then DELETED

Every object gets metadata.uid, resourceVersion (one global counter) and creationTimestamp. Errors carry a
Kubernetes `Status` body. Requests need the kubeconfig's bearer token (401 otherwise); namespaces in `forbidden`
answer 403 as missing RBAC would; anything else is 404 and recorded in `unexpected`.

Deliberate simplifications (documented here, relied on by nobody):
- The job controller handles Indexed Jobs with parallelism == completions only. A pod that exits 0 counts as
  succeeded; one that exits non-zero counts as failed and is replaced (same index, like the controller) until
  failed > backoffLimit: then FailureTarget, the remaining pods are killed and deleted, and Failed
  (BackoffLimitExceeded); the pods that failed on their own stay, with their logs, until the Job goes. There
  is no retry back-off delay, no podFailurePolicy, no activeDeadlineSeconds and no TTL.
- No garbage collector: ownerReferences are stored but deleting a Job does not delete its ConfigMap or Service.
- DELETE of a Job (any propagationPolicy but Orphan) kills its pods' processes before answering (a Foreground delete
  done synchronously); the watch then sees DELETED.
- A watch ends after min(timeoutSeconds, max_watch_seconds): an API server may end any watch early, and clients
  must resume from the last resourceVersion (the launcher does). No 410 Gone: the event log is never compacted.
- Pods are local processes (see container_argv() for what stands in for the image, DNS and volumes).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parents[3]
BACKOFF = "Job has reached the specified backoff limit"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"  # label and annotation the job controller puts on pods
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ROUTE = re.compile(r"^/(?:api/v1|apis/batch/v1)/namespaces/(?P<ns>[^/]+)/(?P<kind>configmaps|services|pods|jobs)"
                    r"(?:/(?P<name>[^/]+)(?P<log>/log)?)?$")
_GROUP = {"configmaps": "", "services": "", "pods": "", "jobs": "batch"}
_KIND = {"configmaps": "ConfigMap", "services": "Service", "pods": "Pod", "jobs": "Job"}
# Environment of the test process that a pod must not inherit: worker/launcher settings, API access, torchrun state.
_NOT_INHERITED = re.compile(r"^(GENIE_|KUBE|KUBERNETES_|RANK$|LOCAL_RANK$|WORLD_SIZE$|LOCAL_WORLD_SIZE$|MASTER_|"
                            r"GROUP_RANK$|ROLE_|TORCHELASTIC_|OMP_NUM_THREADS$)")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_argv(job: dict[str, Any], index: int, config_dirs: dict[str, Path], ports: dict[int, int],
                   torchrun: str) -> tuple[list[str], dict[str, str]]:
    """The command line and env the fake kubelet runs for pod `index` of `job`, in place of its container.

    Each substitution stands in for what the cluster would provide; nothing else of the command is changed:
      1. env: the container's env plus JOB_COMPLETION_INDEX (the job controller sets it on Indexed pods), and
         `$(VAR)` in command/args expanded from it, as the kubelet does;
      2. a ConfigMap volume's mountPath (e.g. /etc/genie) -> config_dirs[mountPath], a local dir holding its files;
      3. the pod DNS names `<job>-<i>.<subdomain>` (the headless Service) -> 127.0.0.1, and their container ports
         (29500) -> ports[containerPort], a free local port (29500 may be taken on a shared machine);
      4. command[0] `torchrun` -> the venv's torchrun (what the image's PATH would find).
    PersistentVolumeClaim mounts are used as they are: the test points the mount path at a local dir (the shared
    volume), emptyDir mounts (/tmp, /dev/shm) are the host's."""
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}
    env["JOB_COMPLETION_INDEX"] = str(index)

    def expand(arg: str) -> str:
        arg = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
        for mount, local in config_dirs.items():
            if arg == mount or arg.startswith(mount.rstrip("/") + "/"):
                arg = str(local) + arg[len(mount.rstrip("/")):]
        hosts = "|".join(re.escape(f"{job['metadata']['name']}-{i}.{pod.get('subdomain', '')}")
                         for i in range(spec["completions"]))
        arg = re.sub(rf"(?:{hosts}):(\d+)", lambda m: f"127.0.0.1:{ports.get(int(m.group(1)), m.group(1))}", arg)
        return re.sub(rf"^(?:{hosts})$", "127.0.0.1", arg)

    argv = [expand(a) for a in [*container.get("command", []), *container.get("args", [])]]
    if argv and argv[0] == "torchrun":
        argv[0] = torchrun
    return argv, env


@dataclass
class PodRun:
    """One pod: a local process group running the container's command."""

    name: str
    job: str
    namespace: str
    index: int
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    exit_code: int | None = None
    killed: bool = False  # by a Job delete or a failed Job: its exit is not counted

    def alive(self) -> bool:
        """True while any process of the pod's process group exists (torchrun's workers included)."""
        if self.proc is None:
            return False
        if self.proc.poll() is None:
            return True
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Recorded:
    """What the fake saw: every request, and the deletes with their propagationPolicy."""

    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path?query)
    deletes: list[tuple[str, str, str | None]] = field(default_factory=list)  # (kind, name, propagationPolicy)
    unexpected: list[str] = field(default_factory=list)
    unauthorized: list[str] = field(default_factory=list)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class FakeKube:
    """A TEST DOUBLE of the Kubernetes API server and kubelet (see the module docstring). Use as a context manager."""

    def __init__(self, workdir: Path, *, token: str = "fake-token", forbidden: tuple[str, ...] = (),
                 max_watch_seconds: float = 2.0, kill_grace: float = 5.0) -> None:
        self.workdir = Path(workdir)
        self.token, self.forbidden = token, set(forbidden)
        self.max_watch_seconds, self.kill_grace = max_watch_seconds, kill_grace
        self.torchrun = str(Path(sys.executable).parent / "torchrun")
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, ns, name) -> object
        self.events: list[tuple[int, str, str, str, dict[str, Any]]] = []  # (rv, kind, ns, type, object)
        self.created: list[tuple[str, str, dict[str, Any]]] = []  # (kind, ns, object as created)
        self.pods: list[PodRun] = []
        self.seen = Recorded()
        self.cond = threading.Condition()
        self.rv = 0
        self.closing = False
        self.server: ThreadingHTTPServer | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def __enter__(self) -> FakeKube:
        self.workdir.mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (_Handler,), {"fake": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="fake-kube", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            pods = [p for p in self.pods if p.alive()]
            for p in pods:
                p.killed = True
        self._kill(pods)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig (JSON is YAML) pointing at this server with its bearer token."""
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                  "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                  "users": [{"name": "fake", "user": {"token": self.token}}],
                  "contexts": [{"name": "fake",
                                "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}]}
        path.write_text(json.dumps(config))
        return path

    # --- what tests read -------------------------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((kind, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def created_with_label(self, key: str, value: str) -> list[tuple[str, str]]:
        """(kind, name) of every object created with this label (pods excluded)."""
        with self.cond:
            return [(k, o["metadata"]["name"]) for k, _, o in self.created
                    if (o["metadata"].get("labels") or {}).get(key) == value]

    def pods_of(self, job: str) -> list[PodRun]:
        with self.cond:
            return [p for p in self.pods if p.job == job]

    def wait_for(self, cond: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake kube: timed out waiting for {what}")
            time.sleep(0.05)

    # --- the store -------------------------------------------------------------------------------------------------

    def _bump(self, kind: str, ns: str, obj: dict[str, Any], type_: str) -> None:
        """Under self.cond: a new resourceVersion for obj, and its watch event."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, kind, ns, type_, copy.deepcopy(obj)))
        self.cond.notify_all()

    def create(self, kind: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.get("metadata") or {}
        name = meta.get("name", "")
        if meta.get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace sent "
                                              "on the request")
        if not _NAME.match(name) or len(name) > 63:
            raise ApiError(422, "Invalid", f'{_KIND[kind]} "{name}" is invalid: metadata.name: Invalid value')
        if kind == "jobs":
            spec = body.get("spec") or {}
            if spec.get("completionMode") != "Indexed" or spec.get("parallelism") != spec.get("completions"):
                raise ApiError(422, "Invalid", "this fake runs Indexed Jobs with parallelism == completions only")
        with self.cond:
            if (kind, ns, name) in self.objects:
                raise ApiError(409, "AlreadyExists", f'{_resource(kind)} "{name}" already exists')
            obj = copy.deepcopy(body)
            obj.setdefault("apiVersion", "batch/v1" if kind == "jobs" else "v1")
            obj.setdefault("kind", _KIND[kind])
            obj["metadata"].update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now())
            if kind == "jobs":
                obj["status"] = {}
            self.objects[(kind, ns, name)] = obj
            self.created.append((kind, ns, copy.deepcopy(body)))
            self._bump(kind, ns, obj, "ADDED")
            if kind == "jobs":
                self._start_job(ns, obj)
            return copy.deepcopy(obj)

    def read(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        with self.cond:
            obj = self.objects.get((kind, ns, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{_resource(kind)} "{name}" not found')
            return copy.deepcopy(obj)

    def patch(self, kind: str, ns: str, name: str, body: Any, content_type: str) -> dict[str, Any]:
        with self.cond:
            obj = self.objects.get((kind, ns, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind} "{name}" not found')
            if "json-patch" in content_type:
                for op in body:
                    if op.get("op") not in ("add", "replace"):
                        raise ApiError(422, "Invalid", f"this fake applies add/replace only, got {op.get('op')}")
                    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
                    target = obj
                    for p in parents:
                        target = target[p]
                    target[last] = op["value"]
            elif "merge-patch" in content_type or "strategic" in content_type:
                _merge(obj, body)
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: "
                                                            f"{content_type}")
            self._bump(kind, ns, obj, "MODIFIED")
            return copy.deepcopy(obj)

    def delete(self, kind: str, ns: str, name: str, policy: str | None) -> None:
        self.seen.deletes.append((kind, name, policy))
        with self.cond:
            obj = self.objects.pop((kind, ns, name), None)
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind} "{name}" not found')
            pods = []
            if kind == "jobs" and policy != "Orphan":
                pods = [p for p in self.pods if p.job == name and p.namespace == ns and p.alive()]
                for p in pods:
                    p.killed = True
        self._kill(pods)  # Foreground: the pods go before the Job does
        with self.cond:
            for p in self.pods:
                pod = self.objects.pop(("pods", ns, p.name), None) if p.job == name and p.namespace == ns else None
                if pod is not None:
                    pod["metadata"]["deletionTimestamp"] = _now()
                    self._bump("pods", ns, pod, "DELETED")
            obj["metadata"]["deletionTimestamp"] = _now()
            self._bump(kind, ns, obj, "DELETED")

    def select(self, kind: str, ns: str, query: dict[str, str]) -> list[dict[str, Any]]:
        with self.cond:  # in creation order (dicts keep insertion order)
            return [copy.deepcopy(o) for (k, n, _), o in self.objects.items()
                    if k == kind and n == ns and _matches(o, query)]

    # --- the job controller and kubelet ----------------------------------------------------------------------------

    def _start_job(self, ns: str, job: dict[str, Any]) -> None:
        """Under self.cond: one pod per index, then the Job's status says they are running."""
        job["status"] = {"startTime": _now(), "active": 0, "ready": 0, "succeeded": 0, "failed": 0}
        container = job["spec"]["template"]["spec"]["containers"][0]
        job["_ports"] = {p["containerPort"]: free_port() for p in container.get("ports", [])}  # dropped on output
        for index in range(job["spec"]["completions"]):
            self._start_pod(ns, job, index)
        self._bump("jobs", ns, job, "MODIFIED")

    def _start_pod(self, ns: str, job: dict[str, Any], index: int) -> None:
        """Under self.cond: a pod object and its process; a thread reports its exit."""
        name = job["metadata"]["name"]
        pod_name = f"{name}-{index}-{uuid.uuid4().hex[:5]}"
        template = job["spec"]["template"]
        podspec = template["spec"]
        pod_dir = self.workdir / "pods" / pod_name
        pod_dir.mkdir(parents=True)
        config_dirs = {}
        container = podspec["containers"][0]
        volumes = {v["name"]: v for v in podspec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            source = volumes.get(mount["name"], {}).get("configMap")
            if source is None:
                continue
            cm = self.objects.get(("configmaps", ns, source["name"]))
            data = (cm or {}).get("data") or {}
            local = pod_dir / f"volume-{mount['name']}"
            local.mkdir()
            for item in source.get("items") or [{"key": k, "path": k} for k in data]:
                (local / item["path"]).write_text(data.get(item["key"], ""))
            config_dirs[mount["mountPath"]] = local
        argv, pod_env = container_argv(job, index, config_dirs, job["_ports"], self.torchrun)
        env = {k: v for k, v in os.environ.items() if not _NOT_INHERITED.match(k)}
        env.update(OMP_NUM_THREADS="1")  # what a small CPU limit would give; this machine's cores are shared
        env.update(pod_env)
        labels = {**(template.get("metadata", {}).get("labels") or {}), INDEX_KEY: str(index), "job-name": name,
                  "batch.kubernetes.io/job-name": name}
        annotations = {**(template.get("metadata", {}).get("annotations") or {}), INDEX_KEY: str(index)}
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "namespace": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                            "labels": labels, "annotations": annotations,
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                 "uid": job["metadata"]["uid"], "controller": True}]},
               "spec": {**copy.deepcopy(podspec), "hostname": f"{name}-{index}"},
               "status": {"phase": "Running", "startTime": _now()}}
        pod["status"]["containerStatuses"] = [_container_status(pod, True, {"running": {"startedAt": _now()}})]
        run = PodRun(pod_name, name, ns, index, argv, pod_env, pod_dir / "log.txt")
        self.objects[("pods", ns, pod_name)] = pod
        self._bump("pods", ns, pod, "ADDED")
        self.pods.append(run)
        with open(run.log_path, "wb") as log:
            run.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        job["status"]["active"] += 1
        job["status"]["ready"] += 1  # no readiness probe: Ready once running
        threading.Thread(target=self._reap, args=(run,), name=f"kubelet-{pod_name}", daemon=True).start()

    def _reap(self, run: PodRun) -> None:
        code = run.proc.wait()
        failing: list[PodRun] | None = None
        with self.cond:
            run.exit_code = code
            pod = self.objects.get(("pods", run.namespace, run.name))
            if pod is not None:
                pod["status"].update(phase="Succeeded" if code == 0 else "Failed", containerStatuses=[_container_status(
                    pod, False, {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}})])
                self._bump("pods", run.namespace, pod, "MODIFIED")
            job = self.objects.get(("jobs", run.namespace, run.job))
            if run.killed or job is None or self.closing:
                return
            status, spec = job["status"], job["spec"]
            if any(c["type"] in ("Complete", "FailureTarget", "Failed") for c in status.get("conditions", [])):
                return  # the Job has its outcome: later pod exits are not counted
            status["active"] -= 1
            status["ready"] -= 1
            if code == 0:
                status["succeeded"] += 1
                if status["succeeded"] == spec["completions"]:
                    message = "Reached expected number of succeeded pods"
                    status.update(completionTime=_now(), conditions=[
                        _condition("SuccessCriteriaMet", "CompletionsReached", message),
                        _condition("Complete", "CompletionsReached", message)])
            else:
                status["failed"] += 1
                if status["failed"] > spec.get("backoffLimit", 6):
                    # As the real controller: FailureTarget first, the pods terminated, then Failed.
                    target = _condition("FailureTarget", "BackoffLimitExceeded", BACKOFF)
                    status.setdefault("conditions", []).append(target)
                    failing = [p for p in self.pods if p.job == run.job and p.namespace == run.namespace and p.alive()]
                    for p in failing:
                        p.killed = True
                else:
                    self._start_pod(run.namespace, job, run.index)  # the controller replaces a failed pod
            self._bump("jobs", run.namespace, job, "MODIFIED")
        if failing is None:
            return
        self._kill(failing)
        with self.cond:
            for p in failing:  # the controller deletes the pods it terminates; failed pods stay for their logs
                pod = self.objects.pop(("pods", p.namespace, p.name), None)
                if pod is not None:
                    pod["metadata"]["deletionTimestamp"] = _now()
                    self._bump("pods", p.namespace, pod, "DELETED")
            if self.objects.get(("jobs", run.namespace, run.job)) is job:
                job["status"].update(active=0, ready=0)
                job["status"]["conditions"].append(_condition("Failed", "BackoffLimitExceeded", BACKOFF))
                self._bump("jobs", run.namespace, job, "MODIFIED")

    def _kill(self, pods: list[PodRun]) -> None:
        """SIGTERM to each pod's process group, SIGKILL after kill_grace (a pod's terminationGracePeriodSeconds)."""
        for p in pods:
            with contextlib.suppress(ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                os.killpg(p.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while any(p.alive() for p in pods) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in pods:
            with contextlib.suppress(ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                os.killpg(p.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                p.proc.wait(timeout=10)


def _resource(kind: str) -> str:
    """As the API server names it in messages: configmaps, jobs.batch."""
    return f"{kind}.{_GROUP[kind]}" if _GROUP[kind] else kind


def _container_status(pod: dict[str, Any], ready: bool, state: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {"name": container["name"], "image": container["image"], "imageID": "", "ready": ready,
            "restartCount": 0, "started": ready, "state": state}


def _condition(type_: str, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": "True", "reason": reason, "message": message, "lastProbeTime": _now(),
            "lastTransitionTime": _now()}


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v


def _matches(obj: dict[str, Any], query: dict[str, str]) -> bool:
    """fieldSelector metadata.name=X / metadata.namespace=X and labelSelector k=v,k2==v2 (equality only)."""
    meta = obj["metadata"]
    for term in filter(None, (query.get("fieldSelector") or "").split(",")):
        key, _, value = term.replace("==", "=").partition("=")
        if key not in ("metadata.name", "metadata.namespace"):
            raise ApiError(400, "BadRequest", f'"{key}" is not a known field selector')
        if meta.get(key.split(".")[1]) != value:
            return False
    for term in filter(None, (query.get("labelSelector") or "").split(",")):
        key, _, value = term.replace("==", "=").partition("=")
        if not _ or (meta.get("labels") or {}).get(key) != value:
            return False
    return True


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams the client reads event by event
    fake: FakeKube

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        fake = self.fake
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        fake.seen.requests.append((method, self.path))
        match = _ROUTE.match(url.path)
        try:
            if self.headers.get("Authorization") != f"Bearer {fake.token}":
                fake.seen.unauthorized.append(f"{method} {self.path}")
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if match is None:
                fake.seen.unexpected.append(f"{method} {self.path}")
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({url.path})")
            ns, kind, name, log = match["ns"], match["kind"], match["name"], match["log"]
            if (kind == "jobs") != url.path.startswith("/apis/batch/v1/"):
                fake.seen.unexpected.append(f"{method} {self.path}")
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({url.path})")
            if ns in fake.forbidden:
                verb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch",
                        "DELETE": "delete"}[method]
                raise ApiError(403, "Forbidden", f'{_resource(kind)} is forbidden: '
                                                 f'User "system:serviceaccount:genie:genie-worker" cannot {verb} '
                                                 f'resource "{kind}" in API group "{_GROUP[kind]}" in the namespace '
                                                 f'"{ns}"')
            body = json.loads(raw) if raw else None
            if log:
                if method != "GET" or kind != "pods":
                    raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
                self._log(ns, name, query)
            elif method == "POST" and not name and kind != "pods":
                self._send(201, _public(fake.create(kind, ns, body)))
            elif method == "GET" and name:
                self._send(200, _public(fake.read(kind, ns, name)))
            elif method == "GET" and query.get("watch", "").lower() in ("true", "1"):
                self._watch(kind, ns, query)
            elif method == "GET":
                items = [_public(o) for o in fake.select(kind, ns, query)]
                with fake.cond:
                    rv = str(fake.rv)
                self._send(200, {"kind": f"{_KIND[kind]}List", "apiVersion": "batch/v1" if kind == "jobs" else "v1",
                                 "metadata": {"resourceVersion": rv}, "items": items})
            elif method == "PATCH" and name and kind != "pods":
                self._send(200, _public(fake.patch(kind, ns, name, body, self.headers.get("Content-Type", ""))))
            elif method == "DELETE" and name and kind != "pods":
                policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
                fake.delete(kind, ns, name, policy)
                self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                 "details": {"name": name, "group": _GROUP[kind], "kind": kind}})
            else:
                fake.seen.unexpected.append(f"{method} {self.path}")
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                                                        "resource")
        except ApiError as exc:
            self._send(exc.code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": exc.message, "reason": exc.reason, "code": exc.code})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, code: int, obj: Any, content_type: str = "application/json") -> None:
        data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _log(self, ns: str, name: str, query: dict[str, str]) -> None:
        fake = self.fake
        fake.read("pods", ns, name)  # 404 when there is no such pod
        run = next(p for p in fake.pods if p.name == name)
        if query.get("container", "train") != "train":
            raise ApiError(400, "BadRequest", f"container {query['container']} is not valid for pod {name}")
        lines = run.log().splitlines(keepends=True)
        if query.get("tailLines"):
            lines = lines[-int(query["tailLines"]):] if int(query["tailLines"]) > 0 else []
        self._send(200, "".join(lines), "text/plain")

    def _watch(self, kind: str, ns: str, query: dict[str, str]) -> None:
        """Events after resourceVersion (or the current objects as ADDED when it is unset or 0), chunk by chunk,
        until timeoutSeconds or max_watch_seconds."""
        fake = self.fake
        timeout = min(float(query.get("timeoutSeconds") or 1800), fake.max_watch_seconds)
        deadline = time.monotonic() + timeout
        with fake.cond:  # a bad selector: an error before the stream starts
            current, now = fake.select(kind, ns, query), fake.rv
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        since = int(query.get("resourceVersion") or 0)
        if since == 0:
            for obj in current:
                self._chunk({"type": "ADDED", "object": _public(obj)})
            since = now
        while True:
            with fake.cond:
                pending = [(rv, t, o) for rv, k, n, t, o in fake.events
                           if rv > since and k == kind and n == ns and _matches(o, query)]
                if not pending:
                    left = deadline - time.monotonic()
                    if left <= 0 or fake.closing:
                        break
                    fake.cond.wait(min(left, 0.5))
                    continue
            for rv, type_, obj in pending:
                self._chunk({"type": type_, "object": _public(obj)})
                since = rv
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


