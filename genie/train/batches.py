"""The micro-batches one rank trains on, in step order, built in the training process or ahead of it by workers.

A GPU step can take less time than building its batch on the CPU (peer-small at batch 48: the LAM's ~0.7 TFLOP step
against ~60 ms of clip building on one core), so on a GPU DataLoader worker processes build the next batches while
the current step runs, into pinned memory for an asynchronous copy. Batches are a function of (seed, step) alone, so
workers change when a batch is built, never which: results are identical with any number of workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from genie.data.source import VideoBatch, VideoSource
from genie.train.distributed import batch_rows

log = logging.getLogger(__name__)
# Default worker processes per GPU rank: half the node's CPUs shared among its ranks, at least 2, at most 8 (on the
# CPU: 0, the step itself needs the cores). On an H200 with 16 cores, 2 workers left the peer-small LAM at batch 192
# waiting on its batches for 53% of each step (benchmarks/README.md); batches there take ~0.25 s to build per core.
MIN_GPU_WORKERS, MAX_GPU_WORKERS = 2, 8


def gpu_workers() -> int:
    """The default number of data workers for one GPU rank on this node (torchrun's LOCAL_WORLD_SIZE ranks)."""
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(MAX_GPU_WORKERS, max(MIN_GPU_WORKERS, cpus // (2 * ranks)))


class StepBatches(Dataset):
    """Item i: micro-batch i % accum of step start + i // accum, i.e. rows [first + m * micro, ... + micro) of that
    step's global batch of `batch_size`."""

    def __init__(self, source: VideoSource, start: int, end: int, batch_size: int, first: int, micro: int,
                 accum: int) -> None:
        self.source, self.start, self.end = source, start, end
        self.batch_size, self.first, self.micro, self.accum = batch_size, first, micro, accum

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accum

    def __getitem__(self, i: int) -> VideoBatch:
        step, m = divmod(i, self.accum)
        lo = self.first + m * self.micro
        return batch_rows(self.source, self.start + step, self.batch_size, lo, lo + self.micro)


def resolve_workers(requested: int | None, device: torch.device) -> int:
    """Worker processes for a run: `requested`, or by default gpu_workers() on a GPU and 0 on the CPU. A daemonic
    process (a Celery prefork child) cannot start children, so it builds its batches itself."""
    if requested is not None and requested < 0:
        raise ValueError(f"data workers must be >= 0, got {requested}")
    workers = requested if requested is not None else (gpu_workers() if device.type == "cuda" else 0)
    if workers and multiprocessing.current_process().daemon:
        log.warning("a daemonic process cannot start data workers: building batches in the training process")
        return 0
    return workers


def _same(batch: VideoBatch) -> VideoBatch:
    return batch


def stream(dataset: StepBatches, workers: int, device: torch.device) -> Iterator[VideoBatch]:
    """The dataset's items in order: built here when workers == 0, else by `workers` processes, a few items ahead."""
    pin = device.type == "cuda"
    if workers == 0:
        for i in range(len(dataset)):
            yield dataset[i]
        return
    # Its own generator: starting workers draws their base seed, which must not move the global generator the
    # VQ dead-code resets draw from (the run would then depend on the number of workers).
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_same,
                        prefetch_factor=2, persistent_workers=False, multiprocessing_context="fork",
                        worker_init_fn=_one_thread, generator=torch.Generator())
    it = iter(loader)
    try:
        for batch in it:  # in index order whatever the number of workers
            yield batch.apply(torch.Tensor.pin_memory) if pin else batch
    finally:
        it._shutdown_workers()  # also when the run stops early: no worker outlives the run


def _one_thread(_: int) -> None:
    # Each worker builds whole batches; torch intra-op threads in every worker would oversubscribe the cores.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
