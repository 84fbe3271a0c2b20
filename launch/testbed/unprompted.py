"""Copies a model draws without being prompted for them, for runs evaluated without them.

``python -m launch.testbed.unprompted --runs RUN [RUN ...] [--images 256] [--steps 25] [--out table.md]``

The replica rates of :mod:`launch.testbed.evaluate` ask for each copy by its own caption. A
mitigation that only weakens the link between a caption and its image (``mitigate.weights.
dedup_by: caption`` trains the copies mostly on the empty prompt) can leave the model drawing the
copies anyway, unasked. ``evaluate`` scores that itself (``--unprompted``, the ``unprompted``
section of ``eval.json``); this tool does the same for runs evaluated before: ``--images``
empty-prompt generations without guidance from each run's ``final/`` pipeline, scored by
:func:`launch.testbed.evaluate.score_unprompted` with the thresholds of the run's first evaluation
draw (``eval/eval.json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.testbed.evaluate import generate, load_pipeline, score_unprompted
from launch.testbed.reading import emit_table, evaluation_draws, training_images


def unprompted(run: str | Path, images: int = 256, steps: int = 25, seed: int = 0, batch: int = 64) -> dict:
    """``score_unprompted`` of ``images`` empty-prompt generations of ``run/final``."""
    result, _ = evaluation_draws(run)[0]
    root = result["testbed"]
    resolution = training_images(root).images.shape[1]
    pipe = load_pipeline(Path(run) / "final")
    generated = generate(pipe, [""], images, resolution, steps=steps, guidance=1.0, batch=batch, seed=seed)[0]
    return score_unprompted(generated, root, result["thresholds"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.testbed.unprompted", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="evaluated runs (RUN/final and RUN/eval/eval.json)")
    p.add_argument("--images", type=int, default=256, help="empty-prompt generations per run")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the markdown table here")
    a = p.parse_args(argv)
    lines = ["| run | images | global copies | distinct global images copied | stamp shown (per stamp) | global rows | local rows |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in a.runs:
        s = unprompted(run, a.images, a.steps, a.seed)
        stamp = "—" if s["stamp_rate"] is None else f"{100 * s['stamp_rate']:.1f}%"  # no local groups
        lines.append(f"| `{run}` | {s['images']} | {100 * s['global_copy_rate']:.1f}% | {s['distinct_global_copied']} | "
                     f"{stamp} | {100 * s['global_rows']:.1f}% | {100 * s['local_rows']:.1f}% |")
    emit_table(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
