"""Where in a motion the LAM changes its mind: the world's LAM labels the controllability eval's motion clips (the
real game holding each key from a standstill, `genie.eval.control`), and for every transition position the script
prints the labels' counts, and for the jump the scene's vertical shift (`best_shift` of the frame pair, in
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

from genie.eval.control import MOTIONS, ControlConfig, best_shift, collect_probes, motion_labels
from genie.train.checkpoint import load_model


def profile(lam, probes) -> dict:
    out = {}
    for motion in MOTIONS:
        clips, labels = motion_labels(lam, probes, motion)  # (L, T, H, W, C), (L, T-1)
        per_t = [{str(k): v for k, v in Counter(labels[:, t].tolist()).most_common()} for t in range(labels.shape[1])]
        entry = {"overall": {str(k): v for k, v in Counter(labels.flatten().tolist()).most_common()}, "by_position": per_t}
        if motion == "jump":  # the scene's vertical shift per transition, as the controllability eval measures it
            entry["mean_vertical_shift_px"] = [
                round(float(np.mean([best_shift(c[t], c[t + 1])[0] for c in clips])), 2) for t in range(len(clips[0]) - 1)]
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
