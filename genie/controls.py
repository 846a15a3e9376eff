"""Key bindings: which latent action each arrow key sends, derived from the eval's latent -> true action mapping.

The rule (key_bindings_from_mapping). A true action "presses" a key when its name, split on "+", contains the key's
name (case-insensitive): procgen's "LEFT+UP" presses left and up, the sprites' "left" presses left. For a key k
and a latent a seen n times, of which p pressed k:

    share  = p / n                             how often the latent's transitions press k (its purity for k)
    base   = the share of all transitions that press k
    low    = the Wilson lower bound of share at one-sided 95% (z = 1.645): what n transitions vouch for

The pair is a candidate when n >= MIN_BINDING_COUNT, share >= MIN_BINDING_LIFT * base (a tie worth playing with)
and low > base (not a fluke of a few transitions). Its strength is low / base. Candidates are taken strongest first,
each key and each latent at most once (a latent sends one thing, so two keys on one latent would tell the player
nothing new), ties going to the earlier key and then the lower latent. A key left without a candidate is unbound:
it sends nothing.

Worlds whose true actions press no key (or that have no mapping at all) bind nothing: sending latent 0..3 for the
arrows would be the arbitrary behaviour this module exists to remove; number keys still reach every latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

KEYS = ("left", "right", "up", "down")  # the arrow keys, in the order the play page lists them
KEY_ALIASES = {"jump": "up"}  # CoinRun's (and most platformers') UP is a jump
KEY_SOURCES = ("calibration", "mapping", "user", "default")  # calibration: against the real game (genie.eval.control)
MIN_BINDING_COUNT = 8  # transitions a latent needs before it may bind a key (as genie.worlds.MIN_NAMING_COUNT)
MIN_BINDING_LIFT = 1.5  # a bound latent presses its key at least this many times as often as the data does
BINDING_Z = 1.645  # one-sided 95% for the Wilson lower bound


@dataclass(frozen=True)
class KeyBinding:
    """One arrow key: the latent action it sends (None: unbound) and, when derived, the share of that latent's
    transitions whose true action pressed the key."""

    key: str
    action: int | None = None
    share: float | None = None

    def __post_init__(self) -> None:
        if self.key not in KEYS:
            raise ValueError(f"key must be one of {list(KEYS)}, got {self.key!r}")
        if self.action is not None and (isinstance(self.action, bool) or not isinstance(self.action, int)
                                        or self.action < 0):
            raise ValueError(f"key {self.key}: action must be a latent action id >= 0 or null, got {self.action!r}")


def canonical_key(name: str) -> str | None:
    """"Left", "JUMP", "up" -> "left", "up", "up"; None for a name that is no key."""
    name = name.strip().lower()
    name = KEY_ALIASES.get(name, name)
    return name if name in KEYS else None


def unbound_keys() -> dict[str, int | None]:
    return dict.fromkeys(KEYS)


def wilson_lower(hits: int, n: int, z: float = BINDING_Z) -> float:
    """The lower end of the Wilson score interval of the proportion hits / n (0 when n == 0)."""
    if n <= 0:
        return 0.0
    p = hits / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z * z / n))


def pressed_keys(true_name: str) -> set[str]:
    """The arrow keys a true action presses: "LEFT+UP" -> {"left", "up"}, "Q" -> set()."""
    return {k for part in str(true_name).split("+") if (k := canonical_key(part)) is not None}


def key_bindings_from_mapping(
    mapping: dict[str, Any] | None, num_actions: int
) -> tuple[dict[str, int | None], dict[str, dict[str, Any]]]:
    """Binds each arrow key to the latent most strongly tied to it (see the module docstring for the rule).

    Args:
        mapping: genie.eval.metrics.action_mapping's result (report["lam"]["mapping"]), or None.
        num_actions: A; latents >= A in the mapping are ignored.
    Returns:
        keys: {key: latent or None} for every key in KEYS.
        evidence: per key, the numbers behind its binding, or, when unbound, behind the best latent it had
            ({"latent", "count", "presses", "share", "base", "lift", "lift_low", "bound"}); keys no true action
            presses are absent.
    """
    keys = unbound_keys()
    mapping = mapping or {}
    true_names = mapping.get("true_names") or []
    latents = [e for e in mapping.get("latents", []) if 0 <= int(e.get("latent", -1)) < num_actions
               and e.get("count") and e.get("counts") and len(e["counts"]) == len(true_names)]
    presses = [pressed_keys(name) for name in true_names]
    total = sum(sum(e["counts"]) for e in latents)
    if not total or not any(presses):
        return keys, {}
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in KEYS}
    for k in KEYS:
        base = sum(c for e in latents for c, p in zip(e["counts"], presses, strict=True) if k in p) / total
        if base == 0:
            continue  # no transition presses this key
        for e in latents:
            n = int(sum(e["counts"]))
            hits = int(sum(c for c, p in zip(e["counts"], presses, strict=True) if k in p))
            share, low = hits / n, wilson_lower(hits, n)
            rows[k].append({"latent": int(e["latent"]), "count": n, "presses": hits, "share": share, "base": base,
                            "lift": share / base, "lift_low": low / base,
                            "candidate": n >= MIN_BINDING_COUNT and share >= MIN_BINDING_LIFT * base and low > base})
    candidates = [(k, r) for k in KEYS for r in rows[k] if r["candidate"]]
    candidates.sort(key=lambda c: (-c[1]["lift_low"], KEYS.index(c[0]), c[1]["latent"]))  # strongest first
    used: set[int] = set()
    for k, r in candidates:
        if keys[k] is None and r["latent"] not in used:
            keys[k] = r["latent"]
            used.add(r["latent"])
    evidence = {}
    for k in KEYS:
        if not rows[k]:
            continue
        chosen = [r for r in rows[k] if r["latent"] == keys[k]] if keys[k] is not None else []
        best = chosen[0] if chosen else max(rows[k], key=lambda r: (r["lift_low"], -r["latent"]))
        evidence[k] = {**{f: (round(v, 4) if isinstance(v, float) else v) for f, v in best.items() if f != "candidate"},
                       "bound": keys[k] is not None}
    return keys, evidence


def key_bindings_from_control(control: dict[str, Any] | None) -> tuple[dict[str, int | None], dict[str, dict[str, Any]]]:
    """The arrow key bindings a controllability eval calibrated against the real game (report["control"]), with
    their evidence per bound key: the share of calibration levels where the latent's frame was nearest the key's game
    frame ("calibration_share"), and the held-out test accuracy ("share", shown by the play page) and direction
    agreement. ({all unbound}, {}) without a calibration."""
    keys = unbound_keys()
    if not control or not isinstance(control.get("keys"), dict):
        return keys, {}
    test = (control.get("test") or {}).get("keys") or {}
    table = {row["latent"]: row for row in (control.get("calibration") or {}).get("latents", [])}
    evidence: dict[str, dict[str, Any]] = {}
    for key, latent in control["keys"].items():
        if key not in keys or latent is None:
            continue
        keys[key] = int(latent)
        scored = test.get(key) or {}
        calibration_share = (table.get(latent) or {}).get("nearest", {}).get(key)
        # "share" is what the play page shows beside the key: here, how often the latent did what the key does.
        share = scored.get("accuracy") if scored.get("accuracy") is not None else calibration_share
        evidence[key] = {"latent": int(latent), "share": share, "calibration_share": calibration_share,
                         "test_accuracy": scored.get("accuracy"),
                         "test_direction_agreement": scored.get("direction_agreement"), "bound": True}
    return keys, evidence


def check_key_bindings(keys: Any, num_actions: int | None = None) -> dict[str, int | None]:
    """Returns {key: latent or None} for every key in KEYS from a {key: latent or null} dict (missing keys are
    unbound); ValueError for an unknown key or a latent outside [0, num_actions) (no upper bound when None)."""
    if not isinstance(keys, dict):
        raise ValueError(f'"keys" must be an object like {{"left": 3, "up": null}}, got {keys!r}')
    out = unbound_keys()
    for name, action in keys.items():
        key = canonical_key(name) if isinstance(name, str) else None
        if key is None or key != name:
            raise ValueError(f"unknown key {name!r}; keys are {list(KEYS)}")
        KeyBinding(key, action)  # type check
        if action is not None and num_actions is not None and action >= num_actions:
            raise ValueError(f"key {key}: latent action {action} is out of range [0, {num_actions})")
        out[key] = action
    return out
