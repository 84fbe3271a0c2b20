"""What a KID gap between runs is made of.

``python -m launch.testbed.kid_blocks --runs RUN [RUN ...] [--out table.md]``

KID with the fixed extractor (:class:`train.evaluate.measures.PixelFeatures`) sums three blocks of
features; here each block scores alone (KID of the clean-prompt generations vs the held-out images
under that block only, with its own kernel scaling: compare a block across runs, not with the
whole KID or another block), next to the share of flat pixels (:func:`flat_fraction`) in the
generations and in the held-out images, and their mean red channel (a palette shift shows there).
Mean over each run's evaluation draws. A gap that sits in
one block names the property that differs (layout: where things are; colour: the colour
histograms; sharpness: flat fill vs edges and residual noise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from train.evaluate.measures import PixelFeatures, flat_fraction, kernel_distance
from launch.testbed.reading import emit_table, evaluation_draws, heldout_images

BLOCKS = ("layout", "colour", "sharpness")


def block_scores(run: str | Path, extractor: PixelFeatures | None = None) -> dict[str, float]:
    """Mean over ``run``'s draws: whole KID, KID per feature block, flat share of the clean
    generations; and the flat share of the held-out images (``heldout_flat``)."""
    extractor = extractor or PixelFeatures()
    draws = evaluation_draws(run)
    held = heldout_images(draws[0][0]["testbed"])
    held_blocks = extractor.blocks(held)
    scores: dict[str, list[float]] = {}
    for result, images in draws:
        clean = [p for p, prompt in enumerate(result["prompts"]) if prompt["group"] == "clean"]
        gen = images[clean].reshape(-1, *images.shape[2:])
        gen_blocks = extractor.blocks(gen)
        whole = kernel_distance(np.concatenate(list(gen_blocks.values()), axis=1),
                                np.concatenate(list(held_blocks.values()), axis=1))
        for name, value in [("kid", whole), *((b, kernel_distance(gen_blocks[b], held_blocks[b])) for b in BLOCKS),
                            ("flat", flat_fraction(gen)), ("red", float(gen[..., 0].mean()))]:
            scores.setdefault(name, []).append(value)
    return {k: float(np.mean(v)) for k, v in scores.items()} | {
        "heldout_flat": flat_fraction(held), "heldout_red": float(held[..., 0].mean()), "draws": len(draws)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.testbed.kid_blocks", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="evaluated runs (folders with eval*/eval.json)")
    p.add_argument("--out", help="also write the markdown table here")
    a = p.parse_args(argv)
    lines = ["| run | KID | KID: layout | KID: colour | KID: sharpness | flat pixels | held-out flat | mean red | "
             "held-out mean red | draws |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in a.runs:
        s = block_scores(run)
        lines.append(f"| `{run}` | {s['kid']:.5f} | {s['layout']:.5f} | {s['colour']:.5f} | {s['sharpness']:.4f} | "
                     f"{s['flat']:.3f} | {s['heldout_flat']:.3f} | {s['red']:.3f} | {s['heldout_red']:.3f} | "
                     f"{s['draws']} |")
    emit_table(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
