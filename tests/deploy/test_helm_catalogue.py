"""The chart's world catalogue (catalogue.enabled): one ReadWriteMany volume mounted at the same path in the gateways
(read-only, --registry), the Triton servers (read-only, explicit model control) and the workers (writable, where
world jobs publish); the commands it renders are ones the real CLIs accept."""

from __future__ import annotations

import json
import subprocess
import sys

import kubernetes_validate
from click.testing import CliRunner

from services.cli import main as cli
from tests.deploy.test_helm_chart import CRD_KINDS, KUBE_VERSIONS, TRITON, arg_map, container, named, of_kind, pod_spec

ON = ("--set", "catalogue.enabled=true", "--set", "catalogue.defaultWorld=coinrun")


def _mounts(c: dict) -> dict[str, dict]:
    return {m["name"]: m for m in c["volumeMounts"]}


def test_off_by_default(helm):
    docs = helm.render()
    assert not [d for d in of_kind(docs, "PersistentVolumeClaim") if "catalogue" in d["metadata"]["name"]]
    args = arg_map(container(docs, "Deployment", "t-genie-gateway")["args"])
    assert "--registry" not in args and args["--world"]
    for model in TRITON:
        c = container(docs, "Deployment", f"t-genie-{model}")
        assert "--explicit" not in c["args"] and "catalogue" not in _mounts(c)


def test_catalogue_volume_and_commands(helm):
    docs = helm.render(*ON)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)
    pvc = named(docs, "PersistentVolumeClaim", "t-genie-catalogue")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # published worlds outlive the release

    def volume_claim(deploy: dict) -> str:
        (vol,) = [v for v in pod_spec(deploy)["volumes"] if v["name"] == "catalogue"]
        return vol["persistentVolumeClaim"]["claimName"]

    gateway = named(docs, "Deployment", "t-genie-gateway")
    c = pod_spec(gateway)["containers"][0]
    args = arg_map(c["args"])
    assert args["--registry"] == "/registry" and "--world" not in args and args["--backend"] == "triton"
    assert args["--default-world"] == "coinrun" and args["--models-budget-mb"] == "2048"
    assert _mounts(c)["catalogue"] == {"name": "catalogue", "mountPath": "/registry", "readOnly": True}
    assert volume_claim(gateway) == "t-genie-catalogue"
    for model in TRITON:
        deploy = named(docs, "Deployment", f"t-genie-{model}")
        c = pod_spec(deploy)["containers"][0]
        assert "--explicit" in c["args"] and "--world" not in arg_map(c["args"])
        assert arg_map(c["args"])["--models-budget-mb"] == "4096" and arg_map(c["args"])["--models-idle-s"] == "60"
        assert _mounts(c)["catalogue"]["mountPath"] == "/registry" and _mounts(c)["catalogue"]["readOnly"] is True
        assert volume_claim(deploy) == "t-genie-catalogue"
    for queue in ("train", "rollout"):
        deploy = named(docs, "Deployment", f"t-genie-worker-{queue}")
        c = pod_spec(deploy)["containers"][0]
        assert _mounts(c)["catalogue"] == {"name": "catalogue", "mountPath": "/registry"}  # writable: jobs publish
        assert {e["name"]: e.get("value") for e in c["env"]}["GENIE_REGISTRY"] == "/registry"


def test_an_existing_claim_is_used_and_none_created(helm):
    docs = helm.render(*ON, "--set", "catalogue.existingClaim=shared-worlds", "--set", "catalogue.mountPath=/srv/worlds")
    assert not [d for d in of_kind(docs, "PersistentVolumeClaim") if "catalogue" in d["metadata"]["name"]]
    gateway = named(docs, "Deployment", "t-genie-gateway")
    (vol,) = [v for v in pod_spec(gateway)["volumes"] if v["name"] == "catalogue"]
    assert vol["persistentVolumeClaim"]["claimName"] == "shared-worlds"
    assert arg_map(pod_spec(gateway)["containers"][0]["args"])["--registry"] == "/srv/worlds"


def test_schema_refuses_bad_catalogue_values(helm):
    for bad in ("catalogue.mountPath=registry", "catalogue.defaultWorld=Bad Name", "catalogue.modelsBudgetMb=-1",
                "catalogue.serverBudgetMb=-5"):
        out = helm.template(*ON, "--set", bad)
        assert out.returncode != 0 and "catalogue" in out.stderr, bad


def test_rendered_commands_are_accepted_by_the_clis(helm, tmp_path):
    """The Triton pods' `genie triton serve --explicit ...` assembles an empty repository (dry run), and the gateway's
    flags parse (with --registry pointing at a real catalogue directory)."""
    docs = helm.render(*ON)
    c = container(docs, "Deployment", "t-genie-dynamics")
    args = [a for a in c["args"] if not a.startswith("--repository")]
    out = CliRunner().invoke(cli, [*args, "--dry-run", f"--repository={tmp_path / 'repo'}"])
    assert out.exit_code == 0, out.output
    command = json.loads(out.output.strip().splitlines()[-1])["command"]
    assert "--model-control-mode=explicit" in command
    assert not any((tmp_path / "repo" / "models").iterdir())  # no model until a gateway loads one
    refused = CliRunner().invoke(cli, ["triton", "serve", "--world", str(tmp_path), "--models-budget-mb", "10", "--dry-run"])
    assert refused.exit_code == 2 and "--models-budget-mb (>= 0) is for --explicit" in refused.output
    help_out = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--help"], capture_output=True, text=True)
    gateway_flags = {a.split("=", 1)[0] for a in container(docs, "Deployment", "t-genie-gateway")["args"][1:]}
    assert all(flag in help_out.stdout for flag in gateway_flags), gateway_flags
