"""Batches built ahead by data workers: the same run as building them in the loop, and no worker outlives it."""

import multiprocessing
import os
from types import SimpleNamespace

import pytest
import torch

from genie.config import apply_overrides
from genie.data import make_source
from genie.train import batches
from genie.train.checkpoint import latest_checkpoint
from genie.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(cfg, run_dir, workers, **kw):
    # The CPU, also on a GPU machine: bit-identical results are a claim about batches, and GPU kernels need not be
    # bitwise reproducible.
    return train("tokenizer", cfg, run_dir, progress=False, tensorboard=False, data_workers=workers, device="cpu", **kw)


@pytest.mark.parametrize("sets", [[], ["train_tokenizer.grad_accum=2"]], ids=["one batch", "two micro-batches"])
def test_workers_build_the_same_batches_in_the_same_order(sets, tiny_world_cfg, tmp_path, runs):
    # reset_after=2: dead-code resets, which draw from the global generator, fire within the 4 steps
    cfg = apply_overrides(tiny_world_cfg, ["train_tokenizer.steps=4", "tokenizer.vq.reset_after=2", *sets])
    here = _run(cfg, tmp_path / "here", 0)
    ahead = _run(cfg, tmp_path / "ahead", 2)
    assert ahead.losses == here.losses
    a, b = runs.weights(tmp_path / "here"), runs.weights(tmp_path / "ahead")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "data_s" in ahead.logs and ahead.logs["data_s"] >= 0
    assert not multiprocessing.active_children()


def test_a_resumed_run_with_workers_continues_from_its_step(tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_tokenizer.steps=4"])
    straight = _run(cfg, tmp_path / "straight", 0)
    _run(cfg, tmp_path / "parts", 2, stop_after=2)
    rest = _run(cfg, tmp_path / "parts", 2)
    assert (rest.resumed_from, rest.losses) == (2, straight.losses[2:])


def test_stopping_early_stops_the_workers(tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_tokenizer.steps=50"])
    result = _run(cfg, tmp_path, 2, on_step=lambda done, logs: done == 2)
    assert result.step == 2
    assert not multiprocessing.active_children()


class BrokenAt:
    """The tiny sprites source, except that step `bad`'s batch cannot be built (a corrupt shard, say)."""

    def __init__(self, source, bad: int) -> None:
        self.source, self.bad = source, bad

    def batch(self, step, batch_size):
        return self.batch_rows(step, batch_size, 0, batch_size)

    def batch_rows(self, step, batch_size, start, stop):
        if step == self.bad:
            raise ValueError(f"shard 7 of step {step} is corrupt")
        return self.source.batch_rows(step, batch_size, start, stop)


def test_a_batch_a_worker_cannot_build_fails_the_run_at_that_step(tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_tokenizer.steps=6", "train_tokenizer.ckpt_every=1"])
    source = BrokenAt(make_source(cfg.data), bad=3)
    with pytest.raises(ValueError, match="shard 7 of step 3 is corrupt"):
        _run(cfg, tmp_path, 2, source=source)
    assert latest_checkpoint(tmp_path).name == "step_00000003"  # steps 0-2 trained and saved, nothing after
    assert not multiprocessing.active_children()


def test_worker_counts(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert batches.resolve_workers(None, cpu) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert batches.resolve_workers(None, gpu) == 8  # one GPU on 16 cores: half of them
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert batches.resolve_workers(None, gpu) == 4  # shared with the node's other rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert batches.resolve_workers(None, gpu) == 2  # never fewer than 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert batches.resolve_workers(None, gpu) == 8  # never more than 8
    assert batches.resolve_workers(3, cpu) == 3
    with pytest.raises(ValueError, match="data workers must be >= 0"):
        batches.resolve_workers(-1, cpu)
    monkeypatch.setattr(multiprocessing, "current_process", lambda: SimpleNamespace(daemon=True))
    assert batches.resolve_workers(None, gpu) == 0  # a Celery prefork child may not start processes


def test_items_are_each_ranks_micro_batches_in_step_order(tiny_world_cfg):
    source = make_source(tiny_world_cfg.data)
    # rank 1 of 2 with 2 micro-batches of 2 rows: rows 4-5 then 6-7 of each global batch of 8, from step 3 on
    items = batches.StepBatches(source, start=3, end=5, batch_size=8, first=4, micro=2, accum=2)
    assert len(items) == 4
    full = source.batch(4, 8)
    assert torch.equal(items[2].frames, full.frames[4:6]) and torch.equal(items[3].frames, full.frames[6:8])
