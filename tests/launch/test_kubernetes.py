"""KubeLauncher against the official client's API surface, without a cluster.

The APIs are `create_autospec` mocks of BatchV1Api / CoreV1Api (a wrong method name or a wrong number of arguments
fails), and every call also goes through the real generated method over a stub transport, which refuses unknown
keyword arguments and missing required ones. Watches run the client's real kubernetes.watch.Watch over scripted
HTTP responses: JSON lines of real V1Job objects, and the API server's ERROR events (410 Gone).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import kubernetes
import pytest
from kubernetes.client import (
    ApiClient,
    V1Job,
    V1JobCondition,
    V1JobList,
    V1JobStatus,
    V1ListMeta,
    V1ObjectMeta,
    V1Pod,
    V1PodList,
)
from kubernetes.client.exceptions import ApiException, ApiTypeError

from genie.launch.kubernetes import (
    JobProgress,
    JobState,
    KubeLauncher,
    LaunchError,
    checkpoint_step_reader,
)
from genie.launch.objects import FINGERPRINT_ANNOTATION, KubeTrainSpec, build_all

NS = "genie"
SPEC = KubeTrainSpec(job_id="job-7", kind="lam", world={"name": "demo"}, run_root="/data/jobs/job-7/runs",
                     image="genie:0.1.0", claim="t-genie-jobs", namespace=NS, nodes=2)
NAME = SPEC.name


# The client methods the launcher may call.
CHECKED = {
    "BatchV1Api": ["create_namespaced_job", "read_namespaced_job", "list_namespaced_job", "delete_namespaced_job"],
    "CoreV1Api": [f"{verb}_namespaced_{kind}" for verb in ("create", "read", "patch", "delete")
                  for kind in ("config_map", "service")] + ["list_namespaced_pod", "read_namespaced_pod_log"],
}


class Api:
    """An autospec'd client API whose calls are checked by the real generated method, then answered from a script."""

    def __init__(self, cls: type) -> None:
        # Autospec of the real methods the launcher may call (all of CoreV1Api takes half a second per test): any
        # other name fails with AttributeError, a wrong number of arguments with TypeError.
        methods = {name: getattr(cls, name) for name in CHECKED[cls.__name__]}
        self.mock = mock.create_autospec(type(cls.__name__, (), methods), instance=True)
        self._real = cls(api_client=mock.MagicMock())  # the real argument checks, a transport that sends nothing
        self._answers: dict[str, list] = {}
        for name in CHECKED[cls.__name__]:
            getattr(self.mock, name).side_effect = self._handler(name)

    def answer(self, name: str, *answers: Any) -> None:
        """The next calls of `name` return (or raise) these in turn; the last one repeats. A callable is called."""
        self._answers[name] = list(answers)

    def _handler(self, name: str):
        def handle(*args, **kwargs):
            getattr(self._real, name)(*args, **kwargs)  # ApiTypeError / ApiValueError on bad arguments
            queue = self._answers.get(name)
            if not queue:
                return mock.DEFAULT
            answer = queue.pop(0) if len(queue) > 1 else queue[0]
            if isinstance(answer, Exception):
                raise answer
            return answer(*args, **kwargs) if callable(answer) else answer

        return handle

    def calls(self, name: str) -> list:
        return getattr(self.mock, name).call_args_list


@pytest.fixture
def batch() -> Api:
    return Api(kubernetes.client.BatchV1Api)


@pytest.fixture
def core() -> Api:
    return Api(kubernetes.client.CoreV1Api)


@pytest.fixture
def launcher(batch, core) -> KubeLauncher:
    return KubeLauncher(batch.mock, core.mock, poll_seconds=5)


def api_error(status: int, reason: str, message: str = "") -> ApiException:
    exc = ApiException(status=status, reason=reason)
    exc.body = json.dumps({"kind": "Status", "code": status, "reason": reason, "message": message})
    return exc


def job(rv: int, active: int = 0, ready: int = 0, succeeded: int = 0, failed: int = 0,
        condition: tuple[str, str, str] | None = None, fingerprint: str = SPEC.fingerprint) -> V1Job:
    conditions = None
    if condition:
        kind, reason, message = condition
        conditions = [V1JobCondition(type=kind, status="True", reason=reason, message=message)]
    return V1Job(api_version="batch/v1", kind="Job",
                 metadata=V1ObjectMeta(name=NAME, namespace=NS, resource_version=str(rv), uid="uid-7",
                                       annotations={FINGERPRINT_ANNOTATION: fingerprint}),
                 status=V1JobStatus(active=active, ready=ready, succeeded=succeeded, failed=failed,
                                    conditions=conditions))


def listed(rv: int, *jobs: V1Job) -> V1JobList:
    return V1JobList(items=list(jobs), metadata=V1ListMeta(resource_version=str(rv)))


def event(kind: str, obj: V1Job) -> dict:
    return {"type": kind, "object": ApiClient().sanitize_for_serialization(obj)}


GONE = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                    "reason": "Expired", "message": "too old resource version: 10 (25)"}}


class Response:
    """What urllib3 hands the client's Watch: newline-separated JSON events, streamed in chunks."""

    def __init__(self, events: list[dict]) -> None:
        self.data = "".join(json.dumps(e) + "\n" for e in events).encode()

    def stream(self, amt=None, decode_content=False):
        yield from (self.data[i:i + 64] for i in range(0, len(self.data), 64))

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def script_cluster(batch: Api, lists: list[V1JobList], streams: list[list[dict]]) -> None:
    """list_namespaced_job answers plain lists from `lists`, and watch=True calls with the event streams in turn."""
    lists, streams = list(lists), list(streams)

    def answer(namespace, **kwargs):
        if kwargs.get("watch"):
            assert streams, "the launcher watched more often than scripted"
            return Response(streams.pop(0))
        assert lists, "the launcher listed more often than scripted"
        return lists.pop(0)

    batch.answer("list_namespaced_job", answer)


def watch_calls(batch: Api) -> list[dict]:
    return [c.kwargs for c in batch.calls("list_namespaced_job") if c.kwargs.get("watch")]


def list_calls(batch: Api) -> list[dict]:
    return [c.kwargs for c in batch.calls("list_namespaced_job") if not c.kwargs.get("watch")]


# --- the test harness itself ---------------------------------------------------------------------------------------


def test_the_fake_apis_refuse_wrong_names_and_arguments(batch, core):
    # Proves the checks the tests below rely on are live.
    with pytest.raises(AttributeError):
        batch.mock.create_job(NS, {})
    with pytest.raises(AttributeError):
        core.mock.create_namespaced_pod(NS, {})  # real, but the launcher has no business creating pods
    with pytest.raises(ApiTypeError, match="unexpected keyword argument 'selector'"):
        batch.mock.list_namespaced_job(NS, selector="x")
    with pytest.raises(TypeError):
        core.mock.delete_namespaced_service(NAME)  # the namespace is missing


# --- submit --------------------------------------------------------------------------------------------------------


def test_submit_creates_configmap_service_and_job_then_makes_the_job_own_them(launcher, batch, core):
    batch.answer("read_namespaced_job", job(5))
    submitted = launcher.submit(SPEC)
    assert (submitted.name, submitted.namespace, submitted.uid, submitted.created) == (NAME, NS, "uid-7", True)
    configmap, service, job_body = build_all(SPEC)
    assert core.calls("create_namespaced_config_map") == [mock.call(NS, configmap)]
    assert core.calls("create_namespaced_service") == [mock.call(NS, service)]
    assert batch.calls("create_namespaced_job") == [mock.call(NS, job_body)]
    for method in ("patch_namespaced_config_map", "patch_namespaced_service"):
        ((name, namespace, patch),) = [c.args for c in core.calls(method)]
        assert (name, namespace) == (NAME, NS)
        assert isinstance(patch, list)  # a list goes out as JSON Patch; a dict would be sent as one too, and fail
        (op,) = patch
        assert op["path"] == "/metadata/ownerReferences"
        assert op["value"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": NAME, "uid": "uid-7"}]
    assert not batch.calls("delete_namespaced_job")


def test_a_redelivered_submit_reuses_the_existing_objects(launcher, batch, core):
    exists = api_error(409, "Conflict", f'jobs.batch "{NAME}" already exists')
    for api, kind in ((core, "config_map"), (core, "service"), (batch, "job")):
        api.answer(f"create_namespaced_{kind}", exists)
    existing = V1ObjectMeta(name=NAME, annotations={FINGERPRINT_ANNOTATION: SPEC.fingerprint})
    core.answer("read_namespaced_config_map", kubernetes.client.V1ConfigMap(metadata=existing))
    core.answer("read_namespaced_service", kubernetes.client.V1Service(metadata=existing))
    batch.answer("read_namespaced_job", job(9))
    submitted = launcher.submit(SPEC)
    assert submitted.created is False and submitted.uid == "uid-7"
    assert not core.calls("delete_namespaced_config_map") and not batch.calls("delete_namespaced_job")


def test_a_name_taken_by_another_run_is_refused(launcher, batch, core):
    core.answer("create_namespaced_config_map", api_error(409, "Conflict"))
    other = V1ObjectMeta(name=NAME, annotations={FINGERPRINT_ANNOTATION: "0123456789abcdef"})
    core.answer("read_namespaced_config_map", kubernetes.client.V1ConfigMap(metadata=other))
    with pytest.raises(LaunchError, match="already exists for another training run") as info:
        launcher.submit(SPEC)
    assert info.value.status == 409 and not batch.calls("create_namespaced_job")


def test_forbidden_raises_a_clear_rbac_error(launcher, batch, core):
    core.answer("create_namespaced_config_map", api_error(
        403, "Forbidden", 'configmaps is forbidden: User "system:serviceaccount:genie:default" cannot create'))
    with pytest.raises(LaunchError) as info:
        launcher.submit(SPEC)
    message = str(info.value)
    assert info.value.status == 403 and "HTTP 403 Forbidden" in message and "cannot create" in message
    assert "RBAC" in message and "permission" in message and "worker.kubernetes.enabled" in message
    assert "\n" not in message
    assert not core.calls("create_namespaced_service") and not batch.calls("create_namespaced_job")


def test_a_refused_job_removes_the_configmap_and_service_it_came_with(launcher, batch, core):
    batch.answer("create_namespaced_job", api_error(422, "Unprocessable Entity", "spec.completions: Invalid value"))
    with pytest.raises(LaunchError, match="creating Job genie/genie-job-7 failed: HTTP 422 .*Invalid value"):
        launcher.submit(SPEC)
    assert core.calls("delete_namespaced_config_map") == [mock.call(NAME, NS)]
    assert core.calls("delete_namespaced_service") == [mock.call(NAME, NS)]


# --- watch ---------------------------------------------------------------------------------------------------------


def test_watch_follows_the_job_to_success(launcher, batch):
    script_cluster(batch, [listed(10, job(10))], [[
        event("MODIFIED", job(11, active=2)),
        event("MODIFIED", job(12, active=2, ready=2)),
        event("MODIFIED", job(13, succeeded=2, condition=("Complete", "CompletionsReached", "Reached 2 completions"))),
    ]])
    seen: list[JobProgress] = []
    outcome = launcher.watch("job-7", NS, on_progress=seen.append, should_stop=lambda: False)
    assert outcome.state == JobState.SUCCEEDED and outcome.reason == "CompletionsReached"
    assert [(p.active, p.ready, p.succeeded) for p in seen] == [(0, 0, 0), (2, 0, 0), (2, 2, 0), (0, 0, 2)]
    assert seen[-1].conditions == ("Complete",) and outcome.progress == seen[-1]
    assert list_calls(batch) == [{"field_selector": f"metadata.name={NAME}"}]
    (w,) = watch_calls(batch)
    assert w["field_selector"] == f"metadata.name={NAME}" and w["resource_version"] == "10"
    assert 1 <= w["timeout_seconds"] <= 5


def test_watch_surfaces_the_failure_reason(launcher, batch):
    script_cluster(batch, [listed(10, job(10, active=2))], [[
        event("MODIFIED", job(11, active=1, failed=1)),
        event("MODIFIED", job(12, failed=4, condition=("Failed", "BackoffLimitExceeded",
                                                       "Job has reached the specified backoff limit"))),
    ]])
    outcome = launcher.watch("job-7", NS)
    assert outcome.state == JobState.FAILED and outcome.reason == "BackoffLimitExceeded"
    assert "backoff limit" in outcome.message and outcome.progress.failed == 4


def test_a_job_already_finished_returns_at_once(launcher, batch):
    done = job(30, failed=1, condition=("Failed", "DeadlineExceeded", "Job was active longer than specified"))
    script_cluster(batch, [listed(30, done)], [])
    outcome = launcher.watch("job-7", NS)
    assert (outcome.state, outcome.reason) == (JobState.FAILED, "DeadlineExceeded") and not watch_calls(batch)


def test_watch_relists_after_410_gone(launcher, batch):
    script_cluster(batch, [listed(10, job(10, active=2)), listed(25, job(25, active=2, ready=2))], [
        [event("MODIFIED", job(11, active=2, ready=1)), GONE],
        [event("MODIFIED", job(26, succeeded=2, condition=("Complete", "CompletionsReached", "")))],
    ])
    seen: list[JobProgress] = []
    outcome = launcher.watch("job-7", NS, on_progress=seen.append)
    assert outcome.state == JobState.SUCCEEDED
    assert len(list_calls(batch)) == 2  # the expired watch is replaced by a fresh list ...
    assert [w["resource_version"] for w in watch_calls(batch)] == ["10", "25"]  # ... and a watch from its version
    assert [p.ready for p in seen] == [0, 1, 2, 0]


def test_watch_resumes_when_the_stream_ends(launcher, batch):
    steps = iter([None, 100, 250, 250, 400])
    script_cluster(batch, [listed(10, job(10))], [
        [event("MODIFIED", job(11, active=2))],  # the API server ends the stream after timeout_seconds
        [],  # a quiet stream: nothing changed in the Job, but training went on
        [event("MODIFIED", job(12, succeeded=2, condition=("Complete", "CompletionsReached", "")))],
    ])
    seen: list[JobProgress] = []
    outcome = launcher.watch("job-7", NS, on_progress=seen.append, read_step=lambda: next(steps))
    assert outcome.state == JobState.SUCCEEDED and outcome.progress.step == 400
    assert [w["resource_version"] for w in watch_calls(batch)] == ["10", "11", "11"]
    assert len(list_calls(batch)) == 1
    assert [(p.active, p.step) for p in seen] == [(0, None), (2, 100), (2, 250), (0, 400)]  # no repeats


def test_should_stop_cancels_the_job_and_its_objects(launcher, batch, core):
    script_cluster(batch, [listed(10, job(10, active=2))], [[event("MODIFIED", job(11, active=2, ready=2))]])
    asked = iter([False, False, True])
    outcome = launcher.watch("job-7", NS, should_stop=lambda: next(asked))
    assert outcome.state == JobState.CANCELLED and outcome.progress.ready == 2
    assert batch.calls("delete_namespaced_job") == [mock.call(NAME, NS, propagation_policy="Foreground")]
    assert core.calls("delete_namespaced_service") == [mock.call(NAME, NS)]
    assert core.calls("delete_namespaced_config_map") == [mock.call(NAME, NS)]


def test_timeout_returns_and_leaves_the_job_running(launcher, batch):
    script_cluster(batch, [listed(10, job(10, active=2))], [[event("MODIFIED", job(11, active=2))]] * 3)
    outcome = launcher.watch("job-7", NS, timeout=0)
    assert outcome.state == JobState.TIMEOUT and not batch.calls("delete_namespaced_job")


def test_detach_returns_and_leaves_the_job_running(launcher, batch):
    script_cluster(batch, [listed(10, job(10, active=2))], [[event("MODIFIED", job(11, active=2))]] * 3)
    asked = iter([False, False, True])
    outcome = launcher.watch("job-7", NS, should_stop=lambda: False, should_detach=lambda: next(asked))
    assert (outcome.state, outcome.reason) == (JobState.TIMEOUT, "Detached")
    assert not batch.calls("delete_namespaced_job")


def test_a_deleted_or_missing_job(launcher, batch):
    script_cluster(batch, [listed(10, job(10, active=2))], [[event("DELETED", job(11))]])
    assert launcher.watch("job-7", NS).state == JobState.CANCELLED
    script_cluster(batch, [listed(12)], [])
    outcome = launcher.watch("job-7", NS)
    assert (outcome.state, outcome.reason) == (JobState.FAILED, "NotFound")


def test_a_forbidden_watch_raises(launcher, batch):
    forbidden = {"type": "ERROR", "object": {"kind": "Status", "code": 403, "reason": "Forbidden",
                                             "message": "cannot watch resource jobs"}}
    script_cluster(batch, [listed(10, job(10, active=2))], [[forbidden]])
    with pytest.raises(LaunchError, match="watching Job genie/genie-job-7 failed: HTTP 403.*RBAC"):
        launcher.watch("job-7", NS)


# --- status, logs, cancel, configuration ---------------------------------------------------------------------------


def test_status_reads_the_job_once(launcher, batch):
    batch.answer("read_namespaced_job", job(3, active=1, ready=1))
    status = launcher.status("job-7", NS)
    assert status.name == NAME and status.outcome is None and status.progress.active == 1
    batch.answer("read_namespaced_job", job(4, condition=("Failed", "BackoffLimitExceeded", "")))
    assert launcher.status("job-7", NS).outcome.state == JobState.FAILED
    batch.answer("read_namespaced_job", api_error(404, "Not Found"))
    assert launcher.status("job-7", NS) is None
    assert batch.calls("read_namespaced_job")[0] == mock.call(NAME, NS)


def test_logs_come_from_the_newest_index_zero_pod(launcher, core):
    def pod(name: str, index: str, created: str) -> V1Pod:
        return V1Pod(metadata=V1ObjectMeta(name=name, creation_timestamp=created,
                                           annotations={"batch.kubernetes.io/job-completion-index": index}))

    core.answer("list_namespaced_pod", V1PodList(items=[
        pod(f"{NAME}-0-old", "0", "2026-01-01T00:00:00Z"), pod(f"{NAME}-0-new", "0", "2026-01-02T00:00:00Z"),
        pod(f"{NAME}-1-x", "1", "2026-01-03T00:00:00Z")]))
    # The raw response: a JSON line stays JSON (the client's own decoding would return a dict repr or str(bytes)).
    core.answer("read_namespaced_pod_log", SimpleNamespace(data=b'step 10 loss 0.5\n{"step": 10}\n'))
    assert launcher.logs("job-7", NS, tail_lines=20) == 'step 10 loss 0.5\n{"step": 10}\n'
    assert core.calls("list_namespaced_pod") == [mock.call(NS, label_selector=f"genie.dev/job={NAME}")]
    assert core.calls("read_namespaced_pod_log") == [mock.call(f"{NAME}-0-new", NS, container="train", tail_lines=20,
                                                               _preload_content=False)]
    core.answer("list_namespaced_pod", V1PodList(items=[]))
    assert launcher.logs("job-7", NS) == ""


def test_cancel_tolerates_objects_already_gone(launcher, batch, core):
    batch.answer("delete_namespaced_job", api_error(404, "Not Found"))
    launcher.cancel("job-7", NS)
    assert core.calls("delete_namespaced_service") == [mock.call(NAME, NS)]
    core.answer("delete_namespaced_config_map", api_error(500, "Internal Server Error", "etcd timeout"))
    with pytest.raises(LaunchError, match="HTTP 500 Internal Server Error: etcd timeout"):
        launcher.cancel("job-7", NS)


def test_without_any_configuration_the_launcher_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(LaunchError, match="no Kubernetes configuration.*in-cluster: .*kubeconfig: "):
        KubeLauncher()


def test_a_kubeconfig_configures_the_real_clients(monkeypatch, tmp_path):
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
              "clusters": [{"name": "k", "cluster": {"server": "https://k8s.example:6443"}}],
              "users": [{"name": "u", "user": {"token": "t"}}],
              "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}
    (tmp_path / "config").write_text(json.dumps(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    launcher = KubeLauncher()
    assert isinstance(launcher.batch, kubernetes.client.BatchV1Api)
    assert isinstance(launcher.core, kubernetes.client.CoreV1Api)
    assert launcher.batch.api_client.configuration.host == "https://k8s.example:6443"


def test_checkpoint_step_reader(tmp_path: Path):
    from genie.train.checkpoint import CHECKPOINT_FORMAT, checkpoint_dir

    read = checkpoint_step_reader(tmp_path / "lam")
    assert read() is None
    for step in (50, 200):
        directory = checkpoint_dir(tmp_path / "lam", step)
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "kind": "lam", "step": step}))
    assert read() == 200
