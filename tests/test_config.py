import json
from dataclasses import replace

import pytest

from genie.config import WorldConfig, apply_overrides, from_dict, load_world_config, to_dict
from genie.models.common import FrameSpec
from genie.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    assert from_dict(WorldConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_peer_small_matches_the_peer_config():
    c = get_preset("peer-small")
    assert (c.tokenizer.patch, c.tokenizer.vq.num_codes, c.tokenizer.vq.code_dim) == (4, 1024, 32)
    assert (c.lam.patch, c.lam.num_actions) == (16, 6)
    assert (c.dynamics.transformer.depth, c.dynamics.transformer.dim, c.dynamics.max_frames) == (4, 256, 16)
    assert c.train_tokenizer.batch_size == 8 and c.tokenizer.encoder.ffn_mult * c.tokenizer.encoder.dim == 1024


def test_overrides_are_typed():
    cfg = apply_overrides(get_preset("tiny"), ["sampling.steps=9", "train_lam.bf16=true", "sampling.schedule=linear"])
    assert (cfg.sampling.steps, cfg.train_lam.bf16, cfg.sampling.schedule) == (9, True, "linear")


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.steps=fast", "expected an integer"),
        ("sampling.nope=1", "no such setting"),
        ("sampling=3", "no such setting"),
        ("nosuch.steps=1", "not a config section"),
        ("sampling.steps", "not key=value"),
        ("tokenizer.patch=5", "does not divide"),
        ("sampling.steps=0", "steps must be >= 1"),
        ("train_lam.bf16=1", "expected true/false"),
        ("dynamics.num_actions=9", "must equal the LAM codebook"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_preset("tiny"), [override])


def test_inconsistent_frames_rejected():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="differs from LAM frame"):
        replace(cfg, lam=replace(cfg.lam, frame=FrameSpec(16, 32, 3), patch=8))


def test_unknown_keys_and_bad_files(tmp_path):
    data = to_dict(get_preset("tiny"))
    data["sampling"]["typo"] = 1
    with pytest.raises(ValueError, match="unknown keys"):
        from_dict(WorldConfig, data)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read config"):
        load_world_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
