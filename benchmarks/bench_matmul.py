"""The measured matmul peak of this machine: the denominator of every model-FLOP/s figure.

Square fp32 torch.mm at several sizes (best and median of several reps), plus two informational rows:
bf16 at the same sizes (fast on CPUs with AVX512_BF16/AMX) and the small, skinny shapes a B=1 world
step actually multiplies, which run below the square peak.
"""

from __future__ import annotations

import torch
from common import base_parser, emit, matmul_gflops, rounded, setup_run

# (M, K, N) of the dynamics model's matmuls at B=1: M = tokens of one frame, K/N = model and FFN widths.
MODEL_SHAPES = ((64, 256, 768), (64, 256, 1024), (64, 1024, 256), (256, 256, 768), (256, 256, 1024), (256, 1024, 256))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 1536, 2048])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    parser.add_argument("--no-model-shapes", action="store_true", help="skip the model-shaped rows")
    args = parser.parse_args()
    machine = setup_run(args)

    dtypes = [torch.float32] if args.no_bf16 else [torch.float32, torch.bfloat16]
    best = {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for n in args.sizes:
            g = matmul_gflops(n, args.reps, dtype)
            best[name] = max(best.get(name, 0.0), max(g.times))
            row = {"best_gflops": max(g.times), "median_gflops": g.median, "reps": args.reps}
            row = {**rounded(row, 1), "others_cores": g.others_cores and round(g.others_cores, 2)}
            emit({"bench": "matmul", "dtype": name, "m": n, "k": n, "n": n, **row}, machine, args.out)
        emit({"bench": "matmul_peak", "dtype": name, "peak_gflops": round(best[name], 1)}, machine, args.out)

    if not args.no_model_shapes:
        for m, k, n in MODEL_SHAPES:
            g = matmul_gflops(n, args.reps, torch.float32, m=m, k=k)
            row = {"best_gflops": max(g.times), "median_gflops": g.median, "of_peak": max(g.times) / best["float32"]}
            row["others_cores"] = g.others_cores
            emit({"bench": "matmul", "dtype": "float32", "m": m, "k": k, "n": n, **rounded(row, 3)}, machine, args.out)


if __name__ == "__main__":
    main()
