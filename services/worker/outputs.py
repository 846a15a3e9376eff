"""Rollout outputs on disk: one directory per item, renamed into place whole, and the job's manifest.

Layout under the job's output dir:
    spec.json                 the job spec as submitted
    items/item_00007/         rollout.gif, frames.npy (L+1, H, W, C) uint8, tokens.npy (L+1, N) int32, item.json
    manifest.json             every item: prompt, actions, seed, files with sha256 and size
An item is written under items/.tmp-item_00007-<random> and renamed to its deterministic name in one step, so a
killed or redelivered chunk leaves either the whole item or nothing, and a rerun never makes a second copy.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from genie.catalog import file_sha256
from genie.diskfull import disk_full_as_error
from genie.media import write_gif
from services.worker.specs import RolloutItem, RolloutJobSpec

ITEM_FILES = ("rollout.gif", "frames.npy", "tokens.npy", "item.json")
MANIFEST_FORMAT = 1


def items_dir(out: Path) -> Path:
    return Path(out) / "items"


def item_done(out: Path, item: RolloutItem) -> bool:
    return (items_dir(out) / item.name / "item.json").is_file()



def write_item(out: Path, item: RolloutItem, frames: np.ndarray, tokens: np.ndarray, meta: dict[str, Any]) -> bool:
    """Writes one item atomically; False if a complete copy was already there (the new one is discarded)."""
    root = items_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / item.name
    tmp = root / f".tmp-{item.name}-{uuid.uuid4().hex[:8]}"
    try:
        with disk_full_as_error(final, "rollout item"):  # DiskFull: the job fails naming it, and is not retried
            tmp.mkdir()
            write_gif(frames, tmp / "rollout.gif")
            np.save(tmp / "frames.npy", frames)
            np.save(tmp / "tokens.npy", tokens)
            info = {**asdict(item), "name": item.name, "frames_shape": list(frames.shape),
                    "tokens_shape": list(tokens.shape), **meta}
            (tmp / "item.json").write_text(json.dumps(info, indent=2))
            for name in ITEM_FILES:
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
        if item_done(out, item):
            return False
        try:
            os.rename(tmp, final)  # atomic; fails if another copy of this item landed first
        except OSError:
            if item_done(out, item):
                return False
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def missing_items(out: Path, spec: RolloutJobSpec) -> list[str]:
    return [item.name for item in spec.items() if not item_done(out, item)]


def build_manifest(out: Path, job_id: str, spec: RolloutJobSpec, backend: str) -> dict[str, Any]:
    """The manifest of a finished job, read back from the items on disk (checksums of the files themselves)."""
    out = Path(out)
    entries = []
    for item in spec.items():
        folder = items_dir(out) / item.name
        info = json.loads((folder / "item.json").read_text())
        files = {name: {"path": f"items/{item.name}/{name}", "sha256": file_sha256(folder / name),
                        "bytes": (folder / name).stat().st_size} for name in ITEM_FILES if name != "item.json"}
        entries.append({"name": item.name, "index": item.index, "prompt": item.prompt, "prompt_index": item.prompt_index,
                        "actions_index": item.actions_index, "actions": list(item.actions), "seed": item.seed,
                        "frames": info["frames_shape"][0], "files": files})
    return {"format": MANIFEST_FORMAT, "job": job_id, "backend": backend, "spec": spec.to_json(),
            "count": len(entries), "items": entries}


def remove_partial_items(out: Path) -> None:
    """Temporary item dirs that killed runs left behind (never complete items)."""
    root = items_dir(out)
    if root.is_dir():
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
