"""The controllability eval against the real CoinRun game: shift estimation, spots, key scores and calibration."""

from __future__ import annotations

import numpy as np
import pytest

from genie.eval.control import (
    KEY_ACTIONS,
    ControlConfig,
    best_shift,
    calibrate_keys,
    collect_probes,
    key_scores,
    lam_motions,
    latent_table,
    scene_shift,
)


@pytest.fixture(scope="module")
def probes():
    found, tried = collect_probes(ControlConfig(levels=3, split="test"))
    assert len(found) == 3 and tried >= 3
    return found


def _texture(seed: int = 0, size: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("dy,dx", [(0, 0), (0, 3), (0, -5), (4, 0), (-2, 6), (7, -7)])
def test_best_shift_finds_the_translation(dy, dx):
    big = _texture()
    before = big[16:80, 16:80]
    after = big[16 - dy : 80 - dy, 16 - dx : 80 - dx]  # after[y, x] = before[y - dy, x - dx]
    assert best_shift(before, after) == (dy, dx)


def test_scene_shift_sums_consecutive_frames():
    big = _texture(1)
    frames = np.stack([big[16:80, 16 - 2 * k : 80 - 2 * k] for k in range(1, 7)])  # 2 px a frame to the right
    assert scene_shift(big[16:80, 16:80], frames, axis=1) == 12
    assert scene_shift(big[16:80, 16:80], frames, axis=0) == 0


def test_probes_are_spots_where_left_and_right_scroll_sideways(probes):
    for p in probes:
        last = p.prompt[-1]
        assert p.prompt.shape == (4, 64, 64, 3) and set(p.game) == set(KEY_ACTIONS)
        right, left = scene_shift(last, p.game["right"], 1), scene_shift(last, p.game["left"], 1)
        assert abs(right) >= 3 and abs(left) >= 3 and np.sign(right) == -np.sign(left)
        assert scene_shift(last, p.game["noop"], 1) == 0 and np.array_equal(p.game["noop"][-1], last)
        assert scene_shift(last, p.game["up"], 0) != 0  # a jump moves the camera
        assert {m: c.shape[0] for m, c in p.clips.items()} == dict.fromkeys(p.clips, 8)


def _frames_from(probes, latent_keys: dict[int, str | None]) -> np.ndarray:
    """(A, L, horizon, ...) frames of a pretend world: latent a replays the game under latent_keys[a], or stands
    still (the prompt's last frame) when None."""
    out = []
    for key in latent_keys.values():
        out.append([p.game[key] if key else np.repeat(p.prompt[-1:], len(p.game["noop"]), 0) for p in probes])
    return np.asarray(out)


def test_a_world_that_plays_like_the_game_scores_one(probes):
    frames = _frames_from(probes, {0: "noop", 1: "right", 2: "up", 3: "left"})
    table = latent_table(frames, probes)
    keys = calibrate_keys(table)
    assert keys == {"right": 1, "left": 3, "up": 2}
    scores = key_scores(frames, probes, {**keys, "noop": 0})
    for key in ("right", "left", "up"):
        assert scores[key]["accuracy"] == 1.0 and scores[key]["direction_agreement"] == 1.0
    assert scores["noop"]["accuracy"] == 1.0
    assert table[1]["mean_dx"] < 0 < table[3]["mean_dx"]


def test_a_world_that_cannot_walk_gets_no_walking_keys(probes):
    # Like the shipped demo world: only jumping moves the scene.
    frames = _frames_from(probes, {0: None, 1: None, 2: "up", 3: None})
    keys = calibrate_keys(latent_table(frames, probes))
    assert keys["up"] == 2 and keys["right"] is None and keys["left"] is None
    scores = key_scores(frames, probes, {"right": 0, "left": 1, "up": 2, "noop": 3})
    assert scores["right"]["accuracy"] == 0.0 and scores["right"]["direction_agreement"] == 0.0
    assert scores["left"]["accuracy"] == 0.0 and scores["up"]["accuracy"] == 1.0


class _LabelByMotion:
    """A pretend LAM labelling each transition by the sign of its horizontal scroll (0 still, 1 right, 2 left)."""

    class cfg:  # noqa: N801 - mimics LatentActionModel.cfg
        max_frames = 8

    def infer_actions(self, clips):
        import torch

        out = []
        for clip in clips.numpy():
            row = []
            for a, b in zip(clip[:-1], clip[1:], strict=True):
                dy, dx = best_shift(a, b)
                row.append(3 if dy else (0 if dx == 0 else (1 if dx < 0 else 2)))
            out.append(row)
        return torch.tensor(out)


def test_lam_motions_majorities(probes):
    report = lam_motions(_LabelByMotion(), probes)
    motions = report["motions"]
    assert motions["stand"]["majority"] == 0 and motions["stand"]["share"] == 1.0
    assert motions["walk right"]["majority"] == 1 and motions["walk left"]["majority"] == 2
    assert report["distinct"] and all(m["transitions"] == 7 * len(probes) for m in motions.values())


def test_eval_of_a_coinrun_world_calibrates_keys_on_val_and_scores_on_test(tmp_path):
    """`genie eval`'s path end to end on a (barely trained) 64x64 world: the control report, its splits, and the
    arrow keys it binds in actions.json."""
    from dataclasses import replace

    from genie.config import apply_overrides
    from genie.data import make_source
    from genie.data.procgen import SPLIT_LEVELS, ProcgenConfig, generate
    from genie.eval.run import EvalConfig, evaluate
    from genie.presets import tiny
    from genie.train.checkpoint import latest_checkpoint
    from genie.train.loop import train
    from genie.worlds import apply_action_names_from_report, export_world, read_actions_file

    generate(ProcgenConfig(split="val", episodes=2, episodes_per_env=2, max_frames=30), tmp_path / "val",
             progress=False)
    cfg = tiny()
    cfg = apply_overrides(cfg, ["data.height=64", "data.width=64", "tokenizer.frame.height=64",
                                "tokenizer.frame.width=64", "lam.frame.height=64", "lam.frame.width=64",
                                "tokenizer.patch=16", "lam.patch=16", "lam.context=1", "train_tokenizer.steps=2",
                                "train_lam.steps=2", "train_dynamics.steps=2", "data.source=shards",
                                f"data.path={tmp_path / 'val'}", f"data.eval_path={tmp_path / 'val'}"])
    cfg = replace(cfg, dynamics=replace(cfg.dynamics, tokens_per_frame=16))
    runs = tmp_path / "runs"
    for kind in ("tokenizer", "lam"):
        train(kind, cfg, runs / kind, progress=False, tensorboard=False)
    frozen = {k: latest_checkpoint(runs / k) for k in ("tokenizer", "lam")}
    train("dynamics", cfg, runs / "dynamics", frozen=frozen, progress=False, tensorboard=False)
    world = export_world(runs, tmp_path / "world")
    report = evaluate(world, make_source(cfg.data, evaluation=True),
                      EvalConfig(clips=2, batch_size=2, atlas_prompts=0, control_levels=2), tmp_path / "eval")
    control = report["control"]
    calib, test = control["calibration"], control["test"]
    assert all(SPLIT_LEVELS["val"] <= lv < SPLIT_LEVELS["test"] for lv in calib["levels"]) and len(calib["levels"]) == 2
    assert all(lv >= SPLIT_LEVELS["test"] for lv in test["levels"]) and len(test["levels"]) == 2
    assert test["keys_from"] == "given" and set(test["keys"]) == set(KEY_ACTIONS)
    assert {k: v["latent"] for k, v in test["keys"].items() if k != "noop"} == control["keys"]
    assert len(test["latents"]) == cfg.dynamics.num_actions and "lam_motions" in test
    for key, row in test["keys"].items():
        assert row["latent"] is None or 0.0 <= row["accuracy"] <= 1.0, key
    apply_action_names_from_report(world, report)
    doc = read_actions_file(world)
    bound = {k: v for k, v in control["keys"].items() if v is not None}
    if bound:  # whatever an untrained world binds is written as the game's calibration, with its evidence
        assert doc["keys_source"] == "calibration" and all(doc["keys"][k] == v for k, v in bound.items())
        assert set(doc["key_evidence"]) == set(bound)
    assert doc["keys"]["down"] is None or doc["keys_source"] != "calibration"
    # Given bindings (a speed setting judged by the reference's keys): no calibration, the test levels scored with them.
    given = {"right": 1, "left": 0, "up": None, "noop": 2}
    again = evaluate(world, make_source(cfg.data, evaluation=True),
                     EvalConfig(clips=2, batch_size=2, atlas_prompts=0, control_levels=2), tmp_path / "eval2",
                     precision="fp32", control_keys=given)
    assert again["control"]["calibration"] is None and again["control"]["keys"] == given
    assert again["control"]["test"]["levels"] == test["levels"]
    assert {k: v["latent"] for k, v in again["control"]["test"]["keys"].items()} == given


class _ScrollingGame:
    """A stand-in for CoinRun with Procgen's interface: the view scrolls 2 px a frame under RIGHT/LEFT, UP and
    RIGHT+UP lift it for the frames they are held, and stepping on the floor at x in [62, 66] ends the episode (a
    monster): the next observation is a new level, flagged `first`, as Procgen shows it."""

    def __init__(self) -> None:
        self.texture = np.random.default_rng(3).integers(0, 255, (128, 256, 3), dtype=np.uint8)
        self.x, self.lift, self.first, self.deaths = 40, 0, False, 0

    def act(self, action) -> None:
        a = int(action[0])
        self.x += {7: 2, 8: 3, 1: -2}.get(a, 0)
        self.lift = 2 if a in (5, 8) else 0
        self.first = self.lift == 0 and 62 <= self.x <= 66
        if self.first:
            # The next level's first view happens to look like the old view scrolled on (as CoinRun's tiled backdrops
            # often do), so the scroll checks alone do not notice that a new level began.
            self.x, self.deaths = self.x + 6, self.deaths + 1

    def observe(self):
        frame = self.texture[32 - self.lift : 96 - self.lift, self.x : self.x + 64].copy()
        return np.zeros(1), {"rgb": frame[None]}, np.array([self.first])

    def get_state(self):
        return [(self.x, self.lift, self.first)]

    def set_state(self, state) -> None:
        self.x, self.lift, self.first = state[0]


def test_a_spot_where_a_key_ends_the_episode_is_skipped():
    """At the first spot (x=52) holding RIGHT walks into the monster: what the game shows then is the next level,
    not what RIGHT did, so no world could match it. The probe comes from the next spot instead."""
    from genie.eval.control import probe_level

    game = _ScrollingGame()
    probe = probe_level(game, 0, ControlConfig(levels=1))
    assert probe is not None and game.deaths >= 1  # RIGHT did end the episode at the first spot
    for key, dx in (("right", -12), ("left", 12)):
        assert scene_shift(probe.prompt[-1], probe.game[key], axis=1) == dx  # a clean scroll, no new level
