"""The shared training loop: every model learns, runs resume exactly, checkpoints are atomic."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from genie.config import apply_overrides
from genie.train.checkpoint import latest_checkpoint, list_checkpoints, load_model, read_meta
from genie.train.loop import lr_at, train


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("kind", ["tokenizer", "lam"])
def test_loss_drops(kind, tiny_world_cfg, tmp_path):
    result = train(kind, tiny_world_cfg, tmp_path / kind, progress=False, tensorboard=False)
    assert result.step == 200 and len(result.losses) == 200
    assert _mean(result.losses[-20:]) < 0.6 * _mean(result.losses[:10]), (result.losses[:10], result.losses[-20:])


def test_lam_beats_copying_last_frame(trained_run):
    """The LAM decoder, given the inferred action, predicts the next frame better than a copy of the last."""
    from genie.data.synthetic import MovingSprites
    from genie.presets import tiny

    lam = load_model(latest_checkpoint(trained_run / "lam"))
    frames = MovingSprites(tiny().data.sprites()).batch(5000, 16).frames
    with torch.no_grad():
        out = lam(frames)
    assert out.logs["mse"] < 0.9 * out.logs["copy_mse"], out.logs


def test_dynamics_loss_drops_and_beats_chance(trained_run):
    dyn_run = trained_run / "dynamics"
    ckpt = latest_checkpoint(dyn_run)
    assert ckpt is not None and json.loads((ckpt / "config.json").read_text())["step"] == 200
    # Compare the trained dynamics against a fresh init on the same batch.
    from genie.data.synthetic import MovingSprites
    from genie.models.dynamics import DynamicsModel
    from genie.presets import tiny

    cfg = tiny()
    tok, lam = load_model(latest_checkpoint(trained_run / "tokenizer")), load_model(latest_checkpoint(trained_run / "lam"))
    frames = MovingSprites(cfg.data.sprites()).batch(7000, 16).frames
    tokens, actions = tok.encode(frames), lam.infer_actions(frames)
    trained, fresh = load_model(ckpt).eval(), DynamicsModel(cfg.dynamics).eval()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        ce_trained = trained(tokens, actions, generator=gen()).loss.item()
        ce_fresh = fresh(tokens, actions, generator=gen()).loss.item()
    assert ce_trained < 0.5 * ce_fresh, (ce_trained, ce_fresh)


def test_resume_is_exact(tiny_world_cfg, tmp_path):
    """Killed after 6 steps and resumed == 12 uninterrupted steps, bit for bit (data, masks, RNG, optimizer)."""
    cfg = apply_overrides(tiny_world_cfg, ["train_tokenizer.steps=12", "train_tokenizer.ckpt_every=100"])
    straight = train("tokenizer", cfg, tmp_path / "a", progress=False, tensorboard=False)
    first = train("tokenizer", cfg, tmp_path / "b", stop_after=6, progress=False, tensorboard=False)
    assert first.step == 6 and latest_checkpoint(tmp_path / "b").name == "step_00000006"
    second = train("tokenizer", cfg, tmp_path / "b", progress=False, tensorboard=False)
    assert second.resumed_from == 6 and second.step == 12
    assert first.losses + second.losses == straight.losses
    a = load_file(latest_checkpoint(tmp_path / "a") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "b") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dynamics_resume_is_exact(trained_run, tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_dynamics.steps=8"])
    frozen = {"tokenizer": latest_checkpoint(trained_run / "tokenizer"), "lam": latest_checkpoint(trained_run / "lam")}
    straight = train("dynamics", cfg, tmp_path / "a", frozen=frozen, progress=False, tensorboard=False)
    train("dynamics", cfg, tmp_path / "b", frozen=frozen, stop_after=3, progress=False, tensorboard=False)
    rest = train("dynamics", cfg, tmp_path / "b", frozen=frozen, progress=False, tensorboard=False)
    assert rest.losses == straight.losses[3:]


def test_checkpoints_are_pruned_and_leave_no_temp_dirs(tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_lam.steps=10", "train_lam.ckpt_every=2", "train_lam.keep_checkpoints=2"])
    train("lam", cfg, tmp_path / "run", progress=False, tensorboard=True)
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["step_00000008", "step_00000010"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars written


def test_resume_with_a_different_config_is_refused(tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_lam.steps=2"])
    train("lam", cfg, tmp_path / "run", progress=False, tensorboard=False)
    recorded = (tmp_path / "run" / "world.json").read_text()
    changed = replace(cfg, lam=replace(cfg.lam, vq=replace(cfg.lam.vq, beta=0.5)))
    with pytest.raises(ValueError, match="different lam config"):
        train("lam", changed, tmp_path / "run", progress=False, tensorboard=False)
    assert (tmp_path / "run" / "world.json").read_text() == recorded  # the refused run changed nothing


def test_dynamics_without_frozen_models_is_a_clear_error(tiny_world_cfg, tmp_path):
    with pytest.raises(ValueError, match="trained tokenizer checkpoint"):
        train("dynamics", tiny_world_cfg, tmp_path, progress=False, tensorboard=False)


def test_bf16_autocast_runs(tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_tokenizer.steps=3", "train_tokenizer.bf16=true"])
    result = train("tokenizer", cfg, tmp_path, progress=False, tensorboard=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_bf16_is_fp32_on_a_cpu_without_bf16_units(tiny_world_cfg, monkeypatch):
    from genie.train import loop

    cfg = apply_overrides(tiny_world_cfg, ["train_tokenizer.bf16=true"]).train_tokenizer
    x = torch.ones(2, 2)
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    with loop._autocast(cfg, torch.device("cpu")):
        assert (x @ x).dtype == torch.float32  # emulated bf16 would run at ~1 GFLOP/s: never there
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    with loop._autocast(cfg, torch.device("cpu")):
        assert (x @ x).dtype == torch.bfloat16


def test_lr_schedule_warmup_then_cosine(tiny_world_cfg):
    cfg = apply_overrides(tiny_world_cfg, ["train_lam.lr=1.0", "train_lam.warmup_steps=10", "train_lam.steps=110",
                                            "train_lam.min_lr_ratio=0.1"]).train_lam
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_on_step_sees_every_step_and_stops_with_a_checkpoint(tiny_world_cfg, tmp_path):
    """Returning True from on_step stops like stop_after (jobs use it for cancel and time limits); resuming is exact."""
    cfg = apply_overrides(tiny_world_cfg, ["train_lam.steps=10", "train_lam.ckpt_every=100"])
    straight = train("lam", cfg, tmp_path / "a", progress=False, tensorboard=False)
    seen = []
    first = train("lam", cfg, tmp_path / "b", progress=False, tensorboard=False,
                  on_step=lambda done, logs: seen.append((done, logs["loss"])) or done == 4)
    assert seen == [(i + 1, loss) for i, loss in enumerate(straight.losses[:4])]
    assert first.step == 4 and first.checkpoint == latest_checkpoint(tmp_path / "b") and first.checkpoint.name == "step_00000004"
    rest = train("lam", cfg, tmp_path / "b", progress=False, tensorboard=False, on_step=lambda done, logs: False)
    assert rest.resumed_from == 4 and rest.step == 10 and first.losses + rest.losses == straight.losses


def test_warm_start_begins_from_the_given_weights_and_then_resumes_normally(tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_tokenizer.steps=4", "train_tokenizer.ckpt_every=2"])
    base = train("tokenizer", cfg, tmp_path / "base", progress=False, tensorboard=False)
    warm = train("tokenizer", cfg, tmp_path / "warm", init=base.checkpoint, stop_after=2, progress=False, tensorboard=False)
    cold = train("tokenizer", cfg, tmp_path / "cold", stop_after=2, progress=False, tensorboard=False)
    # Starting from trained weights, the first loss is the trained model's, far below a fresh init's.
    assert warm.losses[0] < 0.8 * cold.losses[0], (warm.losses[0], cold.losses[0])
    # Once the run has its own checkpoint, `init` is ignored: it resumes at step 2 like any run.
    rest = train("tokenizer", cfg, tmp_path / "warm", init=tmp_path / "nowhere", progress=False, tensorboard=False)
    assert rest.resumed_from == 2 and rest.step == 4


def test_warm_start_refuses_another_kind_or_config(tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_lam.steps=1", "train_tokenizer.steps=1"])
    lam = train("lam", cfg, tmp_path / "lam", progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="is a lam checkpoint"):
        train("tokenizer", cfg, tmp_path / "tok", init=lam.checkpoint, progress=False, tensorboard=False)
    changed = replace(cfg, lam=replace(cfg.lam, vq=replace(cfg.lam.vq, beta=0.5)))
    with pytest.raises(ValueError, match="different lam config"):
        train("lam", changed, tmp_path / "lam2", init=lam.checkpoint, progress=False, tensorboard=False)
    assert not list((tmp_path / "lam2").glob("checkpoints/step_*"))


def test_warm_start_may_change_what_shapes_only_the_training_objective(tiny_world_cfg, tmp_path):
    cfg = apply_overrides(tiny_world_cfg, ["train_lam.steps=2", "train_lam.seed=1"])
    lam = train("lam", cfg, tmp_path / "lam", progress=False, tensorboard=False)
    rebalanced = replace(cfg, lam=replace(cfg.lam, balance=0.5), train_lam=replace(cfg.train_lam, steps=1, seed=0))
    warm = train("lam", rebalanced, tmp_path / "rebalanced", init=lam.checkpoint, progress=False, tensorboard=False)
    assert read_meta(warm.checkpoint)["config"]["balance"] == 0.5  # the new run records its own objective
    cold = train("lam", rebalanced, tmp_path / "cold", progress=False, tensorboard=False)
    base, after_warm, after_cold = (load_file(r.checkpoint / "model.safetensors") for r in (lam, warm, cold))

    def distance(a, b):
        return sum((a[k] - b[k]).pow(2).sum().item() for k in a if a[k].is_floating_point())

    # One step from the loaded weights stays near them; a fresh init (another seed) is far: the weights were loaded.
    assert distance(after_warm, base) < 0.1 * distance(after_cold, base)
