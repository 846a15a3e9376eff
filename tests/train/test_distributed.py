"""Data-parallel training: 2 gloo processes under torchrun train like 1 process on the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genie.config import apply_overrides
from genie.nn.maskgit import random_frame_mask
from genie.train.checkpoint import latest_checkpoint, list_checkpoints
from genie.train.distributed import SlicedDraws
from genie.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


# reset_after=2 makes the VQ dead-code resets (which must see the global batch) happen within a few steps.
TOKENIZER = ["train_tokenizer.steps=4", "tokenizer.vq.reset_after=2", "train_tokenizer.warmup_steps=2"]


def _cli(root: Path, kind: str, sets: list[str]) -> list[str]:
    args = ["-m", "genie.cli", "train", kind, "--preset", "tiny", "--quiet", "--run-root", str(root)]
    return args + [a for s in sets for a in ("--set", s)]


def _torchrun(procs: int, root: Path, kind: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *_cli(root, kind, sets)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GENIE_DIST_TIMEOUT_S": "30"}


def _run(cmd: list[str]) -> list[dict]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


TOL = {"rtol": 1e-4, "atol": 1e-5}  # float summation order differs between 1 and 2 processes


def test_two_processes_match_one_on_the_same_global_batch(tiny_world_cfg, tmp_path, runs):
    cfg = apply_overrides(tiny_world_cfg, TOKENIZER)
    one = train("tokenizer", cfg, tmp_path / "one" / "tokenizer", progress=False, tensorboard=False)
    rows = _run(_torchrun(2, tmp_path / "two", "tokenizer", TOKENIZER))
    assert len(rows) == 1  # rank 0 alone reports; its scalars are the global batch's (all-reduced)
    assert rows[0]["step"] == 4 and rows[0]["logs"]["loss"] == pytest.approx(one.losses[-1], rel=1e-4)
    runs.assert_close(tmp_path / "one" / "tokenizer", tmp_path / "two" / "tokenizer", **TOL)
    run = tmp_path / "two" / "tokenizer"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # rank 0 alone logs


def test_resume_with_another_world_size(tiny_world_cfg, tmp_path, runs):
    """1 process for 3 steps, then 2 processes resume from that checkpoint: as 6 steps in one process."""
    sets = TOKENIZER[1:] + ["train_tokenizer.steps=6"]
    cfg = apply_overrides(tiny_world_cfg, sets)
    train("tokenizer", cfg, tmp_path / "a", progress=False, tensorboard=False)
    train("tokenizer", cfg, tmp_path / "root" / "tokenizer", stop_after=3, progress=False, tensorboard=False)
    rows = _run(_torchrun(2, tmp_path / "root", "tokenizer", sets))
    assert {(r["resumed_from"], r["step"]) for r in rows} == {(3, 6)}
    runs.assert_close(tmp_path / "a", tmp_path / "root" / "tokenizer", **TOL)


def test_grad_accumulation_matches_one_batch(tiny_world_cfg, tmp_path, runs):
    cfg = apply_overrides(tiny_world_cfg, TOKENIZER)
    plain = train("tokenizer", cfg, tmp_path / "a", progress=False, tensorboard=False)
    accum = train("tokenizer", apply_overrides(cfg, ["train_tokenizer.grad_accum=4"]), tmp_path / "b",
                  progress=False, tensorboard=False)
    assert accum.losses == pytest.approx(plain.losses, rel=1e-5)
    runs.assert_close(tmp_path / "a", tmp_path / "b", **TOL)


def test_a_global_batch_that_does_not_split_is_a_clear_error(tiny_world_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="batch_size=8 does not divide by world size 3 x grad_accum 1"):
        train("lam", tiny_world_cfg, tmp_path, progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="grad_accum must be >= 1 and divide batch_size=8"):
        apply_overrides(tiny_world_cfg, ["train_lam.grad_accum=3"])


def test_per_sample_masks_do_not_depend_on_the_rows_a_process_draws():
    def masks(rows: slice | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        if rows is None:
            return random_frame_mask((8, 4, 16), 0.5, 1.0, gen)
        with SlicedDraws(gen, rows, 8):
            return random_frame_mask((rows.stop - rows.start, 4, 16), 0.5, 1.0, gen)

    full = masks(None)
    assert torch.equal(torch.cat([masks(slice(0, 4)), masks(slice(4, 8))]), full)
    assert torch.equal(masks(slice(2, 4)), full[2:4])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


STEPS = 60


def test_killed_rank_fails_the_run_and_a_restart_resumes(tmp_path):
    """SIGKILL one of 2 ranks: torchrun exits non-zero within seconds (no hang); 1 process then resumes and finishes."""
    sets = [f"train_lam.steps={STEPS}", "train_lam.ckpt_every=5", "train_lam.keep_checkpoints=2"]
    proc = subprocess.Popen(_torchrun(2, tmp_path, "lam", sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list_checkpoints(tmp_path / "lam")) < 2:
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode != 0
    killed_at = latest_checkpoint(tmp_path / "lam")
    step_before = int(killed_at.name.split("_")[1])
    assert step_before < STEPS, "the run finished before it could be killed; raise STEPS"

    rows = _run([sys.executable, *_cli(tmp_path, "lam", sets)])
    assert rows[-1]["resumed_from"] >= step_before and rows[-1]["step"] == STEPS
    assert not list((tmp_path / "lam" / "checkpoints").glob(".tmp-*"))


def test_dynamics_two_processes_match_one(tiny_world_cfg, tmp_path, runs):
    """Masks are drawn per sample of the global batch and each rank's CE is weighed by its masked tokens."""
    frozen = runs.untrained_frozen(tiny_world_cfg, tmp_path / "two")  # where the 2-process CLI run finds them
    sets = ["train_dynamics.steps=3"]
    one = train("dynamics", apply_overrides(tiny_world_cfg, sets), tmp_path / "one", frozen=frozen,
                progress=False, tensorboard=False)
    rows = _run(_torchrun(2, tmp_path / "two", "dynamics", sets))
    assert rows[0]["logs"]["loss"] == pytest.approx(one.losses[-1], rel=1e-4)
    runs.assert_close(tmp_path / "one", tmp_path / "two" / "dynamics", **TOL)
