"""The session store on a Redis set with failover locked down like production: every node and Sentinel on TLS only
(client certificates required, TLS replication), the data nodes with requirepass + masterauth, the Sentinels with a
requirepass of their own. Real redis-server processes (RedisHA) and certificates made by the openssl CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.redis_ha import RedisHA
from services.gateway.api.client import GatewayClient, step_exactly_once
from services.gateway.app import GatewayConfig, redis_target
from services.gateway.stores.redis_store import RedisStore, RedisTarget, RedisTLS, StoreMisconfigured
from services.gateway.stores.store import StoreUnavailable
from services.triton import free_ports
from tests.services.gateway.stores.test_redis_failover import ALICE, _gateway, _png
from tests.services.gateway.stores.test_store_contract import _record
from tests.tls_certs import locked_down_ha, make_certs

DATA_PASSWORD = "data-s3cret"
SENTINEL_PASSWORD = "sentinel-s3cret"
REPO = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("ha-certs"))


@pytest.fixture(scope="module")
def secure_ha(certs, tmp_path_factory):
    with locked_down_ha(tmp_path_factory.mktemp("redis-ha-tls"), certs, DATA_PASSWORD, SENTINEL_PASSWORD) as ha:
        yield ha


def _target(ha: RedisHA, certs, sentinel_password=SENTINEL_PASSWORD, password=DATA_PASSWORD, ca=None) -> RedisTarget:
    tls = RedisTLS(ca=str(ca or certs.ca), cert=str(certs.client_cert), key=str(certs.client_key))
    return RedisTarget.parse(ha.sentinel_url()).with_credentials(password, tls, sentinel_password)


def test_tls_sentinel_targets_parse_and_never_show_a_password():
    t = RedisTarget.parse("rediss+sentinel://:PW1x@10.0.0.1:26379,10.0.0.2:26379/genie/2?sentinel_password=SP2y")
    assert (t.sentinels, t.master, t.db, t.password, t.sentinel_password) == \
           ((("10.0.0.1", 26379), ("10.0.0.2", 26379)), "genie", 2, "PW1x", "SP2y")
    t = t.with_credentials("env-pw", None, "env-sp")  # the URL's passwords win; the scheme alone means TLS
    assert (t.password, t.sentinel_password, t.tls) == ("PW1x", "SP2y", RedisTLS())
    assert t.sentinel_kwargs()["ssl"] and t.connection_kwargs()["ssl"] and t.sentinel_kwargs()["password"] == "SP2y"
    for shown in (t.describe(), t.describe_url(), repr(t)):
        assert "PW1x" not in shown and "SP2y" not in shown, shown
    assert "over TLS" in t.describe() and t.describe_url().endswith(":***@10.0.0.1:26379,10.0.0.2:26379/genie/2"
                                                                    "?sentinel_password=***")

    # The flags form: the data URL's scheme says TLS, for the Sentinels as well; their password from env only.
    t = RedisTarget.parse("rediss://:pw@ignored:6379/4", "a:26379,b:26379", "genie").with_credentials("", None, "sp")
    assert (t.db, t.tls, t.sentinel_password, t.sentinel_kwargs()["ssl"]) == (4, RedisTLS(), "sp", True)
    plain = RedisTarget.parse("redis+sentinel://a:1/genie")
    assert plain.sentinel_kwargs() == {} and "ssl" not in plain.connection_kwargs()

    with pytest.raises(ValueError, match="rediss\\+sentinel://"):  # certificates with a plaintext scheme
        RedisTarget.parse("redis+sentinel://a:1/genie").with_credentials("", RedisTLS())
    with pytest.raises(ValueError, match="GENIE_REDIS_SENTINEL_PASSWORD"):  # no Sentinels to give it to
        RedisTarget.parse("redis://h:1/0").with_credentials("", None, "sp")
    with pytest.raises(ValueError, match="expected rediss\\+sentinel://") as err:
        RedisTarget.parse("rediss+sentinel://:PW1x@a:1/genie?sentinel_pass=oops")
    assert "PW1x" not in str(err.value)


def test_gateway_config_takes_the_sentinel_password_and_keeps_it_out_of_its_repr(certs):
    cfg = GatewayConfig(store="redis", redis_url="rediss://h:6379/0", redis_sentinels="a:26379", redis_master="genie",
                        redis_password="data-pw", redis_sentinel_password="sentinel-pw", redis_ca=str(certs.ca))
    target = redis_target(cfg)
    assert (target.password, target.sentinel_password, target.tls.ca) == ("data-pw", "sentinel-pw", str(certs.ca))
    assert "data-pw" not in repr(cfg) and "sentinel-pw" not in repr(cfg)


async def test_sessions_through_tls_sentinels_with_two_passwords(secure_ha, certs):
    store = RedisStore(_target(secure_ha, certs), prefix=f"sent-tls-{uuid.uuid4().hex[:6]}:", timeout_s=2)
    record = _record()
    try:
        await store.verify()
        await store.create(record, max_per_owner=4)
        assert (await store.get(record.session_id)).owner == "alice"
        assert await store.delete(record.session_id)
    finally:
        await store.close()


@pytest.mark.parametrize("sentinel_password", ["wrong", ""])
async def test_a_wrong_or_missing_sentinel_password_is_a_clear_startup_error(secure_ha, certs, sentinel_password):
    store = RedisStore(_target(secure_ha, certs, sentinel_password=sentinel_password), timeout_s=2)
    try:
        with pytest.raises(StoreMisconfigured, match="authentication to the Sentinels failed") as err:
            await store.verify()
        assert "GENIE_REDIS_SENTINEL_PASSWORD" in str(err.value) and "wrong" not in str(err.value)
        if not sentinel_password:
            return
        assert not await store.ping()  # health: NOT_SERVING, no crash
        with pytest.raises(StoreUnavailable, match="Sentinel errors: .*AuthenticationError") as err:
            await store.get("anything")
        assert len(str(err.value)) < 500 and SENTINEL_PASSWORD not in str(err.value)
    finally:
        await store.close()


async def test_sentinels_signed_by_another_ca_are_refused(secure_ha, certs, tmp_path):
    stranger = make_certs(tmp_path / "stranger", name="stranger")
    store = RedisStore(_target(secure_ha, certs, ca=stranger.ca), timeout_s=2)
    try:
        with pytest.raises(StoreMisconfigured, match="TLS handshake to the Sentinels failed.*--redis-ca"):
            await store.verify()
        assert not await store.ping()
    finally:
        await store.close()


async def test_a_wrong_data_password_behind_good_sentinels_names_the_data_password(secure_ha, certs):
    store = RedisStore(_target(secure_ha, certs, password="wrong"), timeout_s=2)
    try:
        with pytest.raises(StoreMisconfigured, match="authentication failed.*GENIE_REDIS_PASSWORD") as err:
            await store.verify()
        assert "wrong" not in str(err.value)
    finally:
        await store.close()


def test_serve_with_a_wrong_sentinel_password_exits_2_with_one_error_line(secure_ha, certs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENIE_REDIS_PASSWORD": DATA_PASSWORD,
           "GENIE_REDIS_SENTINEL_PASSWORD": "wrong", "GENIE_REDIS_CA": str(certs.ca),
           "GENIE_REDIS_CERT": str(certs.client_cert), "GENIE_REDIS_KEY": str(certs.client_key)}
    (triton_port,) = free_ports(1)
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "--world", str(tmp_path), "--backend", "triton",
         "--triton-url", f"127.0.0.1:{triton_port}", "--store", "redis", "--redis-url", secure_ha.sentinel_url(),
         "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "authentication to the Sentinels failed" in errors[0], proc.stderr
    assert "wrong" not in proc.stderr and DATA_PASSWORD not in proc.stderr


async def test_kill_the_master_and_sessions_step_on_over_tls_with_passwords(trained_world_dir, secure_ha, certs):
    gw = _gateway(trained_world_dir, _target(secure_ha, certs), f"sent-tls-{uuid.uuid4().hex[:6]}:")
    await gw.start()
    loop = asyncio.get_running_loop()
    try:
        async with GatewayClient(gw.grpc_address, ALICE, 10) as client, grpc.aio.insecure_channel(gw.grpc_address) as ch:
            sids = [(await client.open(image=_png(trained_world_dir), seed=i)).session.session_id for i in range(2)]
            steps = {sid: 0 for sid in sids}

            async def step_all(n: int) -> None:
                for _ in range(n):
                    for sid in sids:
                        _, steps[sid] = await step_exactly_once([client], sid, steps[sid] % 4, steps[sid], attempts=200,
                                                                backoff_s=0.1)

            await step_all(2)
            old = await loop.run_in_executor(None, secure_ha.kill_master)
            new = await loop.run_in_executor(None, secure_ha.wait_failover, old)
            await step_all(2)  # on the promoted replica, reached over TLS with the same passwords
            assert new != old
            for sid in sids:
                info = await client.get(sid)
                assert (info.step, info.version) == (4, 4), "every acknowledged step survived the failover"
            health = health_pb2_grpc.HealthStub(ch)
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status == \
                health_pb2.HealthCheckResponse.SERVING
        await loop.run_in_executor(None, secure_ha.restart, old)
    finally:
        await gw.stop()
