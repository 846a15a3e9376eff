"""Inference device and precision: auto picks a GPU only when there is one, bf16 never by default on a CPU and
never on a CPU without bf16 hardware; engines put everything on their device (checked on a stand-in device)."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from genie import device as dev
from genie.models.dynamics import DynamicsModel
from genie.models.tokenizer import VideoTokenizer
from genie.presets import tiny
from genie.sampling import DynamicsEngine, FrameDecoder, SamplingConfig, World, _Engine, new_state


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_the_first_gpu_only_when_there_is_one(monkeypatch):
    _gpus(monkeypatch, 0)
    assert dev.resolve_inference_device("auto") == torch.device("cpu")
    _gpus(monkeypatch, 2)
    assert dev.resolve_inference_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_inference_device("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve_inference_device("cpu") == torch.device("cpu")


def test_bad_or_absent_devices_are_clear_errors(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        dev.resolve_inference_device("cuda")
    _gpus(monkeypatch, 1)
    with pytest.raises(ValueError, match="only 1 GPU"):
        dev.resolve_inference_device("cuda:3")
    for bad in ("tpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="device"):
            dev.resolve_inference_device(bad)


@pytest.mark.parametrize("has_bf16", [False, True])
def test_precision_never_bf16_on_a_cpu_by_default(monkeypatch, has_bf16):
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: has_bf16)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert dev.resolve_precision("auto", cpu) == torch.float32
    assert dev.resolve_precision("fp32", gpu) == torch.float32
    assert dev.resolve_precision("auto", gpu) == dev.resolve_precision("bf16", gpu) == torch.bfloat16
    if has_bf16:
        assert dev.resolve_precision("bf16", cpu) == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="without bf16 hardware"):
            dev.resolve_precision("bf16", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        dev.resolve_precision("fp8", cpu)


def test_int8_runs_on_a_cpu_only():
    """int8's Linear layers rescale to fp32, so the engines' compute dtype is fp32; on a GPU it is refused."""
    assert dev.resolve_precision("int8", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="CPU only"):
        dev.resolve_precision("int8", torch.device("cuda", 0))


def test_cpu_bf16_and_int8_detection_reads_the_flags(monkeypatch, tmp_path):
    for flags, bf16, int8 in (("fpu avx2 fma", False, False), ("fpu avx512f avx512_bf16 avx512_vnni", True, True),
                              ("amx_bf16 amx_tile", True, False), ("avx2 avx_vnni", False, True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(dev, "Path", lambda _p, info=info: info)
        dev.cpu_flags.cache_clear()
        assert (dev.cpu_has_bf16(), dev.cpu_has_int8_dot()) == (bf16, int8)
    dev.cpu_flags.cache_clear()


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"},
                                 {"ATEN_CPU_CAPABILITY": "default"}])
def test_no_bf16_when_torch_is_held_below_avx512(monkeypatch, env):
    monkeypatch.setattr(dev, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    for name in dev.BELOW_AVX512:
        monkeypatch.delenv(name, raising=False)
    assert dev.cpu_has_bf16()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")  # not below AVX-512: the units stay usable
    assert dev.cpu_has_bf16()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert not dev.cpu_has_bf16()


@pytest.mark.parametrize("int8_dot", [False, True])
def test_one_process_reads_auto_as_int8_on_a_cpu_with_int8_dot_products(monkeypatch, int8_dot):
    monkeypatch.setattr(dev, "cpu_has_int8_dot", lambda: int8_dot)
    assert dev.single_process_precision("auto", "cpu") == ("int8" if int8_dot else "auto")
    assert dev.single_process_precision("fp32", "cpu") == "fp32"  # an explicit choice stands
    _gpus(monkeypatch, 1)
    assert dev.single_process_precision("auto", "auto") == "auto"  # a GPU: bf16, as auto says there


def test_an_engine_on_a_cpu_without_bf16_runs_fp32_and_refuses_bf16(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    cfg = tiny()
    engine = DynamicsEngine(DynamicsModel(cfg.dynamics), device="cpu")
    assert engine.dtype == torch.float32 and engine.pool.k.dtype == torch.float32
    with pytest.raises(ValueError, match="without bf16 hardware"):
        World(VideoTokenizer(cfg.tokenizer), DynamicsModel(cfg.dynamics), precision="bf16")


def test_bf16_engines_on_a_cpu_precast_their_own_copy_and_step_as_autocast_would(monkeypatch):
    """On a CPU in bf16 the engines keep a copy of their model with the Linear weights in bf16 (the decoder's only:
    the encoder runs in fp32); the caller's model is untouched and the tokens and frames are those of casting at
    every call."""
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)  # torch emulates bf16 where the CPU lacks it: same values
    cfg = tiny()
    torch.manual_seed(0)
    dynamics, tokenizer = DynamicsModel(cfg.dynamics).eval(), VideoTokenizer(cfg.tokenizer).eval()
    n = cfg.dynamics.tokens_per_frame
    states = [new_state(f"s{i}", torch.randint(0, cfg.dynamics.num_tokens, (t, n)), seed=i) for i, t in enumerate((1, 3))]
    sampling = SamplingConfig(steps=3, temperature=1.0)

    def run():
        engine = DynamicsEngine(dynamics, cache_bytes=0, precision="bf16")
        decoder = FrameDecoder(tokenizer, cache_bytes=0, precision="bf16")
        return engine, decoder, engine.next_tokens(states, [1, 2], sampling), decoder.decode_last(states)

    engine, decoder, tokens, frames = run()
    assert engine.dynamics is not dynamics and decoder.tokenizer is not tokenizer
    assert all(m.weight.dtype == torch.bfloat16 for m in engine.dynamics.modules() if isinstance(m, nn.Linear))
    assert decoder.tokenizer.dec_out.weight.dtype == torch.bfloat16
    assert decoder.tokenizer.enc_in.weight.dtype == torch.float32  # encode runs in fp32
    assert all(p.dtype == torch.float32 for p in [*dynamics.parameters(), *tokenizer.parameters()])  # the caller's
    video = torch.randint(0, 256, (1, 2, *cfg.tokenizer.frame.__dict__.values()), dtype=torch.uint8)
    torch.testing.assert_close(decoder.encode(video), FrameDecoder(tokenizer, cache_bytes=0, precision="fp32").encode(video))
    world = World(tokenizer, dynamics, sampling, precision="bf16")  # its public models are the caller's, in fp32
    assert world.tokenizer is tokenizer and world.dynamics is dynamics
    assert world.tokenizer.decode(torch.zeros(1, 1, n, dtype=torch.long)).dtype == torch.float32  # no autocast here
    monkeypatch.setattr(_Engine, "_precast", lambda self, parts: None)  # autocast casts at every call instead
    plain, _, tokens_cast, frames_cast = run()
    assert plain.dynamics is dynamics
    assert torch.equal(tokens, tokens_cast) and torch.equal(frames, frames_cast)


# --- every engine's step on a stand-in device -------------------------------------------------------------------------
OTHER = torch.device("meta")  # the stand-in for cuda: an op mixing it with a CPU tensor fails, as on a GPU


def _on_other_device(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(FakeTensor(mode, torch.empty_like(p, device="meta"), OTHER),
                                                        requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = FakeTensor(mode, torch.empty_like(b, device="meta"), OTHER)
    return model


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["sized", "fixed shapes"])
def test_engines_keep_every_tensor_on_their_device(fixed_shapes):
    """A whole step (history rebuild, MaskGIT with counter noise, commit, decode) on the stand-in device, in both
    layouts. (The sessions' states are CPU tensors the engine reads on the host, so scalar reads are allowed here;
    that a fixed-shape step never waits on the GPU is checked on a GPU, under torch.cuda.set_sync_debug_mode.)"""
    mode = FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True), allow_non_fake_inputs=True)
    cfg = tiny()
    dynamics = _on_other_device(DynamicsModel(cfg.dynamics).eval(), mode)
    tokenizer = _on_other_device(VideoTokenizer(cfg.tokenizer).eval(), mode)
    n = cfg.dynamics.tokens_per_frame
    states = [new_state(f"s{i}", torch.randint(0, cfg.dynamics.num_tokens, (t, n)), seed=i) for i, t in enumerate((1, 3))]
    with mode:
        engine = DynamicsEngine(dynamics, cache_bytes=0, device=OTHER, precision="fp32", fixed_shapes=fixed_shapes)
        decoder = FrameDecoder(tokenizer, cache_bytes=0, device=OTHER, precision="fp32")
        assert engine.pool.k.device == OTHER
        tokens = engine.next_tokens(states, [1, 2], SamplingConfig(steps=3, temperature=1.0, choice_temperature=1.0))
        assert tokens.shape == (2, n) and tokens.device == torch.device("cpu")
        frames = decoder.decode_last(states)
        assert frames.shape == (2, *cfg.tokenizer.frame.__dict__.values()) and frames.device == torch.device("cpu")


def test_the_stand_in_device_catches_a_cpu_tensor():
    """The check above can fail: a model that adds a CPU tensor to its device's tensors is refused."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    layer = _on_other_device(nn.Linear(3, 3), mode)
    with mode, pytest.raises(RuntimeError, match=r"devices.*(cpu.*meta|meta.*cpu)"):
        layer(torch.ones(3, device=OTHER)) + torch.zeros(3)
