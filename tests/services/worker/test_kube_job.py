"""`genie jobs submit train --backend kubernetes` end to end, without a cluster: a real worker's task drives the
real launcher and the real `kubernetes` client, through a kubeconfig, against a TEST DOUBLE of the API server
(fake_kube.py) whose fake kubelet runs each pod's container command -- the real torchrun command line -- as local
processes that train with gloo on the shared jobs dir. Covers success on 2 nodes, cancel, failing pods, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes
import pytest

from genie.launch.kubernetes import LaunchError
from genie.launch.objects import JOB_ID_ANNOTATION, JOB_LABEL, job_name
from genie.train.checkpoint import latest_checkpoint
from services.worker.jobs import resolve_world
from services.worker.kube import train_on_kubernetes
from services.worker.specs import TrainJobSpec

NS = "genie-test"
TINY = ["--preset", "tiny", "--backend", "kubernetes", "--nodes", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def deployed(kit, fake_kube, tmp_path_factory):
    """One train worker configured for Kubernetes: namespace, image, claim, mount (the jobs dir plays the PVC)."""
    root = tmp_path_factory.mktemp("kube-jobs")
    jobs_dir = root / "jobs"
    jobs_dir.mkdir()
    kubeconfig = fake_kube.kubeconfig(root / "kubeconfig", NS)
    env = kit.env(jobs_dir, GENIE_K8S_NAMESPACE=NS, GENIE_K8S_IMAGE="genie:test", GENIE_K8S_CLAIM="genie-jobs",
                  GENIE_K8S_MOUNT=str(jobs_dir), KUBECONFIG=str(kubeconfig))
    env = {k: v for k, v in env.items() if not k.startswith("KUBERNETES_")}  # never the in-cluster config
    worker = kit.worker("train-kube", "train", env, root).wait_ready()
    client = kit.client(env)
    yield {"env": env, "root": root, "jobs": jobs_dir, "kubeconfig": kubeconfig, "worker": worker, "client": client}
    client.close()
    worker.stop(timeout=15)  # before the fake API server goes


def _submit(kit, env: dict, run_root: Path, *sets: str) -> tuple[str, str]:
    """Queues a 2-node tokenizer job with `sets` (train_tokenizer.*=...) -> (job id, its Kubernetes name)."""
    overrides = [a for s in sets for a in ("--set", f"train_tokenizer.{s}")]
    job = kit.submitted(kit.cli(env, "submit", "train", "tokenizer", *TINY, *overrides, "--run-root", str(run_root)))
    return job, job_name(job)


def _clean(fake_kube) -> None:
    assert not fake_kube.seen.unexpected, fake_kube.seen.unexpected  # only the API the launcher is meant to use
    assert not fake_kube.seen.unauthorized, fake_kube.seen.unauthorized  # the kubeconfig's token on every call


def test_a_kubernetes_train_job_runs_two_torchrun_pods_to_success(deployed, fake_kube, kit):
    env, client = deployed["env"], deployed["client"]
    run_root = deployed["jobs"] / "runs-ok"
    job, name = _submit(kit, env, run_root, "steps=6", "ckpt_every=2")
    reports: list[dict] = []

    def finished() -> bool:
        st = client.status(job)
        if st.state == "PROGRESS":
            reports.append(st.detail)
        return st.terminal

    kit.wait_for(finished, "the Kubernetes job")
    st = client.status(job)
    assert st.state == "SUCCESS", (st.to_json(), deployed["worker"].log_text()[-3000:])
    assert st.result["backend"] == "kubernetes" and st.result["k8s_job"] == name and st.result["namespace"] == NS
    assert st.result["step"] == 6 and st.result["nodes"] == 2
    ckpt = run_root / "tokenizer" / "checkpoints" / "step_00000006"
    assert ckpt.is_dir() and Path(st.result["checkpoint"]) == ckpt == latest_checkpoint(run_root / "tokenizer")

    # Exactly the three objects of the job, labelled with its name; the Job carries the job id.
    assert sorted(fake_kube.created_with_label(JOB_LABEL, name)) == [("configmaps", name), ("jobs", name),
                                                                     ("services", name)]
    k8s_job = fake_kube.get("jobs", NS, name)
    assert k8s_job["metadata"]["annotations"][JOB_ID_ANNOTATION] == job
    assert k8s_job["status"]["succeeded"] == 2 and k8s_job["status"]["failed"] == 0
    # The job's --threads and (no) --tensorboard reach the pods, not the supervising worker.
    cmd = k8s_job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--threads") + 1] == "1" and "--no-tensorboard" in cmd
    assert not (run_root / "tokenizer" / "tb").exists()
    owner = fake_kube.get("configmaps", NS, name)["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "Job" and owner["uid"] == k8s_job["metadata"]["uid"]

    # Two pods, one torchrun node each, meeting at one rendezvous; both exited 0; rank 0 reported the result.
    pods = sorted(fake_kube.pods_of(name), key=lambda p: p.index)
    assert [p.index for p in pods] == [0, 1] and [p.exit_code for p in pods] == [0, 0]
    for p in pods:
        argv = p.argv
        assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == str(p.index)
        assert p.env["JOB_COMPLETION_INDEX"] == str(p.index) and p.env["GENIE_JOB_ID"] == job
    endpoints = {p.argv[p.argv.index("--rdzv-endpoint") + 1] for p in pods}
    assert len(endpoints) == 1 and endpoints.pop().startswith("127.0.0.1:")  # pod 0's DNS name, as the fake resolves it
    # The result is rank 0's last line on stdout; torch's elastic agent may log a warning to stderr after it (a peer
    # that left the rendezvous first), so the merged log is searched for it.
    result_line = json.loads([line for line in pods[0].log().splitlines() if line.startswith("{")][-1])
    assert result_line["step"] == 6 and result_line["checkpoint"] == str(ckpt)

    # While it ran, status showed the pods and the Job.
    assert any(r.get("k8s_job") == name and r.get("pods", {}).get("active") == 2 for r in reports), reports
    _clean(fake_kube)


def test_cancel_deletes_the_job_and_kills_its_pods(deployed, fake_kube, kit):
    env, client = deployed["env"], deployed["client"]
    run_root = deployed["jobs"] / "runs-cancel"
    job, name = _submit(kit, env, run_root, "steps=100000", "ckpt_every=2")
    kit.wait_for(lambda: (client.status(job).detail.get("step") or 0) >= 2, "a first checkpoint reported")
    pods = fake_kube.pods_of(name)
    assert len(pods) == 2 and all(p.alive() for p in pods)
    client.cancel(job)
    st = client.wait(job, timeout=60)
    assert st.state == "CANCELLED", (st.to_json(), deployed["worker"].log_text()[-3000:])
    assert ("jobs", name, "Foreground") in fake_kube.seen.deletes
    assert {(kind, n) for kind, n, _ in fake_kube.seen.deletes} >= {("services", name), ("configmaps", name)}
    assert fake_kube.get("jobs", NS, name) is None and fake_kube.get("configmaps", NS, name) is None
    assert not any(p.alive() for p in pods)  # torchrun and its workers: the whole process group is gone
    assert latest_checkpoint(run_root / "tokenizer") is not None
    _clean(fake_kube)


def test_failing_pods_fail_the_job_with_the_reason_and_the_pod_log(deployed, fake_kube, kit):
    env, client = deployed["env"], deployed["client"]
    run_root = deployed["jobs"] / "runs-broken"
    run_root.mkdir()
    (run_root / "tokenizer").write_text("a file where the pods must make the run directory")  # passes submit
    job, name = _submit(kit, env, run_root, "steps=4")
    st = client.wait(job, timeout=120)
    assert st.state == "FAILURE", (st.to_json(), deployed["worker"].log_text()[-3000:])
    assert f"Kubernetes Job {NS}/{name} failed (BackoffLimitExceeded)" in st.error, st.error
    # The error ends with the tail of pod 0's log as the pod wrote it: text lines, from a pod that failed by itself.
    assert "--- last log lines of pod 0 ---\n" in st.error, st.error
    tail = [line.strip() for line in st.error.split("--- last log lines of pod 0 ---\n", 1)[1].strip().splitlines()]
    logs = [[line.strip() for line in p.log().splitlines()] for p in fake_kube.pods_of(name)
            if p.index == 0 and not p.killed]
    assert tail and any(all(line in log for line in tail) for log in logs), tail
    assert any("genie.cli FAILED" in line for line in tail), tail  # torchrun's summary of its failed worker
    assert any("FileExistsError" in "\n".join(log) for log in logs)  # why: their run directory is a file
    # backoffLimit 3: failed pods were replaced until the 4th failure, then the rest were killed.
    k8s_job = fake_kube.get("jobs", NS, name)
    assert k8s_job["status"]["failed"] == 4, k8s_job["status"]
    assert [c["type"] for c in k8s_job["status"]["conditions"]] == ["FailureTarget", "Failed"]
    assert not any(p.alive() for p in fake_kube.pods_of(name))
    _clean(fake_kube)


def test_a_run_root_off_the_claim_fails_on_the_worker_before_any_api_call(deployed, fake_kube, tmp_path, kit):
    env, client = deployed["env"], deployed["client"]
    before = len(fake_kube.seen.requests)
    job = kit.submitted(kit.cli(env, "submit", "train", "tokenizer", *TINY, "--run-root", str(tmp_path / "runs")))
    st = client.wait(job, timeout=60)
    assert st.state == "FAILURE" and "is not under the claim's mount path" in st.error, st.to_json()
    assert len(fake_kube.seen.requests) == before  # nothing reached the API server


class _Run:
    """Stands in for services.worker.runtime.Execution: these calls fail before the first report."""

    def report(self, *args, **kwargs) -> None:
        raise AssertionError("no progress expected")

    def stop_reason(self) -> None:
        return None

    def end(self, *args) -> None:
        raise AssertionError("no end expected")


def _spec(tmp_path: Path) -> TrainJobSpec:
    return TrainJobSpec("tokenizer", resolve_world("tiny", None, ()), run_root=str(tmp_path / "runs"),
                        backend="kubernetes", nodes=2)


@pytest.fixture
def _default_kube_config():
    """load_kube_config() sets the client's process-wide default configuration: put the old one back."""
    saved = kubernetes.client.Configuration.get_default_copy()
    yield
    kubernetes.client.Configuration.set_default(saved)


def test_bad_kubernetes_settings_give_clear_errors(deployed, fake_kube, monkeypatch, tmp_path, _default_kube_config, kit):
    for key in ("GENIE_K8S_IMAGE", "GENIE_K8S_CLAIM", "GENIE_K8S_NAMESPACE", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GENIE_K8S_MOUNT", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(deployed["kubeconfig"]))
    before = len(fake_kube.seen.requests)
    with pytest.raises(ValueError, match="GENIE_K8S_IMAGE is not set"):
        train_on_kubernetes(_Run(), _spec(tmp_path), "bad-1", tmp_path / "runs")
    monkeypatch.setenv("GENIE_K8S_IMAGE", "genie:test")
    with pytest.raises(ValueError, match="GENIE_K8S_CLAIM is not set"):
        train_on_kubernetes(_Run(), _spec(tmp_path), "bad-2", tmp_path / "runs")
    assert len(fake_kube.seen.requests) == before

    monkeypatch.setenv("GENIE_K8S_CLAIM", "genie-jobs")
    monkeypatch.setenv("GENIE_K8S_NAMESPACE", "locked")  # the worker's ServiceAccount has no rights there
    fake_kube.forbidden.add("locked")
    with pytest.raises(LaunchError, match=r"creating ConfigMap locked/genie-bad-3 failed: HTTP 403 .*RBAC"):
        train_on_kubernetes(_Run(), _spec(tmp_path), "bad-3", tmp_path / "runs")
    assert len(fake_kube.seen.requests) == before + 1

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(LaunchError, match="no Kubernetes configuration"):
        train_on_kubernetes(_Run(), _spec(tmp_path), "bad-4", tmp_path / "runs")
    _clean(fake_kube)
