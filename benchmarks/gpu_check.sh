#!/usr/bin/env bash
# Every check of training that needs a GPU, as one prepared run for a session with a lent device (the device
# tool's `run`, which copies this checkout there and returns what lands in $OUT), sized for one 10-minute call:
#   1. tests/train/test_gpu.py (GPU steps match CPU steps, checkpoints cross devices, bf16; nccl with >= 2 GPUs)
#      and tests/train/test_device.py;
#   2. `genie train --device cuda` from the command line;
#   3. bench_distributed.py --device cuda for tokenizer, LAM and dynamics of the largest preset (peer-small) at
#      batch 48 (the paper's CoinRun batch), fp32 (on TF32 cores, the loop's default) and bf16, 1 process per GPU
#      (1 and 2 with 2 GPUs), with the default 2 data workers; then bf16 again with none (what building ahead saves).
# Uses the machine's python3 (it holds torch with CUDA, einops, safetensors, click, tqdm, pytest); nothing is
# installed. Rows go to $OUT/results.jsonl; paste them into benchmarks/README.md with the machine they name.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks" PYTHONUNBUFFERED=1 GENIE_DIST_TIMEOUT_S=120
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())" \
  | tee -a "$OUT/gpu.txt"
status=0

echo "== tests"
for tests in tests/train/test_gpu.py "tests/train/test_device.py tests/train/test_batches.py"; do  # apart: one
  # file that fails to import on the machine's torch must not keep the other from running
  timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib -ra" $tests 2>&1 \
    | tee -a "$OUT/tests.log" || status=1
done

echo "== genie train --device cuda"
timeout 120 python3 -m genie.cli train lam --preset tiny --device cuda --quiet --run-root /tmp/gpu-check-run \
  --set train_lam.steps=20 2>&1 | tee "$OUT/cli.log" || status=1

echo "== bench_distributed --device cuda"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
configs="1x1"
[ "$gpus" -ge 2 ] && configs="1x1 2x1"
for batch in 48; do
  for kind in tokenizer lam dynamics; do
    for bf16 in false true; do
      timeout 150 python3 benchmarks/bench_distributed.py --device cuda --preset peer-small --kind "$kind" \
        --configs $configs --steps 20 --warmup 3 --flops --quiet-wait 0 --out "$OUT/results.jsonl" \
        --set "train_$kind.batch_size=$batch" --set "train_$kind.bf16=$bf16" 2>&1 | tail -3 || status=1
    done
  done
done
for kind in tokenizer lam dynamics; do
  timeout 150 python3 benchmarks/bench_distributed.py --device cuda --preset peer-small --kind "$kind" --configs 1x1 \
    --steps 20 --warmup 3 --quiet-wait 0 --data-workers 0 --out "$OUT/results.jsonl" \
    --set "train_$kind.batch_size=48" --set "train_$kind.bf16=true" 2>&1 | tail -3 || status=1
done
exit $status
