"""Fixtures of the chart tests: the real helm binary (extracted offline from its PyPI wheel by deploy/get_helm.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


class Helm:
    """helm against deploy/helm/genie; `helm template` renders release `t` into namespace `genie`."""

    chart = ROOT / "deploy" / "helm" / "genie"
    production_values = ROOT / "deploy" / "helm" / "values-production-gpu.yaml"

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "KUBECONFIG": os.devnull}  # there is no cluster: never look for one
        return subprocess.run([str(self.path), *args], capture_output=True, text=True, timeout=60, env=env)

    def template(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("template", "t", str(self.chart), "--namespace", "genie", *args)

    def render(self, *args: str) -> list[dict]:
        out = self.template(*args)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="session")
def get_helm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("get_helm", ROOT / "deploy" / "get_helm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm(get_helm) -> Helm:
    return Helm(get_helm.ensure("helm"))
