"""The session store over Redis AUTH + TLS: a real `redis-server` with `requirepass` listening only on a TLS
port (plaintext port 0) and `tls-auth-clients yes`, certificates made by the openssl CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.gateway.stores.redis_store import RedisStore, RedisTarget, RedisTLS, StoreMisconfigured
from services.gateway.stores.store import StoreUnavailable
from services.triton import free_ports
from tests.services.gateway.stores.test_store_contract import _record
from tests.tls_certs import make_certs, tls_redis_server

PASSWORD = "s3cret-for-tests"
REPO = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("redis-certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("other-certs"), name="stranger")


@pytest.fixture(scope="module")
def tls_redis(certs, tmp_path_factory):
    """(port, admin client) of a redis-server with requirepass, TLS only, client certificates required."""
    with tls_redis_server(certs, tmp_path_factory.mktemp("redis-tls"), PASSWORD) as server:
        yield server


def _tls(certs, ca=None) -> RedisTLS:
    return RedisTLS(ca=str(ca or certs.ca), cert=str(certs.client_cert), key=str(certs.client_key))


def _store(port, certs, password=PASSWORD, in_url=True, ca=None) -> RedisStore:
    url = f"rediss://:{password}@127.0.0.1:{port}/0" if in_url else f"rediss://127.0.0.1:{port}/0"
    target = RedisTarget.parse(url).with_credentials("" if in_url else password, _tls(certs, ca))
    return RedisStore(target, prefix=f"tls-test-{time.monotonic_ns()}:", timeout_s=2)


async def test_sessions_over_tls_with_the_password_in_the_url(tls_redis, certs):
    port, _ = tls_redis
    store = _store(port, certs)
    record = _record()
    try:
        await store.verify()
        await store.create(record, max_per_owner=4)
        got = await store.get(record.session_id)
        assert got is not None and got.owner == "alice"
        assert torch.equal(got.state.tokens, record.state.tokens)
        assert await store.count("alice") == 1
        assert await store.delete(record.session_id) and await store.get(record.session_id) is None
    finally:
        await store.close()


async def test_the_password_can_come_from_outside_the_url(tls_redis, certs):
    port, _ = tls_redis
    store = _store(port, certs, in_url=False)
    try:
        await store.verify()
        assert await store.ping()
    finally:
        await store.close()


async def test_a_wrong_password_is_a_clear_startup_error_and_unavailable_afterwards(tls_redis, certs):
    port, _ = tls_redis
    store = _store(port, certs, password="wrong")
    try:
        with pytest.raises(StoreMisconfigured, match="authentication failed") as err:
            await store.verify()
        assert "wrong" not in str(err.value) and ":***@" in str(err.value)  # the password is never shown
        assert not await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.get("anything")
    finally:
        await store.close()


async def test_a_server_signed_by_another_ca_is_refused(tls_redis, certs, other_ca):
    port, _ = tls_redis
    store = _store(port, certs, ca=other_ca.ca)
    try:
        with pytest.raises(StoreMisconfigured, match="TLS handshake failed"):
            await store.verify()
        assert not await store.ping()
    finally:
        await store.close()


async def test_a_password_changed_later_makes_the_store_unavailable(tls_redis, certs):
    port, admin = tls_redis
    store = _store(port, certs)
    try:
        await store.verify()
        assert await store.ping()
        admin.config_set("requirepass", "rotated")  # the operator rotates the password ...
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")  # ... and drops old connections
        assert not await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.get("anything")
    finally:
        admin.config_set("requirepass", PASSWORD)
        await store.close()


def test_tls_options_need_a_rediss_url_and_readable_files(certs, tmp_path):
    with pytest.raises(ValueError, match="rediss://"):
        RedisTarget.parse("redis://127.0.0.1:6379/0").with_credentials("", RedisTLS(ca=str(certs.ca)))
    with pytest.raises(ValueError, match="--redis-ca: cannot read the Redis file"):
        RedisTLS(ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="both --redis-cert and --redis-key"):
        RedisTLS(cert=str(certs.client_cert))
    with pytest.raises(ValueError, match="rediss\\+sentinel://"):  # TLS to Sentinels is said by the scheme
        RedisTarget.parse("redis+sentinel://127.0.0.1:26379/genie").with_credentials("", RedisTLS())


def _serve(port, certs, env_password, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENIE_REDIS_PASSWORD": env_password, "GENIE_REDIS_CA": str(certs.ca),
           "GENIE_REDIS_CERT": str(certs.client_cert), "GENIE_REDIS_KEY": str(certs.client_key)}
    (triton_port,) = free_ports(1)  # nothing listens there: the gateway serves NOT_SERVING until Triton is up
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--world", str(tmp_path), "--backend", "triton",
         "--triton-url", f"127.0.0.1:{triton_port}", "--store", "redis", "--redis-url", f"rediss://127.0.0.1:{port}/0",
         "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_with_a_wrong_password_exits_2_with_one_error_line(tls_redis, certs, tmp_path):
    port, _ = tls_redis
    proc = _serve(port, certs, "wrong", tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "authentication failed" in errors[0], err


def test_serve_with_the_password_from_env_starts(tls_redis, certs, tmp_path):
    port, _ = tls_redis
    proc = _serve(port, certs, PASSWORD, tmp_path)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.poll() is not None else "no ready line"
        assert json.loads(line)["grpc"].startswith("127.0.0.1:")
    finally:
        proc.terminate()
        proc.wait(30)


async def test_without_a_client_certificate_the_server_refuses(tls_redis, certs):
    port, _ = tls_redis
    target = RedisTarget.parse(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0").with_credentials("", RedisTLS(ca=str(certs.ca)))
    store = RedisStore(target, timeout_s=2)
    try:
        # With TLS 1.3 the client's side of the handshake may finish before the server rejects the missing
        # certificate: then the client sees a closed connection (unavailable) rather than a TLS alert.
        with pytest.raises((StoreMisconfigured, StoreUnavailable)):
            await store.verify()
        assert not await store.ping()
    finally:
        await store.close()


async def test_plaintext_to_the_tls_port_is_unavailable(tls_redis):
    port, _ = tls_redis
    store = RedisStore(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", timeout_s=1)
    try:
        with pytest.raises(StoreUnavailable):
            await store.verify()
        assert not await store.ping()
    finally:
        await store.close()


async def test_a_gateway_steps_over_tls_redis_and_turns_unavailable_when_the_password_changes(tls_redis, certs,
                                                                                           trained_world_dir):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.backends.inprocess import InProcessBackend
    from services.gateway.api.client import GatewayClient
    from services.gateway.app import Gateway, GatewayConfig
    from tests.services.gateway.stores.test_gateway_redis import ALICE, _png

    port, admin = tls_redis
    cfg = GatewayConfig(world=str(trained_world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=f"alice:{ALICE}",
                        store="redis", redis_url=f"rediss://127.0.0.1:{port}/0", redis_password=PASSWORD,
                        redis_ca=str(certs.ca), redis_cert=str(certs.client_cert), redis_key=str(certs.client_key))
    gw = Gateway(cfg, backend=InProcessBackend(trained_world_dir))  # the store from the config: TLS + AUTH
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as client, grpc.aio.insecure_channel(gw.grpc_address) as ch:
            sid = (await client.open(image=_png(trained_world_dir), seed=1)).session.session_id
            assert (await client.step(sid, 1)).step == 1
            admin.config_set("requirepass", "rotated")
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.step(sid, 2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "session store" in err.value.details()
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 30
            while (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health never turned NOT_SERVING"
                await asyncio.sleep(0.2)
            admin.config_set("requirepass", PASSWORD)
            assert (await client.step(sid, 2)).step == 2  # nothing was lost: the session continues where it was
    finally:
        admin.config_set("requirepass", PASSWORD)
        await gw.stop()
