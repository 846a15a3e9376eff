"""Service fixtures: the tiny trained world in process and behind a real tritonserver (started once per session)."""

from __future__ import annotations

import os

import pytest
import pytest_asyncio
import redis

from services.backends.inprocess import InProcessBackend
from services.backends.triton_backend import TritonBackend
from services.triton import TritonServer, assemble_repository, free_ports


@pytest.fixture(scope="session")
def require_redis():
    """check(url) -> url, after a ping; fails (never skips) without a real Redis: scripts/test.sh starts one."""

    def check(url: str) -> str:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        except redis.exceptions.ConnectionError as exc:
            pytest.fail(f"these tests need a real Redis at {url} (scripts/test.sh starts one): {exc}")
        return url

    return check


REDIS_URL = os.environ.get("GENIE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url(require_redis) -> str:
    """The real Redis the gateway and store tests use (DB 0; the job tests take DB 3 and up)."""
    return require_redis(REDIS_URL)


@pytest.fixture(scope="session")
def triton_server(trained_world_dir, tmp_path_factory):
    """A tritonserver serving `trained_world_dir` on free loopback ports; tests may stop() and start() it.

    One torch thread per model: three stub processes share the machine with pytest and the in-process backend.
    """
    root = tmp_path_factory.mktemp("triton")
    repository = assemble_repository(trained_world_dir, root, threads=1)
    server = TritonServer(repository, *free_ports(3), log_path=root / "triton.log")
    server.start()
    server.wait_ready(timeout=120)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def triton_certs(tmp_path_factory):
    """A CA with a server certificate for 127.0.0.1/localhost and a client certificate (tests/tls_certs.py)."""
    from tests.tls_certs import make_certs

    return make_certs(tmp_path_factory.mktemp("triton-certs"))


@pytest.fixture(scope="session")
def tls_triton(trained_world_dir, tmp_path_factory, triton_certs):
    """A tritonserver serving gRPC over TLS only to clients with a certificate from `triton_certs`' CA (mutual TLS),
    as the chart runs it with triton.tls.clientCA; shared by the gateway's and the rollout workers' TLS tests."""
    from services.triton import TritonTLS

    root = tmp_path_factory.mktemp("triton-tls")
    repository = assemble_repository(trained_world_dir, root, threads=1)
    tls = TritonTLS(cert=str(triton_certs.server_cert), key=str(triton_certs.server_key), client_ca=str(triton_certs.ca))
    server = TritonServer(repository, *free_ports(3), log_path=root / "triton.log", tls=tls)
    server.start()
    try:
        server.wait_ready(timeout=180)  # readiness is HTTP, on loopback with TLS
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def inprocess_backend(trained_world_dir):
    backend = InProcessBackend(trained_world_dir)
    await backend.start()
    yield backend
    await backend.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def triton_backend(triton_server):
    backend = TritonBackend(triton_server.grpc_url, timeout_s=30.0)
    await backend.start()
    yield backend
    await backend.close()
