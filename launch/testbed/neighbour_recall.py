"""Which planted rows does the monitor's near-duplicate count see? Per kind, on a built testbed.

``python -m launch.testbed.neighbour_recall --testbed DIR --vae MODEL [--threshold 0.95 ...] [--side 4] [--out FILE.md]``

Encodes every training image with the run's VAE (posterior mean, as the trainer's ``neighbours``
signal does), embeds it with :func:`train.monitor.neighbours.embed` and, for each threshold,
reports per ground-truth group: the share of rows with at least one look-alike among the other
training rows, the share whose look-alikes include a row of their own planted group (the copies it
should find), and the mean count. On clean rows any look-alike is a false positive. The count is
complete once every row has been seen once, i.e. after the first epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from launch.testbed.reading import emit_table, load_image, read_rows
from train.monitor.neighbours import embed


def embeddings(root: Path, rows: list[dict], vae_folder: str, side: int, batch: int = 128) -> np.ndarray:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder, subfolder="vae").eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            pixels = np.stack([load_image(root, r["file_name"]) for r in rows[start:start + batch]])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2) * 2 - 1
            out.append(embed(vae.encode(x).latent_dist.mean, side).numpy())
    return np.concatenate(out)


def recall(vectors: np.ndarray, rows: list[dict], thresholds: list[float]) -> list[str]:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    groups = np.asarray([r["group"] for r in rows])
    planted = np.asarray([r.get("planted_group") or f"row-{i}" for i, r in enumerate(rows)])
    lines = ["| threshold | group | rows | with a look-alike | with one of its own planted group | mean count |",
             "|---|---|---|---|---|---|"]
    for threshold in thresholds:
        close = sims >= threshold
        own = close & (planted[:, None] == planted[None, :])
        for group in dict.fromkeys(groups.tolist()):
            members = groups == group
            lines.append(f"| {threshold} | {group} | {members.sum()} | {close[members].any(1).mean():.1%} | "
                         f"{'—' if group == 'clean' else f'{own[members].any(1).mean():.1%}'} | "
                         f"{close[members].sum(1).mean():.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.testbed.neighbour_recall", description=__doc__.split("\n")[0])
    p.add_argument("--testbed", required=True)
    p.add_argument("--vae", required=True, help="a pipeline folder with a vae/ subfolder (e.g. the run's base)")
    p.add_argument("--threshold", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--side", type=int, default=4)
    p.add_argument("--out")
    a = p.parse_args(argv)
    root = Path(a.testbed)
    rows = read_rows(root, split="train")
    emit_table(recall(embeddings(root, rows, a.vae, a.side), rows, a.threshold), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
