"""`genie rollout --actions` parsing (services/cli.py): latent ids, the world's arrow key bindings, action names."""

from __future__ import annotations

import pytest

from genie.controls import KeyBinding
from genie.spec import WorldSpec
from services.cli import _action_sequence

NAMES = ("Q (22%)", "UP (68%)", "jump far", "action 3")


KEYS = (KeyBinding("up", 1, 0.79), KeyBinding("down", 3))


def _spec(names=NAMES, keys=KEYS) -> WorldSpec:
    return WorldSpec(height=8, width=8, channels=3, tokens_per_frame=4, num_codes=16, window=4, keep=2,
                     num_actions=4, action_names=tuple(names), keys=tuple(keys))


def test_ids_keys_and_names_resolve():
    assert _action_sequence("2,up,JUMP, Down ,jump far,q (22%),Action 3,0", 8, _spec(), 0) == [2, 1, 1, 3, 2, 0, 3, 0]


def test_random_is_seeded_and_in_range():
    seq = _action_sequence("random", 50, _spec(), 7)
    assert seq == _action_sequence("random", 50, _spec(), 7) and len(seq) == 50 and set(seq) <= {0, 1, 2, 3}


@pytest.mark.parametrize("actions, match", [
    ("up,left", "the left key is unbound in this world"),
    ("right", "the right key is unbound"),
    ("fire", "unknown action 'fire'"),
    ("1,,2", "unknown action ''"),
    ("4", "latent action 4 is out of range"),
    ("-1", "unknown action '-1'"),
])
def test_bad_items_name_the_valid_ones(actions, match):
    with pytest.raises(ValueError, match=match) as info:
        _action_sequence(actions, 1, _spec(), 0)
    message = str(info.value)
    assert "\n" not in message and "latent ids 0..3" in message and "up=1, down=3, jump=1" in message
    assert "'jump far'" in message


def test_names_that_differ_only_in_case_are_ambiguous_and_keys_win_over_names():
    spec = _spec(names=("Left", "LEFT", "up", "x"), keys=(KeyBinding("up", 3),))
    with pytest.raises(ValueError, match="ambiguous action 'left'"):
        _action_sequence("left", 1, spec, 0)
    assert _action_sequence("up,x", 2, spec, 0) == [3, 3]  # "up" is the key (bound to 3), not action 2's name
    spec = _spec(names=("left", "b", "c", "d"), keys=())
    assert _action_sequence("LEFT", 1, spec, 0) == [0]  # an unbound key's name may still name an action


def test_a_world_without_bindings_or_names():
    spec = _spec(names=(), keys=())
    assert _action_sequence("0,3", 2, spec, 0) == [0, 3]
    with pytest.raises(ValueError, match=r"unbound .*bound keys: none\)$"):
        _action_sequence("up", 1, spec, 0)
