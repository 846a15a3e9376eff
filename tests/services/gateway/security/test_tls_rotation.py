"""Certificate rotation without a restart: a gateway whose TLS files are swapped the way the kubelet updates a
mounted Secret (an atomic `..data` symlink switch) serves the new certificate to new gRPC and HTTPS connections,
keeps open connections, refuses a broken new set while the old certificate serves on, and takes a new client CA
for mutual TLS. Real gRPC and HTTPS over loopback; certificates made here by the openssl CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.backends.inprocess import InProcessBackend
from services.gateway.api.client import GatewayClient
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.security.tls import CertificateReloader, ClientTLS, ServerTLS
from services.gateway.stores.memory_store import MemoryStore
from tests.services.gateway.api.test_grpc_gateway import _png
from tests.services.gateway.security.test_tls import _ca, _leaf
from tests.tls_certs import SecretMount, served_certificate

TOKEN = "rotation-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[4]
SAN = "DNS:localhost,IP:127.0.0.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca signs server-a, server-b and client; new-ca signs new-client (a client CA the gateway learns later)."""
    d = tmp_path_factory.mktemp("rotation-pki")
    _ca(d, "ca")
    _ca(d, "new-ca")
    _leaf(d, "server-a", "ca", "serverAuth", SAN)
    _leaf(d, "server-b", "ca", "serverAuth", SAN)
    _leaf(d, "client", "ca", "clientAuth")
    _leaf(d, "new-client", "new-ca", "clientAuth")
    (d / "both-cas.pem").write_bytes((d / "ca.pem").read_bytes() + (d / "new-ca.pem").read_bytes())
    return d


def _secret(pki: Path, server: str, client_ca: str = "ca.pem") -> dict[str, bytes]:
    return {"tls.crt": (pki / f"{server}.pem").read_bytes(), "tls.key": (pki / f"{server}.key").read_bytes(),
            "ca.crt": (pki / client_ca).read_bytes()}


async def _served(port: int, pki: Path, alpn: str = "h2") -> bytes:
    """served_certificate off the event loop, which the gateway under test needs to answer the handshake."""
    return await asyncio.to_thread(served_certificate, port, pki / "ca.pem", alpn)


def _der(pki: Path, name: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert((pki / f"{name}.pem").read_text())


async def _start(world: Path, mount: SecretMount, client_ca: bool = False, reload_s: float = 0.0) -> Gateway:
    cfg = GatewayConfig(world=str(world), grpc_port=0, http_port=0, metrics_port=-1, tokens=f"alice:{TOKEN}",
                        tls_cert=mount.path("tls.crt"), tls_key=mount.path("tls.key"),
                        tls_client_ca=mount.path("ca.crt") if client_ca else "", tls_reload_s=reload_s)
    gw = Gateway(cfg, backend=InProcessBackend(world), store=MemoryStore())
    await gw.start()
    return gw


def _reloads(gw: Gateway, result: str) -> float:
    return gw.service.metrics.registry.get_sample_value("genie_gateway_tls_reloads_total", {"result": result}) or 0.0


async def test_renewed_certificate_reaches_new_connections_and_open_ones_keep_working(pki, tmp_path, trained_world_dir):
    mount = SecretMount(tmp_path / "tls")
    mount.publish(_secret(pki, "server-a"))
    gw = await _start(trained_world_dir, mount)
    try:
        assert await _served(gw.grpc.port, pki, "h2") == _der(pki, "server-a")
        assert await _served(gw.http_port, pki, "http/1.1") == _der(pki, "server-a")
        trusting = ClientTLS(ca=str(pki / "ca.pem"))
        async with GatewayClient(gw.grpc_address, TOKEN, tls=trusting) as open_client:
            opened = await open_client.open(image=_png(trained_world_dir), seed=5)
            assert gw.reload_tls() is None  # nothing changed
            mount.publish(_secret(pki, "server-b"))
            assert gw.reload_tls() is True
            assert await _served(gw.grpc.port, pki, "h2") == _der(pki, "server-b")
            assert await _served(gw.http_port, pki, "http/1.1") == _der(pki, "server-b")
            # The connection opened before the switch was not cut: the session steps on over it.
            assert (await open_client.step(opened.session.session_id, 1)).step == 1
        async with GatewayClient(gw.grpc_address, TOKEN, tls=trusting) as fresh:
            assert (await fresh.step(opened.session.session_id, 2)).step == 2
        assert _reloads(gw, "ok") == 1 and _reloads(gw, "error") == 0
    finally:
        await gw.stop()


async def test_a_broken_new_set_is_refused_and_the_old_certificate_serves_on(pki, tmp_path, trained_world_dir):
    mount = SecretMount(tmp_path / "tls")
    mount.publish(_secret(pki, "server-a"))
    gw = await _start(trained_world_dir, mount)
    try:
        broken = _secret(pki, "server-b")
        broken["tls.key"] = (pki / "server-a.key").read_bytes()  # a key of another certificate
        mount.publish(broken)
        assert gw.reload_tls() is False
        assert gw.reload_tls() is False  # still broken: refused again, but counted and logged once
        assert _reloads(gw, "error") == 1
        assert await _served(gw.grpc.port, pki, "h2") == _der(pki, "server-a")
        async with GatewayClient(gw.grpc_address, TOKEN, tls=ClientTLS(ca=str(pki / "ca.pem"))) as c:
            assert (await c.list_actions()).window > 0
        mount.publish({**broken, "tls.crt": b"not a certificate"})  # garbage: refused the same way
        assert gw.reload_tls() is False and _reloads(gw, "error") == 2
        mount.publish(_secret(pki, "server-b"))  # fixed: taken
        assert gw.reload_tls() is True
        assert await _served(gw.grpc.port, pki, "h2") == _der(pki, "server-b")
        assert _reloads(gw, "ok") == 1
    finally:
        await gw.stop()


async def test_a_new_client_ca_admits_its_clients_without_a_restart(pki, tmp_path, trained_world_dir):
    mount = SecretMount(tmp_path / "tls")
    mount.publish(_secret(pki, "server-a", client_ca="ca.pem"))
    gw = await _start(trained_world_dir, mount, client_ca=True)
    old = ClientTLS(ca=str(pki / "ca.pem"), cert=str(pki / "client.pem"), key=str(pki / "client.key"))
    new = ClientTLS(ca=str(pki / "ca.pem"), cert=str(pki / "new-client.pem"), key=str(pki / "new-client.key"))
    try:
        async with GatewayClient(gw.grpc_address, TOKEN, tls=new, timeout_s=10.0) as c:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.list_actions()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        mount.publish(_secret(pki, "server-a", client_ca="both-cas.pem"))  # CA rollover: trust old and new
        assert gw.reload_tls() is True
        for client in (new, old):
            async with GatewayClient(gw.grpc_address, TOKEN, tls=client) as c:
                assert (await c.list_actions()).window > 0
    finally:
        await gw.stop()


async def test_the_gateway_rereads_the_files_on_its_period(pki, tmp_path, trained_world_dir):
    mount = SecretMount(tmp_path / "tls")
    mount.publish(_secret(pki, "server-a"))
    gw = await _start(trained_world_dir, mount, reload_s=0.1)
    try:
        mount.publish(_secret(pki, "server-b"))
        for _ in range(100):
            if _reloads(gw, "ok"):
                break
            await asyncio.sleep(0.05)
        assert await _served(gw.grpc.port, pki, "h2") == _der(pki, "server-b")
    finally:
        await gw.stop()


def test_reloader_rules(pki, tmp_path):
    with pytest.raises(ValueError, match="loaded from files"):
        CertificateReloader(ServerTLS((pki / "server-a.pem").read_bytes(), (pki / "server-a.key").read_bytes()))
    with pytest.raises(ValueError, match="tls_reload_s"):
        GatewayConfig(tls_reload_s=-1.0)
    mount = SecretMount(tmp_path / "tls")
    mount.publish(_secret(pki, "server-a"))
    results: list[str] = []
    reloader = CertificateReloader(ServerTLS.load(mount.path("tls.crt"), mount.path("tls.key")), results.append)
    os.remove(mount.path("tls.key"))  # a file missing for a moment: refused, not raised
    assert reloader.check() is False and results == ["error"]


def test_genie_serve_switches_certificate_on_sighup(pki, tmp_path, trained_world_dir):
    """The CLI as a pod runs it: GENIE_TLS_* from a Secret mount, periodic reload off, and SIGHUP to re-read."""
    mount = SecretMount(tmp_path / "tls")
    mount.publish(_secret(pki, "server-a"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GENIE_TLS_CERT": mount.path("tls.crt"),
           "GENIE_TLS_KEY": mount.path("tls.key"), "GENIE_TLS_RELOAD_S": "0"}
    env.pop("GENIE_TLS_CLIENT_CA", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--world", str(trained_world_dir),
                             "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", "--tokens", f"alice:{TOKEN}",
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import json

        info = json.loads(proc.stdout.readline())
        port = int(info["grpc"].rsplit(":", 1)[1])
        assert served_certificate(port, pki / "ca.pem", "h2") == _der(pki, "server-a")
        mount.publish(_secret(pki, "server-b"))
        proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if served_certificate(port, pki / "ca.pem", "h2") == _der(pki, "server-b"):
                break
            import time

            time.sleep(0.05)
        assert served_certificate(port, pki / "ca.pem", "h2") == _der(pki, "server-b")
        assert proc.poll() is None  # SIGHUP re-read the files; it did not stop the gateway
    finally:
        proc.terminate()
        proc.wait(timeout=30)
