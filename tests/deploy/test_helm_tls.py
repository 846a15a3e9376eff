"""TLS in the chart (issue 19): the Ingress (gRPC + page) with its certificate, the gateway's serving certificate
(existing Secret or cert-manager), Triton's gRPC TLS and its CA in the callers, and that values-production-gpu.yaml
encrypts every hop the chart deploys."""

from __future__ import annotations

import base64
from pathlib import Path

import kubernetes_validate
import pytest

PRODUCTION = ["-f", str(Path(__file__).resolve().parents[2] / "deploy" / "helm" / "values-production-gpu.yaml")]
TRITON = ("tokenizer", "lam", "dynamics")


def named(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def main_container(docs: list[dict], name: str) -> tuple[dict, dict]:
    """(pod spec, its one container) of Deployment `name`."""
    spec = named(docs, "Deployment", name)["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    return spec, c


def file_source(spec: dict, c: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) a file path inside container `c` comes from, following its volumeMounts to the volume."""
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    key = path[len(mount["mountPath"].rstrip("/")) + 1:]
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
    assert not items or key in items, (path, items)
    return volume["secret"]["secretName"], items.get(key, key)


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c["env"]}


@pytest.fixture(scope="module")
def production(helm) -> list[dict]:
    return helm.render(*PRODUCTION)


@pytest.fixture(scope="module")
def default(helm) -> list[dict]:
    return helm.render()


def test_default_serves_plaintext_without_an_ingress(default):
    assert not of_kind(default, "Ingress") and not of_kind(default, "Certificate")
    _, gateway = main_container(default, "t-genie-gateway")
    assert not {"GENIE_TLS_CERT", "GENIE_TLS_KEY", "GENIE_TRITON_CA"} & set(env_of(gateway))
    assert gateway["readinessProbe"]["grpc"]["port"] == 50051
    assert gateway["livenessProbe"]["httpGet"]["scheme"] == "HTTP"


def test_production_ingress_carries_grpc_and_the_page_over_tls(production):
    service = named(production, "Service", "t-genie-gateway")
    assert service["spec"]["type"] == "ClusterIP"  # only through the Ingress
    ports = {p["name"] for p in service["spec"]["ports"]}
    grpc, page = named(production, "Ingress", "t-genie-gateway-grpc"), named(production, "Ingress", "t-genie-gateway-http")
    for ingress, protocol, port in ((grpc, "GRPCS", "grpc"), (page, "HTTPS", "http")):
        notes = ingress["metadata"]["annotations"]
        assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == protocol  # re-encrypted to the gateway
        assert notes["cert-manager.io/cluster-issuer"] == "letsencrypt"
        (tls,) = ingress["spec"]["tls"]
        (rule,) = ingress["spec"]["rules"]
        assert tls["hosts"] == [rule["host"]] == ["genie.example.com"] and tls["secretName"] == "t-genie-ingress-tls"
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend == {"name": "t-genie-gateway", "port": {"name": port}} and port in ports
        kubernetes_validate.validate(ingress, "1.27.0", strict=True)
    assert [p["path"] for p in grpc["spec"]["rules"][0]["http"]["paths"]] == ["/genie.v1.Gateway", "/grpc.health.v1.Health"]


def test_production_gateway_serves_tls_from_its_cert_manager_certificate(production):
    cert = named(production, "Certificate", "t-genie-gateway-tls")
    assert cert["spec"]["issuerRef"] == {"name": "genie-internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert "t-genie-gateway" in cert["spec"]["dnsNames"] and "t-genie-gateway.genie.svc" in cert["spec"]["dnsNames"]
    spec, gateway = main_container(production, "t-genie-gateway")
    env = env_of(gateway)
    assert file_source(spec, gateway, env["GENIE_TLS_CERT"]) == (cert["spec"]["secretName"], "tls.crt")
    assert file_source(spec, gateway, env["GENIE_TLS_KEY"]) == (cert["spec"]["secretName"], "tls.key")
    assert "GENIE_TLS_CLIENT_CA" not in env  # the ingress controller has no client certificate by default
    # The kubelet's gRPC probe cannot do TLS: it asks the plaintext health port, which nothing else may reach.
    assert "--plaintext-grpc-port=50052" in gateway["args"]
    assert gateway["readinessProbe"]["grpc"]["port"] == 50052 in [p["containerPort"] for p in gateway["ports"]]
    assert gateway["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert 50052 not in [p["port"] for p in named(production, "Service", "t-genie-gateway")["spec"]["ports"]]
    opened = [p["port"] for rule in named(production, "NetworkPolicy", "t-genie-gateway")["spec"]["ingress"]
              for p in rule["ports"]]
    assert 50052 not in opened


def test_production_triton_speaks_grpc_tls_and_its_callers_trust_it(production):
    for model in TRITON:
        spec, triton = main_container(production, f"t-genie-{model}")
        args = dict(a.split("=", 1) for a in triton["args"] if a.startswith("--tls"))
        assert file_source(spec, triton, args["--tls-cert"]) == ("genie-triton-tls", "tls.crt")
        assert file_source(spec, triton, args["--tls-key"]) == ("genie-triton-tls", "tls.key")
    for caller in ("t-genie-gateway", "t-genie-worker-rollout"):
        spec, c = main_container(production, caller)
        assert file_source(spec, c, env_of(c)["GENIE_TRITON_CA"]) == ("genie-triton-tls", "ca.crt"), caller
    _, train = main_container(production, "t-genie-worker-train")
    assert "GENIE_TRITON_CA" not in env_of(train)  # it never calls Triton


def test_production_redis_is_external_and_comes_from_a_secret(production):
    # The managed Redis's rediss:// URL (with its password) lives in the `genie-redis` Secret, nowhere else.
    assert not of_kind(production, "StatefulSet") and not of_kind(production, "Secret")
    for name in ("t-genie-gateway", "t-genie-worker-train", "t-genie-worker-rollout"):
        _, c = main_container(production, name)
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "GENIE_REDIS_BASE_URL"]
        assert ref == {"name": "genie-redis", "key": "redis-url"}


def test_existing_gateway_secret_and_mutual_tls(helm):
    docs = helm.render("--set", "gateway.tls.enabled=true", "--set", "gateway.tls.existingSecret=gw-tls",
                       "--set", "gateway.tls.clientCA=true", "--set", "ingress.enabled=true",
                       "--set", "ingress.tls.secretName=edge-tls")
    assert not of_kind(docs, "Certificate")
    spec, gateway = main_container(docs, "t-genie-gateway")
    assert file_source(spec, gateway, env_of(gateway)["GENIE_TLS_CLIENT_CA"]) == ("gw-tls", "ca.crt")
    ingress = named(docs, "Ingress", "t-genie-gateway-grpc")
    assert ingress["spec"]["tls"][0]["secretName"] == "edge-tls"
    assert "cert-manager.io/cluster-issuer" not in ingress["metadata"]["annotations"]
    for doc in docs:
        if doc["kind"] != "Certificate":
            kubernetes_validate.validate(doc, "1.27.0", strict=True)
    plain = helm.render("--set", "ingress.enabled=true")
    assert named(plain, "Ingress", "t-genie-gateway-grpc")["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"


@pytest.mark.parametrize("values, message", [
    (["gateway.tls.enabled=true"], "set gateway.tls.existingSecret or gateway.tls.certManager.issuerName"),
    (["triton.tls.enabled=true"], "set triton.tls.existingSecret"),
])
def test_tls_without_a_certificate_source_fails(helm, values, message):
    out = helm.template(*[a for v in values for a in ("--set", v)])
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_tls_secrets_are_mounted_not_inlined(production):
    # Certificates and keys travel as Secret volumes: no PEM in any rendered object.
    for doc in production:
        assert "BEGIN" not in str(doc), doc["metadata"]["name"]
        if doc["kind"] == "Secret":
            assert not any("BEGIN" in base64.b64decode(v).decode() for v in doc.get("data", {}).values())


@pytest.mark.parametrize("client_ca", [False, True])
def test_helm_test_hook_speaks_tls_to_a_tls_gateway(helm, client_ca):
    docs = helm.render(*PRODUCTION, "--set", f"gateway.tls.clientCA={str(client_ca).lower()}")
    (pod,) = of_kind(docs, "Pod")
    (c,) = pod["spec"]["containers"]
    script, target, page = c["args"]
    compile(script, "helm-test", "exec")
    assert target == "t-genie-gateway:50051" and page == "https://t-genie-gateway:8080"
    assert "ssl_channel_credentials" in script and "insecure_channel" in script  # plaintext only without a CA
    env = env_of(c)
    secret = named(docs, "Certificate", "t-genie-gateway-tls")["spec"]["secretName"]
    assert file_source(pod["spec"], c, env["GENIE_TEST_CA"]) == (secret, "ca.crt")
    if client_ca:
        assert file_source(pod["spec"], c, env["GENIE_TEST_CERT"]) == (secret, "tls.crt")
        assert file_source(pod["spec"], c, env["GENIE_TEST_KEY"]) == (secret, "tls.key")
    else:
        assert "GENIE_TEST_CERT" not in env
    kubernetes_validate.validate(pod, "1.27.0", strict=True)


def test_bundled_redis_tls_reaches_every_client(helm):
    docs = helm.render("--set", "redis.tls.enabled=true", "--set", "redis.tls.existingSecret=redis-tls")
    url = base64.b64decode(named(docs, "Secret", "t-genie-redis-url")["data"]["redis-url"]).decode()
    assert url == "rediss://t-genie-redis:6379"
    for name in ("t-genie-gateway", "t-genie-worker-train", "t-genie-worker-rollout"):
        spec, c = main_container(docs, name)
        assert file_source(spec, c, env_of(c)["GENIE_REDIS_CA"]) == ("redis-tls", "ca.crt"), name
        if "worker" in name:
            assert env_of(c)["GENIE_BROKER_CA"] == env_of(c)["GENIE_REDIS_CA"]
    redis = named(docs, "StatefulSet", "t-genie-redis")["spec"]["template"]["spec"]
    server = redis["containers"][0]  # then the tls-reload sidecar
    assert "--port 0 --tls-port 6379" in server["args"][0]  # no plaintext port at all
    assert file_source(redis, server, "/etc/genie/tls/tls.key") == ("redis-tls", "tls.key")
    for doc in docs:
        kubernetes_validate.validate(doc, "1.27.0", strict=True)
    _, gateway = main_container(helm.render(), "t-genie-gateway")
    assert "GENIE_REDIS_CA" not in env_of(gateway)


@pytest.mark.parametrize("values, message", [
    (["redis.tls.enabled=true"], "set redis.tls.existingSecret"),
])
def test_bad_redis_tls_values_fail(helm, values, message):
    out = helm.template(*[a for v in values for a in ("--set", v)])
    assert out.returncode != 0 and message in out.stderr, out.stderr
