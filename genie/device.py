"""Where inference runs and in what precision: --device auto|cpu|cuda[:N], --precision auto|fp32|bf16|int8.

bf16 is worth it on GPUs and on CPUs with bf16 hardware (AVX-512 BF16, AMX); elsewhere torch emulates it and a bf16
matmul runs at ~1 GFLOP/s against ~120 in fp32 (a 2-core AVX2 EPYC), so it is never chosen there by default and is
refused when asked for. int8 (CPU only) computes every Linear layer as int8 x int8 with int32 accumulation
(`genie.nn.int8`) and the rest in fp32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "int8")
def resolve_inference_device(name: str | torch.device) -> torch.device:
    """"auto" = the first GPU when torch sees one, else the CPU; "cpu"; "cuda" / "cuda:N". ValueError when a GPU is
    asked for and absent, or the name is unknown. A torch.device is taken as it is (tests use a stand-in device)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"bad device {name!r}; expected auto, cpu, cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}, but torch sees no CUDA GPU (a CPU build of torch, or no GPU visible); "
                             "use --device cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}, but only {torch.cuda.device_count()} GPU(s) are visible")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that run bf16 matmuls natively
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # ... and int8 dot products (VNNI, AMX)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


# Settings that hold torch's kernels below AVX-512 (a stand-in for an AVX2-only CPU on a newer one, as the benchmarks
# use): torch then cannot use the bf16 units the flags report and emulates bf16, ~18x slower than fp32 (a demo-walk
# dynamics step measured 9.5 s against 0.54 s in fp32).
BELOW_AVX512 = {"ATEN_CPU_CAPABILITY": ("default", "avx2"), "ONEDNN_MAX_CPU_ISA": ("sse41", "avx", "avx2", "avx2_vnni",
                                                                                 "avx2_vnni_2")}


def torch_held_below_avx512() -> bool:
    """Whether the environment holds torch's CPU kernels below AVX-512 (BELOW_AVX512)."""
    return any(os.environ.get(name, "").strip().lower() in values for name, values in BELOW_AVX512.items())


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (AVX-512 BF16 or AMX) and torch may use them."""
    return not torch_held_below_avx512() and any(f in cpu_flags() for f in BF16_CPU_FLAGS)


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX)."""
    return any(f in cpu_flags() for f in INT8_CPU_FLAGS)


def single_process_precision(precision: str, device: str) -> str:
    """What `auto` means where one process serves every session (`genie play`): int8 on a CPU with int8 dot products,
    where it measured 1.35x fp32 at B=1 and the play page 1.3x (benchmarks/README.md, "int8 on a CPU"); otherwise the
    precision as given. Deployments keep `auto` = fp32 on a CPU, so that no two replicas pick different precisions by
    their own CPU flags and give one session different frames."""
    if precision != "auto" or resolve_inference_device(device).type != "cpu" or not cpu_has_int8_dot():
        return precision
    return "int8"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of inference on `device`: bf16 (autocast) or fp32 (int8's Linear layers rescale to fp32).

    auto = bf16 on a GPU, fp32 on any CPU (bf16 on a CPU must be asked for, and its hardware must have it); int8 only
    on a CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"precision int8 runs on a CPU only, not on {device}; use bf16 or fp32 there")
        return torch.float32
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    if device.type == "cpu" and not cpu_has_bf16():
        raise ValueError("precision bf16 on a CPU without bf16 hardware (no AVX-512 BF16 or AMX): torch would emulate "
                         "it at ~1 GFLOP/s; use fp32")
    return torch.bfloat16
