"""Data-parallel training under torchrun: device, process group, per-rank batch rows, world-size-independent randomness.

The global batch of step s is the same B samples whatever the world size W and accumulation A: rank r takes rows
[r*B/W, (r+1)*B/W) and splits them into A micro-batches. Everything random in a step is drawn as if for the
whole batch and then sliced, so 1 process and W processes train on the same samples with the same masks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from genie.config import check_device
from genie.data.source import VideoBatch, VideoSource
from genie.nn.vq import VectorQuantizer

log = logging.getLogger(__name__)
TIMEOUT_ENV = "GENIE_DIST_TIMEOUT_S"  # seconds a collective may wait for a lost rank before failing
DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Topology:
    world: int  # W processes
    rank: int
    local_rank: int
    device: torch.device = torch.device("cpu")  # where this rank trains; collectives run on it too (nccl needs CUDA)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        """Rank 0 alone writes checkpoints, world.json, TensorBoard and the progress bar."""
        return self.rank == 0


def topology() -> Topology:
    """The process layout torchrun describes in WORLD_SIZE / RANK / LOCAL_RANK (one process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return Topology(world, rank, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(requested: str, topo: Topology) -> torch.device:
    """The device this rank trains on: "cpu"; "cuda" = cuda:LOCAL_RANK (one GPU per torchrun process on a
    node); "auto" = cuda when torch sees a GPU, else cpu. Raises ValueError when CUDA is asked for and absent."""
    check_device(requested)
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU (a CPU build of torch, or no GPU visible); "
                         "use --device cpu or auto")
    count = torch.cuda.device_count()
    if topo.local_rank >= count:
        raise ValueError(f"LOCAL_RANK={topo.local_rank} but this node has {count} visible GPU(s): "
                         f"run at most {count} processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", topo.local_rank)


def backend_for(device: torch.device) -> str:
    """nccl for GPU ranks, gloo for CPU ranks."""
    return "nccl" if device.type == "cuda" else "gloo"


def check_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """The micro-batch each rank runs; raises when the global batch does not split evenly."""
    if batch_size % (world * grad_accum):
        raise ValueError(
            f"global batch_size={batch_size} does not divide by world size {world} x grad_accum {grad_accum}; "
            f"choose a batch_size that is a multiple of {world * grad_accum}"
        )
    return batch_size // (world * grad_accum)


def init(topo: Topology) -> bool:
    """Selects this rank's GPU and joins the process group (nccl on GPUs, gloo on CPUs); True when this call
    created the group."""
    if topo.device.type == "cuda":
        torch.cuda.set_device(topo.device)
    if not topo.distributed or dist.is_initialized():
        return False
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend_for(topo.device), timeout=timeout)
    log.info("rank %d of %d joined the process group (%s)", topo.rank, topo.world, backend_for(topo.device))
    return True


def shutdown() -> None:
    dist.destroy_process_group()


def barrier(topo: Topology) -> None:
    if topo.distributed:
        dist.barrier()


def broadcast_int(value: int, topo: Topology) -> int:
    """Rank 0's value on every rank."""
    if not topo.distributed:
        return value
    t = torch.tensor([value], dtype=torch.long, device=topo.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def mean_logs(logs: list[dict[str, float]], topo: Topology) -> dict[str, float]:
    """Averages per-micro-batch scalars over micro-batches and ranks (equal sizes, so the global-batch mean)."""
    names = list(logs[0])
    local = torch.tensor([[m[k] for k in names] for m in logs], dtype=torch.float64).mean(0)  # (L,)
    if topo.distributed:
        local = local.to(topo.device)
        dist.all_reduce(local)
        local /= topo.world
    return dict(zip(names, local.cpu().tolist(), strict=True))


def batch_rows(source: VideoSource, step: int, batch_size: int, start: int, stop: int) -> VideoBatch:
    """Rows [start, stop) of step's global batch; sources with `batch_rows` build only those clips."""
    if hasattr(source, "batch_rows"):
        return source.batch_rows(step, batch_size, start, stop)
    full = source.batch(step, batch_size)
    return full.apply(lambda t: t[start:stop])


class SlicedDraws(TorchFunctionMode):
    """Makes `torch.rand`/`torch.randn` with `generator` draw for all `total` rows of the batch and keep `rows`.

    A model draws its per-sample randomness (MaskGIT masks, action dropout) as (b, ...) tensors from one
    generator; drawn for the global batch and sliced, each sample gets the numbers it gets in one process.
    """

    def __init__(self, generator: torch.Generator, rows: slice, total: int) -> None:
        super().__init__()
        self.generator, self.rows, self.total = generator, rows, total

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.rand, torch.randn) and kwargs.get("generator") is self.generator:
            size = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
            local = self.rows.stop - self.rows.start
            assert size and size[0] == local, f"a draw of {size} from the step generator, expected ({local}, ...)"
            return func(self.total, *size[1:], **kwargs)[self.rows]
        return func(*args, **kwargs)


class GlobalCodeReset:
    """Stands in for one VectorQuantizer's dead-code reset so that it runs once per step on the global batch.

    Usage counts and encoder outputs of every micro-batch and rank are gathered (in global row order) and the
    original reset runs on them with the same global RNG on every rank: the codebook stays identical across
    ranks and equal to a single process's.
    """

    def __init__(self, vq: VectorQuantizer, topo: Topology) -> None:
        self.reset = vq._reset_dead_codes  # the bound original
        self.topo = topo
        self.counts: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.last_micro = True  # set by the loop: the micro-batch that completes the step

    def __call__(self, counts: Tensor, outputs: Tensor) -> None:
        self.counts.append(counts)
        self.outputs.append(outputs)
        if not self.last_micro:
            return
        counts, outputs = torch.stack(self.counts).sum(0), torch.cat(self.outputs)  # (K,), (M, code_dim)
        self.counts, self.outputs = [], []
        if self.topo.distributed:
            dist.all_reduce(counts)
            parts = [torch.empty_like(outputs) for _ in range(self.topo.world)]
            dist.all_gather(parts, outputs.contiguous())
            outputs = torch.cat(parts)  # (W*M, code_dim)
        self.reset(counts, outputs)


def install_code_resets(model: nn.Module, topo: Topology) -> list[GlobalCodeReset]:
    resets = []
    for module in model.modules():
        if isinstance(module, VectorQuantizer):
            resets.append(GlobalCodeReset(module, topo))
            module._reset_dead_codes = resets[-1]
    return resets


def remove_code_resets(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, VectorQuantizer) and "_reset_dead_codes" in vars(module):
            del module._reset_dead_codes
