"""Typed job specs: what a train or rollout job asks for, carried as plain JSON task arguments (never pickled)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from genie.config import MODEL_KINDS, WorldConfig, from_dict, to_dict

MAX_ITEMS = 100_000  # prompts x action sequences in one rollout job
MAX_ACTIONS = 10_000  # actions in one sequence
MAX_CHUNK = 1_000
TRAIN_BACKENDS = ("local", "kubernetes")


@dataclass(frozen=True)
class TrainJobSpec:
    """Train one model of `world` under RUN_ROOT/KIND; a redelivered job resumes from the newest checkpoint there."""

    kind: str  # tokenizer | lam | dynamics
    world: WorldConfig = field(default_factory=WorldConfig)  # resolved at submit (preset/config + overrides)
    run_root: str = ""  # "" = the worker's GENIE_JOBS_DIR/<job id>
    tokenizer: str = ""  # dynamics: frozen checkpoint dirs; "" = the newest under RUN_ROOT/tokenizer (RUN_ROOT/lam)
    lam: str = ""
    threads: int = 0  # torch threads for this job (0 = the worker's default)
    tensorboard: bool = False  # scalars under RUN_ROOT/KIND/tb
    backend: str = "local"  # local: train in the worker process; kubernetes: launch and supervise a Job (torchrun)
    nodes: int = 1  # kubernetes: pods, one torchrun node each
    gpus_per_node: int = 0  # kubernetes: nvidia.com/gpu per pod (and processes per pod when > 0)

    def __post_init__(self) -> None:
        if self.backend not in TRAIN_BACKENDS:
            raise ValueError(f"unknown training backend {self.backend!r}; expected one of {TRAIN_BACKENDS}")
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"nodes must be >= 1 and gpus_per_node >= 0, got {self.nodes}, {self.gpus_per_node}")
        if self.backend == "local" and (self.nodes, self.gpus_per_node) != (1, 0):
            raise ValueError("--nodes/--gpus-per-node need --backend kubernetes (a local job trains in the worker)")
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {MODEL_KINDS}")
        if not isinstance(self.world, WorldConfig):
            raise ValueError(f"world must be a WorldConfig, got {type(self.world).__name__}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.kind != "dynamics" and (self.tokenizer or self.lam):
            raise ValueError("--tokenizer/--lam checkpoints are inputs of dynamics training only")

    @property
    def steps(self) -> int:
        return self.world.train_config(self.kind).steps

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "world": to_dict(self.world), "run_root": self.run_root, "tokenizer": self.tokenizer,
                "lam": self.lam, "threads": self.threads, "tensorboard": self.tensorboard, "backend": self.backend,
                "nodes": self.nodes, "gpus_per_node": self.gpus_per_node}

    @property
    def processes(self) -> int:
        """torchrun processes over all pods: one per GPU, or one per pod on CPU."""
        return self.nodes * max(1, self.gpus_per_node)

    @classmethod
    def from_json(cls, data: Any) -> TrainJobSpec:
        data = _object(data, "train job", {"kind", "world", "run_root", "tokenizer", "lam", "threads", "tensorboard",
                                           "backend", "nodes", "gpus_per_node"})
        return cls(
            kind=_typed(data, "kind", str),
            world=from_dict(WorldConfig, data.get("world", {})),
            run_root=_typed(data, "run_root", str, ""),
            tokenizer=_typed(data, "tokenizer", str, ""),
            lam=_typed(data, "lam", str, ""),
            threads=_typed(data, "threads", int, 0),
            tensorboard=_typed(data, "tensorboard", bool, False),
            backend=_typed(data, "backend", str, "local"),
            nodes=_typed(data, "nodes", int, 1),
            gpus_per_node=_typed(data, "gpus_per_node", int, 0),
        )


@dataclass(frozen=True)
class WorldJobSpec:
    """`genie world build` as a job: a chain of three train tasks (tokenizer, LAM, dynamics, under RUN_ROOT) and a
    finish task (export to OUT, eval, action names). Every part resumes where a redelivery or a failure left it."""

    world: WorldConfig = field(default_factory=WorldConfig)  # resolved at submit (data dirs included)
    out: str = ""  # the world dir; "" = the worker's GENIE_JOBS_DIR/<job id>/world
    run_root: str = ""  # training runs; "" = GENIE_JOBS_DIR/<job id>/runs
    eval_clips: int = 64
    drift_steps: int = 0
    atlas_prompts: int = 4
    threads: int = 0
    # Publish the built world into the catalogue under this name (genie/catalog.py) as the job's last act: train ->
    # publish -> play with no hands. "" = do not publish. `registry` "" = the worker's GENIE_REGISTRY.
    publish: str = ""
    registry: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.world, WorldConfig):
            raise ValueError(f"world must be a WorldConfig, got {type(self.world).__name__}")
        if min(self.eval_clips, self.drift_steps, self.atlas_prompts, self.threads) < 0:
            raise ValueError("eval_clips, drift_steps, atlas_prompts and threads must be >= 0")
        if self.publish:
            from genie.catalog import check_name

            check_name(self.publish)

    @property
    def stage_steps(self) -> dict[str, int]:
        return {kind: self.world.train_config(kind).steps for kind in MODEL_KINDS}

    @property
    def total(self) -> int:
        """Progress units: every training step, plus one for export + eval."""
        return sum(self.stage_steps.values()) + 1

    def resolved(self, job_dir: Path) -> WorldJobSpec:
        """The spec with its default dirs under the job's directory."""
        return replace(self, out=self.out or str(job_dir / "world"), run_root=self.run_root or str(job_dir / "runs"))

    def train_spec(self, kind: str) -> TrainJobSpec:
        return TrainJobSpec(kind, self.world, run_root=self.run_root, threads=self.threads)

    def to_json(self) -> dict[str, Any]:
        return {"world": to_dict(self.world), "out": self.out, "run_root": self.run_root, "eval_clips": self.eval_clips,
                "drift_steps": self.drift_steps, "atlas_prompts": self.atlas_prompts, "threads": self.threads,
                "publish": self.publish, "registry": self.registry}

    @classmethod
    def from_json(cls, data: Any) -> WorldJobSpec:
        keys = {"world", "out", "run_root", "eval_clips", "drift_steps", "atlas_prompts", "threads", "publish", "registry"}
        data = _object(data, "world job", keys)
        return cls(
            world=from_dict(WorldConfig, data.get("world", {})),
            out=_typed(data, "out", str, ""),
            run_root=_typed(data, "run_root", str, ""),
            eval_clips=_typed(data, "eval_clips", int, 64),
            drift_steps=_typed(data, "drift_steps", int, 0),
            atlas_prompts=_typed(data, "atlas_prompts", int, 4),
            threads=_typed(data, "threads", int, 0),
            publish=_typed(data, "publish", str, ""),
            registry=_typed(data, "registry", str, ""),
        )


@dataclass(frozen=True)
class AgentJobSpec:
    """`genie agent train` as a job: one BC policy (LAM-BC or the oracle) trained in OUT; a redelivered or continued
    job resumes from the newest checkpoint there."""

    train: Any  # genie.agent.train.AgentTrainConfig (data and world paths the workers can read)
    out: str = ""  # the run dir; "" = the worker's GENIE_JOBS_DIR/<job id>
    threads: int = 0

    def __post_init__(self) -> None:
        from genie.agent.train import AgentTrainConfig

        if not isinstance(self.train, AgentTrainConfig):
            raise ValueError(f"train must be an AgentTrainConfig, got {type(self.train).__name__}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")

    @property
    def steps(self) -> int:
        return self.train.steps

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"train": asdict(self.train), "out": self.out, "threads": self.threads}

    @classmethod
    def from_json(cls, data: Any) -> AgentJobSpec:
        from genie.agent.train import AgentTrainConfig

        data = _object(data, "agent job", {"train", "out", "threads"})
        train = _typed(data, "train", dict)
        try:
            cfg = AgentTrainConfig.from_json(train)
        except TypeError as exc:  # unknown or missing keys
            raise ValueError(f"agent job: {exc}") from None
        return cls(train=cfg, out=_typed(data, "out", str, ""), threads=_typed(data, "threads", int, 0))


@dataclass(frozen=True)
class ReactiveJobSpec:
    """`genie agent reactive` as a job: DAgger distils the planner into a frame-based policy in OUT; a redelivered or
    continued job keeps the iterations it finished."""

    reactive: Any  # genie.agent.reactive.ReactiveConfig
    out: str = ""  # the run dir; "" = the worker's GENIE_JOBS_DIR/<job id>
    threads: int = 0

    def __post_init__(self) -> None:
        from genie.agent.reactive import ReactiveConfig

        if not isinstance(self.reactive, ReactiveConfig):
            raise ValueError(f"reactive must be a ReactiveConfig, got {type(self.reactive).__name__}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")

    @property
    def steps(self) -> int:  # progress counts DAgger iterations
        return self.reactive.iterations

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"reactive": asdict(self.reactive), "out": self.out, "threads": self.threads}

    @classmethod
    def from_json(cls, data: Any) -> ReactiveJobSpec:
        from genie.agent.reactive import ReactiveConfig

        data = _object(data, "reactive job", {"reactive", "out", "threads"})
        try:
            cfg = ReactiveConfig(**_typed(data, "reactive", dict))
        except TypeError as exc:  # unknown or missing keys
            raise ValueError(f"reactive job: {exc}") from None
        return cls(reactive=cfg, out=_typed(data, "out", str, ""), threads=_typed(data, "threads", int, 0))


@dataclass(frozen=True)
class FinetuneJobSpec:
    """`genie agent finetune` as a job: PPO fine-tunes a reactive expert (a finished reactive run or a policy dir,
    `finetune.init`) in the real game, in OUT; a redelivered or continued job resumes from its newest checkpoint."""

    finetune: Any  # genie.agent.finetune.FinetuneConfig (init: a path the workers can read)
    out: str = ""  # the run dir; "" = the worker's GENIE_JOBS_DIR/<job id>
    threads: int = 0

    def __post_init__(self) -> None:
        from genie.agent.finetune import FinetuneConfig

        if not isinstance(self.finetune, FinetuneConfig):
            raise ValueError(f"finetune must be a FinetuneConfig, got {type(self.finetune).__name__}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")

    @property
    def steps(self) -> int:  # progress counts PPO updates
        return self.finetune.updates

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"finetune": asdict(self.finetune), "out": self.out, "threads": self.threads}

    @classmethod
    def from_json(cls, data: Any) -> FinetuneJobSpec:
        from genie.agent.finetune import FinetuneConfig

        data = _object(data, "finetune job", {"finetune", "out", "threads"})
        try:  # from_dict: unknown keys and wrong types are ValueErrors
            cfg = from_dict(FinetuneConfig, _typed(data, "finetune", dict))
        except TypeError as exc:  # missing keys (init)
            raise ValueError(f"finetune job: {exc}") from None
        return cls(finetune=cfg, out=_typed(data, "out", str, ""), threads=_typed(data, "threads", int, 0))


@dataclass(frozen=True)
class ExpertJobSpec:
    """`genie agent expert` as a job: records expert episodes (the planner, or with `policy_run` a finished reactive
    expert) into the dataset directory OUT."""

    expert: Any  # genie.agent.expert.ExpertConfig
    out: str  # the dataset dir the workers write (and the BC jobs then read)
    policy_run: str = ""  # a finished `genie agent reactive` run; "" = the planner
    workers: int = 1  # processes recording episodes in parallel on the worker
    threads: int = 0

    def __post_init__(self) -> None:
        from genie.agent.expert import ExpertConfig

        if not isinstance(self.expert, ExpertConfig):
            raise ValueError(f"expert must be an ExpertConfig, got {type(self.expert).__name__}")
        if not self.out:
            raise ValueError("an expert job needs out: the dataset directory to write")
        if self.workers < 1 or self.threads < 0:
            raise ValueError(f"need workers >= 1 and threads >= 0, got {self.workers}, {self.threads}")

    @property
    def steps(self) -> int:  # progress counts episodes
        return self.expert.episodes

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"expert": asdict(self.expert), "out": self.out, "policy_run": self.policy_run, "workers": self.workers,
                "threads": self.threads}

    @classmethod
    def from_json(cls, data: Any) -> ExpertJobSpec:
        from genie.agent.expert import ExpertConfig

        data = _object(data, "expert job", {"expert", "out", "policy_run", "workers", "threads"})
        try:
            cfg = ExpertConfig(**_typed(data, "expert", dict))
        except TypeError as exc:
            raise ValueError(f"expert job: {exc}") from None
        return cls(expert=cfg, out=_typed(data, "out", str), policy_run=_typed(data, "policy_run", str, ""),
                   workers=_typed(data, "workers", int, 1), threads=_typed(data, "threads", int, 0))


@dataclass(frozen=True)
class RolloutItem:
    """One output of a rollout job: a prompt under one action sequence, with its own seed."""

    index: int
    prompt_index: int
    actions_index: int
    prompt: str
    actions: tuple[int, ...]
    seed: int

    @property
    def name(self) -> str:
        return f"item_{self.index:05d}"


@dataclass(frozen=True)
class RolloutJobSpec:
    """Generate every prompt under every action sequence; item i (prompt-major order) samples with seed + i."""

    prompts: tuple[str, ...]  # image paths (PNG/JPEG) the workers can read
    actions: tuple[tuple[int, ...], ...]  # latent action sequences, each in [0, A)
    seed: int = 0
    sampling_steps: int = 0  # MaskGIT steps; 0 = the world's default
    chunk_size: int = 4  # items per chunk task (the unit of parallelism across workers and of redelivery)
    parallel: int = 4  # items of a chunk generated concurrently (the backend batches them)
    out: str = ""  # output dir; "" = the worker's GENIE_JOBS_DIR/<job id>
    world: str = ""  # in-process backend's world dir; "" = the worker's GENIE_WORLD
    # A catalogue's version, pinned at submit (`--world-ref name[@version]`): `world` is its directory, and the chunks
    # check its files still have this digest; both land in the manifest with the spec.
    world_ref: str = ""
    world_digest: str = ""

    def __post_init__(self) -> None:
        if bool(self.world_ref) != bool(self.world_digest):
            raise ValueError("a rollout job's world_ref and world_digest come together")
        if not self.prompts:
            raise ValueError("a rollout job needs at least one prompt")
        if not self.actions or any(len(a) == 0 for a in self.actions):
            raise ValueError("a rollout job needs at least one non-empty action sequence")
        if any(len(a) > MAX_ACTIONS for a in self.actions):
            raise ValueError(f"action sequences are limited to {MAX_ACTIONS} actions")
        if any(a < 0 for seq in self.actions for a in seq):
            raise ValueError("actions must be >= 0")
        if len(self.prompts) * len(self.actions) > MAX_ITEMS:
            raise ValueError(f"{len(self.prompts)} prompts x {len(self.actions)} sequences exceeds {MAX_ITEMS} items")
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}], got {self.chunk_size}")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.sampling_steps < 0:
            raise ValueError(f"sampling_steps must be >= 0, got {self.sampling_steps}")

    @property
    def total(self) -> int:
        return len(self.prompts) * len(self.actions)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.total / self.chunk_size)

    def items(self) -> list[RolloutItem]:
        return [RolloutItem(p * len(self.actions) + a, p, a, prompt, seq, self.seed + p * len(self.actions) + a)
                for p, prompt in enumerate(self.prompts) for a, seq in enumerate(self.actions)]

    def chunk(self, index: int) -> list[RolloutItem]:
        if not 0 <= index < self.num_chunks:
            raise ValueError(f"chunk {index} out of range [0, {self.num_chunks})")
        return self.items()[index * self.chunk_size:(index + 1) * self.chunk_size]

    def to_json(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts), "actions": [list(a) for a in self.actions], "seed": self.seed,
                "sampling_steps": self.sampling_steps, "chunk_size": self.chunk_size, "parallel": self.parallel,
                "out": self.out, "world": self.world, "world_ref": self.world_ref, "world_digest": self.world_digest}

    @classmethod
    def from_json(cls, data: Any) -> RolloutJobSpec:
        keys = {"prompts", "actions", "seed", "sampling_steps", "chunk_size", "parallel", "out", "world", "world_ref",
                "world_digest"}
        data = _object(data, "rollout job", keys)
        prompts = _typed(data, "prompts", list)
        actions = _typed(data, "actions", list)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("rollout job: prompts must be strings (image paths)")
        if not all(isinstance(seq, list) and all(_is_int(a) for a in seq) for seq in actions):
            raise ValueError("rollout job: actions must be lists of integers")
        return cls(
            prompts=tuple(prompts),
            actions=tuple(tuple(seq) for seq in actions),
            seed=_typed(data, "seed", int, 0),
            sampling_steps=_typed(data, "sampling_steps", int, 0),
            chunk_size=_typed(data, "chunk_size", int, 4),
            parallel=_typed(data, "parallel", int, 4),
            out=_typed(data, "out", str, ""),
            world=_typed(data, "world", str, ""),
            world_ref=_typed(data, "world_ref", str, ""),
            world_digest=_typed(data, "world_digest", str, ""),
        )


def stage_id(job_id: str, kind: str) -> str:
    """Task id of a world job's training stage (the finish task carries the job id itself)."""
    return f"{job_id}-{kind}"


def chunk_id(job_id: str, index: int) -> str:
    """Chunk tasks get ids derived from the job's, so status finds them and a resent chunk keeps its identity."""
    return f"{job_id}-chunk-{index:04d}"


def resolve_dir(path: str, default: Path) -> Path:
    return Path(path) if path else default


def _object(data: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected an object, got {type(data).__name__}")
    unknown = set(data) - keys
    if unknown:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _typed(data: dict[str, Any], key: str, tp: type, default: Any = ...) -> Any:
    if key not in data:
        if default is ...:
            raise ValueError(f"missing {key!r}")
        return default
    value = data[key]
    ok = _is_int(value) if tp is int else isinstance(value, tp)
    if not ok:
        raise ValueError(f"{key!r} must be {tp.__name__}, got {value!r}")
    return value
