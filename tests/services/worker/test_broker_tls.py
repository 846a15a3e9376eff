"""Celery over Redis AUTH + TLS: the settings that carry the password and certificates into Celery, kombu and the
job store, and a real worker on a `redis-server` with requirepass, TLS only and client certificates required."""

from __future__ import annotations

import shutil
import ssl

import pytest

from services.worker.settings import WorkerSettings, celery_config
from services.worker.specs import RolloutJobSpec
from tests.tls_certs import make_certs, tls_redis_server

PASSWORD = "broker/s3cret:@"  # characters a URL must escape


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("broker-certs"))


@pytest.fixture(scope="module")
def tls_broker(certs, tmp_path_factory):
    with tls_redis_server(certs, tmp_path_factory.mktemp("broker-tls"), PASSWORD) as server:
        yield server


def _env(certs, port, password=PASSWORD) -> dict[str, str]:
    return {"GENIE_BROKER_URL": f"rediss://127.0.0.1:{port}/0", "GENIE_BROKER_PASSWORD": password,
            "GENIE_BROKER_CA": str(certs.ca), "GENIE_BROKER_CERT": str(certs.client_cert),
            "GENIE_BROKER_KEY": str(certs.client_key)}


def test_celery_gets_the_password_and_tls_options(certs):
    conf = celery_config(WorkerSettings.from_env(_env(certs, 6390)))
    assert conf["broker_url"] == conf["result_backend"] == "rediss://:broker%2Fs3cret%3A%40@127.0.0.1:6390/0"
    for key in ("broker_use_ssl", "redis_backend_use_ssl"):
        assert conf[key] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(certs.ca),
                             "ssl_certfile": str(certs.client_cert), "ssl_keyfile": str(certs.client_key)}
    plain = celery_config(WorkerSettings.from_env({"GENIE_BROKER_URL": "redis://:given@h:6379/1",
                                                   "GENIE_BROKER_PASSWORD": "ignored"}))
    assert plain["broker_url"] == "redis://:given@h:6379/1" and "broker_use_ssl" not in plain


def test_tls_settings_are_checked(certs, tmp_path):
    with pytest.raises(ValueError, match="rediss://"):
        WorkerSettings.from_env({"GENIE_BROKER_URL": "redis://h:6379/1", "GENIE_BROKER_CA": str(certs.ca)})
    with pytest.raises(ValueError, match="GENIE_BROKER_CA: cannot read the broker file"):
        WorkerSettings.from_env({"GENIE_BROKER_URL": "rediss://h:6379/1", "GENIE_BROKER_CA": str(tmp_path / "x.pem")})
    with pytest.raises(ValueError, match="GENIE_BROKER_KEY"):
        WorkerSettings.from_env({"GENIE_BROKER_URL": "rediss://h:6379/1", "GENIE_BROKER_CERT": str(certs.client_cert)})


def test_a_real_worker_runs_a_rollout_over_tls_and_auth(tls_broker, certs, kit, trained_world_dir, tmp_path):
    port, admin = tls_broker
    env = kit.env(tmp_path / "jobs", **_env(certs, port))
    worker = kit.worker("tls-rollout", "rollout", env, tmp_path)
    worker.wait_ready()
    client = kit.client(env)
    try:
        prompt = tmp_path / "prompt.png"
        shutil.copy(trained_world_dir / "prompts" / "00.png", prompt)
        job = client.submit_rollout(RolloutJobSpec((str(prompt),), ((0, 1),), out=str(tmp_path / "out")), trained_world_dir)
        st = client.wait(job, timeout=120)
        assert st.state == "SUCCESS", st.to_json()
        assert (tmp_path / "out" / "manifest.json").is_file()
        assert admin.dbsize() > 0  # the job's records and results are in the TLS Redis
    finally:
        client.close()
        worker.stop()


def test_a_client_with_a_wrong_password_cannot_reach_the_jobs(tls_broker, certs):
    port, _ = tls_broker
    from services.worker.jobs import JobClient

    client = JobClient(WorkerSettings.from_env(_env(certs, port, password="wrong")))
    try:
        with pytest.raises(Exception, match="(?i)invalid username-password|WRONGPASS|authentication"):
            client.store.redis.ping()
    finally:
        client.close()


