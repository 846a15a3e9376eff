"""A training process killed with SIGKILL resumes from its last complete checkpoint and finishes."""

import json
import os
import signal
import subprocess
import sys
import time

from genie.train.checkpoint import latest_checkpoint, list_checkpoints, load_model

STEPS = 60


def _cmd(root):
    return [sys.executable, "-m", "genie.cli", "train", "lam", "--preset", "tiny", "--quiet", "--run-root", str(root),
            "--set", f"train_lam.steps={STEPS}", "--set", "train_lam.ckpt_every=5", "--set", "train_lam.keep_checkpoints=2"]


def test_sigkill_then_resume(tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list_checkpoints(tmp_path / "lam")) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_checkpoint(tmp_path / "lam")
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    step_before = int(killed_at.name.split("_")[1])
    assert step_before < STEPS, "the run finished before it could be killed; raise STEPS"
    load_model(killed_at)  # whatever the kill interrupted, the newest checkpoint is complete

    done = subprocess.run(_cmd(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["resumed_from"] >= step_before and result["step"] == STEPS
    assert [p.name for p in list_checkpoints(tmp_path / "lam")][-1] == f"step_{STEPS:08d}"
    assert not list((tmp_path / "lam" / "checkpoints").glob(".tmp-*"))
