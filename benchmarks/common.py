"""Shared benchmark plumbing: timing, competing-load check, FLOP counting, matmul peak, machine facts, JSON rows."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter

from genie.data.synthetic import MovingSprites, SpritesConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results.jsonl"


def sync() -> None:
    """Waits for queued device work so a timer measures it; a no-op on CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class OtherLoad:
    """Measures how many cores other processes kept busy while a block ran (Linux /proc; else None).

    On a 2-core machine one other busy process makes 2-thread torch ops several times slower (the OpenMP
    threads wait on each other), so every row carries this figure: rows with others_cores >~ 0.2 are noisy.
    """

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._start = _cpu_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_jiffies()
        if self._start is None or end is None:
            return
        (busy0, self0, t0), (busy1, self1, t1) = self._start, end
        if t1 > t0:
            self.cores = max(0.0, ((busy1 - busy0) - (self1 - self0)) / os.sysconf("SC_CLK_TCK") / (t1 - t0))


def _cpu_jiffies() -> tuple[int, int, float] | None:
    """(busy jiffies of all CPUs, jiffies of this process, monotonic time)."""
    try:
        cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None
    idle = cpu[3] + cpu[4]  # idle + iowait
    return sum(cpu[:8]) - idle, int(mine[11]) + int(mine[12]), time.monotonic()  # utime + stime


def wait_quiet(max_wait_s: float, window_s: float = 1.0) -> float | None:
    """Waits (up to max_wait_s) until other processes leave our torch threads their cores; returns their load."""
    threshold = _busy_threshold()
    deadline = time.monotonic() + max_wait_s
    while True:
        with OtherLoad() as load:
            time.sleep(window_s)
        if load.cores is None or load.cores < threshold or time.monotonic() >= deadline:
            return load.cores


@dataclass
class Timing:
    times: list[float]  # seconds of each timed call
    others_cores: float | None  # cores other processes kept busy meanwhile (see OtherLoad)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    def summary(self) -> dict[str, Any]:
        """Seconds per call (mean, median, min, max), the count and the competing load."""
        return {
            "mean_s": self.mean,
            "median_s": self.median,
            "min_s": min(self.times),
            "max_s": max(self.times),
            "n": len(self.times),
            "others_cores": self.others_cores,
        }


QUIET_WAIT_S = 0.0  # from --quiet-wait: how long time_it waits for other processes to go idle
RETRIES = 0  # from --retries: how often time_it re-times a block during which other processes were busy


def _busy_threshold() -> float:
    """Other processes' load (cores) above which they compete with our torch threads."""
    return (os.cpu_count() or 1) - torch.get_num_threads() + 0.2


def _maybe_wait_quiet() -> None:
    """Before each timed block, waits for a quiet machine; after one timeout, stops waiting for this run."""
    global QUIET_WAIT_S
    if QUIET_WAIT_S <= 0:
        return
    cores = wait_quiet(QUIET_WAIT_S)
    if cores is not None and cores >= _busy_threshold():
        print(f"# machine stays busy ({cores:.2f} other cores): timing anyway, see others_cores", file=sys.stderr)
        QUIET_WAIT_S = 0.0


def time_it(fn: Callable[[], Any], iters: int, warmup: int = 1, setup: Callable[[], Any] | None = None) -> Timing:
    """Runs `fn` warmup + iters times, syncing around each call, and times the last `iters` calls.

    `setup` (untimed) runs before every call, e.g. to restore state that `fn` consumes. If other processes
    were busy during the timed calls, waits for quiet and times them again (up to RETRIES times).
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {iters}, {warmup}")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync()
    for attempt in range(RETRIES + 1):
        if attempt == 0:
            _maybe_wait_quiet()
        else:
            wait_quiet(max(QUIET_WAIT_S, 30.0))
        times = []
        with OtherLoad() as load:
            for _ in range(iters):
                if setup is not None:
                    setup()
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
        if load.cores is None or load.cores < _busy_threshold():
            break
        print(f"# other processes used {load.cores:.2f} cores while timing (attempt {attempt + 1})", file=sys.stderr)
    return Timing(times, load.cores)


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch 2.13's FlopCounterMode has formulas for the CUDA attention kernels only; on CPU
# scaled_dot_product_attention dispatches to these ops, which would otherwise count as 0 FLOPs.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Model FLOPs of one call of `fn` (matmuls, convolutions and attention; 1 FMA = 2 FLOPs), and its result.

    Elementwise ops, softmax, norms and sampling are not counted, as in the usual MFU convention; causal
    attention counts the full square, as FlopCounterMode does.
    """
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        result = fn()
    return counter.get_total_flops(), result


def matmul_gflops(
    n: int, reps: int, dtype: torch.dtype = torch.float32, m: int | None = None, k: int | None = None
) -> Timing:
    """Times `reps` samples of torch.mm on (m, k) @ (k, n) (square n x n by default); `times` become GFLOP/s."""
    m, k = m or n, k or n
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    inner = max(1, int(2e9 // (2 * m * n * k)))  # ~2 GFLOP per timed sample, so small shapes time well too
    timing = time_it(lambda: [torch.mm(a, b, out=out) for _ in range(inner)], iters=reps, warmup=1)
    return Timing([2 * m * n * k * inner / t / 1e9 for t in timing.times], timing.others_cores)


def matmul_peak(sizes: tuple[int, ...] = (1024, 1536, 2048), reps: int = 5) -> float:
    """The measured fp32 matmul peak in GFLOP/s: the best sample over square sizes."""
    return max(max(matmul_gflops(n, reps).times) for n in sizes)


def gpu_matmul_peak(dtype_name: str, tf32: bool, n: int = 8192, reps: int = 10) -> float:
    """GFLOP/s of n x n x n torch.mm on the GPU (the best of `reps` after warm-up); fp32 on TF32 cores if `tf32`,
    as the training loop runs it."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e9)
    del a, b
    torch.cuda.empty_cache()
    return best


def machine_info() -> dict[str, Any]:
    """What a figure was measured on: CPU model and vector extensions, cores, torch build and threads."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first core's entry
    flags = set(fields.get("flags", "").split())
    info = {
        "cpu": fields.get("model name") or platform.processor() or "unknown",
        "cpu_flags": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL file the rows are appended to")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="max seconds to wait for other processes to idle before timing"
    )
    parser.add_argument("--retries", type=int, default=1, help="re-time a block when other processes were busy")
    return parser


def setup_run(args: argparse.Namespace) -> dict[str, Any]:
    """Applies --threads, seeds torch and returns the machine facts every row of this run carries."""
    global QUIET_WAIT_S, RETRIES
    QUIET_WAIT_S, RETRIES = args.quiet_wait, args.retries
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info()
    print(f"# machine: {json.dumps(info)}", file=sys.stderr)
    return info


def emit(row: dict[str, Any], machine: dict[str, Any], out: Path | None) -> None:
    """Prints one JSON row to stdout and appends it to `out`."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row, "machine": machine})
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")


def sprites_for(world: Any) -> MovingSprites:
    """Synthetic moving-sprites clips shaped like `world`'s (frame size, T = the dynamics window).

    Built from the model configs, not world.data, so presets whose data are on-disk shards time the same.
    """
    f = world.tokenizer.frame
    return MovingSprites(SpritesConfig(height=f.height, width=f.width, frames=world.dynamics.max_frames))


def rounded(d: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}
