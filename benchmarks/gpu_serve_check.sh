#!/usr/bin/env bash
# Every check of serving that needs a GPU, prepared for one call of a lent device (the device tool's `run`, which
# copies this checkout there and returns what lands in $OUT). All parts in one call: ~6-8 minutes on an H200.
#   bash benchmarks/gpu_serve_check.sh                 tests + engine + triton
#   bash benchmarks/gpu_serve_check.sh engine          one part (tests | engine | triton)
# tests:  tests/test_sampling_gpu.py (strict fp32 GPU tokens vs the CPU's, bf16 frames vs fp32 in PSNR, pool hit vs
#         miss and fixed vs sized shapes, on the demo world's weights), test_device.py and test_kvpool.py.
# engine: bench_world.py on the GPU in bf16: the demo world at B=1 (ms/frame) and a batch sweep (aggregate frames/s,
#         % of the bf16 matmul peak measured in the same run), fixed shapes at B=1, peer-small at 8 MaskGIT steps,
#         and a paper-size world with random weights (patch 4 -> 256 tokens/frame, dynamics d=512, 12 layers, 25 steps).
# triton: `genie triton serve --device gpu` on the demo world and bench_triton_sessions.py with many concurrent
#         sessions at 24 frames/s each, over several client processes. Needs tritonclient and nvidia-pytriton on the
#         machine; without them the part says so and is skipped (no network there to install them).
# Uses the machine's python3 (torch with CUDA, einops, safetensors, click, pytest); nothing is installed. Rows go to
# $OUT/results.jsonl; paste them into benchmarks/README.md with the machine they name.
set -uo pipefail
parts=${*:-tests engine triton}
OUT=${OUT:-/tmp/gpu-serve-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
status=0

world() {  # bench_world.py on the GPU in bf16, rows to $OUT/results.jsonl
  timeout "$1" python3 benchmarks/bench_world.py --device cuda --precision bf16 --modes cache --quiet-wait 0 \
    --out "$OUT/results.jsonl" "${@:2}" 2>&1 | tail -n 20 | tee -a "$OUT/engine.log" || status=1
}

for part in $parts; do
  case $part in
    tests)
      timeout 240 python3 -m pytest -q -s -p no:cacheprovider -o addopts="--import-mode=importlib -ra" \
        tests/test_sampling_gpu.py tests/test_device.py tests/test_kvpool.py 2>&1 | tee -a "$OUT/tests.log" || status=1
      ;;
    engine)
      world 120 --preset demo --batch-sizes 1 64 256 1024 --budget-s 8 --sweep 1 7 --sweep-reps 10
      world 60 --preset demo --fixed-shapes --batch-sizes 1 --sweep
      world 60 --preset peer-small --sampling-steps 8 --batch-sizes 1 --sweep
      world 150 --preset peer-small --sampling-steps 25 --batch-sizes 1 16 64 --budget-s 10 --sweep \
        --set dynamics.transformer.dim=512 --set dynamics.transformer.depth=12
      ;;
    triton)
      if ! python3 -c "import tritonclient.grpc, pytriton" 2>/dev/null; then
        echo "SKIPPED triton: tritonclient or nvidia-pytriton is not installed on this machine" | tee -a "$OUT/triton.log"
        continue
      fi
      timeout 200 python3 benchmarks/bench_triton_sessions.py --device gpu --world worlds/demo --sessions 64 256 512 \
        --processes 8 --fps 24 --steps 48 --out "$OUT/results.jsonl" 2>&1 | tail -n 20 | tee -a "$OUT/triton.log" || status=1
      ;;
    *)
      echo "unknown part $part (tests | engine | triton)" >&2
      exit 2
      ;;
  esac
done
exit $status
