"""Full disks: a write that runs out of space becomes DiskFull, which says where and how much space is left.

Everything that writes outputs (checkpoints, exported worlds, datasets, rollout items) writes under a temporary name
and renames into place, so a full disk never leaves a half-written output visible; on DiskFull the temporary files
are removed at once (they hold the space that ran out) and the newest complete output is kept, so a re-run resumes
once there is space. DiskFull is deliberately not an OSError: job queues retry OSErrors as transient, and a full disk
does not go away by waiting a few seconds.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How errors that lost their errno say it: Rust's io::Error through safetensors, strerror inside messages.
_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_NEARLY_FULL = 1 << 20  # numpy's short writes carry no errno: with less free than this, a short write means full
F = TypeVar("F", bound=Callable)


class DiskFull(Exception):
    """A write ran out of space (ENOSPC or a quota). `path` is what was being written, `free` the bytes left on its
    filesystem afterwards (None when unknown)."""

    def __init__(self, path: Path | str, what: str = "output", free: int | None = None) -> None:
        self.path, self.what, self.free = Path(path), what, free
        left = "" if free is None else f" ({_size(free)} free)"
        super().__init__(f"no space left on the disk of {self.path}{left} while writing the {what}; nothing partial "
                         f"was kept: free space (or choose another directory) and run it again")


def free_bytes(path: Path | str) -> int | None:
    """Free bytes (for unprivileged users) on the filesystem holding `path` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, path: Path | str | None = None) -> bool:
    """True when `exc` means the disk (or the quota) holding `path` is full."""
    if isinstance(exc, DiskFull):
        return True
    if getattr(exc, "errno", None) in FULL_ERRNOS:
        return True
    text = str(exc)
    if any(t in text for t in _FULL_TEXTS):
        return True
    if isinstance(exc, OSError) and path is not None and "requested and" in text and "written" in text:
        free = free_bytes(path)  # numpy's tofile: "N requested and M written", no errno
        return free is not None and free < _NEARLY_FULL
    return False


@contextlib.contextmanager
def disk_full_as_error(path: Path | str, what: str = "output", cleanup: Path | None = None) -> Iterator[None]:
    """Turns a disk-full failure inside the block into DiskFull about `path`. `cleanup` (a temporary file or
    directory) is removed when the block fails, whatever the error: it would hold the space that ran out."""
    try:
        yield
    except BaseException as exc:
        if cleanup is not None:
            remove(cleanup)
        if is_disk_full(exc, path) and not isinstance(exc, DiskFull):
            raise DiskFull(path, what, free_bytes(path)) from exc
        raise


def fails_when_disk_full(fn: F) -> F:
    """Decorator: a disk-full OSError (or equivalent) raised by `fn` becomes DiskFull, so a job task that retries
    OSErrors as transient fails at once, naming the cause, instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiskFull:
            raise
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            path = getattr(exc, "filename", None) or "."
            raise DiskFull(path, "job output", free_bytes(path)) from exc

    return wrapper  # type: ignore[return-value]


def remove(path: Path) -> None:
    """Removes a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
