"""Action names of a world directory (WORLD/actions.json): load, save, derive from an eval report's mapping."""

from __future__ import annotations

import json

import pytest

from genie.config import to_dict
from genie.worlds import (
    ACTIONS_FILE,
    MAX_NAME_CHARS,
    MIN_NAMING_COUNT,
    apply_action_names_from_report,
    load_action_names,
    names_from_mapping,
    read_actions_file,
    save_action_names,
)


@pytest.fixture
def world_dir(tmp_path, tiny_world_cfg):
    """A world directory as far as names go: world.json only (no checkpoints needed)."""
    (tmp_path / "world.json").write_text(json.dumps(to_dict(tiny_world_cfg)))
    return tmp_path


def _num_actions(cfg) -> int:
    return cfg.dynamics.num_actions


def _report(num_actions: int, named: dict[int, tuple[str, float, float, int]]) -> dict:
    """A report whose mapping gives latent a (majority name, purity, lift, count) for a in `named`."""
    latents = [{"latent": a, "count": 0, "majority_name": None, "purity": None, "lift": None} for a in range(num_actions)]
    for a, (name, purity, lift, count) in named.items():
        latents[a] = {"latent": a, "count": count, "majority_name": name, "purity": purity, "lift": lift}
    return {"lam": {"mapping": {"latents": latents, "many_to_one_accuracy": 0.5, "one_to_one_accuracy": 0.4}}}


def test_missing_file_gives_default_names(world_dir):
    assert load_action_names(world_dir, 3) == ["action 0", "action 1", "action 2"]
    assert read_actions_file(world_dir) is None


def test_save_and_load_round_trip(world_dir):
    path = save_action_names(world_dir, ["left", "right", "jump"], "user", evidence={"x": 1})
    assert path == world_dir / ACTIONS_FILE and not list(world_dir.glob(".tmp-*"))  # atomic: no temp file left
    assert load_action_names(world_dir, 3) == ["left", "right", "jump"]
    assert read_actions_file(world_dir) == {"names": ["left", "right", "jump"], "source": "user", "mapping": {"x": 1}}


@pytest.mark.parametrize("names, match", [
    ([], "non-empty"),
    (["a", "a"], "unique"),
    (["a", ""], "non-empty"),
    (["a", "x" * (MAX_NAME_CHARS + 1)], "at most"),
    (["a", "tab\there"], "printable"),
    (["a", 3], "string"),
])
def test_save_rejects_bad_names(world_dir, names, match):
    with pytest.raises(ValueError, match=match):
        save_action_names(world_dir, names, "user")
    assert not (world_dir / ACTIONS_FILE).exists()


def test_save_rejects_unknown_source(world_dir):
    with pytest.raises(ValueError, match="source"):
        save_action_names(world_dir, ["a"], "guess")


@pytest.mark.parametrize("content", ["{not json", '["a", "b"]', '{"names": ["a", "a"]}', '{"names": ["a"], "source": "x"}'])
def test_malformed_file_is_a_clear_value_error(world_dir, content):
    (world_dir / ACTIONS_FILE).write_text(content)
    with pytest.raises(ValueError, match=ACTIONS_FILE):
        load_action_names(world_dir, 2)


def test_wrong_count_is_a_value_error_naming_the_file(world_dir):
    save_action_names(world_dir, ["a", "b"], "user")
    with pytest.raises(ValueError, match=rf"{ACTIONS_FILE}: 2 names for 3 actions"):
        load_action_names(world_dir, 3)


def test_names_from_mapping_keep_weak_latents_unnamed():
    rare = MIN_NAMING_COUNT - 1
    report = _report(4, {0: ("RIGHT", 0.41, 2.0, 50), 1: ("LEFT", 0.3, 1.1, 50), 2: ("UP", 0.9, 3.0, rare)})
    names = names_from_mapping(report["lam"]["mapping"], 4)
    assert names == ["RIGHT (41%)", "action 1", "action 2", "action 3"]  # low lift, too rare, unused
    assert names_from_mapping(None, 2) == ["action 0", "action 1"]


def test_names_from_mapping_are_unique():
    mapping = _report(3, {0: ("RIGHT", 0.5, 2.0, 50), 2: ("RIGHT", 0.5, 2.0, 60)})["lam"]["mapping"]
    names = names_from_mapping(mapping, 3)
    assert names == ["RIGHT (50%) #0", "action 1", "RIGHT (50%) #2"]  # every one of a repeated name is numbered


def test_apply_from_report_writes_mapping_names(world_dir, tiny_world_cfg):
    a = _num_actions(tiny_world_cfg)
    names = apply_action_names_from_report(world_dir, _report(a, {1: ("UP", 0.8, 4.0, 100)}))
    assert names[1] == "UP (80%)" and names[0] == "action 0" and len(names) == a
    doc = read_actions_file(world_dir)
    assert doc["source"] == "mapping" and doc["names"] == names
    assert doc["mapping"]["many_to_one_accuracy"] == 0.5 and doc["mapping"]["latents"][1]["majority_name"] == "UP"
    assert load_action_names(world_dir, a) == names


def test_apply_without_mapping_keeps_default_names(world_dir, tiny_world_cfg):
    a = _num_actions(tiny_world_cfg)
    assert apply_action_names_from_report(world_dir, {"lam": None}) == [f"action {i}" for i in range(a)]
    assert read_actions_file(world_dir)["source"] == "default"


def test_user_edits_are_never_overwritten(world_dir, tiny_world_cfg):
    a = _num_actions(tiny_world_cfg)
    mine = [f"mine {i}" for i in range(a)]
    save_action_names(world_dir, mine, "user")
    assert apply_action_names_from_report(world_dir, _report(a, {0: ("UP", 0.9, 4.0, 100)})) == mine
    assert read_actions_file(world_dir)["source"] == "user" and load_action_names(world_dir, a) == mine
    # ... and a mapping's names are replaced by a newer mapping's.
    save_action_names(world_dir, [f"old {i}" for i in range(a)], "mapping")
    assert apply_action_names_from_report(world_dir, _report(a, {0: ("UP", 0.9, 4.0, 100)}))[0] == "UP (90%)"
    assert apply_action_names_from_report(world_dir, _report(a, {}), overwrite_user=True)[0] == "action 0"


def test_names_from_mapping_read_key_combos():
    true_names = ["LEFT", "LEFT+UP", "UP", "RIGHT+UP", "RIGHT", "NOOP"]
    base = [0.2, 0.1, 0.1, 0.1, 0.2, 0.3]  # UP is pressed in 30% of all transitions, LEFT in 30%
    jump = {"latent": 0, "count": 10, "counts": [1, 3, 4, 1, 0, 1], "majority_name": "UP", "purity": 0.4, "lift": 4.0}
    left = {"latent": 1, "count": 10, "counts": [4, 4, 0, 0, 1, 1], "majority_name": "LEFT", "purity": 0.4, "lift": 2.0}
    vague = {"latent": 2, "count": 10, "counts": [2, 1, 1, 1, 2, 3], "majority_name": "NOOP", "purity": 0.3, "lift": 1.0}
    mapping = {"true_names": true_names, "true_frequency": base, "latents": [jump, left, vague]}
    names = names_from_mapping(mapping, 3)
    # 8 of jump's 10 transitions press UP (LEFT+UP, UP, RIGHT+UP); 8 of left's press LEFT, 4 of them LEFT+UP.
    assert names == ["UP (80%)", "LEFT (80%)", "action 2"]


def test_re_export_keeps_the_worlds_action_names(trained_run, tmp_path, tiny_world_cfg):
    from genie.worlds import export_world

    out = export_world(trained_run, tmp_path / "w")
    assert not (out / ACTIONS_FILE).exists()  # a first export has no names file: the defaults apply
    names = [f"move {i}" for i in range(_num_actions(tiny_world_cfg))]
    save_action_names(out, names, "user")
    export_world(trained_run, out)  # replaces the checkpoints, keeps the names
    assert load_action_names(out, _num_actions(tiny_world_cfg)) == names
    assert read_actions_file(out)["source"] == "user"
