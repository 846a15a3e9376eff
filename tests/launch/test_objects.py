"""The launcher's manifests: Kubernetes schema validation of every object (kubernetes-validate --strict), and what
they must say for torchrun to meet on pod 0 (Indexed Job, headless Service, DNS names, GPUs, labels, config)."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest

from genie.launch.objects import (
    CONFIG_DIR,
    JOB_LABEL,
    KubeSettings,
    KubeTrainSpec,
    build_all,
    build_configmap,
    build_headless_service,
    build_job,
    job_name,
)

# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships (as tests/deploy/).
KUBE_VERSIONS = ("1.27.0", "1.37.0")
WORLD = {"name": "demo", "train_tokenizer": {"steps": 500, "batch_size": 8}, "frames": [1, 2.5, None, "x"]}
BASE = dict(job_id="0b6f3c1e-7d2a-4e0f-9a51-3c8d2f6e1b70", kind="tokenizer", world=WORLD,
            run_root="/data/jobs/0b6f3c1e/runs", image="registry.example/genie:0.1.0", claim="t-genie-jobs",
            namespace="genie")
SHAPES = {"cpu-1": dict(nodes=1), "cpu-3": dict(nodes=3, procs_per_node=2),
          "gpu-1": dict(nodes=1, gpus_per_node=1), "gpu-3": dict(nodes=3, gpus_per_node=4, kind="dynamics",
                                                                  lam="/data/jobs/0b6f3c1e/runs/lam/checkpoints/step_00000100")}


def make(**overrides) -> KubeTrainSpec:
    return KubeTrainSpec(**(BASE | overrides))


@pytest.fixture(params=list(SHAPES))
def spec(request) -> KubeTrainSpec:
    return make(**SHAPES[request.param])


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# --- schema validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_passes_strict_schema_validation(spec, version):
    docs = build_all(spec)
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError / SchemaNotFoundError


def test_the_validator_rejects_a_misspelt_field():
    # Proves the validation above is live: an unknown field in the pod template must fail it.
    job = copy.deepcopy(build_job(make()))
    pod_spec(job)["restartPolicys"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBE_VERSIONS[0], strict=True)


def test_spec_with_every_option_still_validates():
    spec = make(nodes=2, gpus_per_node=2, active_deadline_seconds=3600, ttl_seconds_after_finished=0,
                service_account="trainer", node_selector={"gpu": "h100"}, env={"NCCL_DEBUG": "INFO"},
                tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},))
    for doc in build_all(spec):
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    pod = pod_spec(build_job(spec))
    assert pod["serviceAccountName"] == "trainer" and pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in pod["containers"][0]["env"]
    job = build_job(spec)["spec"]
    assert job["activeDeadlineSeconds"] == 3600 and job["ttlSecondsAfterFinished"] == 0


# --- semantics -----------------------------------------------------------------------------------------------------


def test_indexed_job_runs_one_pod_per_node(spec):
    job = build_job(spec)["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == spec.nodes
    assert job["backoffLimit"] == spec.backoff_limit
    assert pod_spec(build_job(spec))["restartPolicy"] == "Never"
    # Evicted or preempted pods are replaced without counting as training failures.
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "Ignore" and rule["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert "podFailurePolicy" not in build_job(make(pod_failure_policy=False))["spec"]


def test_torchrun_meets_on_pod_zero_through_the_headless_service(spec):
    job, service = build_job(spec), build_headless_service(spec)
    pod, pod_labels = pod_spec(job), job["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[0] == "torchrun"
    assert flag(cmd, "--nnodes") == str(spec.nodes)
    assert flag(cmd, "--nproc-per-node") == str(spec.gpus_per_node or spec.procs_per_node or 1)
    assert flag(cmd, "--device") == ("cuda" if spec.gpus_per_node else "cpu")  # one GPU per process: cuda:LOCAL_RANK
    assert flag(cmd, "--node-rank") == "$(JOB_COMPLETION_INDEX)"  # the Job controller's env var of an Indexed Job
    assert flag(cmd, "--rdzv-backend") == "c10d" and flag(cmd, "--rdzv-id") == job["metadata"]["name"]
    host, port = flag(cmd, "--rdzv-endpoint").split(":")
    # An Indexed Job's pod i has hostname <job>-i; with subdomain <svc> it is <job>-i.<svc> in the cluster DNS.
    pod_zero, subdomain = host.split(".")
    assert pod_zero == f"{job['metadata']['name']}-0"
    assert subdomain == pod["subdomain"] == service["metadata"]["name"]
    assert len(f"{job['metadata']['name']}-{spec.nodes - 1}") <= 63  # every pod hostname is a DNS label
    svc = service["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["selector"] and all(pod_labels.get(k) == v for k, v in svc["selector"].items())
    assert [p["port"] for p in svc["ports"]] == [int(port)] == [spec.rdzv_port]
    assert int(port) in [p["containerPort"] for p in container["ports"]]
    # ... and then the Genie command: train KIND from the mounted config into the shared run root.
    tail = cmd[cmd.index("-m"):]
    assert tail[:4] == ["-m", "genie.cli", "train", spec.kind] and "--quiet" in tail
    assert "--threads" not in tail and "--no-tensorboard" not in tail  # the defaults: torch's threads, TensorBoard on
    quiet = build_job(make(threads=2, tensorboard=False))["spec"]["template"]["spec"]["containers"][0]["command"]
    assert flag(quiet, "--threads") == "2" and "--no-tensorboard" in quiet
    assert flag(tail, "--run-root") == spec.run_root
    assert flag(tail, "--config") == f"{CONFIG_DIR}/world.json"
    assert ("--lam" in tail) == (spec.lam is not None) and "--tokenizer" not in tail


def test_a_service_selects_only_its_own_job():
    a, b = make(job_id="run-a"), make(job_id="run-b")
    svc_a = build_headless_service(a)["spec"]["selector"]
    labels_b = build_job(b)["spec"]["template"]["metadata"]["labels"]
    assert not all(labels_b.get(k) == v for k, v in svc_a.items())


def test_gpu_limits_only_when_asked(spec):
    (container,) = pod_spec(build_job(spec))["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    if spec.gpus_per_node:
        assert limits["nvidia.com/gpu"] == spec.gpus_per_node
    else:
        assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests
    assert requests == {"cpu": spec.cpu, "memory": spec.memory} and limits["memory"] == spec.memory


def test_pods_are_locked_down_like_the_charts(spec):
    pod = pod_spec(build_job(spec))
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False  # training never calls the API server
    (c,) = pod["containers"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert {e["name"]: e["value"] for e in c["env"]}["GENIE_JOB_ID"] == spec.job_id


def test_config_and_the_shared_volume_are_mounted(spec):
    pod = pod_spec(build_job(spec))
    (c,) = pod["containers"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes)
    assert volumes["jobs"]["persistentVolumeClaim"]["claimName"] == spec.claim
    assert mounts["jobs"]["mountPath"] == spec.mount_path and spec.run_root.startswith(spec.mount_path + "/")
    assert volumes["config"]["configMap"]["name"] == build_configmap(spec)["metadata"]["name"]
    assert mounts["config"] == {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}
    assert mounts["tmp"]["mountPath"] == "/tmp"  # the only scratch space on a read-only root


def test_world_json_parses_back_to_the_same_dict(spec):
    data = build_configmap(spec)["data"]
    assert list(data) == ["world.json"] and json.loads(data["world.json"]) == WORLD


def test_every_object_is_labelled_with_its_job(spec):
    docs = build_all(spec)
    pod_labels = build_job(spec)["spec"]["template"]["metadata"]["labels"]
    for labels in [d["metadata"]["labels"] for d in docs] + [pod_labels]:
        assert labels["app.kubernetes.io/name"] == "genie" and labels["app.kubernetes.io/component"] == "train"
        assert labels[JOB_LABEL] == spec.name
    for doc in docs:
        assert doc["metadata"]["name"] == spec.name and doc["metadata"]["namespace"] == spec.namespace
        assert doc["metadata"]["annotations"]["genie.dev/job-id"] == spec.job_id


# --- names and validation -----------------------------------------------------------------------------------------


def test_job_names_are_deterministic_dns_labels():
    uuid = BASE["job_id"]
    assert job_name(uuid) == f"genie-{uuid}"  # a valid id is kept as it is
    assert job_name("Job_1") == job_name("Job_1") != job_name("job-1")  # changed ids get a hash: no collisions
    assert job_name("job-1") == "genie-job-1"
    long = job_name("x" * 300)
    assert len(long) + len("-999") <= 63 and long != job_name("x" * 299)
    for name in (job_name("Job_1"), long, job_name("--a..b--")):
        assert name[0].isalpha() and name[-1].isalnum()
        assert all(ch.isdigit() or ("a" <= ch <= "z") or ch == "-" for ch in name)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(nodes=0), "nodes must be between 1"),
    (dict(nodes=True), "nodes must be an integer"),
    (dict(gpus_per_node=-1), "gpus_per_node must be >= 0"),
    (dict(threads=-1), "threads must be >= 0"),
    (dict(threads=1.5), "threads must be an integer"),
    (dict(gpus_per_node=2, procs_per_node=3), "ranks would share a GPU"),
    (dict(procs_per_node=0), "procs_per_node must be >= 1"),
    (dict(job_id="___"), "cannot be made a DNS label"),
    (dict(job_id=""), "job_id must be a non-empty string"),
    (dict(kind="policy"), "kind must be one of tokenizer, lam, dynamics"),
    (dict(run_root="/tmp/runs"), "not under the claim's mount path /data/jobs"),
    (dict(run_root="/data/jobs/../etc"), "not under the claim's mount path"),
    (dict(tokenizer="runs/tok"), "tokenizer 'runs/tok' is not under"),
    (dict(namespace="Genie"), "namespace must be a DNS-1123 label"),
    (dict(claim=""), "claim must be a DNS-1123 label"),
    (dict(image=""), "image must be a container image reference"),
    (dict(memory="lots"), "memory must be a Kubernetes quantity"),
    (dict(world={"x": {1, 2}}), "world must be a JSON-able dict"),
    (dict(env={"BAD-NAME": "1"}), "not a valid environment variable name"),
    (dict(backoff_limit=-1), "backoff_limit must be >= 0"),
    (dict(active_deadline_seconds=0), "active_deadline_seconds must be a positive integer"),
    (dict(rdzv_port=70000), "rdzv_port must be a TCP port"),
])
def test_invalid_specs_are_refused_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        make(**overrides)
    assert "\n" not in str(info.value)


def test_settings_from_env_make_a_spec():
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    env = {"GENIE_K8S_NAMESPACE": "genie", "GENIE_K8S_IMAGE": "genie-gpu:0.1.0", "GENIE_K8S_CLAIM": "t-genie-jobs",
           "GENIE_K8S_MOUNT": "/data/jobs", "GENIE_K8S_CPU": "4", "GENIE_K8S_MEMORY": "16Gi",
           "GENIE_K8S_IMAGE_PULL_SECRETS": "regcred, other", "GENIE_K8S_GPU_NODE_SELECTOR": '{"gpu": "h100"}',
           "GENIE_K8S_GPU_TOLERATIONS": json.dumps([toleration])}
    settings = KubeSettings.from_env(env)
    assert settings == KubeSettings(namespace="genie", image="genie-gpu:0.1.0", claim="t-genie-jobs", cpu="4",
                                    memory="16Gi", image_pull_secrets=("regcred", "other"),
                                    gpu_node_selector={"gpu": "h100"}, gpu_tolerations=(toleration,))
    spec = settings.spec("job-9", "lam", WORLD, "/data/jobs/job-9/runs", nodes=2, gpus_per_node=1, backoff_limit=1)
    assert (spec.namespace, spec.image, spec.claim, spec.nodes, spec.procs, spec.backoff_limit) == (
        "genie", "genie-gpu:0.1.0", "t-genie-jobs", 2, 1, 1)
    pod = pod_spec(build_job(spec))
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == [toleration]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(build_job(spec), version, strict=True)
    cpu_pod = pod_spec(build_job(settings.spec("job-9", "lam", WORLD, "/data/jobs/job-9/runs")))
    assert "nodeSelector" not in cpu_pod and "tolerations" not in cpu_pod  # GPU placement only for GPU pods
    with pytest.raises(ValueError, match="GENIE_K8S_GPU_TOLERATIONS must be a JSON list"):
        KubeSettings.from_env({"GENIE_K8S_GPU_TOLERATIONS": "{}"})
    defaults = KubeSettings.from_env({})
    assert (defaults.namespace, defaults.mount_path, defaults.service_account) == ("default", "/data/jobs", "")
    with pytest.raises(ValueError, match="GENIE_K8S_IMAGE is not set"):
        defaults.spec("job-9", "lam", WORLD, "/data/jobs/job-9/runs")
    with pytest.raises(ValueError, match="GENIE_K8S_CLAIM is not set"):
        KubeSettings(image="genie").spec("job-9", "lam", WORLD, "/data/jobs/job-9/runs")
