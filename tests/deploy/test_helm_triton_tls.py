"""Mutual TLS to Triton in the chart ("Encrypted and authenticated on every hop"): Triton requires client
certificates (`--tls-client-ca`), the gateway and rollout workers present one from a Secret or a cert-manager
Certificate, TLS gRPC is the only inference endpoint (plaintext HTTP binds the pod's loopback), and the probes and
the gateway's wait for Triton still work; the probe and the wait scripts are run here against real servers."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy.test_helm_security import leaks
from tests.deploy.test_helm_tls import env_of, file_source, main_container, named, of_kind
from tests.tls_certs import make_certs, tls_listener

PRODUCTION = ["-f", str(Path(__file__).resolve().parents[2] / "deploy" / "helm" / "values-production-gpu.yaml")]
TRITON = ("tokenizer", "lam", "dynamics")
CALLERS = ("t-genie-gateway", "t-genie-worker-rollout")
MUTUAL = ["--set", "triton.tls.enabled=true", "--set", "triton.tls.existingSecret=triton-tls",
          "--set", "triton.tls.clientCA=true", "--set", "triton.tls.clientSecret=triton-client"]


@pytest.fixture(scope="module")
def mutual(helm) -> list[dict]:
    return helm.render(*MUTUAL)


@pytest.fixture(scope="module")
def production(helm) -> list[dict]:
    return helm.render(*PRODUCTION)


def flags(c: dict) -> dict[str, str]:
    return dict(a.split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)


def init_container(docs: list[dict]) -> tuple[dict, dict]:
    spec = named(docs, "Deployment", "t-genie-gateway")["spec"]["template"]["spec"]
    (wait,) = spec["initContainers"]
    assert wait["name"] == "wait-for-triton"
    return spec, wait


def assert_mutual_triton(docs: list[dict], server_secret: str, client_secret: str) -> None:
    """Every Triton pod requires certificates signed by its Secret's CA and serves inference only over TLS gRPC;
    the gateway (and its wait for Triton) and the rollout workers present `client_secret`'s certificate."""
    for model in TRITON:
        spec, triton = main_container(docs, f"t-genie-{model}")
        args = flags(triton)
        assert file_source(spec, triton, args["--tls-client-ca"]) == (server_secret, "ca.crt")
        assert file_source(spec, triton, args["--tls-cert"]) == (server_secret, "tls.crt")
        assert args["--http-host"] == "127.0.0.1" and args["--host"] == "0.0.0.0"  # gRPC and metrics for the network
        assert "http" not in [p["name"] for p in triton["ports"]]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            (handler,) = {"exec", "httpGet", "grpc", "tcpSocket"} & set(triton[probe])
            assert handler == "exec" and "127.0.0.1:8000/v2/health/" in triton[probe]["exec"]["command"][-1]
        for service in (f"t-genie-{model}", f"t-genie-{model}-pods"):
            assert 8000 not in [p["port"] for p in named(docs, "Service", service)["spec"]["ports"]], service
    for caller in CALLERS:
        spec, c = main_container(docs, caller)
        env = env_of(c)
        assert file_source(spec, c, env["GENIE_TRITON_CERT"]) == (client_secret, "tls.crt"), caller
        assert file_source(spec, c, env["GENIE_TRITON_KEY"]) == (client_secret, "tls.key"), caller
        assert file_source(spec, c, env["GENIE_TRITON_CA"]) == (server_secret, "ca.crt"), caller
    spec, wait = init_container(docs)
    env = env_of(wait)
    assert file_source(spec, wait, env["GENIE_TRITON_CERT"]) == (client_secret, "tls.crt")
    assert file_source(spec, wait, env["GENIE_TRITON_CA"]) == (server_secret, "ca.crt")
    assert wait["args"][1:] == [f"t-genie-{m}:8001" for m in TRITON]
    _, train = main_container(docs, "t-genie-worker-train")
    assert not {"GENIE_TRITON_CA", "GENIE_TRITON_CERT", "GENIE_TRITON_KEY"} & set(env_of(train))  # never calls Triton
    assert leaks(docs) == [] and not any("BEGIN" in str(d) for d in docs)  # certificates travel as Secret volumes


def test_mutual_tls_with_an_existing_client_secret(mutual):
    assert_mutual_triton(mutual, "triton-tls", "triton-client")
    assert not of_kind(mutual, "Certificate")
    for doc in mutual:
        kubernetes_validate.validate(doc, "1.27.0", strict=True)


def test_cert_manager_issues_the_client_certificate(helm):
    docs = helm.render(*MUTUAL[:-2], "--set", "triton.tls.certManager.issuerName=internal-ca",
                       "--set", "triton.tls.certManager.issuerKind=Issuer")
    cert = named(docs, "Certificate", "t-genie-triton-client")
    assert cert["spec"]["issuerRef"] == {"name": "internal-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert cert["spec"]["usages"] == ["client auth", "digital signature"]
    assert_mutual_triton(docs, "triton-tls", cert["spec"]["secretName"])
    # An existing Secret wins over the issuer, as with the gateway's serving certificate.
    both = helm.render(*MUTUAL, "--set", "triton.tls.certManager.issuerName=internal-ca")
    assert not of_kind(both, "Certificate")
    assert_mutual_triton(both, "triton-tls", "triton-client")


def test_production_authenticates_every_triton_hop(production):
    cert = named(production, "Certificate", "t-genie-triton-client")
    assert cert["spec"]["issuerRef"]["name"] == "genie-internal-ca"
    assert_mutual_triton(production, "genie-triton-tls", cert["spec"]["secretName"])
    # Only the TLS gRPC port is open to the callers; the plaintext metrics port only to Prometheus.
    rules = named(production, "NetworkPolicy", "t-genie-triton")["spec"]["ingress"]
    assert [sorted(p["port"] for p in r["ports"]) for r in rules] == [[8001], [8002]]
    assert rules[1]["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}


def test_notes_say_how_triton_is_reached(helm):
    def notes(*values: str) -> str:
        out = helm.run("install", "t", str(helm.chart), "--dry-run=client", "--namespace", "genie", *values)
        assert out.returncode == 0, out.stderr
        return out.stdout.split("NOTES:", 1)[1]

    assert "gRPC over TLS, client certificates required (mutual TLS)" in notes(*PRODUCTION)
    assert "gRPC over TLS" not in notes()


def test_a_client_certificate_without_client_ca_and_plaintext_triton(helm):
    # Certificates first, then require them: the callers present one before Triton asks for it.
    docs = helm.render(*MUTUAL[:4], *MUTUAL[6:])
    for model in TRITON:
        _, triton = main_container(docs, f"t-genie-{model}")
        assert "--tls-client-ca" not in flags(triton) and "--tls-cert" in flags(triton)
    for caller in CALLERS:
        spec, c = main_container(docs, caller)
        assert file_source(spec, c, env_of(c)["GENIE_TRITON_CERT"]) == ("triton-client", "tls.crt")
    # Without triton.tls everything stays as before: plaintext gRPC and HTTP, httpGet probes, port 8000 served.
    plain = helm.render()
    for model in TRITON:
        _, triton = main_container(plain, f"t-genie-{model}")
        assert "--http-host" not in flags(triton) and triton["readinessProbe"]["httpGet"]["port"] == "http"
        assert 8000 in [p["port"] for p in named(plain, "Service", f"t-genie-{model}")["spec"]["ports"]]
    for caller in CALLERS:
        _, c = main_container(plain, caller)
        assert not {"GENIE_TRITON_CA", "GENIE_TRITON_CERT"} & set(env_of(c))
    _, wait = init_container(plain)
    assert wait["args"][1].startswith("http://") and "env" not in wait


@pytest.mark.parametrize("values, message", [
    (["triton.tls.clientCA=true"], "triton.tls.clientCA needs triton.tls.enabled"),
    (["triton.tls.clientSecret=c"], "need triton.tls.enabled"),
    (["triton.tls.certManager.issuerName=ca"], "need triton.tls.enabled"),
    (["triton.tls.enabled=true", "triton.tls.existingSecret=s", "triton.tls.clientCA=true"],
     "triton.tls.clientCA: set triton.tls.clientSecret or triton.tls.certManager.issuerName"),
])
def test_bad_combinations_fail_with_their_message(helm, values, message):
    out = helm.template(*[a for v in values for a in ("--set", v)])
    assert out.returncode != 0 and message in out.stderr, out.stderr


# --- the rendered scripts, run against real servers -----------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/v2/health/ready" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status, code", [(200, 0), (503, 1)])
def test_the_exec_probe_passes_only_on_ready(mutual, status, code):
    _, triton = main_container(mutual, "t-genie-dynamics")
    command = triton["readinessProbe"]["exec"]["command"]
    handler = type("Health", (_Health,), {"status": status})
    with http.server.HTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]  # the probe's script, aimed at this server instead of Triton's 8000
        script = command[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        done = subprocess.run([sys.executable, *command[1:-1], script], capture_output=True, timeout=30)
        server.shutdown()
    assert command[0] == "python" and done.returncode == code, done.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("chart-triton-certs"))


def _wait(docs: list[dict], env: dict[str, str], target: str, timeout: float) -> subprocess.CompletedProcess | str:
    _, wait = init_container(docs)
    script = wait["args"][0]
    try:
        return subprocess.run([sys.executable, "-c", script, target], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env})
    except subprocess.TimeoutExpired as exc:
        return (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""


def test_the_gateway_waits_for_a_tls_handshake_with_each_triton(mutual, certs, tmp_path):
    with tls_listener(certs) as port:
        target = f"localhost:{port}"  # the server certificate's name, as the Services' names are Triton's
        good = {"GENIE_TRITON_CA": str(certs.ca), "GENIE_TRITON_CERT": str(certs.client_cert),
                "GENIE_TRITON_KEY": str(certs.client_key)}
        done = _wait(mutual, good, target, timeout=30)
        assert not isinstance(done, str) and done.returncode == 0, done
        # A CA that did not sign Triton's certificate: it keeps waiting and says why.
        stranger = make_certs(tmp_path / "stranger", name="stranger")
        output = _wait(mutual, {**good, "GENIE_TRITON_CA": str(stranger.ca)}, target, timeout=4)
        assert isinstance(output, str) and f"waiting for {target} (TLS)" in output and "certificate verify failed" in output
