"""A world directory: world.json plus the tokenizer, LAM and dynamics checkpoints, loadable as a World."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from genie.config import MODEL_KINDS, WorldConfig, from_dict, load_world_config, to_dict, write_json_atomic
from genie.controls import (
    KEY_SOURCES,
    KeyBinding,
    check_key_bindings,
    key_bindings_from_control,
    key_bindings_from_mapping,
    unbound_keys,
)
from genie.data import make_source
from genie.diskfull import disk_full_as_error
from genie.media import save_png
from genie.sampling import SamplingConfig, World
from genie.train.checkpoint import latest_checkpoint, load_model, read_meta

log = logging.getLogger(__name__)


def export_world(run_root: Path, out: Path) -> Path:
    """Copies the newest checkpoint of each model under `run_root/<kind>/` into the world dir `out`, keeping the
    action names (actions.json) it already has."""
    run_root, out = Path(run_root), Path(out)
    world = load_world_config(run_root / "dynamics" / "world.json")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    # Any failure (a full disk: DiskFull) removes the partial copy at once; a world already at `out` stays as it was.
    with disk_full_as_error(out, "world", cleanup=tmp):
        tmp.mkdir(parents=True)
        for kind in MODEL_KINDS:
            ckpt = latest_checkpoint(run_root / kind)
            if ckpt is None:
                raise ValueError(f"no {kind} checkpoint under {run_root / kind}; train it first")
            world = _described_by_checkpoint(world, kind, ckpt, run_root)
            (tmp / kind).mkdir()
            for name in ("model.safetensors", "config.json"):
                shutil.copy2(ckpt / name, tmp / kind / name)
        (tmp / "world.json").write_text(json.dumps(to_dict(world), indent=2))
        _write_prompts(world, tmp / "prompts")
        if (out / ACTIONS_FILE).is_file():  # names (maybe a user's edits) belong to the world, not to one export of it
            shutil.copy2(out / ACTIONS_FILE, tmp / ACTIONS_FILE)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _described_by_checkpoint(world: WorldConfig, kind: str, ckpt: Path, run_root: Path) -> WorldConfig:
    """The world config with `kind`'s model config as its checkpoint records it. The dynamics run's world.json holds
    whatever config that run was given, while the tokenizer and LAM it froze were trained, and saved their own configs,
    in runs of their own (a LAM trained in two phases, a stage trained by hand): the exported world.json must describe
    the models it ships."""
    saved = read_meta(ckpt)["config"]
    if saved == to_dict(world.model_config(kind)):
        return world
    log.warning("%s: the %s checkpoint's config differs from the dynamics run's world.json; the world takes the "
                "checkpoint's", run_root, kind)
    return dataclasses.replace(world, **{kind: from_dict(type(world.model_config(kind)), saved)})


def _write_prompts(world: WorldConfig, folder: Path, count: int = 8) -> None:
    """Saves first frames of held-out clips (training clips if none are held out) as the world's prompts."""
    try:
        source = make_source(world.data, evaluation=True)
    except ValueError:
        source = make_source(world.data)
    folder.mkdir()
    for i, frame in enumerate(source.batch(0, count).frames[:, 0].numpy()):
        save_png(frame, folder / f"{i:02d}.png")


def load_prompts(world_dir: Path) -> list[Path]:
    """The prompt images shipped with a world, in order."""
    return sorted((Path(world_dir) / "prompts").glob("*.png"))


def load_world_config_of(world_dir: Path) -> WorldConfig:
    path = Path(world_dir) / "world.json"
    if not path.exists():
        raise ValueError(f"{world_dir} is not a world directory (no world.json)")
    return load_world_config(path)


def load_world(
    world_dir: Path, sampling: SamplingConfig | None = None, cache_bytes: int = 1 << 28, device: str = "cpu",
    precision: str = "auto", fixed_shapes: bool = False,
) -> tuple[World, WorldConfig]:
    """Loads the tokenizer and dynamics of a world dir (the LAM is not needed to play) onto `device`."""
    world_dir = Path(world_dir)
    cfg = load_world_config_of(world_dir)
    for kind in ("tokenizer", "dynamics"):
        read_meta(world_dir / kind)
    tokenizer = load_model(world_dir / "tokenizer", "tokenizer")
    dynamics = load_model(world_dir / "dynamics", "dynamics")
    return World(tokenizer, dynamics, sampling or cfg.sampling, cache_bytes, device, precision, fixed_shapes), cfg


# --- Action names: WORLD/actions.json ------------------------------------------------------------------------------

ACTIONS_FILE = "actions.json"
NAME_SOURCES = ("mapping", "user", "default")
MAX_NAME_CHARS = 32
# A latent action is named after its majority true action only when it was seen at least MIN_NAMING_COUNT times and
# that true action is at least MIN_NAMING_LIFT times more frequent under it than in the data overall.
MIN_NAMING_COUNT = 8
MIN_NAMING_LIFT = 1.5


def default_action_names(num_actions: int) -> list[str]:
    """"action 0", "action 1", ...: the names of a world nobody named."""
    return [f"action {a}" for a in range(num_actions)]


def check_action_names(names: list[str]) -> list[str]:
    """Returns the names if each is a non-empty, printable string of at most MAX_NAME_CHARS and all are unique."""
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError("action names must be a non-empty list of strings")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"action name {i} must be a non-empty string, got {name!r}")
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise ValueError(f"action name {i} {name!r} must be printable and at most {MAX_NAME_CHARS} characters")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise ValueError(f"action names must be unique; repeated: {dupes}")
    return list(names)


def read_actions_file(world_dir: Path) -> dict[str, Any] | None:
    """The parsed WORLD/actions.json ({"names", "source", ...}, with "keys" and "keys_source" when it binds the
    arrow keys), None if absent; ValueError naming the file if bad. A file without a "source" (or with "keys" but
    no "keys_source") was written by hand: its source is "user"."""
    path = Path(world_dir) / ACTIONS_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or "names" not in doc:
            raise ValueError('expected a JSON object with "names"')
        check_action_names(doc["names"])
        doc.setdefault("source", "user")
        if doc["source"] not in NAME_SOURCES:
            raise ValueError(f"source must be one of {list(NAME_SOURCES)}, got {doc['source']!r}")
        if "keys" in doc:  # arrow keys a person wrote in by hand are theirs, like names without a source
            doc["keys"] = check_key_bindings(doc["keys"])
            doc.setdefault("keys_source", "user")
            if doc["keys_source"] not in KEY_SOURCES:
                raise ValueError(f"keys_source must be one of {list(KEY_SOURCES)}, got {doc['keys_source']!r}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: bad action names file: {exc}") from exc
    return doc


def load_action_names(world_dir: Path, num_actions: int) -> list[str]:
    """The world's action names from WORLD/actions.json; "action N" when there is none.

    Raises ValueError naming the file when it is malformed or names a different number of actions.
    """
    doc = read_actions_file(world_dir)
    if doc is None:
        return default_action_names(num_actions)
    if len(doc["names"]) != num_actions:
        raise ValueError(f"{Path(world_dir) / ACTIONS_FILE}: {len(doc['names'])} names for {num_actions} actions")
    return list(doc["names"])


def save_action_names(world_dir: Path, names: list[str], source: str, evidence: dict[str, Any] | None = None) -> Path:
    """Writes WORLD/actions.json atomically: {"names", "source"} plus the optional "mapping" evidence, keeping the
    key bindings the file already has."""
    check_action_names(names)
    if source not in NAME_SOURCES:
        raise ValueError(f"source must be one of {list(NAME_SOURCES)}, got {source!r}")
    doc: dict[str, Any] = {"names": list(names), "source": source}
    if evidence is not None:
        doc["mapping"] = evidence
    old = read_actions_file(world_dir)
    if old is not None and "keys" in old:
        doc.update({f: old[f] for f in ("keys", "keys_source", "key_evidence") if f in old})
    return write_json_atomic(Path(world_dir) / ACTIONS_FILE, doc)


def load_key_bindings(world_dir: Path, num_actions: int) -> tuple[dict[str, int | None], str]:
    """The world's arrow key bindings ({key: latent or None} for every key in genie.controls.KEYS) and their
    source ("mapping", "user" or "default"); every key unbound when actions.json has none.

    Raises ValueError naming the file when it is malformed or binds a latent outside [0, num_actions).
    """
    doc = read_actions_file(world_dir)
    if doc is None or "keys" not in doc:
        return unbound_keys(), "default"
    try:
        return check_key_bindings(doc["keys"], num_actions), doc["keys_source"]
    except ValueError as exc:
        raise ValueError(f"{Path(world_dir) / ACTIONS_FILE}: {exc}") from exc


def load_key_binding_list(world_dir: Path, num_actions: int) -> list[KeyBinding]:
    """load_key_bindings as KeyBindings in KEYS order, each with its latent's share of transitions pressing the key
    when the bindings were derived from a mapping (None for bindings a user set)."""
    keys, source = load_key_bindings(world_dir, num_actions)
    derived = source in ("mapping", "calibration")
    evidence = ((read_actions_file(world_dir) or {}).get("key_evidence") or {}) if derived else {}
    out = []
    for key, action in keys.items():
        e = evidence.get(key) or {}
        share = e.get("share") if action is not None and e.get("latent") == action else None
        out.append(KeyBinding(key, action, None if share is None else float(share)))
    return out


def save_key_bindings(world_dir: Path, keys: dict[str, int | None], source: str,
                      evidence: dict[str, Any] | None = None) -> Path:
    """Writes the arrow key bindings into WORLD/actions.json atomically, keeping its names (default names when the
    world has no actions.json yet). `keys` may name only some keys: the others become unbound."""
    world_dir = Path(world_dir)
    num_actions = load_world_config_of(world_dir).dynamics.num_actions
    keys = check_key_bindings(keys, num_actions)
    if source not in KEY_SOURCES:
        raise ValueError(f"keys_source must be one of {list(KEY_SOURCES)}, got {source!r}")
    doc = read_actions_file(world_dir) or {"names": default_action_names(num_actions), "source": "default"}
    doc.pop("key_evidence", None)
    doc.update({"keys": keys, "keys_source": source})
    if evidence:
        doc["key_evidence"] = evidence
    return write_json_atomic(world_dir / ACTIONS_FILE, doc)


def names_from_mapping(mapping: dict[str, Any] | None, num_actions: int) -> list[str]:
    """Player-readable names from a latent -> true action mapping (genie.eval.metrics.action_mapping).

    Only latents seen at least MIN_NAMING_COUNT times are named; the others keep "action N". True actions that
    are key combos ("LEFT+UP") are read as keys first: a latent is called after the keys that most of its
    transitions press and that it makes at least MIN_NAMING_LIFT times likelier than the data does, e.g.
    "UP (79%)" when 79% of its transitions press UP. Failing that, after its majority true action when that is
    MIN_NAMING_LIFT times likelier than overall, e.g. "RIGHT+UP (41%)". Repeated names get " #<latent>".
    """
    names = default_action_names(num_actions)
    mapping = mapping or {}
    for entry in mapping.get("latents", [])[:num_actions]:
        if entry.get("count", 0) < MIN_NAMING_COUNT or entry.get("majority_name") is None:
            continue
        a = int(entry["latent"])
        keys = _key_name(entry, mapping)
        if keys is not None:
            names[a] = keys
        elif (entry.get("lift") or 0.0) >= MIN_NAMING_LIFT:
            names[a] = f"{entry['majority_name'][:20]} ({entry['purity']:.0%})"
    repeated = {name for name, n in Counter(names).items() if n > 1}
    return [f"{name} #{a}" if name in repeated else name for a, name in enumerate(names)]


def _key_name(entry: dict[str, Any], mapping: dict[str, Any]) -> str | None:
    """"KEY+KEY (share)" for the keys pressed in most of a latent's transitions, more often than in the data."""
    counts, true_names, base = entry.get("counts"), mapping.get("true_names"), mapping.get("true_frequency")
    if not counts or not true_names or not base or not len(counts) == len(true_names) == len(base):
        return None
    combos = [set(name.split("+")) - {"NOOP"} for name in true_names]  # the keys each true action presses
    if not any(len(c) > 1 for c in combos) or not sum(counts) or not sum(base):  # the actions are not key combos
        return None

    def share(keys: set[str], weights: list[float]) -> float:
        return sum(w for w, combo in zip(weights, combos, strict=True) if keys <= combo) / sum(weights)

    shares = {k: share({k}, counts) for combo in combos for k in combo}  # each key's share of this latent's moves
    chosen = sorted((k for k, s in shares.items() if s >= 0.5 and s >= MIN_NAMING_LIFT * share({k}, base)),
                    key=lambda k: -shares[k])
    if not chosen:
        return None
    return f"{'+'.join(chosen)[:20]} ({share(set(chosen), counts):.0%})"


def apply_action_names_from_report(world_dir: Path, report: dict[str, Any], overwrite_user: bool = False) -> list[str]:
    """Names the world's actions and binds its arrow keys (genie.controls) from an eval report's
    report["lam"]["mapping"]; returns the names in effect.

    Never overwrites names or keys a user edited (source / keys_source "user") unless `overwrite_user`. Without a
    mapping (no true actions in the data), the names are "action N" and every key is unbound (source "default").
    """
    world_dir = Path(world_dir)
    num_actions = load_world_config_of(world_dir).dynamics.num_actions
    doc = None if overwrite_user else read_actions_file(world_dir)
    mapping = (report.get("lam") or {}).get("mapping")
    if doc is not None and doc["source"] == "user":
        names = load_action_names(world_dir, num_actions)
    else:
        names = names_from_mapping(mapping, num_actions)
        source = "mapping" if names != default_action_names(num_actions) else "default"
        save_action_names(world_dir, names, source, evidence=_evidence(mapping) if mapping else None)
    if doc is None or doc.get("keys_source") != "user":
        # A calibration against the real game (where the data came from a simulator) beats the LAM's mapping: it
        # binds what each latent does in the world, not what the LAM labelled it in the data.
        keys, key_evidence = key_bindings_from_control(report.get("control"))
        source = "calibration"
        if not any(a is not None for a in keys.values()):
            keys, key_evidence = key_bindings_from_mapping(mapping, num_actions)
            source = "mapping"
        save_key_bindings(world_dir, keys, source if any(a is not None for a in keys.values()) else "default",
                          key_evidence)
    return names


def _evidence(mapping: dict[str, Any]) -> dict[str, Any]:
    """The part of a mapping worth keeping next to the names: accuracies and each latent's majority and purity."""
    keep = ("latent", "count", "majority_name", "purity", "lift")
    return {
        "many_to_one_accuracy": mapping.get("many_to_one_accuracy"),
        "one_to_one_accuracy": mapping.get("one_to_one_accuracy"),
        "latents": [{k: e.get(k) for k in keep} for e in mapping.get("latents", [])],
    }
