#!/usr/bin/env bash
# Every check of training that needs a GPU, prepared for a session with a lent device (the device tool's `run`,
# which copies this checkout there and returns what lands in $OUT). Parts, each sized for one 10-minute call:
#   bash benchmarks/gpu_check.sh            tests + bench (the first call; ~6 min)
#   bash benchmarks/gpu_check.sh sweep      the batch sweep (~2 min; `tests bench sweep` took 7 min on an H200)
# tests: tests/train/test_gpu.py (GPU steps match CPU steps, checkpoints cross devices, TF32/bf16; nccl with >= 2
#        GPUs), tests/train/test_device.py and test_batches.py, and `genie train --device cuda` from the command line.
# bench: bench_distributed.py --device cuda --flops for the tokenizer, LAM and dynamics of the largest preset
#        (peer-small) at batch 48 (the paper's CoinRun batch), fp32 (on TF32 cores, the loop's default) and bf16,
#        1 process per GPU (1 and 2 with 2 GPUs), with the default data workers; then bf16 with none (what building
#        batches ahead saves).
# sweep: bf16 at batch 96 and 192: where samples/s stops growing, i.e. the largest batch worth running.
# Uses the machine's python3 (it holds torch with CUDA, einops, safetensors, click, tqdm, pytest); nothing is
# installed. Rows go to $OUT/results.jsonl; paste them into benchmarks/README.md with the machine they name.
set -uo pipefail
parts=${*:-tests bench}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks" PYTHONUNBUFFERED=1 GENIE_DIST_TIMEOUT_S=120
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())" \
  | tee -a "$OUT/gpu.txt"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
configs="1x1"
[ "$gpus" -ge 2 ] && configs="1x1 2x1"
status=0

bench() {  # KIND BATCH BF16 [extra bench_distributed args...]
  local kind=$1 batch=$2 bf16=$3
  shift 3
  timeout 150 python3 benchmarks/bench_distributed.py --device cuda --preset peer-small --kind "$kind" \
    --steps 20 --warmup 3 --quiet-wait 0 --out "$OUT/results.jsonl" \
    --set "train_$kind.batch_size=$batch" --set "train_$kind.bf16=$bf16" "$@" 2>&1 | tail -3 || status=1
}

for part in $parts; do
  case $part in
    tests)
      for tests in tests/train/test_gpu.py "tests/train/test_device.py tests/train/test_batches.py"; do
        # apart: a file that fails to import on the machine's torch must not keep the other from running
        timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib -ra" $tests 2>&1 \
          | tee -a "$OUT/tests.log" || status=1
      done
      timeout 120 python3 -m genie.cli train lam --preset tiny --device cuda --quiet --run-root /tmp/gpu-check-run \
        --set train_lam.steps=20 2>&1 | tee -a "$OUT/cli.log" || status=1
      ;;
    bench)
      for kind in tokenizer lam dynamics; do
        for bf16 in false true; do
          bench "$kind" 48 "$bf16" --configs $configs --flops
        done
      done
      for kind in tokenizer lam dynamics; do
        bench "$kind" 48 true --configs 1x1 --data-workers 0
      done
      ;;
    sweep)
      for batch in 96 192; do
        for kind in tokenizer lam dynamics; do
          bench "$kind" "$batch" true --configs 1x1 --flops
        done
      done
      ;;
    *) echo "unknown part $part (tests, bench, sweep)" >&2; exit 2 ;;
  esac
done
exit $status
