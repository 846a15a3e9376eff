import json

import pytest
import torch

from genie.data import make_source
from genie.data.synthetic import ACTION_NAMES as SPRITE_NAMES
from genie.eval.run import EvalConfig, evaluate
from genie.sampling import SamplingConfig


def test_eval_report_on_trained_tiny_world(trained_world_dir, tiny_world_cfg, tmp_path):
    source = make_source(tiny_world_cfg.data, evaluation=True)
    report = evaluate(trained_world_dir, source, EvalConfig(clips=12, horizon=4, batch_size=6, gif_clips=2), tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["clips"] == 12 and saved["tokenizer"]["psnr"] == report["tokenizer"]["psnr"]
    # Floors a trained tiny world clears and an untrained one does not (untrained tokenizer: 6.4 dB).
    assert report["tokenizer"]["psnr"] > 14, report["tokenizer"]
    assert 0 < report["tokenizer"]["codebook_usage"] <= 1
    assert len(report["dynamics"]["psnr_by_step_inferred"]) == 4
    assert report["dynamics"]["psnr_t4_inferred"] > 12, report["dynamics"]
    assert set(report["lam"]) >= {"nmi", "one_to_one_accuracy", "many_to_one_accuracy"}
    assert (tmp_path / "compare.gif").exists()
    # The latent -> true mapping, with the sprites' true action names, agrees with the consistency numbers.
    mapping, a = saved["lam"]["mapping"], tiny_world_cfg.dynamics.num_actions
    assert mapping["true_names"][: len(SPRITE_NAMES)] == list(SPRITE_NAMES) and len(mapping["latents"]) == a
    assert mapping["many_to_one_accuracy"] == pytest.approx(report["lam"]["many_to_one_accuracy"])
    assert mapping["one_to_one_accuracy"] == pytest.approx(report["lam"]["one_to_one_accuracy"])
    assert sum(e["count"] for e in mapping["latents"]) == mapping["transitions"] == report["lam"]["transitions"]
    # The atlas is on by default: 4 prompts, every action, files in the output directory.
    atlas = saved["atlas"]
    assert (atlas["prompts"], atlas["steps"]) == (4, 8) and len(atlas["actions"]) == a
    assert (tmp_path / "atlas.png").exists() and (tmp_path / "atlas.gif").exists()


def test_eval_is_deterministic(trained_world_dir, tiny_world_cfg, tmp_path):
    cfg = EvalConfig(clips=4, horizon=2, batch_size=4, gif_clips=0, atlas_prompts=2, atlas_steps=2)
    source = make_source(tiny_world_cfg.data, evaluation=True)
    a = evaluate(trained_world_dir, source, cfg, tmp_path / "a", sampling=SamplingConfig(steps=2, temperature=1.0))
    b = evaluate(trained_world_dir, source, cfg, tmp_path / "b", sampling=SamplingConfig(steps=2, temperature=1.0))
    assert a["dynamics"] == b["dynamics"] and torch.isfinite(torch.tensor(a["dynamics"]["psnr_by_step_random"])).all()
    assert a["atlas"]["actions"] == b["atlas"]["actions"] and a["atlas"]["prompts"] == 2


def test_atlas_can_be_turned_off(trained_world_dir, tiny_world_cfg, tmp_path):
    cfg = EvalConfig(clips=2, horizon=1, batch_size=2, gif_clips=0, atlas_prompts=0)
    report = evaluate(trained_world_dir, make_source(tiny_world_cfg.data, evaluation=True), cfg, tmp_path,
                      sampling=SamplingConfig(steps=1, temperature=1.0))
    assert "atlas" not in report and not (tmp_path / "atlas.png").exists()
    with pytest.raises(ValueError, match="atlas"):
        EvalConfig(atlas_steps=0)
