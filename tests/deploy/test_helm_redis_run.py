"""The bundled Redis's rendered start script and readiness probe, run for real: redis-server on a free loopback port
with the chart's generated password (and TLS, with a throwaway CA), which must refuse clients without the password
(or without TLS), keep the password out of its command line, and answer the probe."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import redis

from services.triton.launcher import free_ports

# redis-server and openssl come from scripts/system-deps.sh.


def named(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def make_certs(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 signed by it: tls.crt, tls.key, ca.crt as in a TLS Secret."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
        "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "tls.key", "-out", "tls.csr")
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "ext.cnf", "-out", "tls.crt")


class RenderedRedis:
    """The chart's Redis container, its paths moved under a temporary directory and its port to a free one."""

    def __init__(self, docs: list[dict], root: Path, tls: bool) -> None:
        (self.container,) = named(docs, "StatefulSet", "t-genie-redis")["spec"]["template"]["spec"]["containers"]
        secret = named(docs, "Secret", "t-genie-redis-password")["data"]["redis-password"]
        self.password = base64.b64decode(secret).decode()
        self.root, self.tls = root, tls
        (self.port,) = free_ports(1)
        for sub in ("tmp", "data", "tls"):
            (root / sub).mkdir()

    def localise(self, text: str) -> str:
        # One pass: the temporary directory is itself under /tmp.
        moves = {"/etc/genie/tls/": f"{self.root}/tls/", "/tmp/": f"{self.root}/tmp/",
                 "--dir /data": f"--dir {self.root}/data", "-h 127.0.0.1": f"-h 127.0.0.1 -p {self.port}"}
        text = re.sub("|".join(map(re.escape, moves)), lambda m: moves[m.group(0)], text)
        # Only loopback here; without TLS the chart relies on Redis's default port, which must not be used here.
        local = "--protected-mode no --bind 127.0.0.1" + ("" if self.tls else f" --port {self.port}")
        return text.replace("--protected-mode no", local).replace("--tls-port 6379", f"--tls-port {self.port}")

    def start(self) -> subprocess.Popen:
        assert self.container["command"] == ["sh", "-c"]
        script = self.localise(self.container["args"][0])
        env = {**os.environ, "REDIS_PASSWORD": self.password}
        return subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def probe(self, password: str) -> int:
        sh, flag, command = self.container["readinessProbe"]["exec"]["command"]
        env = {**os.environ, "REDIS_PASSWORD": password}
        return subprocess.run([sh, flag, self.localise(command)], env=env, timeout=30).returncode

    def client(self, **kwargs) -> redis.Redis:
        if self.tls:
            kwargs |= {"ssl": True, "ssl_ca_certs": str(self.root / "tls" / "ca.crt")}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)


@pytest.fixture(params=["plain", "tls"])
def running(request, helm, tmp_path):
    tls = request.param == "tls"
    args = ["--set", "redis.tls.enabled=true", "--set", "redis.tls.existingSecret=redis-tls"] if tls else []
    server = RenderedRedis(helm.render(*args), tmp_path, tls)
    if tls:
        make_certs(server.root / "tls")
    proc = server.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                server.client(password=server.password).ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        yield server, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_rendered_redis_requires_the_generated_password(running):
    server, proc = running
    assert server.client(password=server.password).set("k", "v") is True
    with pytest.raises(redis.AuthenticationError):
        server.client().ping()  # no password
    with pytest.raises(redis.AuthenticationError):
        server.client(password="wrong-password").ping()
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert "redis-server" in cmdline and server.password not in cmdline  # `exec` replaced sh: this is Redis itself
    assert oct((server.root / "tmp" / "auth.conf").stat().st_mode & 0o777) == "0o600"
    assert server.probe(server.password) == 0 and server.probe("wrong-password") != 0

    if server.tls:  # and nothing in the clear
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=server.port, password=server.password, socket_timeout=3).ping()
