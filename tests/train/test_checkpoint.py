import json

import pytest
import torch

from genie.models.dynamics import DynamicsModel
from genie.train.checkpoint import load_model, save_checkpoint


def test_model_rebuilds_from_json_alone(tiny_world_cfg, tmp_path):
    model = DynamicsModel(tiny_world_cfg.dynamics)
    save_checkpoint(tmp_path / "ck", "dynamics", model, step=3)
    loaded = load_model(tmp_path / "ck", "dynamics")
    assert loaded.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["kind"] == "dynamics" and meta["step"] == 3
    assert not (tmp_path / "ck" / "trainer.json").exists()


def test_wrong_kind_and_corrupt_checkpoints_are_clear_errors(tiny_world_cfg, tmp_path):
    save_checkpoint(tmp_path / "ck", "dynamics", DynamicsModel(tiny_world_cfg.dynamics), step=1)
    with pytest.raises(ValueError, match="holds a dynamics checkpoint, expected tokenizer"):
        load_model(tmp_path / "ck", "tokenizer")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot load weights"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not a Genie checkpoint"):
        load_model(tmp_path / "ck")
    with pytest.raises(ValueError, match="not a Genie checkpoint"):
        load_model(tmp_path / "missing")


def test_overwriting_a_checkpoint_is_atomic(tiny_world_cfg, tmp_path):
    model = DynamicsModel(tiny_world_cfg.dynamics)
    save_checkpoint(tmp_path / "ck", "dynamics", model, step=1)
    save_checkpoint(tmp_path / "ck", "dynamics", model, step=2)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
