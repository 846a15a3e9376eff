"""The ceiling of one-to-one action accuracy on Procgen data: what any labeller that sees the frames could reach.

`genie eval` scores a LAM by the best one-to-one (Hungarian) mapping of its latents to the simulator's true actions.
Many of Procgen's 15 actions do the same thing in CoinRun (DOWN and the six letter keys do nothing, UP does nothing
in mid-air, ...), so no labeller can tell them apart from the frames. `equivalence_classes` replays a dataset's
episodes in the real game (the generator is deterministic) and at every recorded transition restores the game's
state, plays each of the 15 actions and groups those whose next frames equal the recorded ones. A labeller that
names each group (by its most frequent member) is the best possible; its one-to-one accuracy is the ceiling.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.optimize import linear_sum_assignment

from genie.data.procgen import ACTION_NAMES, ProcgenConfig, _chunk, make_env

K = len(ACTION_NAMES)


def equivalence_classes(cfg: ProcgenConfig, horizon: int = 1) -> tuple[np.ndarray, list[frozenset[int]], int]:
    """Replays cfg's episodes as `genie data generate` records them -> (true actions (M,), for each transition the set
    of actions whose next `horizon` frames (the recorded actions following) equal the recorded ones, the number of
    transitions whose own action did not reproduce them). horizon=1 is what a labeller of frame pairs sees; more
    frames bound a labeller that also sees the future."""
    true, groups, mismatches = [], [], 0
    for chunk in range(-(-cfg.episodes // cfg.episodes_per_env)):
        env, _ = make_env(cfg, chunk)  # replays restore every state, so one environment of the same config serves
        for frames, actions, meta in _chunk(cfg, chunk, states=True):
            actions = actions.tolist()
            for t, snapshot in enumerate(meta["states"]):
                group = set()
                for a in range(K):
                    env.set_state(snapshot)
                    if all(_step_equals(env, b, frames[t + 1 + j])
                           for j, b in enumerate([a] + actions[t + 1 : t + min(horizon, len(actions) - t)])):
                        group.add(a)
                if actions[t] not in group:
                    mismatches += 1
                    group.add(actions[t])
                true.append(actions[t])
                groups.append(frozenset(group))
    return np.array(true), groups, mismatches


def _step_equals(env, action: int, frame: np.ndarray) -> bool:
    env.act(np.array([action]))
    _, obs, first = env.observe()
    return not first[0] and np.array_equal(obs["rgb"][0], frame)


def one_to_one(labels: np.ndarray, true: np.ndarray, num_labels: int) -> float:
    """Best one-to-one accuracy when at most num_labels labels may be mapped (each to a distinct true action)."""
    joint = np.zeros((K, K))
    np.add.at(joint, (labels, true), 1)
    if num_labels >= K:
        rows, cols = linear_sum_assignment(-joint)
        return float(joint[rows, cols].sum() / len(true))
    # At most num_labels real pairs: every label may go unmapped (K zero-valued "unmapped" columns), and K - num_labels
    # blocker rows that can only take real actions leave num_labels of them to the labels.
    big = joint.sum() + 1.0
    labels_rows = np.concatenate([joint, np.zeros((K, K))], axis=1)
    blockers = np.concatenate([np.zeros((K - num_labels, K)), np.full((K - num_labels, K), -big)], axis=1)
    rows, cols = linear_sum_assignment(-np.concatenate([labels_rows, blockers]))
    return float(sum(joint[r, c] for r, c in zip(rows, cols, strict=True) if r < K and c < K) / len(true))


def ceiling(cfg: ProcgenConfig, horizon: int = 1, num_labels: int = 8) -> dict:
    """The one-to-one accuracy of the best labeller of cfg's transitions (it sees `horizon` frames after each action)
    with num_labels labels and with one per action, beside the majority baseline; plus how often actions coincide."""
    true, groups, mismatches = equivalence_classes(cfg, horizon)
    freq = Counter(true.tolist())
    labels = np.array([max(g, key=lambda a: (freq[a], -a)) for g in groups])  # equal groups get equal labels
    sizes = Counter(len(g) for g in groups)
    return {
        "transitions": int(len(true)),
        "replay_mismatches": mismatches,  # transitions whose replay did not reproduce the recorded frames
        "ceiling_one_to_one": one_to_one(labels, true, num_labels),
        "ceiling_one_to_one_all_labels": one_to_one(labels, true, K),
        "num_labels": num_labels,
        "majority_baseline": float(max(freq.values()) / len(true)),
        "mean_group_size": float(np.mean([len(g) for g in groups])),
        "group_size_histogram": {int(k): int(v) for k, v in sorted(sizes.items())},
    }
