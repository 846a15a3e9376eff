"""The arrow key binding rule (genie.controls) on toy mappings whose answers are known."""

from __future__ import annotations

import pytest

from genie.controls import (
    KEYS,
    MIN_BINDING_COUNT,
    canonical_key,
    check_key_bindings,
    key_bindings_from_mapping,
    pressed_keys,
    wilson_lower,
)


def _mapping(true_names: list[str], rows: list[list[int]]) -> dict:
    """A mapping as genie.eval.metrics.action_mapping writes it, from per-latent counts over the true actions."""
    return {"true_names": true_names,
            "latents": [{"latent": a, "count": sum(r), "counts": r} for a, r in enumerate(rows)]}


def test_pressed_keys_read_combos_case_insensitively():
    assert pressed_keys("LEFT+UP") == {"left", "up"}
    assert pressed_keys("right") == {"right"} and pressed_keys("NOOP") == set() and pressed_keys("Q") == set()
    assert canonical_key("Jump") == "up" and canonical_key(" DOWN ") == "down" and canonical_key("fire") is None


def test_wilson_lower_bound_known_values():
    assert wilson_lower(0, 0) == 0.0
    assert wilson_lower(42, 53) == pytest.approx(0.687, abs=1e-3)  # the demo world's UP latent
    assert wilson_lower(10, 10) < 1.0 and wilson_lower(5, 10) < 0.5 < wilson_lower(500, 600)


def test_each_key_gets_its_clearly_tied_latent_and_an_untied_key_stays_unbound():
    true_names = ["LEFT", "LEFT+UP", "UP", "RIGHT", "DOWN", "NOOP"]
    rows = [
        [2, 10, 20, 2, 2, 4],  # latent 0: 30 of 40 press UP
        [20, 10, 2, 2, 2, 4],  # latent 1: 30 of 40 press LEFT (and 12 UP: weaker than latent 0)
        [2, 2, 2, 28, 2, 4],  # latent 2: 28 of 40 press RIGHT
        [6, 6, 6, 6, 2, 14],  # latent 3: vague; every latent presses DOWN 2 times in 40, its base rate
    ]
    keys, evidence = key_bindings_from_mapping(_mapping(true_names, rows), 4)
    assert keys == {"left": 1, "right": 2, "up": 0, "down": None}
    assert evidence["up"]["latent"] == 0 and evidence["up"]["share"] == 0.75 and evidence["up"]["bound"]
    assert evidence["down"]["bound"] is False and evidence["down"]["lift"] < 1.5  # why down is unbound
    assert list(keys) == list(KEYS)


def test_a_latent_binds_one_key_only_its_strongest():
    # Latent 0 presses LEFT+UP: it is the best latent for both keys, but is taken by up (the stronger tie, UP being
    # rarer); latent 1's LEFT share (55%) is under 1.5x LEFT's base rate (48%), so left stays unbound.
    true_names = ["LEFT+UP", "LEFT", "RIGHT", "NOOP"]
    rows = [[30, 2, 2, 6], [2, 20, 6, 12], [2, 2, 20, 16]]
    keys, evidence = key_bindings_from_mapping(_mapping(true_names, rows), 3)
    assert keys == {"left": None, "right": 2, "up": 0, "down": None}
    assert evidence["left"]["latent"] == 0 and evidence["left"]["bound"] is False
    assert "down" not in evidence  # no true action presses down


def test_a_few_lucky_transitions_do_not_bind():
    true_names = ["DOWN", "UP", "NOOP"]
    few = [MIN_BINDING_COUNT - 1, 0, 0]  # all DOWN, but too rare to trust
    rows = [[2, 30, 28], few, [3, 3, 54]]
    keys, _ = key_bindings_from_mapping(_mapping(true_names, rows), 3)
    assert keys["down"] is None and keys["up"] == 0
    # The same share over a few more transitions is enough.
    rows[1] = [MIN_BINDING_COUNT, 0, 0]
    assert key_bindings_from_mapping(_mapping(true_names, rows), 3)[0]["down"] == 1


def test_sprites_names_bind_and_latents_outside_the_world_are_ignored():
    true_names = ["noop", "up", "down", "left", "right"]
    rows = [[40, 0, 0, 0, 0], [0, 40, 0, 0, 0], [0, 0, 40, 0, 0], [0, 0, 0, 40, 0], [0, 0, 0, 0, 40]]
    keys, _ = key_bindings_from_mapping(_mapping(true_names, rows), 4)  # latent 4 (right) is not a world action
    assert keys == {"left": 3, "right": None, "up": 1, "down": 2}


@pytest.mark.parametrize("mapping", [None, {}, _mapping(["A", "B"], [[10, 0], [0, 10]]), {"true_names": ["UP"]}])
def test_without_key_combos_nothing_binds(mapping):
    assert key_bindings_from_mapping(mapping, 2) == (dict.fromkeys(KEYS), {})


def test_check_key_bindings():
    assert check_key_bindings({"up": 3}, 4) == {"left": None, "right": None, "up": 3, "down": None}
    for bad, match in [({"jump": 1}, "unknown key"), ({"Left": 1}, "unknown key"), ({"up": 4}, "out of range"),
                       ({"up": -1}, "action must be"), ({"up": "3"}, "action must be"), ({"up": True}, "action must be"),
                       ([1, 2], "must be an object")]:
        with pytest.raises(ValueError, match=match):
            check_key_bindings(bad, 4)
