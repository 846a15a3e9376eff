"""worker.kubernetes.enabled: the train worker's ServiceAccount, its least-privilege Role and RoleBinding, and the env
that tells genie/launch/ where to run training Jobs. Off by default: then no RBAC object and no API token at all."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from genie.launch.objects import KubeSettings, build_all

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ["-f", str(ROOT / "deploy" / "helm" / "values-production-gpu.yaml")]
ENABLED = ["--set", "worker.kubernetes.enabled=true"]
KUBE_VERSIONS = ("1.27.0", "1.37.0")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("cert-manager.io/v1", "Certificate")}
RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
LAUNCHER = "t-genie-train-launcher"
# (apiGroup, resource, verb): what the launcher does, and all the Role may allow.
LEAST_PRIVILEGE = {
    *(("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete", "patch")),
    *(("", r, v) for r in ("services", "configmaps") for v in ("create", "get", "delete", "patch")),
    ("", "pods", "get"), ("", "pods", "list"), ("", "pods/log", "get"),
}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def worker(docs: list[dict], queue: str) -> dict:
    (deploy,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == f"t-genie-worker-{queue}"]
    return deploy["spec"]["template"]["spec"]


def env_of(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["containers"][0]["env"]}


def permissions(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


@pytest.fixture(scope="module")
def enabled(helm) -> list[dict]:
    return helm.render(*ENABLED)


def test_off_by_default_no_rbac_and_no_token(helm):
    for values in ([], PRODUCTION):
        docs = helm.render(*values)
        assert not [d for d in docs if d["kind"] in RBAC_KINDS]
        for queue in ("train", "rollout"):
            pod = worker(docs, queue)
            assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False
            assert not [name for name in env_of(pod) if name.startswith("GENIE_K8S_")]


def test_the_role_is_exactly_the_least_privilege_set(enabled):
    (role,) = of_kind(enabled, "Role")
    assert role["metadata"]["name"] == LAUNCHER
    assert permissions(role) == LEAST_PRIVILEGE
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"] and "resourceNames" not in rule
    assert not of_kind(enabled, "ClusterRole") and not of_kind(enabled, "ClusterRoleBinding")  # namespaced only


def test_the_role_covers_every_call_the_launcher_makes():
    # Derived from the launcher's source: a new API call without its permission fails, so does an unneeded grant.
    source = (ROOT / "genie" / "launch" / "kubernetes.py").read_text()
    methods = set(re.findall(r"self\.(?:batch|core)\.(\w+)", source))
    verbs = {"create": "create", "read": "get", "list": "list", "patch": "patch", "delete": "delete"}
    resources = {"job": ("batch", "jobs"), "config_map": ("", "configmaps"), "service": ("", "services"),
                 "pod": ("", "pods"), "pod_log": ("", "pods/log")}
    needed = set()
    for method in methods:
        verb, _, resource = method.partition("_namespaced_")
        needed.add((*resources[resource], verbs[verb]))
    assert "stream.stream(self.batch.list_namespaced_job," in source
    needed.add(("batch", "jobs", "watch"))  # the watch streams list_namespaced_job with watch=True
    assert needed <= LEAST_PRIVILEGE
    # Granted though the launcher does not call them yet (issue 7's list): patch on jobs (suspend/resume a run)
    # and get on single pods (per-pod status). Anything else unused fails here.
    assert LEAST_PRIVILEGE - needed == {("batch", "jobs", "patch"), ("", "pods", "get")}


def test_the_binding_ties_the_service_account_to_the_role(enabled):
    (account,) = of_kind(enabled, "ServiceAccount")
    (role,) = of_kind(enabled, "Role")
    (binding,) = of_kind(enabled, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "genie"}]
    assert account["automountServiceAccountToken"] is False  # only pods that ask get its token
    for doc in (account, role, binding):
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "t"


def test_only_the_train_worker_uses_the_service_account(enabled):
    (account,) = of_kind(enabled, "ServiceAccount")
    train, rollout = worker(enabled, "train"), worker(enabled, "rollout")
    assert train["serviceAccountName"] == account["metadata"]["name"]
    assert train["automountServiceAccountToken"] is True  # the client's in-cluster config reads the token
    assert "serviceAccountName" not in rollout and rollout["automountServiceAccountToken"] is False


def test_the_train_worker_env_describes_where_jobs_run(enabled):
    pod = worker(enabled, "train")
    env = env_of(pod)
    assert env["GENIE_K8S_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    (claim,) = of_kind(enabled, "PersistentVolumeClaim")
    (jobs_volume,) = [v for v in pod["volumes"] if v["name"] == "jobs"]
    (jobs_mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "jobs"]
    assert env["GENIE_K8S_CLAIM"]["value"] == claim["metadata"]["name"] == jobs_volume["persistentVolumeClaim"]["claimName"]
    assert env["GENIE_K8S_MOUNT"]["value"] == jobs_mount["mountPath"] == "/data/jobs"
    assert env["GENIE_K8S_IMAGE"]["value"] == pod["containers"][0]["image"]
    # What the launcher makes of this env are objects that pass strict validation and mount the same claim.
    settings = KubeSettings.from_env({k: e["value"] for k, e in env.items() if "value" in e} | {"GENIE_K8S_NAMESPACE": "genie"})
    spec = settings.spec("job-1", "tokenizer", {"name": "demo"}, "/data/jobs/job-1/runs", nodes=2)
    for doc in build_all(spec):
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)
    (volume,) = [v for v in build_all(spec)[2]["spec"]["template"]["spec"]["volumes"] if v["name"] == "jobs"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_existing_claim_gpu_placement_and_pull_secrets_reach_the_launcher(helm):
    docs = helm.render(*ENABLED, *PRODUCTION, "--set", "worker.jobs.existingClaim=shared-jobs",
                       "--set", "imagePullSecrets[0].name=regcred")
    env = {k: e.get("value") for k, e in env_of(worker(docs, "train")).items()}
    assert env["GENIE_K8S_CLAIM"] == "shared-jobs" and env["GENIE_K8S_IMAGE_PULL_SECRETS"] == "regcred"
    settings = KubeSettings.from_env({k: v for k, v in env.items() if v is not None})
    production = yaml.safe_load(Path(PRODUCTION[1]).read_text())["gpu"]
    assert settings.image == f"{production['image']['repository']}:{production['image']['tag']}"  # the GPU image
    assert settings.gpu_node_selector == production["nodeSelector"]
    assert list(settings.gpu_tolerations) == production["tolerations"]
    spec = settings.spec("job-1", "dynamics", {"name": "demo"}, "/data/jobs/job-1/runs", nodes=2, gpus_per_node=8)
    pod = build_all(spec)[2]["spec"]["template"]["spec"]
    assert pod["tolerations"] == production["tolerations"] and pod["imagePullSecrets"] == [{"name": "regcred"}]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [ENABLED, ENABLED + PRODUCTION], ids=["default", "production-gpu"])
def test_kubernetes_validate_strict(helm, values, version):
    docs = helm.render(*values, "--set", "worker.kubernetes.serviceAccount.annotations.team=ml")
    assert {d["kind"] for d in docs} >= {"ServiceAccount", "Role", "RoleBinding"}
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_service_account_name_and_annotations(helm):
    docs = helm.render(*ENABLED, "--set", "worker.kubernetes.serviceAccount.name=trainer",
                       "--set", "worker.kubernetes.serviceAccount.annotations.team=ml")
    (account,) = of_kind(docs, "ServiceAccount")
    (binding,) = of_kind(docs, "RoleBinding")
    assert account["metadata"]["name"] == "trainer" and account["metadata"]["annotations"] == {"team": "ml"}
    assert binding["subjects"][0]["name"] == "trainer" == worker(docs, "train")["serviceAccountName"]


def test_helm_lint_strict_when_enabled(helm):
    out = helm.run("lint", "--strict", str(helm.chart), *ENABLED)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("bad", [
    "worker.kubernetes.enabled=maybe",
    "worker.kubernetes.memory=lots",
    "worker.kubernetes.serviceAccount.name=Not_A_Name",
    "worker.kubernetes.bogus=1",
])
def test_schema_rejects_bad_values(helm, bad):
    out = helm.template("--set", bad)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
