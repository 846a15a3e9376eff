"""The rendered chart, default and GPU/production values: Kubernetes schema validation of every object, and what the
objects must say (probes, resources, security, selectors, ports, HPA, PDBs, GPUs, commands, the helm test hook)."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest

PRODUCTION = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "values-production-gpu.yaml"
VALUES = {"default": [], "production-gpu": ["-f", str(PRODUCTION)]}
# The chart's kubeVersion floor (native gRPC probes went GA in 1.27) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
# Prometheus Operator and cert-manager CRDs: kubernetes-validate knows only built-in kinds. ServiceMonitors are checked
# structurally in test_service_monitors instead, Certificates in test_helm_tls.py.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("cert-manager.io/v1", "Certificate")}
WORKLOADS = ("Deployment", "StatefulSet")
TRITON = ("tokenizer", "lam", "dynamics")


@pytest.fixture(scope="module", params=list(VALUES))
def rendered(request, helm) -> tuple[str, list[dict]]:
    return request.param, helm.render(*VALUES[request.param])


@pytest.fixture(scope="module")
def default(helm) -> list[dict]:
    return helm.render()


@pytest.fixture(scope="module")
def production(helm) -> list[dict]:
    return helm.render(*VALUES["production-gpu"])


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    return doc["metadata"]["labels"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def container(docs: list[dict], kind: str, name: str) -> dict:
    (c,) = pod_spec(named(docs, kind, name))["containers"]
    return c


def arg_map(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)


# --- schema validation of every rendered object ------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_kubernetes_validate_strict(rendered, version):
    name, docs = rendered
    skipped = set()
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            skipped.add(doc["kind"])
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError / SchemaNotFoundError
    assert skipped == ({"ServiceMonitor", "Certificate"} if name == "production-gpu" else set())


def test_validator_rejects_a_misspelt_field(default):
    # Proves the strict validation above is live: an unknown field in a container must fail it.
    doc = copy.deepcopy(named(default, "Deployment", "t-genie-gateway"))
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)


# --- pods: probes, resources, security ---------------------------------------------------------------------------


def test_every_container_has_probes_resources_and_a_locked_down_context(rendered):
    _, docs = rendered
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert {d["metadata"]["name"] for d in workloads} >= {"t-genie-gateway", *(f"t-genie-{m}" for m in TRITON),
                                                          "t-genie-worker-train", "t-genie-worker-rollout"}
    for doc in workloads + of_kind(docs, "Pod"):
        spec, what = pod_spec(doc), doc["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, what  # with the rest: Pod Security "restricted"
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, what
        assert spec["automountServiceAccountToken"] is False, what
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (what, c["name"])
            assert "memory" in c["resources"]["limits"], (what, c["name"])
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (what, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (what, c["name"])
        mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, what  # the only writable scratch space on a read-only root
        if doc["kind"] == "Pod":
            continue  # the helm test hook runs once; it needs no probes
        for c in spec["containers"]:
            assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c), (what, c["name"])
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            for probe in (c["startupProbe"], c["readinessProbe"], c["livenessProbe"]):
                handler = next(v for k, v in probe.items() if k in ("httpGet", "tcpSocket", "grpc", "exec"))
                if "port" in handler:
                    port = handler["port"]
                    assert port in ports or port in ports.values(), (what, port)


def test_probe_endpoints(default):
    gateway = container(default, "Deployment", "t-genie-gateway")
    assert gateway["readinessProbe"]["grpc"] == {"port": 50051, "service": ""}
    # Liveness must not follow Triton/Redis health, or an outage there would restart every gateway.
    assert "grpc" not in gateway["livenessProbe"] and gateway["livenessProbe"]["httpGet"]["path"] != "/healthz"
    for model in TRITON:
        c = container(default, "Deployment", f"t-genie-{model}")
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300


# --- wiring: selectors, Services, HPA, PDBs, ServiceMonitors --------------------------------------------------------


def test_selectors_match_their_own_pods_only(rendered):
    _, docs = rendered
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for doc in workloads:
        selector = doc["spec"]["selector"]["matchLabels"]
        matching = [w["metadata"]["name"] for w in workloads if selects(selector, pod_labels(w))]
        assert matching == [doc["metadata"]["name"]]
        assert set(pod_labels(doc)) >= {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                                        "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of"}


def test_services_select_one_workload_and_target_its_ports(rendered):
    _, docs = rendered
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for svc in of_kind(docs, "Service"):
        (target,) = [w for w in workloads if selects(svc["spec"]["selector"], pod_labels(w))]
        ports = {p["name"] for c in pod_spec(target)["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)


def test_hpa_scales_the_gateway_deployment(rendered):
    _, docs = rendered
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    target = named(docs, ref["kind"], ref["name"])
    assert ref["apiVersion"] == target["apiVersion"] == "apps/v1" and ref["name"] == "t-genie-gateway"
    assert "replicas" not in target["spec"]  # else every helm upgrade would reset the HPA's count
    assert "cpu" in pod_spec(target)["containers"][0]["resources"]["requests"]  # Utilization is relative to it
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overrides", [
    ["gpu.enabled=true"],
    ["networkPolicy.enabled=true", "metrics.serviceMonitor.enabled=true"],
    ["redis.persistence.enabled=false", "worker.jobs.existingClaim=jobs", "world.existingClaim=worlds"],
    ["fullnameOverride=genie", "gateway.service.type=LoadBalancer"],
])
def test_other_value_combinations_render_valid_objects(helm, overrides):
    docs = helm.render(*[a for o in overrides for a in ("--set", o)])
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for svc in of_kind(docs, "Service"):
        assert any(selects(svc["spec"]["selector"], pod_labels(w)) for w in workloads), svc["metadata"]["name"]


def test_pdbs_cover_one_workload_each(rendered):
    _, docs = rendered
    workloads = [d for d in docs if d["kind"] == "Deployment"]
    pdbs = of_kind(docs, "PodDisruptionBudget")
    covered = []
    for pdb in pdbs:
        (target,) = [w for w in workloads if selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(w))]
        covered.append(target["metadata"]["name"])
        assert pdb["spec"]["maxUnavailable"] >= 1  # never blocks a node drain
    assert sorted(covered) == sorted(w["metadata"]["name"] for w in workloads)


def test_service_monitors(default, production):
    assert not of_kind(default, "ServiceMonitor")
    services = of_kind(production, "Service")
    monitors = of_kind(production, "ServiceMonitor")
    assert len(monitors) == 6  # gateway, three Triton servers, two worker queues
    for sm in monitors:
        assert sm["metadata"]["labels"]["release"] == "prometheus"
        (svc,) = [s for s in services if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        names = {p["name"] for p in svc["spec"]["ports"]}
        assert all(e["port"] in names and e["path"] == "/metrics" for e in sm["spec"]["endpoints"]), sm["metadata"]["name"]


def test_network_policies_select_existing_pods(rendered):
    name, docs = rendered
    policies = of_kind(docs, "NetworkPolicy")  # on by default (issue 19)
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    components = set()
    for policy in policies:
        sel = policy["spec"]["podSelector"]
        exprs = {e["key"]: set(e["values"]) for e in sel.get("matchExpressions", [])}
        hit = [w for w in workloads if selects(sel.get("matchLabels", {}), pod_labels(w))
               and all(pod_labels(w).get(k) in v for k, v in exprs.items())]
        assert hit, policy["metadata"]["name"]
        components |= {pod_labels(w)["app.kubernetes.io/component"] for w in hit}
    expected = {"gateway", *TRITON, "worker-train", "worker-rollout"}
    assert components == (expected if name == "production-gpu" else expected | {"redis"})  # production: managed Redis


# --- what each component runs ------------------------------------------------------------------------------------------


def test_gateway_command_points_at_the_triton_services(rendered):
    _, docs = rendered
    c = container(docs, "Deployment", "t-genie-gateway")
    assert c["args"][0] == "serve"
    args = arg_map(c["args"])
    assert args["--host"] == "0.0.0.0" and args["--backend"] == "triton" and args["--store"] == "redis"
    assert (args["--grpc-port"], args["--http-port"], args["--metrics-port"]) == ("50051", "8080", "9090")
    assert args["--redis-url"] == "$(GENIE_REDIS_URL)"
    env = {e["name"]: e for e in c["env"]}
    assert env["GENIE_REDIS_URL"]["value"] == "$(GENIE_REDIS_BASE_URL)/0"
    assert list(env).index("GENIE_REDIS_BASE_URL") < list(env).index("GENIE_REDIS_URL")  # $(VAR) needs it defined first
    urls = dict(pair.split("=") for pair in args["--triton-model-urls"].split(","))
    assert set(urls) == set(TRITON)
    for model, url in urls.items():
        # Session affinity (the default): every pod of the model, by the DNS name of its headless Service.
        assert url.startswith("dns:"), url
        host, port = url.removeprefix("dns:").split(":")
        svc = named(docs, "Service", host)
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"]["app.kubernetes.io/component"] == model
        assert int(port) in [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]


def test_without_session_affinity_the_gateway_uses_the_cluster_ip_services(helm):
    docs = helm.render("--set", "gateway.sessionAffinity=false")
    args = arg_map(container(docs, "Deployment", "t-genie-gateway")["args"])
    urls = dict(pair.split("=") for pair in args["--triton-model-urls"].split(","))
    assert urls == {m: f"t-genie-{m}:8001" for m in TRITON}
    assert all(named(docs, "Service", f"t-genie-{m}")["spec"].get("clusterIP") != "None" for m in TRITON)


def test_triton_commands(rendered):
    which, docs = rendered
    for model in TRITON:
        c = container(docs, "Deployment", f"t-genie-{model}")
        assert c["args"][:2] == ["triton", "serve"]
        args = arg_map(c["args"])
        assert args["--models"] == model and args["--host"] == "0.0.0.0"
        assert (args["--grpc-port"], args["--http-port"], args["--metrics-port"]) == ("8001", "8000", "8002")
        assert args["--world"] and int(args["--threads"]) >= 0 and args["--precision"] in ("auto", "fp32", "bf16", "int8")
        if which == "default":  # CPU pods, the launcher's CPU defaults
            assert not {"--device", "--instances-per-gpu", "--max-batch", "--queue-delay-us"} & set(args)
        assert {"/dev/shm", "/tmp"} <= {m["mountPath"] for m in c["volumeMounts"]}


def test_worker_commands_and_env(rendered):
    _, docs = rendered
    config = named(docs, "ConfigMap", "t-genie-worker")["data"]
    for queue in ("train", "rollout"):
        deploy = named(docs, "Deployment", f"t-genie-worker-{queue}")
        c = pod_spec(deploy)["containers"][0]
        assert c["command"] == ["celery"]
        assert " ".join(c["args"]) == f"-A services.worker.app worker -Q {queue} --pool solo --concurrency 1 -n {queue}@%h"
        assert c["envFrom"] == [{"configMapRef": {"name": "t-genie-worker"}}]
        env = {e["name"]: e.get("value") for e in c["env"]} | config
        assert env["GENIE_BROKER_URL"] == "$(GENIE_REDIS_BASE_URL)/1"  # Celery apart from the sessions in DB 0
        assert env["GENIE_RESULT_BACKEND"] == "$(GENIE_REDIS_BASE_URL)/1"
        assert env["GENIE_JOBS_DIR"] == "/data/jobs" and env["GENIE_WORKER_METRICS_PORT"] == "9100"
        assert env["GENIE_ROLLOUT_BACKEND"] == "triton" and env["GENIE_TRITON_MODEL_URLS"].count(":8001") == 3
        timeout, limit = int(env["GENIE_VISIBILITY_TIMEOUT"]), int(env["GENIE_TASK_TIME_LIMIT"])
        assert env["GENIE_WORLD"] and limit > 0 and (timeout == 0 or timeout > limit)
        assert "/data/jobs" in {m["mountPath"] for m in c["volumeMounts"]}
        assert pod_spec(deploy)["terminationGracePeriodSeconds"] >= 120
        assert "checksum/config" in deploy["spec"]["template"]["metadata"]["annotations"]


def test_gpu_values_add_gpu_limits_and_placement(default, production):
    def gpus(docs, name):
        return container(docs, "Deployment", name)["resources"].get("limits", {}).get("nvidia.com/gpu")

    everything = [d["metadata"]["name"] for d in default if d["kind"] == "Deployment"]
    assert all(gpus(default, n) is None for n in everything)
    gpu_pods = {"t-genie-tokenizer", "t-genie-dynamics", "t-genie-worker-train"}  # lam: gpu false in production
    for name in everything:
        spec = pod_spec(named(production, "Deployment", name))
        if name in gpu_pods:
            assert gpus(production, name) == 1, name
            assert spec["containers"][0]["image"].startswith("registry.example.com/genie/genie-gpu:")
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
            strategy = named(production, "Deployment", name)["spec"]["strategy"]["rollingUpdate"]
            assert strategy == {"maxSurge": 0, "maxUnavailable": 1}, name  # no surge pod waiting for a GPU
        else:
            assert gpus(production, name) is None and "nodeSelector" not in spec, name
            assert spec["containers"][0]["resources"]["requests"]["cpu"], name  # CPU pods still request CPU
    # The Triton pods with a GPU run KIND_GPU instances, with the batching the production values ask for.
    dyn = arg_map(container(production, "Deployment", "t-genie-dynamics")["args"])
    assert (dyn["--device"], dyn["--instances-per-gpu"], dyn["--precision"]) == ("gpu", "2", "bf16")
    assert (dyn["--max-batch"], dyn["--queue-delay-us"]) == ("256", "2000")
    tok = arg_map(container(production, "Deployment", "t-genie-tokenizer")["args"])
    assert (tok["--device"], tok["--max-batch"]) == ("gpu", "128") and "--queue-delay-us" not in tok
    lam = arg_map(container(production, "Deployment", "t-genie-lam")["args"])
    assert "--device" not in lam  # gpu: false in production: CPU instances


def test_world_from_a_volume(production):
    for model in TRITON:
        c = container(production, "Deployment", f"t-genie-{model}")
        assert arg_map(c["args"])["--world"] == "/worlds/coinrun"
        assert {"name": "worlds", "mountPath": "/worlds", "readOnly": True} in c["volumeMounts"]
        volumes = pod_spec(named(production, "Deployment", f"t-genie-{model}"))["volumes"]
        assert {"name": "worlds", "persistentVolumeClaim": {"claimName": "genie-worlds", "readOnly": True}} in volumes


# --- Redis and secrets ----------------------------------------------------------------------------------------------------


def test_bundled_redis(default):
    sts = named(default, "StatefulSet", "t-genie-redis")
    headless = named(default, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert named(default, "Service", "t-genie-redis")["spec"]["ports"][0]["port"] == 6379
    c = pod_spec(sts)["containers"][0]
    assert c["image"].startswith("docker.io/library/redis:7")
    assert c["command"] == ["sh", "-c"] and "--appendonly yes" in c["args"][0]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    url = named(default, "Secret", "t-genie-redis-url")["data"]["redis-url"]
    assert base64.b64decode(url).decode() == "redis://t-genie-redis:6379"


def test_external_redis(helm, production):
    assert not of_kind(production, "StatefulSet")
    c = container(production, "Deployment", "t-genie-gateway")
    ref = next(e for e in c["env"] if e["name"] == "GENIE_REDIS_BASE_URL")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "genie-redis", "key": "redis-url"}
    docs = helm.render("--set", "redis.enabled=false", "--set", "redis.external.url=rediss://:pw@cache.example:6380")
    assert base64.b64decode(named(docs, "Secret", "t-genie-redis-url")["data"]["redis-url"]).decode() == \
        "rediss://:pw@cache.example:6380"


def test_tokens_secret(helm, default, production):
    ref = next(e for e in container(default, "Deployment", "t-genie-gateway")["env"] if e["name"] == "GENIE_TOKENS")
    secret = named(default, "Secret", ref["valueFrom"]["secretKeyRef"]["name"])
    assert re.fullmatch(r"demo:[A-Za-z0-9]{32}", base64.b64decode(secret["data"]["tokens"]).decode())
    tokens = "alice:s3cret-s3cret-s3cret,bob:t0ken-t0ken-t0ken"
    docs = helm.render("--set", "gateway.auth.tokens=" + tokens.replace(",", "\\,"))  # --set splits on bare commas
    assert base64.b64decode(named(docs, "Secret", "t-genie-tokens")["data"]["tokens"]).decode() == tokens
    ref = next(e for e in container(production, "Deployment", "t-genie-gateway")["env"] if e["name"] == "GENIE_TOKENS")
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "genie-tokens", "key": "tokens"}
    assert not of_kind(production, "Secret")  # both credentials come from existing Secrets


# --- helm test hook and NOTES ------------------------------------------------------------------------------------------------


def test_helm_test_hook_checks_gateway_grpc_health(rendered):
    name, docs = rendered
    (pod,) = of_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    script, target, page = c["args"]
    assert c["command"] == ["python", "-c"] and "HealthStub" in script and "SERVING" in script
    compile(script, "helm-test", "exec")  # the inline script is valid Python
    host, port = target.split(":")
    gateway = named(docs, "Service", host)
    assert int(port) in [p["port"] for p in gateway["spec"]["ports"] if p["name"] == "grpc"]
    assert page == f"{'https' if name == 'production-gpu' else 'http'}://{host}:8080"  # production: gateway TLS
