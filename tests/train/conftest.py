"""Fixtures of the training tests: one torch thread, and comparing runs by the weights of their checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genie.train.checkpoint import latest_checkpoint, untrained_frozen


@pytest.fixture
def one_thread():
    """In-process runs use 1 thread: 2 OpenMP threads crawl when other work holds a core of a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Runs:
    """Training runs compared by their newest checkpoints, and the frozen models a dynamics run starts from."""

    @staticmethod
    def weights(run_dir: Path) -> dict[str, torch.Tensor]:
        return load_file(latest_checkpoint(run_dir) / "model.safetensors")

    @staticmethod
    def assert_close(a_dir: Path, b_dir: Path, rtol: float, atol: float) -> None:
        """The newest checkpoints of two runs hold the same tensors, within (rtol, atol)."""
        a, b = Runs.weights(a_dir), Runs.weights(b_dir)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)

    untrained_frozen = staticmethod(untrained_frozen)


@pytest.fixture
def runs() -> type[Runs]:
    return Runs
