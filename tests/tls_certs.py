"""Throwaway certificates for TLS tests, made with the `openssl` CLI: a CA, a server certificate for
127.0.0.1/localhost signed by it, and a client certificate signed by it (for mutual TLS); a redis-server
with AUTH + TLS on them, a Redis Sentinel set locked down the same way, and a bare TLS listener that requires client
certificates."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(root: Path, name: str, ca: Path, ca_key: Path, ext: str) -> tuple[Path, Path]:
    key, csr, cert, extfile = (root / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=root)
    extfile.write_text(ext)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
             "-out", str(cert), "-extfile", str(extfile), cwd=root)
    return cert, key


def make_certs(root: Path, name: str = "genie-test") -> Certs:
    """A fresh CA and its server + client certificates under `root` (created)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl CLI is needed for the TLS tests (apt-get install openssl)")
    root.mkdir(parents=True, exist_ok=True)
    ca, ca_key = root / "ca.crt", root / "ca.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", f"/CN={name} CA", cwd=root)
    server_cert, server_key = _signed(root, "server", ca, ca_key,
                                      "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client_cert, client_key = _signed(root, "client", ca, ca_key, "extendedKeyUsage=clientAuth\n")
    return Certs(ca, server_cert, server_key, client_cert, client_key)


def another_server_certificate(certs: Certs, name: str) -> tuple[Path, Path]:
    """A second server certificate (and key) for 127.0.0.1/localhost from the CA of `certs`: a renewal."""
    root = certs.ca.parent
    return _signed(root, name, certs.ca, root / "ca.key",
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")


@contextlib.contextmanager
def tls_redis_server(certs: Certs, workdir: Path, password: str, client_certs: bool = True):
    """A `redis-server` on a free 127.0.0.1 port, TLS only (plaintext port 0), `requirepass password`, and
    client certificates required when `client_certs`; yields (port, an admin redis.Redis) and stops it after."""
    import redis

    from services.triton import free_ports

    (port,) = free_ports(1)
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--requirepass", password, "--tls-cert-file", str(certs.server_cert),
         "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca),
         "--tls-auth-clients", "yes" if client_certs else "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    admin = redis.Redis(host="127.0.0.1", port=port, password=password, ssl=True, ssl_ca_certs=str(certs.ca),
                        ssl_certfile=str(certs.client_cert), ssl_keyfile=str(certs.client_key), socket_timeout=2)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                admin.ping()
                break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    err = proc.stderr.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server with TLS did not start: {err}") from None
                time.sleep(0.1)
        yield port, admin
    finally:
        admin.close()
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def tls_listener(certs: Certs):
    """A TLS server on a free 127.0.0.1 port that requires a client certificate signed by `certs.ca` (as a server
    with mutual TLS does); after each handshake it reads the client's first bytes, answers with an empty HTTP/2
    SETTINGS frame, as a gRPC server does, and closes. Yields the port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    context.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            conn.settimeout(5)
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(64)  # the client's first bytes: closing with them unread would reset the connection
                tls.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


class SecretMount:
    """A directory laid out as the kubelet mounts a Secret: tls.crt -> ..data/tls.crt, ..data -> ..<version>/."""

    def __init__(self, root: Path) -> None:
        self.root, self.version = root, 0
        root.mkdir()

    def publish(self, files: dict[str, bytes]) -> None:
        self.version += 1
        version = self.root / f"..v{self.version}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(Path("..data") / name)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")  # the atomic switch

    def path(self, name: str) -> str:
        return str(self.root / name)


def served_certificate(port: int, ca: Path, alpn: str, server_name: str = "localhost") -> bytes:
    """DER of the certificate a new TLS connection to 127.0.0.1:port is given (verified against `ca` and
    `server_name`); `alpn`: h2 for a gRPC port, http/1.1 for HTTPS."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        return tls.getpeercert(binary_form=True)


@contextlib.contextmanager
def locked_down_ha(root: Path, certs: Certs, password: str, sentinel_password: str):
    """A real RedisHA set (1 replica, 3 Sentinels) locked down like production: every node and Sentinel on TLS only
    with client certificates (`certs`), the data nodes with requirepass + masterauth `password`, the Sentinels with a
    requirepass of their own; yields the started set and stops it."""
    from harness.redis_ha import RedisHA, ServerTLS

    tls = ServerTLS(str(certs.ca), str(certs.server_cert), str(certs.server_key), str(certs.client_cert),
                    str(certs.client_key))
    with RedisHA(root, replicas=1, sentinels=3, password=password, sentinel_password=sentinel_password,
                 tls=tls) as ha:
        yield ha
