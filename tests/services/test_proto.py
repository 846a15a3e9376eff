"""The generated API code in genie_api/ is exactly what scripts/gen_proto.sh makes from proto/ (never hand-edited)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_proto(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, cwd=ROOT,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "genie_api").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "genie_api").rglob("*") if p.is_file())
    assert committed == fresh
    for rel in committed:
        assert (ROOT / rel).read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} differs: run scripts/gen_proto.sh"


def test_service_is_genie_v1_gateway():
    from genie_api.v1 import gateway_pb2

    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    assert service.full_name == "genie.v1.Gateway"
    assert {m.name for m in service.methods} == {"OpenSession", "Step", "Play", "GetSession", "CloseSession", "ListActions",
                                                  "InferActions", "ListWorlds"}
