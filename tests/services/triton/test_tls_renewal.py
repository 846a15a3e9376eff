"""Triton reads its TLS files only at start, so `genie triton serve` restarts it when they are renewed: a real
tritonserver behind the launcher, its files swapped the way the kubelet updates a mounted Secret. A broken new
set is not served (and does not restart anything); a good one is, on the same ports, with the launcher alive."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from services.triton import free_ports
from tests.tls_certs import SecretMount, another_server_certificate, make_certs, served_certificate

ROOT = Path(__file__).resolve().parents[3]


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"genie triton serve exited ({proc.returncode}) while waiting for {what}")
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _der(path: Path) -> bytes:
    import ssl

    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_renewed_certificate_restarts_triton_and_a_broken_one_does_not(trained_world_dir, tmp_path):
    certs = make_certs(tmp_path / "pki")
    renewed_cert, renewed_key = another_server_certificate(certs, "server-renewed")
    mount = SecretMount(tmp_path / "tls")
    secret = {"tls.crt": certs.server_cert.read_bytes(), "tls.key": certs.server_key.read_bytes()}
    mount.publish(secret)
    grpc_port, http_port, metrics_port = free_ports(3)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "triton", "serve", "--world", str(trained_world_dir), "--models", "lam",
         "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
         "--tls-cert", mount.path("tls.crt"), "--tls-key", mount.path("tls.key"),
         "--tls-check-s", "0.2", "--tls-restart-jitter-s", "0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    served = lambda: served_certificate(grpc_port, certs.ca, "h2")  # noqa: E731
    try:
        _wait_for(lambda: served() == _der(certs.server_cert), 300, "Triton over TLS", proc)
        mount.publish({**secret, "tls.key": renewed_key.read_bytes()})  # the old certificate with a new key: broken
        _wait_for(lambda: "new TLS files not used yet" in (tmp_path / "serve.log").read_text(), 30,
                  "the broken set to be refused", proc)
        assert served() == _der(certs.server_cert)  # the server was not restarted onto it
        mount.publish({"tls.crt": renewed_cert.read_bytes(), "tls.key": renewed_key.read_bytes()})
        _wait_for(lambda: served() == _der(renewed_cert), 300, "Triton to serve the renewed certificate", proc)
        # gRPC answers before the launcher's readiness wait returns and says so: wait for the line, do not race it.
        _wait_for(lambda: "restarted with the renewed TLS files" in (tmp_path / "serve.log").read_text(), 60,
                  "the launcher to report the restart", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
