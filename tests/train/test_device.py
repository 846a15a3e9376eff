"""Device choice for training: cpu / cuda / auto, the process group's backend, refusals that write nothing, and
a training step that keeps every tensor on the model's device.

The last is checked without a GPU: the models, batches and frozen models go to a stand-in device (FakeTensorMode
tensors on "meta", which compute shapes only), and any op that mixes it with a CPU tensor raises, as it would on
CUDA. What a real GPU must show (GPU runs match CPU runs, checkpoints cross devices, nccl) is in test_gpu.py, which
runs where torch sees a GPU.
"""

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from genie.build import BuildConfig
from genie.cli import main
from genie.config import apply_overrides
from genie.data import make_source
from genie.data.source import VideoBatch
from genie.presets import tiny
from genie.train import loop
from genie.train.checkpoint import build_model
from genie.train.distributed import SlicedDraws, Topology, backend_for, resolve_device
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


# --- one training step on a stand-in device --------------------------------------------------------------------------
OTHER = torch.device("meta")  # the stand-in for cuda: any op mixing it with a CPU tensor fails, as on a GPU


@pytest.fixture
def fake_mode():
    # ShapeEnv: boolean-mask indexing and .item() (the losses' logs) become symbols instead of failing.
    return FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True), allow_non_fake_inputs=True)


def _on_other_device(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """`model` with its parameters and buffers on OTHER (Module.to cannot swap in fake tensors: done by hand)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(FakeTensor(mode, torch.empty_like(p, device="meta"), OTHER),
                                                        requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = FakeTensor(mode, torch.empty_like(b, device="meta"), OTHER)
    return model


def _world():
    # No dead-code resets: whether one fires depends on values, which a stand-in tensor does not have.
    return apply_overrides(tiny(), ["tokenizer.vq.reset_after=0", "lam.vq.reset_after=0"])


def _step(objective, model: nn.Module, batch, gen: torch.Generator, rows: slice | None = None) -> None:
    """The loop's step: objective, backward, gradient clipping, AdamW (built as the loop builds it)."""
    opt = torch.optim.AdamW(loop._param_groups(model, 0.05), lr=1e-3)
    loss, logs = objective(batch, gen, rows)
    loss.backward()
    assert loss.device == OTHER and "loss" in logs
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device == OTHER for g in grads)
    assert nn.utils.clip_grad_norm_(model.parameters(), 1.0).device == OTHER
    opt.step()
    moments = [v for state in opt.state.values() for k, v in state.items() if k != "step"]  # step: a CPU count
    assert moments and all(m.device == OTHER for m in moments)


@pytest.mark.parametrize("kind", ["tokenizer", "lam"])
def test_a_training_step_keeps_everything_on_the_models_device(kind, fake_mode):
    world = _world()
    model = _on_other_device(build_model(kind, world.model_config(kind)), fake_mode)
    cpu_batch = make_source(world.data).batch(0, 2)
    with fake_mode:
        batch = loop._to(cpu_batch, OTHER)
        assert batch.frames.device == OTHER
        _step(loop._objective(kind, model, world, None), model, batch, loop._step_generator(world.train_lam, 0))


@pytest.mark.parametrize("rows", [None, slice(2, 4)], ids=["whole batch", "one rank's rows"])
def test_a_dynamics_step_moves_its_cpu_drawn_masks_to_the_models_device(rows, fake_mode, monkeypatch):
    """Masks and action dropout are drawn on the CPU from the step generator (also sliced, as under DDP), then
    moved: tokens, actions, masks and the loss all meet on the model's device."""
    # A rank's loss weight is CPU arithmetic on replayed draws (exact values, tested in test_distributed.py); under
    # the fake mode those draws have no values, so it is a constant here.
    monkeypatch.setattr(loop, "_masked_share", lambda *args: 0.5)
    world = apply_overrides(_world(), ["dynamics.action_dropout=0.1"])
    models = {k: _on_other_device(build_model(k, world.model_config(k)), fake_mode) for k in ("tokenizer", "lam", "dynamics")}
    for k in ("tokenizer", "lam"):
        models[k].requires_grad_(False)
    total = 4
    cpu_batch = make_source(world.data).batch(0, total)
    objective = loop._dynamics_objective(models["dynamics"], models["tokenizer"], models["lam"], world.dynamics, total)
    gen = loop._step_generator(world.train_dynamics, 0)
    with fake_mode:
        if rows is None:
            _step(objective, models["dynamics"], loop._to(cpu_batch, OTHER), gen)
        else:
            part = loop._to(cpu_batch.apply(lambda t: t[rows]), OTHER)
            with SlicedDraws(gen, rows, total):
                _step(objective, models["dynamics"], part, gen, rows)


def test_the_stand_in_device_catches_a_cpu_tensor_in_the_step(fake_mode):
    """The check above can fail: a forward that adds a tensor made on the CPU is refused."""

    class Careless(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x * self.w + torch.zeros(3)).sum()  # torch.zeros without device=: the CPU

    model = _on_other_device(Careless(), fake_mode)
    # A RuntimeError naming both devices (torch 2.13 words it "...devices, cpu and meta", 2.11 "...devices meta, cpu").
    with fake_mode, pytest.raises(RuntimeError, match=r"devices.*(cpu.*meta|meta.*cpu)"):
        model(loop._to(VideoBatch(torch.ones(3), None), OTHER).frames)
