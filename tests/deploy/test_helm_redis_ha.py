"""The chart's Redis with failover (deploy/helm/values-redis-ha.yaml): master + replicas with a Sentinel in each
pod, the gateway finding the master through them and waiting for a replica, the workers' broker following it too;
or an external Sentinel set. With redis.tls, every hop (clients, replication, Sentinels) is TLS; the Sentinels
require the Redis password, which reaches them only through env and a config file in /tmp."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest
import redis as redis_py

from services.triton import free_ports
from tests.deploy.test_helm_security import leaks, secret_values
from tests.tls_certs import make_certs

ROOT = Path(__file__).resolve().parents[2]
HA = ["-f", str(ROOT / "deploy" / "helm" / "values-redis-ha.yaml")]
TLS = ["--set", "redis.tls.enabled=true", "--set", "redis.tls.existingSecret=redis-tls"]
SECRET_REF = {"secretKeyRef": {"name": "t-genie-redis-password", "key": "redis-password"}}


def _named(docs, kind, name):
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _gateway_args(docs) -> dict[str, str]:
    c = _named(docs, "Deployment", "t-genie-gateway")["spec"]["template"]["spec"]["containers"][0]
    return dict(a.split("=", 1) for a in c["args"] if "=" in a)


def _env(docs, kind, name) -> dict[str, dict]:
    c = _named(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in c["env"]}


@pytest.fixture(scope="module")
def ha(helm) -> list[dict]:
    return helm.render(*HA)


@pytest.fixture(scope="module")
def ha_tls(helm) -> list[dict]:
    return helm.render(*HA, *TLS)


def test_lint_strict_and_every_object_validates(helm, ha):
    out = helm.run("lint", "--strict", str(helm.chart), *HA)
    assert out.returncode == 0, out.stdout + out.stderr
    for doc in ha:
        if doc["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(doc, "1.30", strict=True)


def test_three_redis_pods_each_with_a_sentinel(ha):
    sts = _named(ha, "StatefulSet", "t-genie-redis")
    assert sts["spec"]["replicas"] == 3
    redis, sentinel = sts["spec"]["template"]["spec"]["containers"][:2]
    assert (redis["name"], sentinel["name"]) == ("redis", "sentinel")
    assert sentinel["ports"][0]["containerPort"] == 26379 and sentinel["readinessProbe"] and sentinel["livenessProbe"]
    script = sentinel["args"][0]
    assert "sentinel monitor genie $master 6379 2" in script and "down-after-milliseconds genie 5000" in script
    assert "--replicaof" in redis["args"][0] and "--appendonly yes" in redis["args"][0]
    for shell in (redis["args"][0], script):  # the scripts parse
        assert subprocess.run(["sh", "-n"], input=shell, text=True).returncode == 0
    svc = _named(ha, "Service", "t-genie-redis-sentinel")
    assert svc["spec"]["ports"][0]["port"] == 26379 and svc["spec"]["clusterIP"] == "None"
    assert _named(ha, "Service", "t-genie-redis")["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "t-genie-redis-0"


def test_the_gateway_finds_the_master_through_the_sentinels_and_waits_for_a_replica(ha):
    args = _gateway_args(ha)
    hosts = [f"t-genie-redis-{i}.t-genie-redis-headless:26379" for i in range(3)]
    assert args["--redis-sentinels"] == ",".join(hosts) and args["--redis-master"] == "genie"
    assert (args["--redis-wait-replicas"], args["--redis-wait-ms"]) == ("1", "100")
    assert args["--max-in-flight"] == "32" and args["--max-queue"] == "64"


def test_network_policy_opens_sentinel_ports_to_redis_pods_and_gateways(ha):
    policy = _named(ha, "NetworkPolicy", "t-genie-redis")
    ports = [sorted(p["port"] for p in rule["ports"]) for rule in policy["spec"]["ingress"]]
    assert [6379, 26379] in ports and [26379] in ports


def test_default_is_one_redis_without_sentinel_args(helm):
    docs = helm.render()
    assert _named(docs, "StatefulSet", "t-genie-redis")["spec"]["replicas"] == 1
    assert "--redis-sentinels" not in _gateway_args(docs)
    assert _gateway_args(docs)["--redis-wait-replicas"] == "0"


def test_external_sentinels(helm):
    docs = helm.render("--set", "redis.enabled=false", "--set", "redis.external.url=redis://cache:6379",
                       "--set", "redis.external.sentinels=s1:26379\\,s2:26379", "--set", "redis.external.sentinelMaster=mymaster")
    args = _gateway_args(docs)
    assert (args["--redis-sentinels"], args["--redis-master"]) == ("s1:26379,s2:26379", "mymaster")


@pytest.mark.parametrize("bad", [["redis.sentinel.replicas=1"], ["redis.wait.replicas=-1"], ["gateway.admission.queueTimeout=0"],
                                 ["redis.external.sentinels=not a list"]])
def test_schema_rejects_bad_values(helm, bad):
    out = helm.template(*HA, *[a for o in bad for a in ("--set", o)])
    assert out.returncode != 0 and "schema" in out.stderr, out.stderr


def test_quorum_above_the_sentinel_count_fails(helm):
    out = helm.template(*HA, "--set", "redis.sentinel.quorum=4")
    assert out.returncode != 0 and "quorum cannot exceed" in out.stderr


def test_tls_with_sentinel_lints_and_validates(helm, ha_tls):
    out = helm.run("lint", "--strict", str(helm.chart), *HA, *TLS)
    assert out.returncode == 0, out.stdout + out.stderr
    for doc in ha_tls:
        if doc["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(doc, "1.30", strict=True)


def test_with_tls_every_redis_and_sentinel_port_and_link_is_tls(ha_tls):
    pod = _named(ha_tls, "StatefulSet", "t-genie-redis")["spec"]["template"]["spec"]
    redis, sentinel = pod["containers"][:2]
    data, script = redis["args"][0], sentinel["args"][0]
    assert "--port 0 --tls-port 6379 --tls-replication yes" in data and "--tls-ca-cert-file /etc/genie/tls/ca.crt" in data
    for line in ("port 0", "tls-port 26379", "tls-replication yes", "tls-cert-file /etc/genie/tls/tls.crt",
                 "tls-ca-cert-file /etc/genie/tls/ca.crt"):
        assert f"\n{line}\n" in "\n" + "\n".join(x.strip() for x in script.splitlines()) + "\n", line
    assert "port 26379\n" not in script.replace("tls-port 26379\n", "")  # no plaintext Sentinel port
    for shell in (data, script):  # both ask a Sentinel for the master over TLS, with the password from the env
        assert 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --tls --cacert /etc/genie/tls/ca.crt -h t-genie-redis-sentinel' in shell
        assert subprocess.run(["sh", "-n"], input=shell, text=True).returncode == 0
    for c in (redis, sentinel):
        assert "redis-cli --tls --cacert /etc/genie/tls/ca.crt" in c["readinessProbe"]["exec"]["command"][2]
        assert {"name": "tls", "mountPath": "/etc/genie/tls", "readOnly": True} in c["volumeMounts"]
    assert {"name": "tls", "secret": {"secretName": "redis-tls", "defaultMode": 0o440}} in pod["volumes"]


@pytest.mark.parametrize("tls", [False, True])
def test_the_sentinels_require_the_password_from_the_secret_and_nowhere_else(helm, tls):
    docs = helm.render(*HA, *(TLS if tls else []))
    redis, sentinel = _named(docs, "StatefulSet", "t-genie-redis")["spec"]["template"]["spec"]["containers"][:2]
    script = sentinel["args"][0]
    assert 'requirepass "$REDIS_PASSWORD"' in script and 'sentinel sentinel-pass "$REDIS_PASSWORD"' in script
    assert "cat > /tmp/sentinel.conf" in script and "umask 077" in script  # a private file in /tmp
    assert sentinel["env"] == [{"name": "REDIS_PASSWORD", "valueFrom": SECRET_REF}]
    assert 'REDISCLI_AUTH="$REDIS_PASSWORD"' in sentinel["readinessProbe"]["exec"]["command"][2]
    assert ("--tls" in sentinel["readinessProbe"]["exec"]["command"][2]) == tls
    assert (f"{'rediss' if tls else 'redis'}://t-genie-redis:6379",) == tuple(
        v for v in secret_values(docs) if v.startswith("redis"))
    password = [v for v in secret_values(docs) if not v.startswith("redis")]
    assert password and all(len(p) >= 8 for p in password)  # so the leak scan below looks for it
    assert leaks(docs) == []  # not in a ConfigMap, an env literal, an argument or an annotation


def test_the_gateway_gets_the_sentinel_password_from_the_secret_and_tls_from_the_url(ha_tls):
    env = _env(ha_tls, "Deployment", "t-genie-gateway")
    assert env["GENIE_REDIS_SENTINEL_PASSWORD"] == {"name": "GENIE_REDIS_SENTINEL_PASSWORD", "valueFrom": SECRET_REF}
    assert env["GENIE_REDIS_URL"]["value"] == "$(GENIE_REDIS_BASE_URL)/0"  # rediss:// from the Secret: TLS everywhere
    assert env["GENIE_REDIS_CA"]["value"] == "/etc/genie/redis-ca/ca.crt"
    args = _gateway_args(ha_tls)
    assert args["--redis-url"] == "$(GENIE_REDIS_URL)" and args["--redis-master"] == "genie"
    assert not any("PASSWORD" in a and "$(" not in a for a in args)


@pytest.mark.parametrize("tls", [False, True])
def test_the_workers_follow_the_master_through_the_sentinels(helm, tls):
    docs = helm.render(*HA, *(TLS if tls else []))
    hosts = ",".join(f"t-genie-redis-{i}.t-genie-redis-headless:26379" for i in range(3))
    for name in ("t-genie-worker-train", "t-genie-worker-rollout"):
        env = _env(docs, "Deployment", name)
        assert env["GENIE_BROKER_SENTINELS"]["value"] == hosts and env["GENIE_BROKER_SENTINEL_MASTER"]["value"] == "genie"
        assert env["GENIE_BROKER_SENTINEL_PASSWORD"] == {"name": "GENIE_BROKER_SENTINEL_PASSWORD", "valueFrom": SECRET_REF}
        assert env["GENIE_BROKER_URL"]["value"] == "$(GENIE_REDIS_BASE_URL)/1"  # the DB, password and TLS only
        assert ("GENIE_BROKER_CA" in env) == tls
    policy = _named(docs, "NetworkPolicy", "t-genie-redis")
    sentinel_peers = [rule["from"] for rule in policy["spec"]["ingress"] if [p["port"] for p in rule["ports"]] == [26379]]
    assert "worker-rollout" in str(sentinel_peers) and "worker-train" in str(sentinel_peers)


def test_without_sentinel_the_workers_get_no_sentinel_settings(helm):
    env = _env(helm.render(), "Deployment", "t-genie-worker-rollout")
    assert not [k for k in env if "SENTINEL" in k]
    env = _env(helm.render("--set", "redis.enabled=false", "--set", "redis.external.url=redis://cache:6379",
                           "--set", "redis.external.sentinels=s1:26379", "--set", "redis.external.sentinelMaster=m"),
               "Deployment", "t-genie-worker-rollout")
    assert (env["GENIE_BROKER_SENTINELS"]["value"], env["GENIE_BROKER_SENTINEL_MASTER"]["value"]) == ("s1:26379", "m")
    assert "GENIE_BROKER_SENTINEL_PASSWORD" not in env  # an external set's Sentinel password is not the chart's to give


def _localised_pod(docs, root: Path, data_port: int, sentinel_port: int) -> tuple[dict, dict, Callable[[str], str]]:
    """The rendered Redis pod's two containers and a function that moves their scripts onto loopback: pod DNS names
    to 127.0.0.1, ports to free ones, /etc/genie/tls and /tmp into `root`, a quorum of 1 (one Sentinel here)."""
    redis_c, sentinel_c = _named(docs, "StatefulSet", "t-genie-redis")["spec"]["template"]["spec"]["containers"][:2]
    moves = {"$(hostname).t-genie-redis-headless": "127.0.0.1", "t-genie-redis-0.t-genie-redis-headless": "127.0.0.1",
             "-h t-genie-redis-sentinel -p 26379": f"-h 127.0.0.1 -p {sentinel_port}",
             "-h 127.0.0.1 -p 26379": f"-h 127.0.0.1 -p {sentinel_port}", "-h 127.0.0.1 ping": f"-h 127.0.0.1 -p {data_port} ping",
             "tls-port 26379": f"tls-port {sentinel_port}", "--tls-port 6379": f"--tls-port {data_port}",
             "$master 6379 2": f"$master {data_port} 1", "--replicaof \"$master\" 6379": f"--replicaof \"$master\" {data_port}",
             "/etc/genie/tls/": f"{root}/tls/", "/tmp/": f"{root}/tmp/", "--dir /data": f"--dir {root}/data",
             "--protected-mode no": "--protected-mode no --bind 127.0.0.1",
             "protected-mode no\n": "protected-mode no\nbind 127.0.0.1\n"}

    def localise(text: str) -> str:
        return re.sub("|".join(map(re.escape, moves)), lambda m: moves[m.group(0)], text)

    return redis_c, sentinel_c, localise


def test_the_rendered_tls_sentinel_pod_runs_and_refuses_clients_without_the_password_or_tls(helm, tmp_path):
    """The chart's data node and Sentinel scripts, run for real on loopback with TLS: the Sentinel serves only TLS,
    requires the password, names the master, and no password is on a command line."""
    docs = helm.render(*HA, *TLS)
    password = base64.b64decode(_named(docs, "Secret", "t-genie-redis-password")["data"]["redis-password"]).decode()
    certs = make_certs(tmp_path / "certs")
    for sub in ("tmp", "data", "tls"):
        (tmp_path / sub).mkdir()
    for src, dst in ((certs.server_cert, "tls.crt"), (certs.server_key, "tls.key"), (certs.ca, "ca.crt")):
        (tmp_path / "tls" / dst).write_bytes(src.read_bytes())
    data_port, sentinel_port = free_ports(2)
    redis_c, sentinel_c, localise = _localised_pod(docs, tmp_path, data_port, sentinel_port)
    env = {**os.environ, "REDIS_PASSWORD": password, "HOSTNAME": "t-genie-redis-0"}
    procs = [subprocess.Popen(["sh", "-c", localise(c["args"][0])], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for c in (redis_c, sentinel_c)]
    tls = {"ssl": True, "ssl_ca_certs": str(certs.ca), "socket_timeout": 3}
    sentinel = redis_py.Redis(host="127.0.0.1", port=sentinel_port, password=password, decode_responses=True, **tls)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if sentinel.execute_command("SENTINEL", "get-master-addr-by-name", "genie"):
                    break
            except redis_py.ConnectionError:
                pass
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "the pod did not start"
            time.sleep(0.2)
        assert sentinel.execute_command("SENTINEL", "get-master-addr-by-name", "genie") == ["127.0.0.1", str(data_port)]
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(host="127.0.0.1", port=sentinel_port, **tls).ping()  # no password
        with pytest.raises(redis_py.ConnectionError):
            redis_py.Redis(host="127.0.0.1", port=sentinel_port, password=password, socket_timeout=3).ping()  # plaintext
        for proc in procs:  # `exec` replaced sh: these are the servers themselves
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
            assert "redis-server" in cmdline and password not in cmdline
        assert oct((tmp_path / "tmp" / "sentinel.conf").stat().st_mode & 0o777) == "0o600"
        for c in (redis_c, sentinel_c):
            sh, flag, command = c["readinessProbe"]["exec"]["command"]
            assert subprocess.run([sh, flag, localise(command)], env=env, timeout=30).returncode == 0, c["name"]
            wrong = {**env, "REDIS_PASSWORD": "wrong-password"}
            assert subprocess.run([sh, flag, localise(command)], env=wrong, timeout=30).returncode != 0, c["name"]
    finally:
        sentinel.close()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)
