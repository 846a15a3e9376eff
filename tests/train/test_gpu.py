"""Training on a GPU: the same steps as on the CPU, checkpoints that cross devices, nccl across GPUs.

Skipped where torch sees no GPU (CI); `benchmarks/gpu_check.sh` runs this file on a lent GPU. TF32 is off
(train_*.tf32=false) so that GPU matmuls are true fp32 and comparable with the CPU's within float tolerance.
"""

import os
import subprocess
import sys

import pytest
import torch

from genie.config import apply_overrides
from genie.train.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP32 = [f"train_{k}.tf32=false" for k in ("tokenizer", "lam", "dynamics")]
STEPS = ["train_tokenizer.steps=4", "train_lam.steps=4", "train_dynamics.steps=4", *FP32]
TOL = {"rtol": 1e-3, "atol": 1e-4}  # GPU kernels sum in another order than the CPU's


def _run(kind, cfg, run_dir, device, **kw):
    return train(kind, cfg, run_dir, progress=False, tensorboard=False, device=device, **kw)


@pytest.mark.parametrize("kind", ["tokenizer", "lam", "dynamics"])
def test_gpu_steps_match_cpu_steps(kind, tiny_world_cfg, tmp_path, runs):
    cfg = apply_overrides(tiny_world_cfg, STEPS)
    frozen = runs.untrained_frozen(cfg, tmp_path / "frozen") if kind == "dynamics" else None
    cpu = _run(kind, cfg, tmp_path / "cpu", "cpu", frozen=frozen)
    gpu = _run(kind, cfg, tmp_path / "gpu", "cuda", frozen=frozen)
    assert gpu.losses == pytest.approx(cpu.losses, rel=1e-3)  # same data, same masks (drawn on the CPU), same math
    runs.assert_close(tmp_path / "cpu", tmp_path / "gpu", **TOL)


def test_checkpoints_cross_devices_both_ways(tiny_world_cfg, tmp_path, runs):
    """GPU for 2 steps -> CPU to 4 -> GPU to 6 is the same run as 6 steps on the CPU."""
    cfg = apply_overrides(tiny_world_cfg, ["train_tokenizer.steps=6", *FP32])
    straight = _run("tokenizer", cfg, tmp_path / "straight", "cpu")
    run = tmp_path / "mixed"
    _run("tokenizer", cfg, run, "cuda", stop_after=2)
    middle = _run("tokenizer", cfg, run, "cpu", stop_after=4)
    last = _run("tokenizer", cfg, run, "cuda")
    assert (middle.resumed_from, last.resumed_from, last.step) == (2, 4, 6)
    assert last.losses == pytest.approx(straight.losses[4:], rel=1e-3)
    runs.assert_close(tmp_path / "straight", run, **TOL)


@pytest.mark.parametrize("sets", [["train_lam.bf16=true"], ["train_lam.tf32=true"]], ids=["bf16", "tf32"])
def test_reduced_precision_trains_on_the_gpu_and_leaves_torch_as_it_was(sets, tiny_world_cfg, tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32
    cpu = _run("lam", apply_overrides(tiny_world_cfg, ["train_lam.steps=3", "train_lam.tf32=false"]), tmp_path / "cpu", "cpu")
    gpu = _run("lam", apply_overrides(tiny_world_cfg, ["train_lam.steps=3", *sets]), tmp_path / "gpu", "cuda")
    assert gpu.step == 3 and gpu.losses == pytest.approx(cpu.losses, rel=5e-2)  # close, not equal: fewer mantissa bits
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl across processes needs 2 GPUs")
def test_two_gpus_under_nccl_match_one(tiny_world_cfg, tmp_path, runs):
    sets = ["train_tokenizer.steps=4", "tokenizer.vq.reset_after=2", *FP32]  # resets gather over nccl too
    one = _run("tokenizer", apply_overrides(tiny_world_cfg, sets), tmp_path / "one", "cuda")
    assert one.step == 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "genie.cli",
           "train", "tokenizer", "--preset", "tiny", "--quiet", "--device", "cuda", "--run-root", str(tmp_path / "two"),
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "GENIE_DIST_TIMEOUT_S": "60"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs.assert_close(tmp_path / "one", tmp_path / "two" / "tokenizer", **TOL)
