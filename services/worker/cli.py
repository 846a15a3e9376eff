"""`genie jobs`: submit training and rollout jobs to the Celery workers, follow them, cancel them."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from genie.agent_cli import bc_config, bc_options, ppo_options
from services.redis_errors import short_reason
from services.worker.settings import DEFAULT_BROKER


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _client(ctx: click.Context):
    from services.worker.jobs import JobClient
    from services.worker.settings import WorkerSettings

    try:
        return JobClient(WorkerSettings.from_env(broker_url=ctx.obj["broker"], result_backend=ctx.obj["result_backend"],
                                                 sentinels=ctx.obj["sentinels"], sentinel_master=ctx.obj["sentinel_master"]))
    except ValueError as exc:
        _fail(str(exc))


def _broker(client) -> str:
    """Where the broker is, for an error line: its URL, or the Sentinels that name its master."""
    return client.store.url if client.settings.sentinels else client.settings.broker_url


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable broker or a Redis that refuses writes (full, or its disk failing) raises."""
    import kombu.exceptions
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, kombu.exceptions.OperationalError,
            redis.exceptions.ResponseError)


def _broker_failure(exc: BaseException, where: str) -> str:
    """The one-line reason for a failed broker call; any other Redis error is re-raised (a bug, not an outage)."""
    import redis

    text = short_reason(exc)
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or text.startswith("OOM"):
        return (f"the broker at {where} is full: Redis is at its maxmemory and refuses writes (noeviction); "
                f"finished jobs' records expire, or raise maxmemory; nothing was changed")
    if text.startswith("MISCONF"):
        return f"the broker at {where} refuses writes: saving to disk failed (MISCONF; is its disk full?); nothing was changed"
    if isinstance(exc, redis.exceptions.ResponseError) and not isinstance(exc, redis.exceptions.ReadOnlyError):
        raise exc
    return f"cannot reach the broker at {where}: {text}"


def _queue(client, submit: Callable[[], tuple[str, dict[str, Any]]], wait: bool) -> None:
    """Runs submit() (validate the job, queue it; returns its id and the fields of the line printed), exits 2 with one
    line on a bad argument or an unreachable broker, prints the job's JSON line and, with wait, follows it."""
    try:
        job_id, fields = submit()
    except ValueError as exc:
        _fail(str(exc))
    except _connection_errors() as exc:
        _fail(_broker_failure(exc, _broker(client)))
    click.echo(json.dumps({"job": job_id, **fields}))
    if wait:
        _follow(client, job_id)


def _job_call(client, method, job_id: str):
    """client.status / client.cancel of one job; an unknown job or an unreachable store exits 2 with one line."""
    try:
        return method(job_id)
    except KeyError as exc:
        _fail(exc.args[0])
    except _connection_errors() as exc:
        _fail(_broker_failure(exc, client.store.url).replace("the broker", "the result backend", 1))


@click.group("jobs")
@click.option("--broker", envvar="GENIE_BROKER_URL", default=DEFAULT_BROKER, show_default=True,
              help="Celery broker (Redis) URL, as the workers' GENIE_BROKER_URL.")
@click.option("--result-backend", envvar="GENIE_RESULT_BACKEND", default="",
              help="The workers' result backend when it is not the broker's Redis DB (GENIE_RESULT_BACKEND).")
@click.option("--broker-sentinels", envvar="GENIE_BROKER_SENTINELS", default="",
              help="host:port,...: reach the broker's master through these Sentinels, as the workers do; the URLs "
                   "then give only the DB, password and TLS (rediss:// = TLS to the Sentinels too). Sentinels with a "
                   "requirepass: env GENIE_BROKER_SENTINEL_PASSWORD.")
@click.option("--broker-sentinel-master", envvar="GENIE_BROKER_SENTINEL_MASTER", default="",
              help="The master name the Sentinels monitor (GENIE_BROKER_SENTINEL_MASTER).")
@click.pass_context
def jobs(ctx: click.Context, broker: str, result_backend: str, broker_sentinels: str, broker_sentinel_master: str) -> None:
    """Offline jobs on the Celery workers: training runs and batch rollouts (queues `train` and `rollout`)."""
    ctx.obj = {"broker": broker, "result_backend": result_backend, "sentinels": broker_sentinels,
               "sentinel_master": broker_sentinel_master}


@jobs.group()
def submit() -> None:
    """Validate a job and queue it; bad arguments exit with code 2 and queue nothing."""


@submit.command("train")
@click.argument("kind", type=click.Choice(["tokenizer", "lam", "dynamics"]))
@click.option("--preset", help="Named world config (tiny, sprites, demo, peer-small). Default: demo.")
@click.option("--config", "config", type=click.Path(path_type=Path), help="World config JSON (see `genie config`).")
@click.option("--set", "overrides", multiple=True, help="Dotted override, e.g. --set train_tokenizer.steps=500.")
@click.option("--run-root", default="", help="Train in RUN_ROOT/KIND (dynamics reads RUN_ROOT/tokenizer and /lam). "
                                             "Default: GENIE_JOBS_DIR/<job id> on the worker.")
@click.option("--tokenizer", "tokenizer_ckpt", default="", help="Tokenizer checkpoint dir (dynamics).")
@click.option("--lam", "lam_ckpt", default="", help="LAM checkpoint dir (dynamics).")
@click.option("--threads", type=int, default=0, help="torch threads on the worker (0 = its default).")
@click.option("--tensorboard", is_flag=True, help="Write TensorBoard scalars to RUN_ROOT/KIND/tb.")
@click.option("--backend", type=click.Choice(["local", "kubernetes"]), default="local", show_default=True,
              help="Train in the worker process, or have the worker launch and supervise a Kubernetes Job of torchrun "
                   "pods (the chart's worker.kubernetes.enabled).")
@click.option("--nodes", type=int, default=1, show_default=True, help="kubernetes: pods (torchrun nodes).")
@click.option("--gpus-per-node", type=int, default=0, show_default=True, help="kubernetes: GPUs per pod.")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (exit 1 unless it succeeds).")
@click.pass_context
def submit_train(ctx, kind, preset, config, overrides, run_root, tokenizer_ckpt, lam_ckpt, threads, tensorboard, backend,
                 nodes, gpus_per_node, wait) -> None:
    """Queue the training of one model; a redelivered job resumes from its newest checkpoint. With --backend
    kubernetes the worker runs it as an Indexed Job of NODES torchrun pods; status and cancel work the same."""
    from services.worker.jobs import resolve_world
    from services.worker.specs import TrainJobSpec

    client = _client(ctx)

    def submit() -> tuple[str, dict[str, Any]]:
        spec = TrainJobSpec(kind, resolve_world(preset, config, overrides), run_root=run_root, tokenizer=tokenizer_ckpt,
                            lam=lam_ckpt, threads=threads, tensorboard=tensorboard, backend=backend, nodes=nodes,
                            gpus_per_node=gpus_per_node)
        return client.submit_train(spec), {"queue": "train", "kind": kind, "steps": spec.steps}

    _queue(client, submit, wait)


@submit.command("agent")
@click.option("--data", "data_dir", required=True, help="Expert dataset dir the workers can read (`genie agent expert`).")
@click.option("--world", "world_dir", default="", help="World whose LAM labels the frames (default: GENIE_WORLD).")
@click.option("--out", default="", help="Run dir. Default: GENIE_JOBS_DIR/<job id> on the worker.")
@bc_options
@click.option("--threads", type=int, default=0, help="torch threads on the worker (0 = its default).")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (exit 1 unless it succeeds).")
@click.pass_context
def submit_agent(ctx, data_dir, world_dir, out, threads, wait, **bc) -> None:
    """Queue `genie agent train`: behavioural cloning on the LAM's latent actions (or the true ones), resumable; the
    same settings as `genie agent train`."""
    import os

    from services.worker.specs import AgentJobSpec

    client = _client(ctx)

    def submit() -> tuple[str, dict[str, Any]]:
        world = world_dir or os.environ.get("GENIE_WORLD", "")
        train = bc_config(str(Path(data_dir).resolve()), str(Path(world).resolve()) if world else "", **bc)
        spec = AgentJobSpec(train, out=out, threads=threads)
        return client.submit_agent(spec), {"queue": "train", "kind": "agent", "target": train.target,
                                           "steps": train.steps}

    _queue(client, submit, wait)


@submit.command("reactive")
@click.option("--out", default="", help="Run dir the workers write (a re-submitted job with more --iterations extends "
              "it). Default: GENIE_JOBS_DIR/<job id> on the worker.")
@click.option("--iterations", type=int, default=4, show_default=True, help="DAgger iterations (0 plays the planner).")
@click.option("--episodes", type=int, default=48, show_default=True, help="Train-split episodes per iteration.")
@click.option("--steps", type=int, default=1500, show_default=True, help="Training steps after each iteration.")
@click.option("--arch", type=click.Choice(["nature", "impala"]), default="nature", show_default=True)
@click.option("--augment", type=int, default=0, show_default=True, help="Pixels of random shift (0: none).")
@click.option("--mode", "distribution_mode", type=click.Choice(["easy", "hard"]), default="easy", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "overrides", multiple=True, help="Any other ReactiveConfig field, KEY=VALUE (repeatable).")
@click.option("--threads", type=int, default=0, help="torch threads on the worker (0 = its default).")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (exit 1 unless it succeeds).")
@click.pass_context
def submit_reactive(ctx, out, iterations, episodes, steps, arch, augment, distribution_mode, seed, overrides, threads,
                    wait) -> None:
    """Queue `genie agent reactive`: DAgger distils the planner into a policy that acts from the frames it sees
    (progress in iterations; a redelivery keeps the finished ones; cancel stops after the current one)."""
    from genie.agent.reactive import ReactiveConfig
    from genie.config import apply_overrides
    from services.worker.specs import ReactiveJobSpec

    client = _client(ctx)

    def submit() -> tuple[str, dict[str, Any]]:
        cfg = apply_overrides(ReactiveConfig(iterations=iterations, episodes=episodes, steps=steps, arch=arch,
                                             augment=augment, distribution_mode=distribution_mode, seed=seed),
                              list(overrides))
        spec = ReactiveJobSpec(cfg, out=str(Path(out).resolve()) if out else "", threads=threads)
        return client.submit_reactive(spec), {"queue": "train", "kind": "reactive", "iterations": iterations}

    _queue(client, submit, wait)


@submit.command("finetune")
@click.option("--init", required=True, help="The policy to start from: a finished reactive run (`genie jobs submit "
              "reactive`) or a policy dir, on storage the workers read.")
@click.option("--out", default="", help="Run dir the workers write (a re-submitted job with more --updates extends it). "
              "Default: GENIE_JOBS_DIR/<job id> on the worker.")
@ppo_options
@click.option("--set", "overrides", multiple=True, help="Any other FinetuneConfig field, KEY=VALUE (repeatable), "
              "e.g. value_warmup=1.")
@click.option("--threads", type=int, default=0, help="torch threads on the worker (0 = its default).")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (exit 1 unless it succeeds).")
@click.pass_context
def submit_finetune(ctx, init, out, updates, envs, rollout, epochs, minibatches, lr, entropy, distribution_mode, seed,
                    overrides, threads, wait) -> None:
    """Queue `genie agent finetune`: PPO fine-tunes a reactive expert in the real game, on train-split levels
    (progress in updates; a redelivery resumes from the newest checkpoint; cancel stops after the current update)."""
    from genie.agent.finetune import FinetuneConfig
    from genie.config import apply_overrides
    from services.worker.specs import FinetuneJobSpec

    client = _client(ctx)

    def submit() -> tuple[str, dict[str, Any]]:
        cfg = apply_overrides(FinetuneConfig(init=str(Path(init).resolve()), updates=updates, envs=envs, rollout=rollout,
                                             epochs=epochs, minibatches=minibatches, lr=lr, entropy=entropy,
                                             distribution_mode=distribution_mode, seed=seed), list(overrides))
        spec = FinetuneJobSpec(cfg, out=str(Path(out).resolve()) if out else "", threads=threads)
        return client.submit_finetune(spec), {"queue": "train", "kind": "finetune", "updates": cfg.updates}

    _queue(client, submit, wait)


@submit.command("expert")
@click.option("--out", required=True, help="New dataset dir the workers write (and BC jobs then read).")
@click.option("--reactive", "policy_run", default="", help="A finished reactive run (`genie jobs submit reactive`): "
              "record its policy instead of the planner.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--episodes", type=int, default=100, show_default=True)
@click.option("--max-frames", type=int, default=500, show_default=True, help="An episode still running here fails.")
@click.option("--mode", "distribution_mode", type=click.Choice(["easy", "hard"]), default="easy", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "overrides", multiple=True, help="Any other ExpertConfig field, KEY=VALUE (repeatable).")
@click.option("--workers", type=int, default=1, show_default=True, help="Processes recording episodes on the worker.")
@click.option("--threads", type=int, default=0, help="torch threads on the worker (0 = its default).")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (exit 1 unless it succeeds).")
@click.pass_context
def submit_expert(ctx, out, policy_run, split, episodes, max_frames, distribution_mode, seed, overrides, workers, threads,
                  wait) -> None:
    """Queue `genie agent expert`: record the planner's (or, with --reactive, a reactive expert's) episodes with
    their true actions, the unseen videos the BC jobs learn from."""
    from genie.agent.expert import ExpertConfig
    from genie.config import apply_overrides
    from services.worker.specs import ExpertJobSpec

    client = _client(ctx)

    def submit() -> tuple[str, dict[str, Any]]:
        cfg = apply_overrides(ExpertConfig(split=split, episodes=episodes, max_frames=max_frames,
                                           distribution_mode=distribution_mode, seed=seed), list(overrides))
        spec = ExpertJobSpec(cfg, out=str(Path(out).resolve()), policy_run=str(Path(policy_run).resolve()) if policy_run
                             else "", workers=workers, threads=threads)
        return client.submit_expert(spec), {"queue": "train", "kind": "expert", "episodes": episodes}

    _queue(client, submit, wait)


@submit.command("world")
@click.option("--data", "data_dir", default="", help="Training dataset dir the workers can read (default: the "
              "config's data section); its frame size sets the world's.")
@click.option("--eval-data", default="", help="Held-out dataset dir for the eval (default: the config's data.eval_path).")
@click.option("--preset", help="Named world config (tiny, sprites, demo, peer-small). Default: demo.")
@click.option("--config", "config", type=click.Path(path_type=Path), help="World config JSON (see `genie config`).")
@click.option("--set", "overrides", multiple=True, help="Dotted override, e.g. --set train_dynamics.steps=500.")
@click.option("--out", default="", help="World dir to write. Default: GENIE_JOBS_DIR/<job id>/world on the worker.")
@click.option("--run-root", default="", help="Training runs (resumable). Default: GENIE_JOBS_DIR/<job id>/runs.")
@click.option("--eval-clips", type=int, default=64, show_default=True, help="Clips evaluated; 0 = no eval.")
@click.option("--drift-steps", type=int, default=0, show_default=True, help="Also measure drift over this many steps.")
@click.option("--atlas-prompts", type=int, default=4, show_default=True, help="Prompts per action in the atlas.")
@click.option("--threads", type=int, default=0, help="torch threads on the worker (0 = its default).")
@click.option("--publish", default="", help="Then publish the world into the catalogue under this name (its next "
              "version), playable at once by gateways serving that catalogue.")
@click.option("--registry", default="", help="The catalogue to publish into (default: the worker's GENIE_REGISTRY).")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (exit 1 unless it succeeds).")
@click.pass_context
def submit_world(ctx, data_dir, eval_data, preset, config, overrides, out, run_root, eval_clips, drift_steps,
                 atlas_prompts, threads, publish, registry, wait) -> None:
    """Queue `genie world build` as a chain of jobs: train tokenizer -> LAM -> dynamics, then export, evaluate and
    name the actions (and with --publish, publish it). Status shows the stage and the steps done over all three."""
    from genie.build import with_data
    from services.worker.jobs import resolve_world
    from services.worker.specs import WorldJobSpec

    client = _client(ctx)

    def submit() -> tuple[str, dict[str, Any]]:
        world = with_data(resolve_world(preset, config, overrides), data_dir, eval_data)
        spec = WorldJobSpec(world, out=out, run_root=run_root, eval_clips=eval_clips, drift_steps=drift_steps,
                            atlas_prompts=atlas_prompts, threads=threads, publish=publish, registry=registry)
        return client.submit_world(spec), {"queue": "train", "kind": "world", "steps": spec.stage_steps}

    _queue(client, submit, wait)


@submit.command("rollout")
@click.option("--world", "world_dir", type=click.Path(path_type=Path),
              help="World dir the workers load (in-process backend); validation reads it. Default: GENIE_WORLD.")
@click.option("--world-ref", default="", help="Instead of --world: a catalogue world, NAME (its newest live version) "
              "or NAME@VERSION; the job pins the version and its digest, and the manifest records both.")
@click.option("--registry", default="", envvar="GENIE_REGISTRY", help="The catalogue of --world-ref (env GENIE_REGISTRY).")
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="A PNG/JPEG path, or the index of one of the world's prompts; repeat for several.")
@click.option("--actions", "actions", multiple=True, required=True,
              help="An action sequence: '3,1,0,2' or 'random:N'; repeat for several. Every prompt runs every sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Item i (prompt-major) samples with SEED + i.")
@click.option("--sampling-steps", type=int, default=0, help="MaskGIT steps (default: the world's).")
@click.option("--chunk-size", type=int, default=4, show_default=True, help="Items per chunk task.")
@click.option("--parallel", type=int, default=4, show_default=True, help="Items of a chunk generated concurrently.")
@click.option("--out", default="", help="Output dir. Default: GENIE_JOBS_DIR/<job id> on the worker.")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (exit 1 unless it succeeds).")
@click.pass_context
def submit_rollout(ctx, world_dir, world_ref, registry, prompts, actions, seed, sampling_steps, chunk_size, parallel, out,
                   wait) -> None:
    """Queue a batch rollout: prompts x action sequences -> GIFs, frames and tokens, plus a manifest."""
    from genie.catalog import DirectoryCatalog, parse_ref
    from genie.worlds import load_world_config_of
    from services.worker.jobs import parse_actions, resolve_prompts
    from services.worker.specs import RolloutJobSpec

    client = _client(ctx)

    def submit() -> tuple[str, dict[str, Any]]:
        # world: the dir validation reads; named: the one the job names for the workers ("" = their GENIE_WORLD)
        world, named, pinned = Path(world_dir or client.settings.world), world_dir, {}
        if world_ref:
            if world_dir:
                raise ValueError("give --world or --world-ref, not both")
            if not registry:
                raise ValueError("--world-ref needs a catalogue: --registry or GENIE_REGISTRY")
            entry = DirectoryCatalog(registry).resolve(*parse_ref(world_ref))
            world, named = entry.path, str(entry.path)
            pinned = {"world_ref": entry.ref, "world_digest": entry.digest}
        num_actions = load_world_config_of(world).dynamics.num_actions
        spec = RolloutJobSpec(resolve_prompts(prompts, world), parse_actions(actions, num_actions, seed), seed=seed,
                              sampling_steps=sampling_steps, chunk_size=chunk_size, parallel=parallel, out=out,
                              world=str(named) if named else "", **pinned)
        return client.submit_rollout(spec, world), {"queue": "rollout", "items": spec.total, "chunks": spec.num_chunks}

    _queue(client, submit, wait)


def progress_line(st, width: int = 30) -> str:
    """`<id> train PROGRESS [#########.....] 120/200 60% step 120 loss 0.0812`."""
    frac = min(1.0, st.done / st.total) if st.total else 0.0
    bar = "#" * round(frac * width) + "." * (width - round(frac * width))
    parts = [st.job_id, st.kind, st.state, f"[{bar}]", f"{st.done}/{st.total}", f"{frac:.0%}"]
    if st.detail.get("stage") and not st.terminal:
        parts.append(f"stage {st.detail['stage']}")
    if st.detail.get("loss") is not None:
        parts.append(f"loss {st.detail['loss']:.4f}")
    if st.worker:
        parts.append(f"on {st.worker}")
    if st.error:
        parts.append(f"- {st.error}")
    return " ".join(parts)


def _follow(client, job_id: str, timeout: float | None = None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    tty = sys.stdout.isatty()
    while True:
        st = client.status(job_id)
        line = progress_line(st)
        click.echo(("\r" + line) if tty else line, nl=not tty or st.terminal)
        if st.terminal:
            click.echo(json.dumps(st.to_json()))
            sys.exit(0 if st.state == "SUCCESS" else 1)
        if deadline is not None and time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.5 if tty else 2.0)


@jobs.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole status as JSON.")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (exit 1 unless it succeeds).")
@click.option("--timeout", type=float, help="With --wait: give up (exit 1) after this many seconds.")
@click.pass_context
def status(ctx, job_id, as_json, wait, timeout) -> None:
    """Show a job's state and progress (QUEUED, PROGRESS, RETRY, SUCCESS, FAILURE, CANCELLING, CANCELLED)."""
    client = _client(ctx)
    st = _job_call(client, client.status, job_id)
    if wait:
        _follow(client, job_id, timeout)
    click.echo(json.dumps(st.to_json()) if as_json else progress_line(st))


@jobs.command()
@click.argument("job_id")
@click.pass_context
def cancel(ctx, job_id) -> None:
    """Cancel a job: a queued one never runs, a running one stops at its next step or item (training keeps a
    checkpoint there, so resubmitting with the same --run-root continues it)."""
    client = _client(ctx)
    click.echo(progress_line(_job_call(client, client.cancel, job_id)))
