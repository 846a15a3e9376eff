"""Fuzz at volume: runs tests/services/gateway/api/test_fuzz.py (hypothesis, seeded) with `--examples` requests per
gateway (4 gateways: in-process/Triton backend x memory/Redis store) and reports how the RPCs answered: the
count per (method, code), the total, and how many were UNKNOWN or INTERNAL (the goal is 0). Needs the Redis
the tests use (GENIE_TEST_REDIS_URL) and trains the tests' tiny world (~1 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import base_parser, emit, setup_run

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=1300, help="hypothesis examples per gateway (4 gateways)")
    args = p.parse_args()
    machine = setup_run(args)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "tally.jsonl"
        env = {**os.environ, "GENIE_FUZZ_EXAMPLES": str(args.examples), "GENIE_FUZZ_REPORT": str(report),
               "PYTHONPATH": str(ROOT)}
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "tests/services/gateway/api/test_fuzz.py", "-q", "-p", "no:cacheprovider"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        seconds = time.monotonic() - t0
        tally: Counter = Counter()
        for line in report.read_text().splitlines():
            tally.update(json.loads(line))
    well_formed = {k: v for k, v in tally.items() if not k.startswith("garbage")}
    codes = Counter()
    for key, n in tally.items():
        codes[key.rpartition(" ")[2]] += n
    emit({"bench": "fuzz", "examples_per_gateway": args.examples, "tests_passed": proc.returncode == 0,
          "requests": sum(well_formed.values()), "garbage_requests": sum(tally.values()) - sum(well_formed.values()),
          "unknown_or_internal": codes["UNKNOWN"] + codes["INTERNAL"], "codes": dict(codes),
          "by_method": dict(sorted(tally.items())), "seconds": round(seconds, 1)}, machine, args.out)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
