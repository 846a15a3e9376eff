"""Renders benchmark JSONL rows as the markdown tables of benchmarks/README.md (the latest row per key wins)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DEFAULT_OUT

TABLES = {
    "matmul": (
        ("dtype", "m", "k", "n"),
        ["threads", "dtype", "m", "k", "n", "best_gflops", "median_gflops", "of_peak", "others_cores"],
    ),
    "train": (
        ("preset", "model", "dtype", "batch"),
        ["threads", "preset", "model", "batch", "s_per_step", "steps_per_s", "samples_per_s", "gflop_per_step",
         "gflops", "of_peak", "jasmine_s_per_step", "speedup_vs_jasmine", "n", "others_cores"],
    ),
    "world_step": (
        ("preset", "sampling_steps", "batch", "cache"),
        ["threads", "preset", "sampling_steps", "batch", "cache", "ms_per_frame", "ms_per_frame_amortized", "max_s",
         "fps_per_session", "fps_aggregate", "per_session_vs_b1", "gflop_per_step", "gflops", "of_peak",
         "speedup_vs_jasmine", "n", "others_cores"],
    ),
    "world_history": (
        ("preset", "sampling_steps", "context_frames"),
        ["threads", "preset", "sampling_steps", "context_frames", "ms_cache", "ms_nocache", "nocache_over_cache",
         "others_cores"],
    ),
    "gateway": (
        ("world", "backend", "triton_threads", "store", "sessions"),
        ["world", "backend", "triton_threads", "store", "sessions", "steps_per_session", "p50_ms", "p99_ms", "fps_aggregate",
         "bare_p50_ms", "bare_fps_aggregate", "server_step_ms", "server_model_ms", "server_store_ms", "gateway_overhead",
         "commit_conflicts"],
    ),
    "gateway_redis_memory": (
        ("world",),
        ["world", "idle_sessions", "redis_key_memory_usage", "redis_bytes_per_session_info"],
    ),
    "gateway_soak": (
        ("world", "backend", "store", "soak_sessions"),
        ["world", "backend", "store", "soak_sessions", "soak_seconds", "steps", "fps_aggregate", "p50_ms", "p99_ms", "errors",
         "lost_sessions", "mismatched_sessions", "min_steps_per_session", "gateway_rss_mb_start", "gateway_rss_mb_end"],
    ),
}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def render(rows: list[dict], bench: str) -> str:
    key_fields, columns = TABLES[bench]
    latest: dict[tuple, dict] = {}
    for row in rows:
        if row.get("bench") == bench:
            row = {**row, "threads": row.get("machine", {}).get("threads")}
            latest[tuple(row.get(k) for k in (*key_fields, "threads"))] = row
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in latest.values()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", type=Path, nargs="*", default=[DEFAULT_OUT])
    args = parser.parse_args()
    rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.startswith("{")]
    for bench in TABLES:
        print(f"### {bench}\n\n{render(rows, bench)}\n")


if __name__ == "__main__":
    main()
