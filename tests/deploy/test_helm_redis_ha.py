"""The chart's Redis with failover (deploy/helm/values-redis-ha.yaml): master + replicas with a Sentinel in each
pod, the gateway finding the master through them and waiting for a replica; or an external Sentinel set."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

ROOT = Path(__file__).resolve().parents[2]
HA = ["-f", str(ROOT / "deploy" / "helm" / "values-redis-ha.yaml")]


def _named(docs, kind, name):
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _gateway_args(docs) -> dict[str, str]:
    c = _named(docs, "Deployment", "t-genie-gateway")["spec"]["template"]["spec"]["containers"][0]
    return dict(a.split("=", 1) for a in c["args"] if "=" in a)


@pytest.fixture(scope="module")
def ha(helm) -> list[dict]:
    return helm.render(*HA)


def test_lint_strict_and_every_object_validates(helm, ha):
    out = helm.run("lint", "--strict", str(helm.chart), *HA)
    assert out.returncode == 0, out.stdout + out.stderr
    for doc in ha:
        if doc["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(doc, "1.30", strict=True)


def test_three_redis_pods_each_with_a_sentinel(ha):
    sts = _named(ha, "StatefulSet", "t-genie-redis")
    assert sts["spec"]["replicas"] == 3
    redis, sentinel = sts["spec"]["template"]["spec"]["containers"]
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
