"""Typed configuration: the world config that composes every model config, and dotted overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from genie.data.synthetic import SpritesConfig
from genie.models.dynamics import DynamicsModelConfig
from genie.models.lam import LatentActionModelConfig
from genie.models.tokenizer import VideoTokenizerConfig
from genie.sampling import SamplingConfig

C = TypeVar("C")
MODEL_KINDS = ("tokenizer", "lam", "dynamics")
DEVICES = ("auto", "cpu", "cuda")  # where training runs: auto = a GPU when torch sees one, else the CPU


def check_device(name: str) -> str:
    """`name` if it is one of DEVICES; ValueError otherwise."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; expected one of {DEVICES}")
    return name


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # the global batch of a step, whatever the number of processes
    grad_accum: int = 1  # micro-batches per process per step (batch_size / (processes * grad_accum) rows each)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = False  # autocast matmuls to bfloat16 on GPUs and CPUs with AMX/AVX-512 BF16 (fp32 on other CPUs)
    tf32: bool = True  # on a GPU, fp32 matmuls and convolutions on TF32 tensor cores (no effect on the CPU)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 3
    # Dynamics only: encode the dataset's clip-length windows once with the frozen tokenizer and LAM (a cache in the
    # run directory) and train on those tokens and latent actions, instead of encoding every step's clips
    # (genie.train.token_cache). Shards data only; clips then start at multiples of the clip length.
    encode_once: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum must be >= 1 and divide batch_size={self.batch_size}, got {self.grad_accum}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")
        if self.log_every < 1 or self.ckpt_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("log_every, ckpt_every and keep_checkpoints must be >= 1")


DATA_SOURCES = ("sprites", "shards")
EVAL_SEED_OFFSET = 1_000_000  # synthetic evaluation clips come from a seed range training never uses


@dataclass(frozen=True)
class DataConfig:
    """Where training clips come from and their geometry: (frames, height, width, 3) uint8."""

    source: str = "sprites"  # "sprites": built-in moving sprites; "shards": a dataset dir (`genie data generate`)
    path: str = ""  # shards: the training split's directory
    eval_path: str = ""  # shards: a held-out split's directory for `genie eval`
    height: int = 64
    width: int = 64
    frames: int = 16  # clip length T
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"unknown data source {self.source!r}; expected one of {DATA_SOURCES}")
        if self.source == "shards" and not self.path:
            raise ValueError("data.source=shards needs data.path (a directory written by `genie data generate`)")

    def sprites(self, evaluation: bool = False) -> SpritesConfig:
        seed = self.seed + (EVAL_SEED_OFFSET if evaluation else 0)
        return SpritesConfig(height=self.height, width=self.width, frames=self.frames, seed=seed)


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a world: data, the three models, sampling and their training runs."""

    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: VideoTokenizerConfig = field(default_factory=VideoTokenizerConfig)
    lam: LatentActionModelConfig = field(default_factory=LatentActionModelConfig)
    dynamics: DynamicsModelConfig = field(default_factory=DynamicsModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train_tokenizer: TrainConfig = field(default_factory=TrainConfig)
    train_lam: TrainConfig = field(default_factory=TrainConfig)
    train_dynamics: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        t, a, d, s = self.tokenizer, self.lam, self.dynamics, self.data
        if t.frame != a.frame:
            raise ValueError(f"tokenizer frame {t.frame} differs from LAM frame {a.frame}")
        if (s.height, s.width) != (t.frame.height, t.frame.width) or t.frame.channels != 3:
            raise ValueError(f"data frames {s.height}x{s.width}x3 differ from model frames {t.frame}")
        if d.num_tokens != t.vq.num_codes:
            raise ValueError(f"dynamics.num_tokens={d.num_tokens} must equal tokenizer codebook {t.vq.num_codes}")
        if d.tokens_per_frame != t.tokens_per_frame:
            raise ValueError(f"dynamics.tokens_per_frame={d.tokens_per_frame} must equal tokenizer's {t.tokens_per_frame}")
        if d.num_actions != a.num_actions:
            raise ValueError(f"dynamics.num_actions={d.num_actions} must equal the LAM codebook {a.num_actions}")
        if self.train_tokenizer.encode_once or self.train_lam.encode_once:
            raise ValueError("encode_once is a dynamics training setting (train_dynamics.encode_once)")
        for kind, frames in (("tokenizer", t.max_frames), ("lam", a.max_frames), ("dynamics", d.max_frames)):
            if s.frames > frames:
                raise ValueError(f"clips of {s.frames} frames exceed the {kind} window {frames}")

    def model_config(self, kind: str):
        if kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
        return getattr(self, kind)

    def train_config(self, kind: str) -> TrainConfig:
        self.model_config(kind)
        return getattr(self, f"train_{kind}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Builds a (nested) config dataclass from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {k: _coerce(hints[k], v, f"{cls.__name__}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    raise ValueError(f"{where}: unsupported field type {tp!r}")


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings such as schedule=linear


def apply_overrides(cfg: C, overrides: list[str]) -> C:
    """Applies dotted `key=value` overrides (e.g. `tokenizer.encoder.dim=128`), type-checked per field.

    Values are JSON (`3`, `0.5`, `true`, `[0.9, 0.95]`) or a bare string.
    """
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ValueError(f"override {item!r}: no such setting {key!r}")
        node[parts[-1]] = _parse_scalar(raw)
    return from_dict(type(cfg), data)


def write_json_atomic(path: Path, data: Any) -> Path:
    """Writes `data` as indented JSON under a temporary name and renames it: readers never see half a file, and a
    failed write (DiskFull on a full disk) leaves nothing behind."""
    import os
    import uuid

    from genie.diskfull import disk_full_as_error

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    with disk_full_as_error(path, path.name, cleanup=tmp):
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    return path


def load_world_config(path: Path) -> WorldConfig:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from exc
    return from_dict(WorldConfig, data)
