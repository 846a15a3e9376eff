"""The dynamics' token cache (train_dynamics.encode_once): what it holds, when it is rebuilt, and training on it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from genie.catalog import file_sha256
from genie.config import apply_overrides
from genie.data import ShardedDataset, ShardWriter
from genie.data.source import VideoBatch
from genie.train import loop, token_cache
from genie.train.checkpoint import latest_checkpoint, load_model
from genie.train.loop import train
from genie.train.token_cache import TokenBatch, build_token_cache, window_starts

LENGTHS = (5, 12, 13, 6)  # with T=6: no window, 2, 3 (the last ending at frame 12), 1


def _dataset(root, lengths=LENGTHS, size=16):
    rng = np.random.default_rng(0)
    writer = ShardWriter(root, frames_per_shard=16)
    for n, length in enumerate(lengths):
        writer.add(rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8), None, {"n": n})
    writer.close({})
    return root


def _frozen(trained_run):
    dirs = {k: latest_checkpoint(trained_run / k) for k in ("tokenizer", "lam")}
    return dirs, (load_model(dirs["tokenizer"], "tokenizer"), load_model(dirs["lam"], "lam"))


def _build(out, data, dirs, models, **kw):
    return build_token_cache(out, data, 6, dirs["tokenizer"], dirs["lam"], *models, torch.device("cpu"), **kw)


def _counting(monkeypatch):
    calls = []
    encode = token_cache._encode_windows

    def counted(data, windows, *args):
        calls.append(list(windows))
        return encode(data, windows, *args)

    monkeypatch.setattr(token_cache, "_encode_windows", counted)
    return calls


def test_windows_tile_each_episode_and_end_at_its_last_frame():
    assert window_starts([5, 12, 13, 6], 6) == [(1, 0), (1, 6), (2, 0), (2, 6), (2, 7), (3, 0)]
    assert window_starts([3], 6) == []


def test_the_cache_holds_what_the_frozen_models_give_each_window(trained_run, tmp_path, monkeypatch, capsys):
    data = _dataset(tmp_path / "data")
    dirs, (tokenizer, lam) = _frozen(trained_run)
    monkeypatch.setattr(token_cache, "CHUNK_WINDOWS", 4)  # 6 windows: two chunk files
    cache = _build(tmp_path / "cache", data, dirs, (tokenizer, lam), progress=True)
    assert "encode dataset" in capsys.readouterr().err  # minutes on a CPU: not silent
    ds = ShardedDataset(data)
    windows = window_starts([e.length for e in ds.episodes], 6)
    assert cache.num_windows == len(windows) == 6 and len(list((tmp_path / "cache").glob("chunk-*"))) == 2
    for w, (ep, start) in enumerate(windows):
        clip = torch.from_numpy(np.array(ds.clip(ep, start, 6)[0]))[None]  # (1, T, H, W, C)
        with torch.no_grad():
            assert torch.equal(cache.tokens[w].long(), tokenizer.encode(clip)[0])
            assert torch.equal(cache.actions[w].long(), lam.infer_actions(clip)[0])
    # Batches are a function of (seed, step); a slice of rows is the same rows of the whole batch.
    whole = cache.batch(3, 5)
    assert isinstance(whole, TokenBatch) and whole.tokens.shape == (5, 6, tokenizer.cfg.tokens_per_frame)
    assert whole.tokens.dtype == whole.actions.dtype == torch.int64
    assert torch.equal(whole.tokens, cache.batch(3, 5).tokens)
    assert torch.equal(cache.batch_rows(3, 5, 1, 4).tokens, whole.tokens[1:4])
    assert not torch.equal(cache.batch(4, 5).tokens, whole.tokens)


def test_an_interrupted_build_resumes_and_other_weights_rebuild(trained_run, tmp_path, monkeypatch):
    data = _dataset(tmp_path / "data")
    dirs, models = _frozen(trained_run)
    monkeypatch.setattr(token_cache, "CHUNK_WINDOWS", 4)
    first = _build(tmp_path / "cache", data, dirs, models)
    (tmp_path / "cache" / "chunk-00001.safetensors").unlink()  # as if killed before the second chunk was written
    calls = _counting(monkeypatch)
    resumed = _build(tmp_path / "cache", data, dirs, models)
    assert len(calls) == 1 and len(calls[0]) == 2  # only the missing chunk: its 2 windows
    assert torch.equal(resumed.tokens, first.tokens) and torch.equal(resumed.actions, first.actions)
    _build(tmp_path / "cache", data, dirs, models)
    assert len(calls) == 1  # complete: loaded, nothing encoded

    other = tmp_path / "lam-other"  # the same LAM with one weight changed: the cache must not be reused
    shutil.copytree(dirs["lam"], other)
    state = load_file(other / "model.safetensors")
    name = next(iter(state))
    state[name] = state[name] + 0.5
    save_file(state, other / "model.safetensors")
    _build(tmp_path / "cache", data, {**dirs, "lam": other}, (models[0], load_model(other, "lam")))
    assert len(calls) == 3  # both chunks again
    key = json.loads((tmp_path / "cache" / "key.json").read_text())
    assert key["lam"] == file_sha256(other / "model.safetensors")


def test_a_cached_batch_gives_the_loss_of_encoding_its_frames(trained_run, tmp_path, tiny_world_cfg):
    data = _dataset(tmp_path / "data")
    dirs, (tokenizer, lam) = _frozen(trained_run)
    cache = _build(tmp_path / "cache", data, dirs, (tokenizer, lam))
    ds = ShardedDataset(data)
    windows = window_starts([e.length for e in ds.episodes], 6)
    picks = [4, 0, 2]
    frames = torch.stack([torch.from_numpy(np.array(ds.clip(*windows[w], 6)[0])) for w in picks])
    cached = TokenBatch(cache.tokens[picks].long(), cache.actions[picks].long())
    model = load_model(latest_checkpoint(trained_run / "dynamics"), "dynamics").train()
    objective = loop._dynamics_objective(model, tokenizer, lam, tiny_world_cfg.dynamics, 3)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    encoded_loss, _ = objective(VideoBatch(frames, None), gen())
    cached_loss, _ = objective(cached, gen())
    assert torch.allclose(cached_loss, encoded_loss)


def test_dynamics_trains_on_the_cache_and_resumes_without_encoding_again(trained_run, tmp_path, tiny_world_cfg,
                                                                        monkeypatch):
    data = _dataset(tmp_path / "data")
    dirs, _ = _frozen(trained_run)
    cfg = apply_overrides(tiny_world_cfg, ["data.source=shards", f"data.path={data}", "train_dynamics.encode_once=true",
                                           "train_dynamics.steps=4", "train_dynamics.ckpt_every=2"])
    first = train("dynamics", cfg, tmp_path / "run", frozen=dirs, stop_after=2, progress=False, tensorboard=False)
    assert first.step == 2 and all(np.isfinite(first.losses))
    assert (tmp_path / "run" / "token-cache" / "key.json").exists()
    calls = _counting(monkeypatch)
    second = train("dynamics", cfg, tmp_path / "run", frozen=dirs, progress=False, tensorboard=False)
    assert (second.resumed_from, second.step, calls) == (2, 4, [])
    with pytest.raises(ValueError, match="pass no other source"):
        train("dynamics", cfg, tmp_path / "run2", frozen=dirs, source=object(), progress=False, tensorboard=False)


def test_encode_once_is_a_dynamics_setting_for_datasets(trained_run, tiny_world_cfg, tmp_path):
    with pytest.raises(ValueError, match="a dynamics training setting"):
        replace(tiny_world_cfg, train_lam=replace(tiny_world_cfg.train_lam, encode_once=True))
    sprites = apply_overrides(tiny_world_cfg, ["train_dynamics.encode_once=true"])  # the tiny preset trains on sprites
    with pytest.raises(ValueError, match="needs data.source=shards"):
        train("dynamics", sprites, tmp_path / "run", frozen=_frozen(trained_run)[0], progress=False, tensorboard=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
