"""Issue 19's chart rules: credentials only in Secrets (never in a ConfigMap, an env literal or an argument), the
bundled Redis's generated password, and NetworkPolicies on by default whose selectors match the pods they name."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path

import pytest

HELM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "helm"
TOKENS = "alice:s3cret-s3cret-s3cret,bob:t0ken-t0ken-t0ken"
VALUES = {
    "default": [],
    "production-gpu": ["-f", str(HELM_DIR / "values-production-gpu.yaml")],
    "redis-ha": ["-f", str(HELM_DIR / "values-redis-ha.yaml")],
    "tokens": ["--set", "gateway.auth.tokens=" + TOKENS.replace(",", "\\,")],
}
WORKLOADS = ("Deployment", "StatefulSet", "Pod")


@pytest.fixture(scope="module", params=list(VALUES))
def rendered(request, helm) -> tuple[str, list[dict]]:
    return request.param, helm.render(*VALUES[request.param])


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    return doc["metadata"]["labels"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"]["labels"]


def named(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def secret_values(docs: list[dict]) -> set[str]:
    """Every value the rendered Secrets hold, and each token of a `client:token,...` list on its own."""
    values = set()
    for doc in docs:
        if doc["kind"] != "Secret":
            continue
        for value in doc.get("data", {}).values():
            text = base64.b64decode(value).decode()
            values.add(text)
            values |= {pair.split(":", 1)[1] for pair in text.split(",") if re.fullmatch(r"[\w.-]+:\S{16,}", pair)}
    return values


def plain_texts(docs: list[dict]):
    """(where, text) of everything a `kubectl get -o yaml` shows in the clear: ConfigMap data, container commands
    and arguments, env value literals, annotations."""
    for doc in docs:
        name = f'{doc["kind"]}/{doc["metadata"]["name"]}'
        if doc["kind"] == "ConfigMap":
            yield from ((f"{name} data.{k}", str(v)) for k, v in doc.get("data", {}).items())
        yield from ((f"{name} annotation {k}", str(v)) for k, v in (doc["metadata"].get("annotations") or {}).items())
        if doc["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(doc)
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f'{name} container {c["name"]}'
            yield from ((f"{where} command/args", text) for text in c.get("command", []) + c.get("args", []))
            yield from ((f'{where} env {e["name"]}', e["value"]) for e in c.get("env", []) if "value" in e)


def leaks(docs: list[dict]) -> list[str]:
    secrets = {s for s in secret_values(docs) if len(s) >= 8}
    return [where for where, text in plain_texts(docs) for s in secrets if s in text]


# --- credentials only in Secrets --------------------------------------------------------------------------------------


def test_no_secret_value_in_plain_text(rendered):
    name, docs = rendered
    assert leaks(docs) == []
    if name == "tokens":
        assert {"s3cret-s3cret-s3cret", "t0ken-t0ken-t0ken"} <= secret_values(docs)  # the scan looks for them


def test_the_leak_scan_finds_a_planted_password(helm):
    # Proves the scan above can fail: the generated Redis password planted in an argument, an env literal, a ConfigMap.
    docs = helm.render()
    password = base64.b64decode(named(docs, "Secret", "t-genie-redis-password")["data"]["redis-password"]).decode()
    for plant in ("arg", "env", "configmap"):
        bad = copy.deepcopy(docs)
        gateway = pod_spec(named(bad, "Deployment", "t-genie-gateway"))["containers"][0]
        if plant == "arg":
            gateway["args"].append(f"--redis-url=redis://:{password}@r:6379")
        elif plant == "env":
            gateway["env"].append({"name": "X", "value": password})
        else:
            named(bad, "ConfigMap", "t-genie-worker")["data"]["X"] = password
        assert len(leaks(bad)) == 1, plant


def test_the_bundled_redis_password_is_generated_and_only_referenced(helm):
    docs = helm.render()
    secret = named(docs, "Secret", "t-genie-redis-password")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", password)
    again = helm.render()  # no cluster, so no lookup: a fresh one (in a cluster, lookup keeps the installed one)
    assert base64.b64decode(named(again, "Secret", "t-genie-redis-password")["data"]["redis-password"]).decode() != password
    ref = {"name": "t-genie-redis-password", "key": "redis-password"}
    sts = named(docs, "StatefulSet", "t-genie-redis")
    (redis,) = pod_spec(sts)["containers"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": ref}} in redis["env"]
    script = redis["args"][0]
    assert 'requirepass "%s"' in script and "/tmp/auth.conf" in script and "--requirepass" not in script
    assert "REDISCLI_AUTH" in redis["readinessProbe"]["exec"]["command"][2]  # else the probe gets NOAUTH
    assert base64.b64decode(named(docs, "Secret", "t-genie-redis-url")["data"]["redis-url"]).decode() == \
        "redis://t-genie-redis:6379"  # no password in the URL: clients read GENIE_REDIS_PASSWORD
    for workload in ("t-genie-gateway", "t-genie-worker-train", "t-genie-worker-rollout"):
        (c,) = pod_spec(named(docs, "Deployment", workload))["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["GENIE_REDIS_PASSWORD"] == {"name": "GENIE_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": ref}}
        if "worker" in workload:  # the Celery settings' own name for it (services/worker/settings.py)
            assert env["GENIE_BROKER_PASSWORD"] == {"name": "GENIE_BROKER_PASSWORD", "valueFrom": {"secretKeyRef": ref}}
        assert all(":@" not in e.get("value", "") for e in c["env"]), workload


def test_sentinels_authenticate_to_the_master(helm):
    docs = helm.render(*VALUES["redis-ha"])
    redis, sentinel = pod_spec(named(docs, "StatefulSet", "t-genie-redis"))["containers"][:2]
    assert 'masterauth "%s"' in redis["args"][0]  # replicas authenticate to the master
    assert "sentinel auth-pass genie $REDIS_PASSWORD" in sentinel["args"][0]
    assert [e["name"] for e in sentinel["env"]] == ["REDIS_PASSWORD"]


def test_an_existing_redis_password_secret(helm):
    docs = helm.render("--set", "redis.auth.existingSecret=my-redis", "--set", "redis.auth.existingSecretKey=pw")
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "t-genie-redis-password"]
    (c,) = pod_spec(named(docs, "Deployment", "t-genie-gateway"))["containers"]
    (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "GENIE_REDIS_PASSWORD"]
    assert ref == {"name": "my-redis", "key": "pw"}


# --- NetworkPolicies -------------------------------------------------------------------------------------------------


def matches(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics for matchLabels and In / NotIn / Exists / DoesNotExist expressions."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def components(docs: list[dict], selector: dict) -> set[str]:
    return {pod_labels(w)["app.kubernetes.io/component"] for w in docs
            if w["kind"] in WORKLOADS and matches(selector, pod_labels(w))}


def allowed(docs: list[dict], policy_name: str, port: int) -> list[dict]:
    """The `from` peers of a policy's rules that open `port`."""
    policy = named(docs, "NetworkPolicy", policy_name)
    return [peer for rule in policy["spec"]["ingress"] if port in [p["port"] for p in rule["ports"]]
            for peer in rule["from"]]


def test_policies_protect_every_pod_and_admit_only_whom_they_should(rendered):
    name, docs = rendered
    protected = set().union(*(components(docs, p["spec"]["podSelector"]) for p in docs if p["kind"] == "NetworkPolicy"))
    pods = {pod_labels(w)["app.kubernetes.io/component"] for w in docs if w["kind"] in WORKLOADS}
    assert protected == pods - {"test"}, name  # the one-shot helm test pod listens on nothing

    def release_peers(policy: str, port: int) -> set[str]:
        peers = allowed(docs, policy, port)
        # A peer without a namespaceSelector is this namespace; every release peer must be exactly that.
        assert all("namespaceSelector" not in p for p in peers if "ipBlock" not in p and
                   p["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/instance") == "t")
        return set().union(*(components(docs, p["podSelector"]) for p in peers if "namespaceSelector" not in p))

    assert components(docs, named(docs, "NetworkPolicy", "t-genie-triton")["spec"]["podSelector"]) == \
        {"tokenizer", "lam", "dynamics"}
    assert release_peers("t-genie-triton", 8001) == {"gateway", "worker-rollout"}
    # With triton.tls (production-gpu) Triton's plaintext HTTP binds its pod's loopback: no rule opens 8000.
    assert release_peers("t-genie-triton", 8000) == (set() if name == "production-gpu" else {"gateway", "worker-rollout"})
    for policy, port in [("t-genie-triton", 8002), ("t-genie-worker", 9100), ("t-genie-gateway", 9090)]:
        (peer,) = allowed(docs, policy, port)
        assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}, (policy, port)
    for port in (50051, 8080):
        peers = allowed(docs, "t-genie-gateway", port)
        controller = [p for p in peers if "namespaceSelector" in p]
        assert controller == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}]
        assert release_peers("t-genie-gateway", port) == {"test"}
    if name != "production-gpu":
        assert release_peers("t-genie-redis", 6379) == {"gateway", "worker-train", "worker-rollout"} | \
            ({"redis"} if name == "redis-ha" else set())


def test_network_policies_can_be_turned_off_and_their_peers_configured(helm):
    docs = helm.render("--set", "networkPolicy.enabled=false")
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]
    docs = helm.render("--set", "networkPolicy.ingressController.namespaceSelector.matchLabels.team=edge")
    (controller,) = [p for p in allowed(docs, "t-genie-gateway", 50051) if "namespaceSelector" in p]
    assert controller["namespaceSelector"]["matchLabels"]["team"] == "edge"
