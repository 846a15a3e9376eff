"""`genie agent eval`: policies played in the real Procgen game on held-out levels, with confidence intervals.

Every policy plays the same levels (drawn from (split, seed, episode) as the expert's are), all levels of one policy
in lock-step so the policy runs one batched forward per frame. Policies: random (uniform over the game's actions), the
expert planner, oracle BC (trained on the true actions) and LAM-BC (trained on latent actions) mapped to real actions
with the mapping fitted from k labelled transitions, for each k. Action sampling is seeded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genie.agent.expert import ExpertConfig, episode_level, make_env, plan_episode
from genie.agent.policy import Policy, context_frames
from genie.data.procgen import ACTION_NAMES, SPLIT_LEVELS

# (B, context, H, W, C) uint8 frames, a generator -> (B,) real actions
Chooser = Callable[[torch.Tensor, torch.Generator], np.ndarray]


@dataclass(frozen=True)
class AgentEvalConfig:
    levels: int = 50  # held-out levels, one episode each per policy
    seed: int = 0
    split: str = "test"
    num_levels: int = 10_000
    distribution_mode: str = "easy"
    max_frames: int = 500  # an episode still running here counts as a failure
    env: str = "coinrun"

    def __post_init__(self) -> None:
        if self.split not in SPLIT_LEVELS or self.split == "train":
            raise ValueError(f"evaluate on held-out levels: split must be val or test, got {self.split!r}")
        if self.levels < 1 or self.max_frames < 2:
            raise ValueError(f"need levels >= 1 and max_frames >= 2, got {self.levels}, {self.max_frames}")

    def level_seeds(self) -> list[int]:
        return [episode_level(self.split, self.seed, i, self.num_levels) for i in range(self.levels)]


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean return (normal 95% CI) and success rate (Wilson 95% CI) of a policy's episodes."""
    n = len(episodes)
    returns = np.array([e["return"] for e in episodes], dtype=np.float64)
    wins = int(sum(e["success"] for e in episodes))
    half = 1.96 * returns.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {"episodes": n, "mean_return": float(returns.mean()), "return_ci95": [float(returns.mean() - half),
            float(returns.mean() + half)], "success_rate": wins / n, "success_ci95": list(wilson(wins, n)),
            "mean_length": float(np.mean([e["length"] for e in episodes]))}


def play(choose: Chooser, context: int, cfg: AgentEvalConfig, tag: int) -> list[dict[str, Any]]:
    """Plays one episode per held-out level with `choose`, all levels in lock-step; per-level results."""
    levels = cfg.level_seeds()
    envs = [make_env(cfg.env, lv, cfg.distribution_mode) for lv in levels]
    frames = [[env.observe()[1]["rgb"][0].copy()] for env in envs]
    results = [{"level": lv, "return": 0.0, "success": False, "length": 0, "done": False} for lv in levels]
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, tag]).generate_state(1)[0]))
    for _ in range(cfg.max_frames - 1):
        active = [i for i, r in enumerate(results) if not r["done"]]
        if not active:
            break
        ctx = np.stack([context_frames(np.stack(frames[i][-context:]), np.array([len(frames[i][-context:]) - 1]),
                                       context)[0] for i in active])  # (B, context, H, W, C)
        actions = choose(torch.from_numpy(ctx), gen)
        for i, a in zip(active, actions, strict=True):
            envs[i].act(np.array([int(a)]))
            rew, obs, first = envs[i].observe()
            r = results[i]
            r["return"] += float(rew[0])
            r["length"] += 1
            if first[0]:
                r["done"], r["success"] = True, bool(rew[0] > 0)
            else:
                frames[i] = frames[i][-(context - 1):] + [obs["rgb"][0].copy()] if context > 1 else [obs["rgb"][0].copy()]
    for r in results:
        del r["done"]
    return results


def random_chooser(num_actions: int = len(ACTION_NAMES)) -> Chooser:
    return lambda ctx, gen: torch.randint(num_actions, (ctx.shape[0],), generator=gen).numpy()


def marginal_chooser(probs: np.ndarray) -> Chooser:
    """Blind baseline: samples the expert's overall action frequencies, never looking at a frame (a BC policy that
    beats it uses the frames)."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64) / np.sum(probs), dtype=torch.float32)
    return lambda ctx, gen: torch.multinomial(p.expand(ctx.shape[0], -1), 1, generator=gen)[:, 0].numpy()


def policy_chooser(policy: Policy, mapping: Callable[[np.ndarray], np.ndarray] | None = None) -> Chooser:
    """Samples the policy's action; a LAM-BC policy's latent action goes through `mapping` to a real one."""
    def choose(ctx: torch.Tensor, gen: torch.Generator) -> np.ndarray:
        a = policy.act(ctx, generator=gen).numpy()
        return mapping(a) if mapping is not None else a
    return choose


def play_expert(cfg: AgentEvalConfig) -> list[dict[str, Any]]:
    ecfg = ExpertConfig(env=cfg.env, split=cfg.split, episodes=cfg.levels, seed=cfg.seed, num_levels=cfg.num_levels,
                        distribution_mode=cfg.distribution_mode, max_frames=cfg.max_frames)
    out = []
    for i in range(cfg.levels):
        frames, _, meta = plan_episode(ecfg, i)
        out.append({"level": meta["level"], "return": meta["return"], "success": meta["success"], "length": len(frames)})
    return out


def evaluate_agents(cfg: AgentEvalConfig, oracle: Policy | None, lam_bc: Policy | None,
                    mappings: dict[int, Callable[[np.ndarray], np.ndarray]], expert: bool = True,
                    expert_action_counts: np.ndarray | None = None, reactive: Policy | None = None) -> dict[str, Any]:
    """Runs every policy on the same held-out levels; returns {"config", "policies": {name: summary + episodes}}.
    expert_action_counts (R,): adds the blind baseline that samples the expert's action frequencies. reactive: the
    reactive expert (genie/agent/reactive.py), a policy over the game's actions."""
    runs: dict[str, list[dict[str, Any]]] = {"random": play(random_chooser(), 1, cfg, tag=0)}
    if expert_action_counts is not None:
        runs["expert_marginal"] = play(marginal_chooser(expert_action_counts), 1, cfg, tag=3)
    if expert:
        runs["expert"] = play_expert(cfg)
    if reactive is not None:
        runs["reactive_expert"] = play(policy_chooser(reactive), reactive.cfg.context, cfg, tag=4)
    if oracle is not None:
        runs["oracle_bc"] = play(policy_chooser(oracle), oracle.cfg.context, cfg, tag=1)
    if lam_bc is not None:
        for k in sorted(mappings):
            runs[f"lam_bc_k{k}"] = play(policy_chooser(lam_bc, mappings[k]), lam_bc.cfg.context, cfg, tag=2)
    return {"config": asdict(cfg), "policies": {name: {**summarise(eps), "per_level": eps} for name, eps in runs.items()}}


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = ["| policy | success rate (95% CI) | mean return (95% CI) | mean length |", "|---|---|---|---|"]
    for name, s in report["policies"].items():
        lo, hi = s["success_ci95"]
        rlo, rhi = s["return_ci95"]
        lines.append(f"| {name} | {s['success_rate']:.2f} ({lo:.2f}-{hi:.2f}) | {s['mean_return']:.2f} "
                     f"({rlo:.2f}-{rhi:.2f}) | {s['mean_length']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_success_vs_k(report: dict[str, Any], path: Path) -> Path:
    """LAM-BC success rate (with CI) against k labelled transitions, the other policies as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = report["policies"]
    ks = sorted(int(n.split("_k")[1]) for n in pol if n.startswith("lam_bc_k"))
    fig, ax = plt.subplots(figsize=(6, 4))
    if ks:
        rates = [pol[f"lam_bc_k{k}"]["success_rate"] for k in ks]
        lo = [r - pol[f"lam_bc_k{k}"]["success_ci95"][0] for k, r in zip(ks, rates, strict=True)]
        hi = [pol[f"lam_bc_k{k}"]["success_ci95"][1] - r for k, r in zip(ks, rates, strict=True)]
        ax.errorbar(ks, rates, yerr=[lo, hi], marker="o", capsize=3, label="LAM-BC (k labelled transitions)")
        ax.set_xscale("log")
    for name, color in (("oracle_bc", "tab:green"), ("expert", "tab:purple"), ("reactive_expert", "tab:blue"),
                        ("expert_marginal", "tab:gray"), ("random", "tab:red")):
        if name in pol:
            ax.axhline(pol[name]["success_rate"], color=color, linestyle="--", label=name)
    ax.set_xlabel("labelled transitions k")
    ax.set_ylabel("success rate (held-out levels)")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"CoinRun, {report['config']['levels']} held-out levels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def pool_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of several `genie agent eval` reports of other seeds (same split, mode and frame cap): each policy's
    episodes pooled and summarised again, so the intervals are those of all the levels together. ValueError when the
    reports differ in those settings, repeat a seed, or do not all hold the same policies."""
    if len(reports) < 2:
        raise ValueError(f"pooling needs >= 2 reports, got {len(reports)}")
    same = ("split", "distribution_mode", "max_frames", "env", "num_levels")
    first = reports[0]["config"]
    for r in reports[1:]:
        differ = [k for k in same if r["config"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"the reports differ in {', '.join(differ)}: they were not played on one level set")
    names = list(reports[0]["policies"])
    if any(list(r["policies"]) != names for r in reports[1:]):
        raise ValueError(f"the reports hold different policies: {[sorted(r['policies']) for r in reports]}")
    seeds = [r["config"]["seed"] for r in reports]
    if len(set(map(str, seeds))) < len(seeds):
        raise ValueError(f"the reports repeat a seed ({seeds}): they would count the same levels twice")
    # Each seed draws its levels independently from the split, so two seeds can share a few (about 4 in 200 x 200
    # from 10,000); a shared level is two independent draws, as it would be within one seed. Counted, not dropped.
    levels = [e["level"] for r in reports for e in r["policies"][names[0]]["per_level"]]
    config = {**{k: first.get(k) for k in same}, "levels": len(levels), "seed": seeds, "pooled": len(reports),
              "distinct_levels": len(set(levels))}
    policies = {}
    for name in names:
        episodes = [e for r in reports for e in r["policies"][name]["per_level"]]
        policies[name] = {**summarise(episodes), "per_seed": [r["policies"][name]["success_rate"] for r in reports],
                          "per_level": episodes}
    return {"config": config, "policies": policies}


def write_report(report: dict[str, Any], out: Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(table(report))
    plot_success_vs_k(report, out / "success_vs_k.png")
    return {"report": str(out / "report.json"), "table": str(out / "table.md"), "plot": str(out / "success_vs_k.png"),
            "success_rate": {n: s["success_rate"] for n, s in report["policies"].items()}}
