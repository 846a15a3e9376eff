"""`genie agent ...`: record the CoinRun expert, train latent-action (and oracle) behavioural cloning, evaluate them."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("agent")
def agent() -> None:
    """Agents that learn from unlabelled video through latent actions."""


def labelled_counts(text: str) -> tuple[int, ...]:
    """--labelled's comma-separated k values; ValueError with the expected form otherwise."""
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise ValueError(f"--labelled takes comma-separated counts, e.g. 10,50,200,1000; got {text!r}") from None
    return ks


def bc_options(fn):
    """The behavioural-cloning settings `genie agent train` and `genie jobs submit agent` both take (AgentTrainConfig's
    fields and its policy's); `bc_config` turns them into the config."""
    options = [
        click.option("--target", type=click.Choice(["latent", "true"]), default="latent", show_default=True,
                     help="latent: LAM-BC; true: the oracle (the same policy on the true actions)."),
        click.option("--steps", type=int, default=2000, show_default=True),
        click.option("--batch-size", type=int, default=64, show_default=True),
        click.option("--lr", type=float, default=5e-4, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--labelled", default="10,50,200,1000", show_default=True,
                     help="k: labelled transitions per mapping."),
        click.option("--context", type=int, default=2, show_default=True,
                     help="Frames the policy sees (the current one and context-1 before it)."),
        click.option("--arch", type=click.Choice(["nature", "impala"]), default="nature", show_default=True,
                     help="The policy's trunk: the halved Nature-DQN CNN or the IMPALA ResNet."),
        click.option("--width", "width_mult", type=int, default=32, show_default=True,
                     help="Channels of the policy's CNN."),
        click.option("--augment", type=int, default=0, show_default=True,
                     help="Pixels of random shift applied to the training frames (0: none)."),
    ]
    for option in reversed(options):  # the first listed shows first in --help
        fn = option(fn)
    return fn


def bc_config(data: str, world: str, target: str, steps: int, batch_size: int, lr: float, seed: int, labelled: str,
              context: int, arch: str, width_mult: int, augment: int, **extra):
    """The AgentTrainConfig of `bc_options`' values (ValueError, with the option's name, on a bad one)."""
    from genie.agent.policy import PolicyConfig
    from genie.agent.train import AgentTrainConfig

    return AgentTrainConfig(data=data, world=world, target=target, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            labelled=labelled_counts(labelled), augment=augment,
                            policy=PolicyConfig(context=context, arch=arch, width_mult=width_mult), **extra)


@agent.command("expert")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--episodes", type=int, default=100, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New dataset directory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-levels", type=int, default=10_000, show_default=True, help="Levels the split draws from.")
@click.option("--max-frames", type=int, default=500, show_default=True, help="An episode still running here fails.")
@click.option("--mode", "distribution_mode", type=click.Choice(["easy", "hard"]), default="easy", show_default=True)
@click.option("--workers", type=int, default=1, show_default=True)
@click.option("--reactive", "reactive_run", type=click.Path(path_type=Path),
              help="Record the reactive expert of this `genie agent reactive` run (a policy acting from the frames it "
                   "sees) instead of the planner.")
@click.option("--quiet", is_flag=True)
def expert(split, episodes, out, seed, num_levels, max_frames, distribution_mode, workers, reactive_run, quiet) -> None:
    """Record CoinRun expert episodes (a search planner over procgen's state save/restore, or with --reactive the
    planner distilled into a frame-based policy) in the shard format; the true actions are kept for the oracle and the
    labelled transitions only."""
    from genie.agent.expert import ExpertConfig, record
    from genie.cli_common import fail as _fail

    try:
        cfg = ExpertConfig(split=split, episodes=episodes, seed=seed, num_levels=num_levels, max_frames=max_frames,
                           distribution_mode=distribution_mode)
        if reactive_run is not None:
            from genie.agent.reactive import finished_policy_dir, load_reactive_policy, record_reactive

            policy = load_reactive_policy(finished_policy_dir(reactive_run))
            summary = record_reactive(policy, cfg, out, workers=workers, progress=not quiet)
        else:
            summary = record(cfg, out, workers=workers, progress=not quiet)
    except (ValueError, ImportError, OSError) as exc:
        _fail(str(exc))
    click.echo(json.dumps(summary))


@agent.command("reactive")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory (re-run to resume).")
@click.option("--iterations", type=int, default=4, show_default=True, help="DAgger iterations (0 plays the planner).")
@click.option("--episodes", type=int, default=48, show_default=True, help="Train-split episodes per iteration.")
@click.option("--steps", type=int, default=1500, show_default=True, help="Training steps after each iteration.")
@click.option("--beta-decay", type=float, default=0.5, show_default=True,
              help="Iteration i lets the planner act in a share beta_decay**i of the frames, the student in the rest.")
@click.option("--max-frames", type=int, default=400, show_default=True)
@click.option("--tolerance", type=float, default=1.0, show_default=True,
              help="A first action is near-optimal when its best sequence ends within this x of the best.")
@click.option("--horizon", type=int, default=48, show_default=True,
              help="Frames the labelling planner looks ahead.")
@click.option("--candidates", type=int, default=8, show_default=True,
              help="The labelling planner's random sequences per frame (after its fixed ones).")
@click.option("--context", type=int, default=2, show_default=True, help="Frames the student sees.")
@click.option("--width", "width_mult", type=int, default=32, show_default=True, help="Channels of the student's CNN.")
@click.option("--arch", type=click.Choice(["nature", "impala"]), default="nature", show_default=True,
              help="The student's trunk: the halved Nature-DQN CNN or the IMPALA ResNet.")
@click.option("--augment", type=int, default=0, show_default=True,
              help="Pixels of random shift applied to the student's training frames (0: none).")
@click.option("--least-action", is_flag=True,
              help="Train on the least near-optimal action (walk unless a jump is needed), not the whole set.")
@click.option("--critical-weight", type=float, default=1.0, show_default=True,
              help="Loss weight of the frames where the default action (jumping right) is not near-optimal.")
@click.option("--mode", "distribution_mode", type=click.Choice(["easy", "hard"]), default="easy", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Processes playing and labelling episodes.")
@click.option("--quiet", is_flag=True)
def reactive(out, iterations, episodes, steps, beta_decay, max_frames, tolerance, horizon, candidates, context,
             width_mult, arch, augment, least_action, critical_weight, distribution_mode, seed, workers, quiet) -> None:
    """Distil the planner into a reactive expert by DAgger: a CNN that acts from the last two frames, trained on the
    planner's choice at every state it visits. Resumes at the first unfinished iteration."""
    import logging

    from genie.agent.reactive import ReactiveConfig, run_dagger
    from genie.cli_common import fail as _fail

    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = ReactiveConfig(iterations=iterations, episodes=episodes, steps=steps, beta_decay=beta_decay,
                             max_frames=max_frames, tolerance=tolerance, horizon=horizon, candidates=candidates,
                             context=context, width_mult=width_mult, arch=arch, augment=augment,
                             least_action=least_action, critical_weight=critical_weight,
                             distribution_mode=distribution_mode, seed=seed, workers=workers)
        summary = run_dagger(cfg, out, progress=not quiet)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    click.echo(json.dumps(summary))


def ppo_options(fn):
    """The PPO settings `genie agent finetune` and `genie jobs submit finetune` both take (FinetuneConfig's fields)."""
    options = [
        click.option("--updates", type=int, default=100, show_default=True, help="PPO updates (more extend a run)."),
        click.option("--envs", type=int, default=32, show_default=True, help="Games played at once."),
        click.option("--rollout", type=int, default=128, show_default=True, help="Frames each game plays per update."),
        click.option("--epochs", type=int, default=3, show_default=True),
        click.option("--minibatches", type=int, default=4, show_default=True),
        click.option("--lr", type=float, default=2e-4, show_default=True),
        click.option("--entropy", type=float, default=0.01, show_default=True, help="Entropy bonus."),
        click.option("--mode", "distribution_mode", type=click.Choice(["easy", "hard"]), default="easy",
                     show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
    ]
    for option in reversed(options):  # the first listed shows first in --help
        fn = option(fn)
    return fn


@agent.command("finetune")
@click.option("--init", "init", type=click.Path(path_type=Path), required=True,
              help="The policy to start from: a finished `agent reactive` run, or a policy directory.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory (re-run to resume).")
@ppo_options
@click.option("--gamma", type=float, default=0.99, show_default=True)
@click.option("--value-warmup", type=int, default=4, show_default=True, help="First updates train only the value head.")
@click.option("--threads", type=int, default=0, help="torch threads (0 = default).")
@click.option("--quiet", is_flag=True)
def finetune(init, out, updates, envs, rollout, epochs, minibatches, lr, entropy, gamma, value_warmup,
             distribution_mode, seed, threads, quiet) -> None:
    """Fine-tune a reactive expert by RL (PPO) in the real game, on train-split levels. Its policy/ is read by
    `agent eval --reactive OUT` and `agent expert --reactive OUT` like a DAgger run's. Resumes from the newest
    checkpoint."""
    import logging

    import torch

    from genie.agent.finetune import FinetuneConfig, run_finetune
    from genie.cli_common import fail as _fail

    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = FinetuneConfig(init=str(init), updates=updates, envs=envs, rollout=rollout, epochs=epochs,
                             minibatches=minibatches, lr=lr, entropy=entropy, gamma=gamma, value_warmup=value_warmup,
                             distribution_mode=distribution_mode, seed=seed)
        summary = run_finetune(cfg, out, progress=not quiet)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    click.echo(json.dumps(summary))


@agent.command("train")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True, help="Expert dataset (`genie agent expert`).")
@click.option("--world", "world_dir", type=click.Path(path_type=Path), help="World whose frozen LAM labels the frames "
              "(default: the shipped demo world).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory (re-run to resume).")
@bc_options
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--stop-after", type=int, help="Stop (resumably) after this step.")
@click.option("--threads", type=int, default=0, help="torch threads (0 = default).")
@click.option("--quiet", is_flag=True)
def train(data_dir, world_dir, out, checkpoint_every, stop_after, threads, quiet, **bc) -> None:
    """Behavioural cloning from expert frames: the policy predicts the frozen LAM's latent action (or the true one),
    then latent -> real mappings are fitted from k labelled transitions. Checkpoints and resumes like every training."""
    import torch

    from genie.agent.train import train_agent
    from genie.cli_common import DEFAULT_WORLD
    from genie.cli_common import fail as _fail

    if threads:
        torch.set_num_threads(threads)
    try:
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {stop_after}")
        cfg = bc_config(str(data_dir), str(world_dir or DEFAULT_WORLD), checkpoint_every=checkpoint_every, **bc)
        summary = train_agent(cfg, out, progress=not quiet, stop_after=stop_after)
    except ValueError as exc:
        _fail(str(exc))
    click.echo(json.dumps(summary))


@agent.command("eval")
@click.option("--lam-bc", "lam_run", type=click.Path(path_type=Path), help="A finished `agent train --target latent` run.")
@click.option("--oracle", "oracle_run", type=click.Path(path_type=Path), help="A finished `agent train --target true` run.")
@click.option("--levels", type=int, default=50, show_default=True, help="Held-out levels (one episode each per policy).")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-frames", type=int, default=500, show_default=True, help="An episode still running here fails.")
@click.option("--mode", "distribution_mode", type=click.Choice(["easy", "hard"]), default="easy", show_default=True)
@click.option("--no-expert", is_flag=True, help="Skip the expert planner.")
@click.option("--reactive", "reactive_run", type=click.Path(path_type=Path),
              help="A finished `genie agent reactive` run: its reactive expert plays too.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for report.json, table.md, the plot.")
@click.option("--threads", type=int, default=0, help="torch threads (0 = default).")
def evaluate(lam_run, oracle_run, levels, split, seed, max_frames, distribution_mode, no_expert, reactive_run, out,
             threads) -> None:
    """Play random, the expert, oracle BC and LAM-BC (one mapping per k) in the real game on held-out levels; report
    mean return and success rate with 95% confidence intervals, a Markdown table and a success-vs-k plot."""
    import torch

    from genie.agent.eval import AgentEvalConfig, evaluate_agents, write_report
    from genie.agent.train import expert_action_counts, load_mappings, load_policy
    from genie.cli_common import fail as _fail
    from genie.data.procgen import ACTION_NAMES

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = AgentEvalConfig(levels=levels, split=split, seed=seed, max_frames=max_frames,
                              distribution_mode=distribution_mode)
        oracle = load_policy(Path(oracle_run) / "policy") if oracle_run else None
        lam_bc = load_policy(Path(lam_run) / "policy") if lam_run else None
        mappings = load_mappings(lam_run) if lam_run else {}
        counts = expert_action_counts(oracle_run or lam_run, len(ACTION_NAMES)) if (oracle_run or lam_run) else None
        reactive_policy = None
        if reactive_run is not None:
            from genie.agent.reactive import finished_policy_dir, load_reactive_policy

            reactive_policy = load_reactive_policy(finished_policy_dir(reactive_run))
        report = evaluate_agents(cfg, oracle, lam_bc, mappings, expert=not no_expert, expert_action_counts=counts,
                                 reactive=reactive_policy)
        summary = write_report(report, out)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    click.echo(json.dumps(summary))


@agent.command("pool")
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the pooled report.json, "
              "table.md and plot.")
def pool(reports, out) -> None:
    """Pool `agent eval` reports of other seeds (e.g. --seed 0 and --seed 1) into one report: each policy's success
    and return over all their levels, with the intervals of the pooled count."""
    from genie.agent.eval import pool_reports, write_report
    from genie.cli_common import fail as _fail

    loaded = []
    for path in reports:
        file = path / "report.json" if path.is_dir() else path
        try:
            loaded.append(json.loads(file.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            _fail(f"{file}: not a readable `genie agent eval` report.json ({exc})")
    try:
        summary = write_report(pool_reports(loaded), out)
    except (ValueError, KeyError, TypeError) as exc:
        _fail(f"cannot pool these reports: {exc}")
    click.echo(json.dumps(summary))


@agent.command("gif")
@click.option("--lam-bc", "lam_run", type=click.Path(path_type=Path), required=True, help="A finished LAM-BC run.")
@click.option("--world", "world_dir", type=click.Path(path_type=Path), help="World to play in (default: the demo world).")
@click.option("--k", "k", type=int, default=200, show_default=True, help="The mapping fitted from k labelled transitions.")
@click.option("--level-index", type=int, default=0, show_default=True, help="Which held-out (test) level.")
@click.option("--steps", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="GIF to write.")
@click.option("--threads", type=int, default=0, help="torch threads (0 = default).")
def gif(lam_run, world_dir, k, level_index, steps, seed, out, threads) -> None:
    """The LAM-BC policy played in the real game (mapped to real actions) and inside the world (latent actions) from
    the same held-out level, side by side."""
    import torch

    from genie.agent.showcase import write_showcase
    from genie.agent.train import load_mappings, load_policy
    from genie.cli_common import DEFAULT_WORLD
    from genie.cli_common import fail as _fail
    from genie.envs import load_engine

    if threads:
        torch.set_num_threads(threads)
    try:
        if steps < 1 or level_index < 0:
            raise ValueError(f"need --steps >= 1 and --level-index >= 0, got {steps}, {level_index}")
        mappings = load_mappings(lam_run)
        if k not in mappings:
            raise ValueError(f"{lam_run} has mappings for k in {sorted(mappings)}, not {k}")
        policy = load_policy(Path(lam_run) / "policy")
        engine, _ = load_engine(Path(world_dir or DEFAULT_WORLD))
        path = write_showcase(policy, mappings[k], engine, out, level_index=level_index, steps=steps, seed=seed)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    click.echo(json.dumps({"gif": str(path)}))
