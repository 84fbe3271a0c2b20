"""Where a mitigation's quality cost sits: clean prompts whose training image it down-weighted
(its collateral) vs the clean prompts it left alone.

``python -m launch.testbed.by_weight --split-by RUN --runs RUN [RUN ...] [--out table.md]``

The split comes from ``--split-by``'s own config: the de-duplication weights its trainer used
(:mod:`train.mitigate.dedup`: whole-image and region de-duplication weights, computed from
the data alone, the same cached arrays). A clean training image is *touched* when its row weight
or any tile of its region map is below 1. Each ``--runs`` entry is then scored per split on every
evaluation draw it has (``eval/``, ``eval-seed<k>/``, averaged): KID of the split's clean-prompt
generations vs the held-out images, and the median prompt fidelity (own-image rank). The two
splits are different sets of emoji, so compare a split across runs, not the splits with each other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from train.evaluate.measures import image_kid
from launch.testbed.reading import emit_table, evaluation_draws, heldout_images


def touched_samples(run: str | Path) -> tuple[set[str], Path]:
    """The sample ids whose loss weight ``run``'s de-duplication lowered, and its testbed folder."""
    from data.datasets import load_table
    from train.mitigate.dedup import dedup_weights, region_dedup_weights

    cfg = OmegaConf.load(Path(run) / "config.yaml")
    data_cfg, dedup, cache = cfg.data, cfg.mitigate.dedup, cfg.model.cache_dir
    table, root = load_table(data_cfg, cache)
    touched = np.zeros(len(table), dtype=bool)
    if dedup.images:
        touched |= dedup_weights(table, data_cfg.image_column, cache, root, dedup.max_distance) < 1
    if dedup.regions:
        regions = region_dedup_weights(table, data_cfg.image_column, data_cfg.resolution, cache, root,
                                       dedup.region_tiles, dedup.region_min_count, dedup.region_dilate)
        touched |= (regions < 1).any(axis=(1, 2))
    ids = table[data_cfg.id_column]
    return {str(ids[i]) for i in np.flatnonzero(touched)}, Path(data_cfg.path)


def split_scores(run: str | Path, touched: set[str], root: Path) -> dict[str, dict]:
    """Per split (touched | untouched): clean prompts, KID and median own-image rank, mean over draws."""
    held = heldout_images(root)
    scores: dict[str, dict[str, list]] = {"touched": {}, "untouched": {}}
    for result, images in evaluation_draws(run):
        ranks: dict[int, list] = {}
        for g in result["generations"]:
            ranks.setdefault(g["prompt"], []).append(g.get("own_rank"))
        for split in scores:
            picked = [p for p, prompt in enumerate(result["prompts"])
                      if prompt["group"] == "clean" and (prompt["sample_id"] in touched) == (split == "touched")]
            if len(picked) < 2:
                continue
            gen = images[picked].reshape(-1, *images.shape[2:])
            own = [r for p in picked for r in ranks[p] if r is not None]
            s = scores[split]
            s.setdefault("prompts", []).append(len(picked))
            s.setdefault("kid", []).append(image_kid(gen, held))
            s.setdefault("own_rank_median", []).append(float(np.median(own)) if own else np.nan)
    return {split: {k: float(np.mean(v)) for k, v in s.items()} | {"draws": len(s.get("kid", []))}
            for split, s in scores.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.testbed.by_weight", description=__doc__.split("\n\n")[0])
    p.add_argument("--split-by", required=True, help="a run whose de-duplication weights define the split")
    p.add_argument("--runs", nargs="+", required=True, help="evaluated runs to score per split")
    p.add_argument("--out", help="also write the markdown table here")
    a = p.parse_args(argv)
    touched, root = touched_samples(a.split_by)
    lines = [f"Split by `{a.split_by}`: {len(touched)} training rows down-weighted.", "",
             "| run | split | clean prompts | KID vs held-out | own-image rank (median) | draws |",
             "| --- | --- | --- | --- | --- | --- |"]
    for run in a.runs:
        for split, s in split_scores(run, touched, root).items():
            if s["draws"]:
                lines.append(f"| `{run}` | {split} | {s['prompts']:.0f} | {s['kid']:.5f} | "
                             f"{s['own_rank_median']:.3f} | {s['draws']} |")
    emit_table(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
