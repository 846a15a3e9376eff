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


def renewed_leaf(directory: Path) -> None:
    """renewed.crt / renewed.key for 127.0.0.1 from the CA make_certs left in `directory`."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "renewed.key", "-out", "renewed.csr")
    run("x509", "-req", "-in", "renewed.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "ext.cnf", "-out", "renewed.crt")


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
        containers = {c["name"]: c for c in named(docs, "StatefulSet", "t-genie-redis")["spec"]["template"]["spec"]["containers"]}
        self.container, self.reloader = containers["redis"], containers.get("tls-reload")
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

    def start_reloader(self, log: Path) -> subprocess.Popen:
        """The tls-reload sidecar's script, against this server."""
        assert self.reloader is not None and self.reloader["command"] == ["sh", "-c"]
        env = {**os.environ, "REDIS_PASSWORD": self.password}
        with log.open("w") as out:
            return subprocess.Popen(["sh", "-c", self.localise(self.reloader["args"][0])], env=env, stdout=out,
                                    stderr=subprocess.STDOUT)

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
    args = ["--set", "redis.tls.enabled=true", "--set", "redis.tls.existingSecret=redis-tls",
            "--set", "redis.tls.reloadSeconds=1"] if tls else []
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
    # Full is refused, never evicted: maxmemory from the values (768mb = 768 MiB) with noeviction.
    config = server.client(password=server.password).config_get("maxmemory*")
    assert (config["maxmemory"], config["maxmemory-policy"]) == (str(768 << 20), "noeviction")

    if server.tls:  # and nothing in the clear
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=server.port, password=server.password, socket_timeout=3).ping()


def test_rendered_tls_reload_sidecar_serves_a_renewal_and_refuses_a_broken_one(running):
    """The kubelet swaps a renewed Secret's files; the sidecar has redis-server re-read them. A certificate with a
    key of another one is refused (Redis keeps serving the old pair) until the matching key arrives."""
    import ssl

    from tests.tls_certs import served_certificate

    server, _ = running
    if not server.tls:
        assert server.reloader is None  # no TLS, no sidecar
        return
    tls = server.root / "tls"
    renewed_leaf(tls)
    der = lambda name: ssl.PEM_cert_to_DER_cert((tls / name).read_text())  # noqa: E731
    served = lambda: served_certificate(server.port, tls / "ca.crt", "redis", "127.0.0.1")  # noqa: E731
    assert served() == der("tls.crt")
    original = (tls / "tls.crt").read_bytes()
    reloader = server.start_reloader(server.root / "reload.log")
    try:
        time.sleep(1.5)  # the sidecar has taken the files' first sum
        (tls / "tls.crt.new").write_bytes((tls / "renewed.crt").read_bytes())
        os.replace(tls / "tls.crt.new", tls / "tls.crt")  # the new certificate, the old key: broken
        deadline = time.monotonic() + 20
        while "new TLS files not used" not in (server.root / "reload.log").read_text():
            assert reloader.poll() is None and time.monotonic() < deadline, (server.root / "reload.log").read_text()
            time.sleep(0.2)
        assert served() == ssl.PEM_cert_to_DER_cert(original.decode())  # still the old pair
        (tls / "tls.key.new").write_bytes((tls / "renewed.key").read_bytes())
        os.replace(tls / "tls.key.new", tls / "tls.key")
        while served() != der("renewed.crt"):
            assert reloader.poll() is None and time.monotonic() < deadline + 20, (server.root / "reload.log").read_text()
            time.sleep(0.2)
        assert server.client(password=server.password).ping()  # and new clients get in over the renewal
    finally:
        reloader.terminate()
        reloader.wait(timeout=10)


def test_tls_reload_sidecar_restarts_only_a_sentinel_and_can_be_turned_off(helm):
    base = ["--set", "redis.tls.enabled=true", "--set", "redis.tls.existingSecret=redis-tls"]

    def sidecar(*extra: str) -> dict | None:
        pod = named(helm.render(*base, *extra), "StatefulSet", "t-genie-redis")["spec"]["template"]["spec"]
        return {c["name"]: c for c in pod["containers"]}.get("tls-reload")

    plain = sidecar()["args"][0]
    assert "CONFIG SET" in plain and "SHUTDOWN" not in plain and "sleep 30;" in plain
    with_sentinel = sidecar("--set", "redis.sentinel.enabled=true", "--set", "redis.tls.sentinelRestartJitterSeconds=120")
    script = with_sentinel["args"][0]
    assert "-p 26379 SHUTDOWN" in script and "% 120" in script  # after a random 0..119 s
    assert all(e.get("valueFrom") for e in with_sentinel["env"])  # the password only from the Secret
    assert sidecar("--set", "redis.tls.reloadSeconds=0") is None
