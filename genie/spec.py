"""A world's serving description (WorldSpec): what a client and a server need to know about a world, a pure function
of the world directory (world.json and actions.json). The gateway, the Triton services and the rollout workers all
read it from here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from genie.config import WorldConfig
from genie.controls import KEYS, KeyBinding
from genie.sampling import SamplingConfig
from genie.worlds import default_action_names, load_action_names, load_key_binding_list, load_world_config_of


@dataclass(frozen=True)
class WorldSpec:
    """What a client and the gateway need to know about the served world."""

    height: int
    width: int
    channels: int
    tokens_per_frame: int  # N
    num_codes: int  # K
    window: int  # frames of history the dynamics model attends to (T)
    keep: int  # frames kept when the window slides
    num_actions: int  # A
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the world's default sampling
    action_names: tuple[str, ...] = ()
    keys: tuple[KeyBinding, ...] = ()  # the bound arrow keys (WORLD/actions.json "keys"); a key not here is unbound

    def __post_init__(self) -> None:
        if self.action_names and len(self.action_names) != self.num_actions:
            raise ValueError(f"{len(self.action_names)} action names for {self.num_actions} actions")
        for b in self.keys:
            if b.action is not None and b.action >= self.num_actions:
                raise ValueError(f"key {b.key} is bound to action {b.action}; the world has {self.num_actions}")

    def action_name(self, action: int) -> str:
        return self.action_names[action] if self.action_names else f"action {action}"

    def key_bindings(self) -> tuple[KeyBinding, ...]:
        """Every arrow key in KEYS order, bound or not (unbound: action None)."""
        bound = {b.key: b for b in self.keys}
        return tuple(bound.get(k, KeyBinding(k)) for k in KEYS)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WorldSpec:
        d = dict(d)
        d["sampling"] = SamplingConfig(**d.get("sampling", {}))
        d["action_names"] = tuple(d.get("action_names", ()))
        d["keys"] = tuple(KeyBinding(**k) for k in d.get("keys", ()))  # absent in specs published before keys
        return cls(**d)


def world_spec(cfg: WorldConfig, action_names: Sequence[str] = (), keys: Sequence[KeyBinding] = ()) -> WorldSpec:
    """The WorldSpec of a world config (shared with the Triton services, which publish it)."""
    d, t = cfg.dynamics, cfg.tokenizer
    return WorldSpec(
        height=t.frame.height,
        width=t.frame.width,
        channels=t.frame.channels,
        tokens_per_frame=d.tokens_per_frame,
        num_codes=d.num_tokens,
        window=d.max_frames,
        keep=cfg.sampling.keep(d.max_frames),
        num_actions=d.num_actions,
        sampling=cfg.sampling,
        action_names=tuple(action_names),
        keys=tuple(b for b in keys if b.action is not None),
    )


def world_spec_of(world_dir: Path) -> WorldSpec:
    """The WorldSpec of a world directory, with the action names and arrow key bindings of its actions.json
    (`genie world names`).

    Raises ValueError when the directory is not a world or its actions.json is malformed. Default names
    ("action N") are not stored: an empty `action_names` means the same.
    """
    cfg = load_world_config_of(world_dir)
    names = load_action_names(world_dir, cfg.dynamics.num_actions)
    keys = load_key_binding_list(world_dir, cfg.dynamics.num_actions)
    return world_spec(cfg, () if names == default_action_names(cfg.dynamics.num_actions) else names, keys)
