"""Evaluation metrics: PSNR, SSIM, controllability (ΔtPSNR), latent-vs-true action consistency and mapping."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

PSNR_CAP = 100.0  # dB reported for identical frames (true PSNR is infinite), so means stay finite


def _unit(frames: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float [0, 1]."""
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-frame PSNR in dB over (..., H, W, C) frames (uint8, or float in [0, 1]); capped at PSNR_CAP."""
    if a.shape != b.shape:
        raise ValueError(f"frame shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (_unit(a) - _unit(b)).pow(2).flatten(-3).mean(-1)
    floor = 10 ** (-PSNR_CAP / 10)
    return 10 * torch.log10(1.0 / mse.clamp_min(floor))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()  # (size, size)


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-frame SSIM (Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1=0.01, K2=0.03, data range 1) over
    (..., H, W, C) frames, averaged over channels and valid window positions. Frames smaller than the window use
    a window the size of the frame."""
    if a.shape != b.shape:
        raise ValueError(f"frame shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    lead, (h, w, c) = a.shape[:-3], a.shape[-3:]
    size = min(window, h, w)
    x = _unit(a).reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)  # (M*C, 1, H, W)
    y = _unit(b).reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    k = _gaussian_window(size, sigma)[None, None]
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    sxx = F.conv2d(x * x, k) - mu_x**2
    syy = F.conv2d(y * y, k) - mu_y**2
    sxy = F.conv2d(x * y, k) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.reshape(-1, c, s.shape[-2] * s.shape[-1]).mean(dim=(1, 2)).reshape(lead)


def action_consistency(latent: np.ndarray, true: np.ndarray, num_latent: int, num_true: int) -> dict[str, float]:
    """How well latent actions predict the simulator's true actions, over paired transitions.

    Returns normalised mutual information (arithmetic mean normalisation, in [0, 1]), the accuracy of the best
    one-to-one latent -> true mapping (Hungarian), the accuracy when each latent maps to its most frequent
    true action (many-to-one), the chance level of that (most frequent true action), and latent usage.
    """
    joint = _joint_counts(latent, true, num_latent, num_true)
    n = joint.sum()
    p = joint / n
    pl, pt = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pl[:, None] * pt[None, :])[nz])).sum())
    hl = float(-(pl[pl > 0] * np.log(pl[pl > 0])).sum())
    ht = float(-(pt[pt > 0] * np.log(pt[pt > 0])).sum())
    nmi = 0.0 if hl + ht == 0 else 2 * mi / (hl + ht)
    rows, cols = linear_sum_assignment(-joint)
    return {
        "nmi": nmi,
        "one_to_one_accuracy": float(joint[rows, cols].sum() / n),
        "many_to_one_accuracy": float(joint.max(axis=1).sum() / n),
        "majority_baseline": float(joint.sum(axis=0).max() / n),
        "latent_usage": float((joint.sum(axis=1) > 0).mean()),
        "transitions": int(n),
    }



def _joint_counts(latent: np.ndarray, true: np.ndarray, num_latent: int, num_true: int) -> np.ndarray:
    """(num_latent, num_true) float64 counts of paired (latent, true) actions, after checking shapes and ranges."""
    latent, true = np.asarray(latent).ravel(), np.asarray(true).ravel()
    if latent.shape != true.shape or latent.size == 0:
        raise ValueError(f"need equal, non-empty action arrays, got {latent.shape} and {true.shape}")
    if latent.min() < 0 or latent.max() >= num_latent or true.min() < 0 or true.max() >= num_true:
        raise ValueError("actions out of range")
    joint = np.zeros((num_latent, num_true), dtype=np.float64)
    np.add.at(joint, (latent, true), 1)
    return joint


def true_action_labels(names: list[str] | None, num_true: int) -> list[str]:
    """Names of true actions 0..num_true-1: the dataset's where it records them, else "true N"."""
    names = list(names or [])
    return [names[j] if j < len(names) else f"true {j}" for j in range(num_true)]


def action_mapping(
    latent: np.ndarray, true: np.ndarray, num_latent: int, num_true: int, true_names: list[str] | None = None
) -> dict[str, Any]:
    """What each latent action means in terms of the simulator's true actions, over paired transitions.

    For each latent: how often it occurs ("count"), its counts and distribution over true actions, its most
    frequent true action ("majority", "majority_name"), that action's share ("purity") and how much more likely
    the latent makes it than the data overall ("lift"; 1 = no information). Overall: the accuracy of mapping each
    latent to its majority true action (many-to-one), of the best one-to-one mapping (Hungarian; "one_to_one"
    gives each latent's partner), and the frequency of every true action.
    """
    joint = _joint_counts(latent, true, num_latent, num_true)  # (A, num_true)
    n = joint.sum()
    labels = true_action_labels(true_names, num_true)
    base = joint.sum(axis=0) / n  # (num_true,) how often each true action occurs
    rows, cols = linear_sum_assignment(-joint)
    partner = {int(r): int(c) for r, c in zip(rows, cols, strict=True)}
    latents = []
    for a in range(num_latent):
        count = joint[a].sum()
        if count == 0:
            latents.append({"latent": a, "count": 0, "counts": [0] * num_true, "distribution": None, "majority": None,
                            "majority_name": None, "purity": None, "lift": None})
            continue
        j = int(joint[a].argmax())
        purity = float(joint[a, j] / count)
        latents.append({
            "latent": a,
            "count": int(count),
            "counts": joint[a].astype(int).tolist(),
            "distribution": (joint[a] / count).tolist(),
            "majority": j,
            "majority_name": labels[j],
            "purity": purity,
            "lift": purity / float(base[j]),
        })
    return {
        "true_names": labels,
        "true_frequency": base.tolist(),
        "many_to_one_accuracy": float(joint.max(axis=1).sum() / n),
        "one_to_one_accuracy": float(joint[rows, cols].sum() / n),
        "one_to_one": [labels[partner[a]] if a in partner else None for a in range(num_latent)],
        "transitions": int(n),
        "latents": latents,
    }
