"""One Linear layer of the demo world's shapes in fp32 and as `Int8Linear` (its input's quantisation included), with
glibc's default handling of freed buffers and with `keep_freed_memory()`: microseconds a call, median of --reps.

    python benchmarks/bench_int8.py            # each shape in a fresh process per allocator setting
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

SHAPES = ((64, 192, 768), (64, 768, 192), (1024, 192, 768), (1024, 768, 192))


def _time(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _measure(keep: bool, reps: int) -> list[dict]:
    import torch
    from torch import nn

    from genie.nn.int8 import Int8Linear, keep_freed_memory

    torch.set_num_threads(2)
    if keep:
        keep_freed_memory()
    rows = []
    with torch.no_grad():
        for m, k, n in SHAPES:
            linear = nn.Linear(k, n)
            quantized, x = Int8Linear(linear), torch.randn(m, k)
            fp32_us = _time(lambda: linear(x), reps)  # noqa: B023 - called right here, inside this iteration
            int8_us = _time(lambda: quantized(x), reps)  # noqa: B023
            rows.append({"m": m, "k": k, "n": n, "keep_freed_memory": keep, "fp32_us": round(fp32_us, 1),
                         "int8_us": round(int8_us, 1)})
    return rows


def main() -> None:
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 200
    if "--child" in sys.argv:  # one allocator setting per process: mallopt cannot be undone
        print(json.dumps(_measure(sys.argv[sys.argv.index("--child") + 1] == "keep", reps)))
        return
    for setting in ("default", "keep"):
        out = subprocess.run([sys.executable, __file__, "--child", setting, "--reps", str(reps)], check=True,
                             capture_output=True, text=True).stdout
        for row in json.loads(out.splitlines()[-1]):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
