"""Full disks, on a real filesystem a few MB large: every writer's failure is recognised, and `genie train`, `export`
and `data generate` end with one line and exit code 1, keep nothing partial, and finish when re-run with space."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from genie.diskfull import DiskFull, disk_full_as_error, is_disk_full
from genie.train.checkpoint import list_checkpoints
from services.cli import main

TINY = ["--preset", "tiny", "--quiet", "--no-tensorboard"]


def _run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


@pytest.mark.parametrize("writer", ["safetensors", "numpy", "text"])
def test_every_writer_failure_on_a_full_disk_is_recognised_and_cleaned_up(small_disk, writer):
    disk = small_disk("1m")
    disk.fill()
    target = disk.path / "out" / f"x.{writer}"
    with pytest.raises(DiskFull) as info, disk_full_as_error(target, writer, cleanup=target.parent):
        target.parent.mkdir(exist_ok=True)
        if writer == "safetensors":  # Rust's io::Error: no errno, "os error 28" in the text
            save_file({"w": torch.zeros(1 << 18)}, target)
        elif writer == "numpy":  # a short write: "N requested and M written", no errno either
            np.save(target, np.zeros(1 << 18))
        else:
            target.write_text("x" * (1 << 20))
    assert "no space left" in str(info.value) and str(target) in str(info.value)
    assert not target.parent.exists()  # the partial output went at once: it held the space


def test_other_write_errors_are_not_disk_full(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "f.npy"
    with pytest.raises(FileNotFoundError) as info:
        np.save(missing, np.zeros(4))
    assert not is_disk_full(info.value, missing)
    assert not is_disk_full(PermissionError(13, "Permission denied"), tmp_path)
    assert is_disk_full(OSError(28, os.strerror(28)))


def test_training_on_a_full_disk_stops_cleanly_and_resumes_when_there_is_space(small_disk):
    disk = small_disk("4m")
    root = str(disk.path / "run")
    args = ["train", "lam", *TINY, "--run-root", root, "--set", "train_lam.steps=8", "--set", "train_lam.ckpt_every=2"]
    code, out = _run([*args, "--stop-after", "2"])
    assert code == 0, out
    disk.fill(leave=200 << 10)  # room for the run's small files, not for the next checkpoint (~0.9 MB)
    code, out = _run(args)
    assert code == 1 and out.count("error: ") == 1 and "no space left" in out and "lam checkpoint (step 4)" in out, out
    assert "Traceback" not in out
    assert [p.name for p in list_checkpoints(disk.path / "run" / "lam")] == ["step_00000002"]  # the good one stays
    assert disk.leftovers() == []
    disk.free()
    code, out = _run(args)
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["resumed_from"] == 2


def test_export_to_a_full_disk_keeps_the_world_that_was_there(small_disk, trained_run):
    disk = small_disk("8m")
    out = disk.path / "world"
    code, text = _run(["export", "--run-root", str(trained_run), "--out", str(out)])
    assert code == 0, text
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    disk.fill()
    code, text = _run(["export", "--run-root", str(trained_run), "--out", str(out)])
    assert code == 1 and text.count("error: ") == 1 and "no space left" in text and "world" in text, text
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert disk.leftovers() == []


def test_data_generate_on_a_full_disk_leaves_no_dataset_and_works_with_space(small_disk):
    disk = small_disk("2m")
    out = disk.path / "data"
    args = ["data", "generate", "--episodes", "2", "--max-frames", "60", "--quiet", "--out", str(out)]
    disk.fill(leave=300 << 10)  # 2 episodes of up to 60 64x64 frames need up to 1.5 MB
    code, text = _run(args)
    assert code == 1 and text.count("error: ") == 1 and "no space left" in text and "dataset" in text, text
    assert not out.exists() and disk.leftovers() == []  # no half dataset: its shards went with the failure
    disk.free()
    code, text = _run(args)
    assert code == 0, text
    assert json.loads(text.strip().splitlines()[-1])["episodes"] == 2 and (out / "index.json").is_file()
