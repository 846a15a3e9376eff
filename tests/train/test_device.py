"""Device choice for training: cpu / cuda / auto, the process group's backend, and refusals that write nothing.

What a GPU itself must show (GPU runs match CPU runs, checkpoints cross devices, nccl) is in test_gpu.py, which runs
where torch sees a GPU.
"""

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from genie.build import BuildConfig
from genie.cli import main
from genie.presets import tiny
from genie.train.distributed import Topology, backend_for, resolve_device
from genie.train.loop import train

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def _gpus(monkeypatch, count: int) -> None:
    """Pretends torch sees `count` GPUs (resolve_device only asks; nothing is placed on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cpu_is_the_cpu_whatever_torch_sees(monkeypatch):
    _gpus(monkeypatch, 2)
    assert resolve_device("cpu", Topology(1, 0, 0)) == torch.device("cpu")


def test_auto_takes_the_local_ranks_gpu_when_there_is_one(monkeypatch):
    _gpus(monkeypatch, 0)
    assert resolve_device("auto", Topology(2, 1, 1)) == torch.device("cpu")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto", Topology(2, 1, 1)) == torch.device("cuda", 1)
    assert resolve_device("cuda", Topology(4, 2, 0)) == torch.device("cuda", 0)  # node 2's first process


def test_cuda_without_a_gpu_or_with_too_few_is_a_clear_error(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        resolve_device("cuda", Topology(1, 0, 0))
    _gpus(monkeypatch, 2)
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but this node has 2 visible GPU"):
        resolve_device("cuda", Topology(3, 2, 2))
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu", Topology(1, 0, 0))


def test_gpu_ranks_use_nccl_and_cpu_ranks_gloo():
    assert backend_for(torch.device("cuda", 3)) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def test_an_explicit_cpu_run_is_the_default_cpu_run(tiny_world_cfg, tmp_path):
    """On a machine without a GPU, auto is the CPU: the same steps give the same weights."""
    if torch.cuda.is_available():
        pytest.skip("auto is the GPU here")
    from genie.config import apply_overrides

    cfg = apply_overrides(tiny_world_cfg, ["train_lam.steps=2"])
    a = train("lam", cfg, tmp_path / "a", progress=False, tensorboard=False, device="cpu")
    b = train("lam", cfg, tmp_path / "b", progress=False, tensorboard=False)
    assert a.losses == b.losses


@NO_GPU
def test_train_cli_refuses_cuda_without_a_gpu_and_writes_nothing(tmp_path):
    result = CliRunner().invoke(main, ["train", "lam", "--preset", "tiny", "--run-root", str(tmp_path / "runs"),
                                       "--device", "cuda", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "torch sees no CUDA GPU" in result.output
    assert not (tmp_path / "runs").exists()


def test_train_cli_refuses_an_unknown_device(tmp_path):
    result = CliRunner().invoke(main, ["train", "lam", "--preset", "tiny", "--run-root", str(tmp_path / "runs"),
                                       "--device", "gpu0", "--quiet"])
    assert result.exit_code == 2 and "unknown device 'gpu0'" in result.output
    assert not (tmp_path / "runs").exists()


@NO_GPU
def test_world_build_refuses_cuda_without_a_gpu_before_training(tmp_path):
    from genie.build import build_world

    cfg = BuildConfig(world=tiny(), out=str(tmp_path / "world"), device="cuda")
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        build_world(cfg)
    assert not (tmp_path / "world").exists() and not cfg.runs.exists()
    with pytest.raises(ValueError, match="unknown device"):
        BuildConfig(world=tiny(), out=str(tmp_path / "world"), device="mps")


@NO_GPU
def test_torchrun_ranks_asking_for_gpus_fail_fast_without_them(tmp_path):
    """Two ranks with --device cuda on a GPU-less node: each exits with the reason, the launcher reports failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "genie.cli",
           "train", "lam", "--preset", "tiny", "--quiet", "--run-root", str(tmp_path), "--device", "cuda"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "torch sees no CUDA GPU" in done.stderr
    assert not any(line.startswith("{") for line in done.stdout.splitlines())
    assert not (tmp_path / "lam").exists()
