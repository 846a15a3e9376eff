"""Action names and arrow key bindings of a world directory (WORLD/actions.json): load, save, derive from an eval
report's mapping."""

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
    load_key_bindings,
    names_from_mapping,
    read_actions_file,
    save_action_names,
    save_key_bindings,
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


def test_export_describes_the_models_it_ships(trained_run, tmp_path):
    """A LAM trained in a run of its own (a second phase, a stage trained by hand) may carry another config than the
    one the dynamics run recorded: the exported world.json takes each model's config from its checkpoint."""
    import shutil

    from genie.config import load_world_config
    from genie.train.checkpoint import latest_checkpoint, read_meta
    from genie.worlds import export_world

    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs)
    recorded = json.loads((runs / "dynamics" / "world.json").read_text())
    lam_config = read_meta(latest_checkpoint(runs / "lam"))["config"]
    recorded["lam"] = {**lam_config, "balance": lam_config["balance"] + 0.5}  # as a run given other settings wrote it
    (runs / "dynamics" / "world.json").write_text(json.dumps(recorded))
    out = export_world(runs, tmp_path / "w")
    assert to_dict(load_world_config(out / "world.json").lam) == lam_config
    assert json.loads((out / "lam" / "config.json").read_text())["config"] == lam_config


# --- arrow key bindings ---------------------------------------------------------------------------------------------

UNBOUND = {"left": None, "right": None, "up": None, "down": None}


def _combo_report(num_actions: int) -> dict:
    """A mapping in which latent 1 presses UP in 30 of 40 transitions and latent 0 RIGHT in 30; nobody LEFT."""
    true_names = ["LEFT", "UP", "RIGHT", "NOOP"]
    rows = [[2, 2, 30, 6], [2, 30, 2, 6]] + [[2, 2, 2, 34]] * (num_actions - 2)
    latents = [{"latent": a, "count": sum(r), "counts": r, "majority_name": true_names[max(range(4), key=r.__getitem__)],
                "purity": max(r) / sum(r), "lift": 2.0} for a, r in enumerate(rows)]
    return {"lam": {"mapping": {"true_names": true_names, "latents": latents}}}


def test_apply_from_report_binds_the_keys(world_dir, tiny_world_cfg):
    a = _num_actions(tiny_world_cfg)
    assert load_key_bindings(world_dir, a) == (UNBOUND, "default")  # no actions.json: nothing bound
    apply_action_names_from_report(world_dir, _combo_report(a))
    assert load_key_bindings(world_dir, a) == ({"left": None, "right": 0, "up": 1, "down": None}, "mapping")
    doc = read_actions_file(world_dir)
    assert doc["key_evidence"]["up"]["share"] == 0.75 and doc["key_evidence"]["left"]["bound"] is False
    assert json.loads((world_dir / ACTIONS_FILE).read_text())["keys"]["down"] is None  # stored as null, not left out
    apply_action_names_from_report(world_dir, {"lam": None})  # a newer eval without a mapping unbinds them
    assert load_key_bindings(world_dir, a) == (UNBOUND, "default")


def test_user_keys_survive_re_derivation_and_name_edits(world_dir, tiny_world_cfg):
    a = _num_actions(tiny_world_cfg)
    apply_action_names_from_report(world_dir, _combo_report(a))
    save_key_bindings(world_dir, {"left": 3, "up": 1}, "user")
    mine = ({"left": 3, "right": None, "up": 1, "down": None}, "user")
    assert load_key_bindings(world_dir, a) == mine
    names = apply_action_names_from_report(world_dir, _combo_report(a))  # names re-derived, keys kept
    assert names[1] == "UP (75%)" and load_key_bindings(world_dir, a) == mine
    save_action_names(world_dir, [f"n{i}" for i in range(a)], "user")  # editing names keeps the keys
    assert load_key_bindings(world_dir, a) == mine
    apply_action_names_from_report(world_dir, _combo_report(a), overwrite_user=True)  # the explicit reset
    assert load_key_bindings(world_dir, a)[1] == "mapping"


def test_save_keys_without_names_file_and_bad_keys(world_dir, tiny_world_cfg):
    a = _num_actions(tiny_world_cfg)
    save_key_bindings(world_dir, {"down": 0}, "user")
    assert load_action_names(world_dir, a) == [f"action {i}" for i in range(a)]
    assert read_actions_file(world_dir)["source"] == "default"
    with pytest.raises(ValueError, match="out of range"):
        save_key_bindings(world_dir, {"down": a}, "user")
    with pytest.raises(ValueError, match="unknown key"):
        save_key_bindings(world_dir, {"fire": 0}, "user")
    assert load_key_bindings(world_dir, a)[0]["down"] == 0  # refused edits change nothing
    (world_dir / ACTIONS_FILE).write_text(json.dumps({"names": [f"x{i}" for i in range(a)],
                                                      "keys": {"up": a + 5}}))
    with pytest.raises(ValueError, match=rf"{ACTIONS_FILE}: .*out of range"):
        load_key_bindings(world_dir, a)
    (world_dir / ACTIONS_FILE).write_text(json.dumps({"names": [f"x{i}" for i in range(a)], "keys": {"up": 1}}))
    assert load_key_bindings(world_dir, a) == ({**UNBOUND, "up": 1}, "user")  # written by hand: the user's
    (world_dir / ACTIONS_FILE).write_text(json.dumps({"names": [f"x{i}" for i in range(a)], "keys": {"jump": 1}}))
    with pytest.raises(ValueError, match=rf"{ACTIONS_FILE}: bad action names file: unknown key 'jump'"):
        load_key_bindings(world_dir, a)
