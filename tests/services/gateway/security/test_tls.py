"""The gateway over TLS with real certificates made here by the openssl CLI: verified and refused clients over real
gRPC, mutual TLS, the opt-in plaintext port, the page over HTTPS, and bad certificate files at startup."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.backends.inprocess import InProcessBackend
from services.gateway.api.client import GatewayClient, frame_array
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.security.tls import ClientTLS, ServerTLS
from services.gateway.stores.memory_store import MemoryStore
from tests.services.gateway.api.test_grpc_gateway import _png

TOKEN = "tls-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[4]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}", cwd=d)


def _leaf(d: Path, name: str, ca: str, usage: str, san: str = "") -> None:
    """A certificate `name`.pem/.key signed by `ca`, for serverAuth or clientAuth."""
    ext = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}", "subjectKeyIdentifier=hash",
           "authorityKeyIdentifier=keyid,issuer"] + ([f"subjectAltName={san}"] if san else [])
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """ca (signs the server and the client), other-ca (signs nothing this gateway trusts), a server certificate
    for 127.0.0.1 and localhost, a client certificate from ca and one from other-ca."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    _leaf(d, "client", "ca", "clientAuth")
    _leaf(d, "stranger", "other-ca", "clientAuth")
    return d


async def _start(world: Path, pki: Path, **tls) -> Gateway:
    cfg = GatewayConfig(world=str(world), grpc_port=0, http_port=0, metrics_port=-1, tokens=f"alice:{TOKEN}",
                        tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), **tls)
    gw = Gateway(cfg, backend=InProcessBackend(world), store=MemoryStore())
    await gw.start()
    return gw


@pytest.fixture
async def tls_gateway(trained_world_dir, pki):
    gw = await _start(trained_world_dir, pki, plaintext_grpc_port=0)
    yield gw
    await gw.stop()


@pytest.fixture
async def mtls_gateway(trained_world_dir, pki):
    gw = await _start(trained_world_dir, pki, tls_client_ca=str(pki / "ca.pem"))
    yield gw
    await gw.stop()


async def _refused(address: str, tls: ClientTLS | None) -> str:
    async with GatewayClient(address, TOKEN, timeout_s=10.0, tls=tls) as c:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.list_actions()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    return info.value.details()


async def test_verifying_client_opens_and_steps(tls_gateway, pki, trained_world_dir):
    assert tls_gateway.grpc.tls
    async with GatewayClient(tls_gateway.grpc_address, TOKEN, tls=ClientTLS(ca=str(pki / "ca.pem"))) as c:
        opened = await c.open(image=_png(trained_world_dir), seed=3)
        stepped = await c.step(opened.session.session_id, 1)
        assert stepped.step == 1 and frame_array(stepped.frame).ndim == 3
    # The certificate names localhost too, and a server name override verifies against it when dialling the IP.
    port = tls_gateway.grpc.port
    async with GatewayClient(f"localhost:{port}", TOKEN, tls=ClientTLS(ca=str(pki / "ca.pem"))) as c:
        assert (await c.list_actions()).window > 0
    async with GatewayClient(tls_gateway.grpc_address, TOKEN, tls=ClientTLS(ca=str(pki / "ca.pem"), server_name="localhost")) as c:
        assert (await c.list_actions()).window > 0


async def test_health_answers_on_the_tls_port(tls_gateway, pki):
    creds = ClientTLS(ca=str(pki / "ca.pem")).channel_credentials()
    async with grpc.aio.secure_channel(tls_gateway.grpc_address, creds) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_wrong_ca_and_plaintext_clients_are_refused(tls_gateway, pki):
    details = await _refused(tls_gateway.grpc_address, ClientTLS(ca=str(pki / "other-ca.pem")))
    assert "ssl" in details.lower() or "handshake" in details.lower(), details
    # A name the certificate does not hold is refused too.
    await _refused(tls_gateway.grpc_address, ClientTLS(ca=str(pki / "ca.pem"), server_name="elsewhere.example"))
    await _refused(tls_gateway.grpc_address, None)  # plaintext client on the TLS port


async def test_opt_in_plaintext_port_serves(tls_gateway, pki, trained_world_dir):
    address = tls_gateway.grpc.plaintext_address
    assert address is not None and address != tls_gateway.grpc_address
    async with GatewayClient(address, TOKEN) as c:
        opened = await c.open(image=_png(trained_world_dir), seed=1)
        assert (await c.step(opened.session.session_id, 0)).step == 1
    await _refused(address, ClientTLS(ca=str(pki / "ca.pem")))  # and it is plaintext only


async def test_no_plaintext_port_unless_asked(mtls_gateway):
    assert mtls_gateway.grpc.plaintext_address is None


async def test_mutual_tls_needs_a_client_certificate_the_ca_signed(mtls_gateway, pki, trained_world_dir):
    good = ClientTLS(ca=str(pki / "ca.pem"), cert=str(pki / "client.pem"), key=str(pki / "client.key"))
    async with GatewayClient(mtls_gateway.grpc_address, TOKEN, tls=good) as c:
        opened = await c.open(image=_png(trained_world_dir), seed=2)
        assert (await c.step(opened.session.session_id, 1)).step == 1
    await _refused(mtls_gateway.grpc_address, ClientTLS(ca=str(pki / "ca.pem")))  # no client certificate
    stranger = ClientTLS(ca=str(pki / "ca.pem"), cert=str(pki / "stranger.pem"), key=str(pki / "stranger.key"))
    await _refused(mtls_gateway.grpc_address, stranger)


async def _get(url: str, context: ssl.SSLContext | bool, **kw) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url, ssl=context, **kw) as resp:
        return resp.status, await resp.text()


async def test_page_and_api_over_https(tls_gateway, mtls_gateway, pki):
    url = tls_gateway.page_url()
    assert url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    base = f"https://127.0.0.1:{tls_gateway.http_port}"
    status, page = await _get(base + "/", trusting)
    assert status == 200 and "/static/play.js" in page
    status, body = await _get(base + "/api/world", trusting, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and '"actions"' in body
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _get(base + "/", ssl.create_default_context(cafile=str(pki / "other-ca.pem")))
    with pytest.raises(aiohttp.ClientError):  # plain HTTP to the HTTPS port
        await _get(f"http://127.0.0.1:{tls_gateway.http_port}/", False)
    # With mutual TLS on gRPC, the page still takes a browser without a client certificate (its API needs the token).
    status, _ = await _get(f"https://127.0.0.1:{mtls_gateway.http_port}/", trusting)
    assert status == 200


def test_server_tls_rejects_a_mismatched_key(pki):
    with pytest.raises(ValueError, match="does not match"):
        ServerTLS.load(str(pki / "server.pem"), str(pki / "client.key"))
    assert ServerTLS.load(str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem")).mutual


@pytest.mark.parametrize("flags, needle", [
    (["--tls-cert", "{d}/missing.pem", "--tls-key", "{d}/server.key"], "cannot read the TLS certificate"),
    (["--tls-cert", "{d}/server.pem", "--tls-key", "{d}/client.key"], "does not match"),
    (["--tls-cert", "{d}/server.pem", "--tls-key", "{d}/server.key", "--tls-client-ca", "{d}/server.ext"], "not a PEM"),
    (["--tls-cert", "{d}/server.pem"], "both a certificate and a key"),
    (["--tls-client-ca", "{d}/ca.pem"], "needs the server's certificate"),
    (["--plaintext-grpc-port", "0"], "only for beside a TLS one"),
])
@pytest.mark.parametrize("command", ["serve", "play"])
def test_bad_certificate_files_exit_2_with_one_line(pki, trained_world_dir, flags, needle, command):
    from click.testing import CliRunner

    from services.cli import main

    args = [command, "--world", str(trained_world_dir), "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1",
            "--device", "cpu", *(f.format(d=pki) for f in flags), *(["--no-browser"] if command == "play" else [])]
    result = CliRunner().invoke(main, args, env={"GENIE_TLS_CERT": None, "GENIE_TLS_KEY": None, "GENIE_TLS_CLIENT_CA": None})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


async def test_genie_serve_over_tls_from_env_vars(pki, trained_world_dir):
    """`genie serve` as a pod runs it: certificate, key and client CA from GENIE_TLS_*, no plaintext port."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GENIE_TLS_CERT": str(pki / "server.pem"),
           "GENIE_TLS_KEY": str(pki / "server.key"), "GENIE_TLS_CLIENT_CA": str(pki / "ca.pem")}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--world", str(trained_world_dir), "--grpc-port",
                             "0", "--http-port", "0", "--metrics-port", "-1", "--device", "cpu", "--threads", "1",
                             "--tokens", f"alice:{TOKEN}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        info = json.loads(line)
        assert info["tls"] is True and info["page"].startswith("https://") and "grpc_plaintext" not in info
        good = ClientTLS(ca=str(pki / "ca.pem"), cert=str(pki / "client.pem"), key=str(pki / "client.key"))
        async with GatewayClient(info["grpc"], TOKEN, tls=good) as c:
            assert (await c.list_actions()).window > 0
        await _refused(info["grpc"], ClientTLS(ca=str(pki / "ca.pem")))  # mutual: no client certificate, no call
        status, _ = await _get(info["page"], ssl.create_default_context(cafile=str(pki / "ca.pem")))
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
