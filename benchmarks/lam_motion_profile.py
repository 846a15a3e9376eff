"""Where in a motion the LAM changes its mind: the world's LAM labels the controllability eval's motion clips (the
real game holding each key from a standstill, `genie.eval.control`), and for every transition position the script
prints the labels' counts, and for the jump the scene's vertical shift (best integer shift of the frame pair, in
pixels). `lam_motions` reports only each motion's majority share; this shows which frames of a motion fall outside it.

    python benchmarks/lam_motion_profile.py --world worlds/demo --split val --levels 32 \\
        --out benchmarks/worlds/lam-motion-profile-val.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from genie.eval.control import MOTIONS, ControlConfig, collect_probes
from genie.train.checkpoint import load_model


def vertical_shift(a: np.ndarray, b: np.ndarray, max_shift: int = 8) -> int:
    """The integer dy (pixels, + = the scene moves down, i.e. the agent rises) that best maps frame a onto frame b:
    (H, W) grey -> int. Rows near the border are left out, where the roll wraps."""
    m = max_shift
    errors = {dy: float(np.mean((np.roll(a, dy, axis=0)[m:-m] - b[m:-m]) ** 2)) for dy in range(-m, m + 1)}
    return min(errors, key=errors.get)


def profile(lam, probes) -> dict:
    out = {}
    for motion in MOTIONS:
        clips = torch.from_numpy(np.stack([p.clips[motion] for p in probes]))[:, : lam.cfg.max_frames]  # (L, T, H, W, C)
        with torch.no_grad():
            labels = lam.infer_actions(clips).numpy()  # (L, T-1)
        per_t = [{str(k): v for k, v in Counter(labels[:, t].tolist()).most_common()} for t in range(labels.shape[1])]
        entry = {"overall": {str(k): v for k, v in Counter(labels.flatten().tolist()).most_common()}, "by_position": per_t}
        if motion == "jump":
            grey = clips.float().mean(-1).numpy()  # (L, T, H, W)
            entry["mean_vertical_shift_px"] = [
                round(float(np.mean([vertical_shift(g[t], g[t + 1]) for g in grey])), 2) for t in range(grey.shape[1] - 1)]
        out[motion] = entry
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=Path, default=Path("worlds/demo"))
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--levels", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lam = load_model(args.world / "lam", "lam").eval()
    probes, tried = collect_probes(ControlConfig(split=args.split, levels=args.levels, seed=args.seed))
    report = {"world": str(args.world), "split": args.split, "levels": len(probes), "levels_tried": tried,
              "motions": profile(lam, probes)}
    for motion, entry in report["motions"].items():
        print(motion, "overall", entry["overall"])
        for t, counts in enumerate(entry["by_position"]):
            shift = f"  dy {entry['mean_vertical_shift_px'][t]:+.2f} px" if "mean_vertical_shift_px" in entry else ""
            print(f"  t={t} {counts}{shift}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
