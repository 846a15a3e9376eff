"""Celery's broker, result backend and the job records through Redis Sentinel, locked down: a real RedisHA set (TLS only
with client certificates, data requirepass + masterauth, a Sentinel requirepass of its own) and a real worker that
keeps running jobs after the master is killed and a replica promoted."""

from __future__ import annotations

import shutil
import ssl

import pytest

from services.worker.jobs import JobClient
from services.worker.settings import WorkerSettings, celery_config
from services.worker.specs import RolloutJobSpec
from services.worker.store import JobStore
from tests.tls_certs import locked_down_ha, make_certs

DATA_PASSWORD = "broker/data:s3cret"  # characters a URL must escape
SENTINEL_PASSWORD = "broker-sentinel-s3cret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("sentinel-broker-certs"))


@pytest.fixture(scope="module")
def secure_ha(certs, tmp_path_factory):
    with locked_down_ha(tmp_path_factory.mktemp("broker-ha"), certs, DATA_PASSWORD, SENTINEL_PASSWORD) as ha:
        yield ha


def _env(certs, sentinels: str, password: str = DATA_PASSWORD,
         sentinel_password: str = SENTINEL_PASSWORD) -> dict[str, str]:
    return {"GENIE_BROKER_URL": "rediss://genie-redis:6379/1", "GENIE_RESULT_BACKEND": "rediss://genie-redis:6379/2",
            "GENIE_BROKER_SENTINELS": sentinels, "GENIE_BROKER_SENTINEL_MASTER": "genie",
            "GENIE_BROKER_PASSWORD": password, "GENIE_BROKER_SENTINEL_PASSWORD": sentinel_password,
            "GENIE_BROKER_CA": str(certs.ca), "GENIE_BROKER_CERT": str(certs.client_cert),
            "GENIE_BROKER_KEY": str(certs.client_key)}


def test_celery_gets_sentinel_urls_and_tls_to_the_sentinels(certs):
    s = WorkerSettings.from_env(_env(certs, "10.0.0.1:26379,10.0.0.2:26380"))
    conf = celery_config(s)
    assert conf["broker_url"] == ("sentinel://:broker%2Fdata%3As3cret@10.0.0.1:26379/1;"
                                  "sentinel://:broker%2Fdata%3As3cret@10.0.0.2:26380/1")
    assert conf["result_backend"].endswith("@10.0.0.2:26380/2")
    tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(certs.ca), "ssl_certfile": str(certs.client_cert),
           "ssl_keyfile": str(certs.client_key)}
    assert conf["broker_use_ssl"] == conf["redis_backend_use_ssl"] == tls  # to the master the Sentinels name
    for options in (conf["broker_transport_options"], conf["result_backend_transport_options"]):
        assert options["master_name"] == "genie"
        sk = options["sentinel_kwargs"]  # to the Sentinels: their own password, the same certificates
        assert (sk["password"], sk["ssl"], sk["ssl_ca_certs"], sk["ssl_certfile"]) == \
               (SENTINEL_PASSWORD, True, str(certs.ca), str(certs.client_cert))
    assert DATA_PASSWORD not in repr(s) and SENTINEL_PASSWORD not in repr(s)

    plain = celery_config(WorkerSettings.from_env({"GENIE_BROKER_URL": "redis://h:6379/3", "GENIE_BROKER_SENTINELS": "a:1",
                                                   "GENIE_BROKER_SENTINEL_MASTER": "m"}))
    assert plain["broker_url"] == plain["result_backend"] == "sentinel://a:1/3"
    assert plain["broker_transport_options"]["sentinel_kwargs"] == {"socket_timeout": 10, "socket_connect_timeout": 5}
    assert "broker_use_ssl" not in plain and "ssl" not in plain["result_backend_transport_options"]["sentinel_kwargs"]


@pytest.mark.parametrize("env, message", [
    ({"GENIE_BROKER_SENTINELS": "a:1"}, "GENIE_BROKER_SENTINEL_MASTER"),
    ({"GENIE_BROKER_SENTINEL_MASTER": "m"}, "GENIE_BROKER_SENTINELS"),
    ({"GENIE_BROKER_SENTINELS": "a", "GENIE_BROKER_SENTINEL_MASTER": "m"}, "host:port"),
    ({"GENIE_BROKER_SENTINEL_PASSWORD": "x"}, "GENIE_BROKER_SENTINEL_PASSWORD needs"),
    ({"GENIE_BROKER_SENTINELS": "a:1", "GENIE_BROKER_SENTINEL_MASTER": "m", "GENIE_RESULT_BACKEND": "rpc://"},
     "redis\\[s\\]://"),
])
def test_sentinel_settings_are_checked(env, message):
    with pytest.raises(ValueError, match=message):
        WorkerSettings.from_env({"GENIE_BROKER_URL": "redis://h:6379/1", **env})


def test_the_jobs_cli_takes_the_sentinels_and_fails_in_one_line_when_they_refuse(secure_ha, certs):
    from click.testing import CliRunner

    from services.worker.cli import jobs

    env = {**_env(certs, ",".join(f"127.0.0.1:{p}" for p in secure_ha.sentinel_ports), sentinel_password="wrong"),
           "GENIE_BROKER_SENTINELS": "", "GENIE_BROKER_SENTINEL_MASTER": ""}
    result = CliRunner().invoke(jobs, ["--broker-sentinels", ",".join(f"127.0.0.1:{p}" for p in secure_ha.sentinel_ports),
                                       "--broker-sentinel-master", "genie", "status", "no-such-job"], env=env)
    assert result.exit_code == 2, result.output
    assert "wrong" not in result.output and len(result.output.splitlines()) == 1, result.output
    assert "via Sentinel" in result.output and "Sentinel errors: auth:AuthenticationError" in result.output


def test_a_real_worker_runs_jobs_through_tls_sentinels_and_after_a_failover(secure_ha, certs, kit, trained_world_dir,
                                                                            tmp_path):
    sentinels = ",".join(f"127.0.0.1:{p}" for p in secure_ha.sentinel_ports)
    env = kit.env(tmp_path / "jobs", **_env(certs, sentinels))
    worker = kit.worker("sentinel-rollout", "rollout", env, tmp_path)
    worker.wait_ready()
    client = JobClient(WorkerSettings.from_env(env))
    prompt = tmp_path / "prompt.png"
    shutil.copy(trained_world_dir / "prompts" / "00.png", prompt)
    try:
        def run(name: str) -> None:
            spec = RolloutJobSpec((str(prompt),), ((0, 1),), out=str(tmp_path / name))
            st = client.wait(client.submit_rollout(spec, trained_world_dir), timeout=120)
            assert st.state == "SUCCESS", st.to_json()
            assert (tmp_path / name / "manifest.json").is_file()

        run("before")
        keyspace = secure_ha.client(secure_ha.master_port()).info("keyspace")
        assert {"db1", "db2"} <= set(keyspace), keyspace  # the queue, records and results: on the Sentinels' master
        old = secure_ha.kill_master()
        new = secure_ha.wait_failover(old)
        run("after")  # the worker, the client and the job records all followed the Sentinels to the new master
        assert new != old
        assert isinstance(client.store, JobStore) and "via Sentinel" in client.store.url
        log = worker.log_text()
        assert DATA_PASSWORD not in log and SENTINEL_PASSWORD not in log
        secure_ha.restart(old)
    finally:
        client.close()
        worker.stop()
