"""The chart as a package: helm lint --strict, values.schema.json (rejects bad values; lists the same paths as the
@param comments), template-time checks, NOTES, the helm extraction, and the Dockerfile the chart's images come from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "genie"
VALUES = {"default": [], "production-gpu": ["-f", str(ROOT / "deploy" / "helm" / "values-production-gpu.yaml")]}


def test_get_helm_is_idempotent(helm, get_helm):
    before = helm.path.stat().st_mtime_ns
    assert get_helm.ensure("helm") == helm.path and helm.path.stat().st_mtime_ns == before
    assert helm.run("version", "--short").stdout.startswith("v4.")


@pytest.mark.parametrize("values", list(VALUES))
def test_helm_lint_strict(helm, values):
    out = helm.run("lint", "--strict", str(CHART), *VALUES[values])
    assert out.returncode == 0, out.stdout + out.stderr


def test_chart_refuses_kubernetes_without_grpc_probes(helm):
    out = helm.template("--kube-version", "1.26.0")
    assert out.returncode != 0 and "kubeVersion" in out.stderr


def test_template_checks_across_values(helm):
    docs = helm.render("--set", "gateway.autoscaling.enabled=false", "--set", "gateway.replicaCount=3")
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    (gateway,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-genie-gateway"]
    assert gateway["spec"]["replicas"] == 3
    out = helm.template("--set", "gateway.autoscaling.minReplicas=5", "--set", "gateway.autoscaling.maxReplicas=2")
    assert out.returncode != 0 and "minReplicas must not exceed maxReplicas" in out.stderr
    out = helm.template("--set", "worker.visibilityTimeout=600")
    assert out.returncode != 0 and "must exceed worker.taskTimeLimit" in out.stderr


def test_notes_render(helm):
    out = helm.run("install", "t", str(CHART), "--dry-run=client", "--namespace", "genie")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "helm test t -n genie" in notes and "port-forward service/t-genie-gateway" in notes


@pytest.mark.parametrize("bad", [
    "gateway.replicaCount=-1",
    "dynamics.replicaCount=-2",
    "gateway.service.type=Ingress",
    "image.pullPolicy=Sometimes",
    "gateway.bogus=1",  # a typo'd key
    "gateway.auth.tokens=no-colon-at-all-in-this",
    "gateway.auth.tokens=alice:short",  # the gateway refuses tokens under 16 characters
    "world.path=worlds/demo",  # relative: the pod's working directory is not a contract
    "redis.enabled=false",  # external Redis without an address
    "redis.databases.broker=16",
    "worker.jobs.accessModes={ReadWriteSometimes}",
    "gateway.resources.requests.cpu=null",  # the HPA's utilisation needs a CPU request
    "gateway.resources.requests.memory=lots",
])
def test_schema_rejects_bad_values(helm, bad):
    out = helm.template("--set", bad)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr


def test_schema_and_param_comments_list_the_same_paths():
    text = (CHART / "values.yaml").read_text()
    params = set(re.findall(r"^\s*## @param ([\w.]+) ", text, flags=re.M))
    schema = json.loads((CHART / "values.schema.json").read_text())

    def resolve(node):
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def paths(node, prefix=""):
        node = resolve(node)
        if "properties" not in node:
            return {prefix}
        return set().union(*(paths(child, f"{prefix}{k}.") for k, child in node["properties"].items() if k != "global"))

    assert {p.rstrip(".") for p in paths(schema)} == params

    def undocumented(values, prefix=""):
        for key, value in values.items():
            path = f"{prefix}{key}"
            if path not in params:
                yield from undocumented(value, path + ".") if isinstance(value, dict) else [path]

    assert list(undocumented(yaml.safe_load(text))) == []


def test_dockerfile_matches_the_chart():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert 'ENTRYPOINT ["genie"]' in dockerfile and "python:3.11-slim" in dockerfile
    assert f"USER {values['podSecurityContext']['runAsUser']}:" in dockerfile
    assert f"COPY worlds/demo {values['world']['path']}" in dockerfile
    assert '"torch==2.13.0"' in dockerfile and 'pip install ".[triton]"' in dockerfile
    # .dockerignore is an allow-list: everything the Dockerfile copies from the context must be let back in.
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    sources = [src for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line
               for src in line.split()[1:-1]]
    assert sources and all(src.rstrip("/") in allowed and (ROOT / src).exists() for src in sources), (sources, allowed)
