"""Shared fixtures: the tiny world config and, once per session, a tiny world trained on sprites."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from genie.presets import tiny
from genie.train.loop import train
from genie.worlds import export_world


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_world_cfg():
    return tiny()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_world_cfg) -> Path:
    """Trains tokenizer, LAM and dynamics of the tiny preset (200 steps each, ~15 s on 2 cores), once per run: under
    pytest-xdist the first worker to get here trains into the directory the workers share and the others wait for it
    (the tests only read the run)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _train_tiny(tmp_path_factory.mktemp("tiny-run"), tiny_world_cfg)
    shared = tmp_path_factory.getbasetemp().parent  # the run's base directory, above each worker's own
    root, done = shared / "tiny-run", shared / "tiny-run.done"
    with FileLock(str(shared / "tiny-run.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a worker that died mid-training left half a run
            _train_tiny(root, tiny_world_cfg)
            done.touch()
    return root


def _train_tiny(root: Path, tiny_world_cfg) -> Path:
    for kind in ("tokenizer", "lam"):
        train(kind, tiny_world_cfg, root / kind, progress=False, tensorboard=False)
    from genie.train.checkpoint import latest_checkpoint

    frozen = {"tokenizer": latest_checkpoint(root / "tokenizer"), "lam": latest_checkpoint(root / "lam")}
    train("dynamics", tiny_world_cfg, root / "dynamics", frozen=frozen, progress=False, tensorboard=False)
    return root


@pytest.fixture(scope="session")
def trained_world_dir(trained_run, tmp_path_factory) -> Path:
    return export_world(trained_run, tmp_path_factory.mktemp("worlds") / "tiny")


class SmallDisk:
    """A real filesystem a few MB large (tmpfs), for what a full disk does; `fill` leaves `leave` bytes free."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / ".filler"

    def fill(self, leave: int = 0) -> None:
        """Writes a filler file until the disk is full, then gives `leave` bytes back."""
        with self.filler.open("ab", buffering=0) as f:  # unbuffered: nothing left to fail at close
            try:
                while True:
                    f.write(b"\0" * (4 << 10))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        if leave:
            size = self.filler.stat().st_size
            with self.filler.open("r+b") as f:
                f.truncate(max(0, size - leave))

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        """Temporary names anywhere on the disk: what a failed write must not leave behind."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob(".tmp*"))


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(size="4m")` mounts a tmpfs of that size and returns a SmallDisk on it; unmounted after the test.
    Needs root (as CI runs); skipped where mounting is not allowed."""
    mounts: list[Path] = []

    def make(size: str = "4m") -> SmallDisk:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small filesystem here: {done.stderr.decode().strip()}")
        mounts.append(path)
        return SmallDisk(path)

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)
