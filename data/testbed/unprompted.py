"""Copies a model draws without being prompted for them.

``python -m data.testbed.unprompted --runs RUN [RUN ...] [--images 256] [--steps 25] [--out table.md]``

The replica rates of :mod:`data.testbed.evaluate` ask for each copy by its own caption. A
mitigation that only weakens the link between a caption and its image (``mitigate.weights.
dedup_by: caption`` trains the copies mostly on the empty prompt) could leave the model drawing the
copies anyway, unprompted. So this generates ``--images`` images from the empty prompt without
guidance (the unconditional model, which classifier-free guidance starts from) for each run's
``final/`` pipeline and counts, with the thresholds of the run's own first evaluation draw
(``eval/eval.json``):

* global copies: the nearest training image is a planted global image and closer than the
  replica threshold (the share and how many distinct global images appear);
* stamps: a stamp region closer to a local group's stamp than its region threshold, the whole
  image not a copy; the mean over the stamps, as the evaluator counts clean prompts' stamps (the
  thresholds pass 5% of held-out prompts' generations for each stamp).

For scale: a model that reproduced its training rows exactly would draw a global image in
``global_rows`` of its samples and a stamp in ``local_rows``; one that learned only the clean
images, in ~0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data.testbed.evaluate import generate, load_pipeline
from data.testbed.measures import masked_distance, nearest
from data.testbed.reading import emit_table, evaluation_draws, read_rows, stamps, training_images


def count_copies(images: np.ndarray, root: str | Path, thresholds: dict) -> dict:
    """Global copies and stamps among ``images`` (N, H, W, 3) in [0, 1], with an evaluation's
    ``thresholds`` ({"replica": float, "region": {group: float}})."""
    train = training_images(root)
    index, distance = nearest(images, train.images)
    groups = np.asarray(train.groups)[index]
    copy = (groups == "global") & (distance < thresholds["replica"])
    # per stamp, as the evaluator counts clean prompts' stamps (mean over the local groups): the
    # region thresholds let 5% of held-out prompts' generations through for each stamp
    shown = np.stack([masked_distance(images, image, mask) < thresholds["region"][str(group)]
                      for group, (image, mask) in stamps(root).items()], axis=1)
    rows = read_rows(root, split="train")
    return {"images": len(images), "global_copy_rate": float(copy.mean()),
            "distinct_global_copied": len({train.file_names[i] for i in index[copy]}),
            "stamp_rate": float((shown & ~copy[:, None]).mean()),
            "global_rows": float(np.mean([r["group"] == "global" for r in rows])),
            "local_rows": float(np.mean([r["group"] == "local" for r in rows]))}


def unprompted(run: str | Path, images: int = 256, steps: int = 25, seed: int = 0, batch: int = 64) -> dict:
    """``count_copies`` of ``images`` empty-prompt generations of ``run/final``."""
    result, _ = evaluation_draws(run)[0]
    root = result["testbed"]
    resolution = training_images(root).images.shape[1]
    pipe = load_pipeline(Path(run) / "final")
    generated = generate(pipe, [""], images, resolution, steps=steps, guidance=1.0, batch=batch, seed=seed)[0]
    return count_copies(generated, root, result["thresholds"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.testbed.unprompted", description=__doc__.split("\n\n")[0])
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
        lines.append(f"| `{run}` | {s['images']} | {100 * s['global_copy_rate']:.1f}% | {s['distinct_global_copied']} | "
                     f"{100 * s['stamp_rate']:.1f}% | {100 * s['global_rows']:.1f}% | {100 * s['local_rows']:.1f}% |")
    emit_table(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
