"""The `genie` command end to end: train the three models in parts, export a world, play it."""

import json

from click.testing import CliRunner
from PIL import Image

from genie.cli import main

TINY = ["--preset", "tiny", "--quiet"]


def _run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_train_export_play(tmp_path):
    root = str(tmp_path / "run")
    for kind in ("tokenizer", "lam", "dynamics"):
        code, out = _run(["train", kind, *TINY, "--run-root", root, "--set", f"train_{kind}.steps=20"])
        assert code == 0, out
        assert json.loads(out.strip().splitlines()[-1])["step"] == 20
    code, out = _run(["export", "--run-root", root, "--out", str(tmp_path / "world")])
    assert code == 0, out
    gif = tmp_path / "play.gif"
    code, out = _run(["play", "--world", str(tmp_path / "world"), "--steps", "5", "--actions", "0,1,2,3,1", "--out", str(gif)])
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["frames"] == 5 and report["actions"] == [0, 1, 2, 3, 1] and report["fps"] > 0
    with Image.open(gif) as im:
        assert im.n_frames == 6 and im.size == (64, 64)
    assert len(list((tmp_path / "world" / "prompts").glob("*.png"))) == 8
    own = tmp_path / "mine.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(own)
    code, out = _run(["play", "--world", str(tmp_path / "world"), "--steps", "2", "--prompt", str(own), "--out", str(gif)])
    assert code == 0, out
    for bad in (["--prompt", "99"], ["--prompt", str(tmp_path / "none.png")], ["--actions", "1,x"], ["--actions", "7"]):
        code, out = _run(["play", "--world", str(tmp_path / "world"), "--steps", "1", *bad, "--out", str(gif)])
        assert code == 2 and out.count("error: ") == 1, (bad, out)


def test_training_resumes_in_parts(tmp_path):
    root = str(tmp_path / "run")
    code, out = _run(["train", "lam", *TINY, "--run-root", root, "--set", "train_lam.steps=8", "--stop-after", "4"])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["step"] == 4
    code, out = _run(["train", "lam", *TINY, "--run-root", root, "--set", "train_lam.steps=8"])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["resumed_from"] == 4


def test_bad_input_exits_2_with_one_line(tmp_path):
    cases = [
        ["train", "tokenizer", *TINY, "--run-root", str(tmp_path), "--set", "tokenizer.patch=5"],
        ["train", "dynamics", *TINY, "--run-root", str(tmp_path / "empty")],
        ["play", "--world", str(tmp_path / "nowhere")],
        ["config", "--preset", "nope"],
        ["export", "--run-root", str(tmp_path / "empty"), "--out", str(tmp_path / "w")],
    ]
    for args in cases:
        code, out = _run(args)
        assert code == 2, (args, out)
        lines = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, out


def test_config_prints_json():
    code, out = _run(["config", "--preset", "tiny", "--set", "sampling.steps=3"])
    assert code == 0 and json.loads(out)["sampling"]["steps"] == 3
