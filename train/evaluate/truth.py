"""Audit verdicts against ground truth, when the data knows it (the memorization testbed).

The testbed's columns say which rows are planted copies: ``group`` (clean / global / local, and
v6's near_global / caption_dup / template / moving_local), ``source_id`` (the original image),
``planted_group`` (v6: rows that copy one thing), ``mask_file`` (the copied region: a stamp, a
card). The ground-truth measures of :mod:`train.evaluate.measures` decide which generations
really are copies:

* global replica: nearest training image (pixel RMSE, full resolution) is the own source (for
  the whole-image kinds: any row of the own planted group) and closer than the calibrated
  threshold (5% quantile of clean prompts' nearest distances);
* local replica (region kinds): the masked region matches the own image (masked RMSE below the
  5% quantile of clean generations' masked distance to any stamp) while the whole image is not a
  replica.

Per generation we collect the raw distances while its images are at hand (:class:`TruthAnnotator`),
then, once every rank's records are gathered, calibrate and score (:func:`score_against_truth`).
"""

from __future__ import annotations

from typing import Sequence


from train.evaluate.measures import calibrate_threshold, masked_distance, nearest
from train.evaluate.sampling import Generation
from train.evaluate.trainset import Probe, TrainingSet

TRUTH_COLUMNS = ("group", "source_id")
GROUP_KINDS = ("global", "near_global", "caption_dup")   # a copy of any row of the planted group counts
REGION_KINDS = ("local", "template", "moving_local")     # judged on the own image's mask


def has_truth(trainset: TrainingSet) -> bool:
    return all(c in trainset.table.column_names for c in TRUTH_COLUMNS)


class TruthAnnotator:
    """Adds ``truth`` distances to each record (called per batch, on the rank that generated it)."""

    def __init__(self, trainset: TrainingSet):
        self.trainset = trainset
        self.images = trainset.images(range(len(trainset)))  # the testbed is small by design
        table = trainset.table
        self.sources = [str(table[r]["source_id"]) for r in trainset.rows]
        planted = "planted_group" in table.column_names
        self.planted = [table[r]["planted_group"] if planted else None for r in trainset.rows]
        self.stamps = []  # (mask, stamped image) per local group, for clean generations
        seen = set()
        for position, row in enumerate(trainset.rows):
            group = table[row]["group"]
            mask_file = table[row].get("mask_file") if "mask_file" in table.column_names else None
            if group == "local" and mask_file and mask_file not in seen:
                seen.add(mask_file)
                mask = trainset.mask(row, self.images.shape[1:3])
                if mask is not None and mask.any():
                    self.stamps.append((mask, self.images[position]))

    def __call__(self, gen: Generation, probes: Sequence[Probe]) -> list[dict]:
        index, distance = nearest(gen.images, self.images)
        out = []
        for i, probe in enumerate(probes):
            group = self.trainset.column("group", probe.row) if probe.row is not None else None
            nearest_row = int(index[i])
            nn_is_own = probe.row is not None and (
                self.sources[nearest_row] == str(self.trainset.column("source_id", probe.row))
                or (group in GROUP_KINDS and self.planted[nearest_row] is not None
                    and self.planted[nearest_row] == self.trainset.column("planted_group", probe.row)))
            truth = {"group": group, "nn_distance": float(distance[i]), "nn_is_own": bool(nn_is_own),
                     "own_masked_distance": None, "stamp_distance": None}
            if group in REGION_KINDS:
                own = self.trainset.position_of_row(probe.row)
                mask = self.trainset.mask(probe.row, gen.images.shape[1:3])
                if own is not None and mask is not None and mask.any():
                    truth["own_masked_distance"] = float(masked_distance(gen.images[i], self.images[own], mask))
            if group == "clean" and self.stamps:
                truth["stamp_distance"] = float(min(masked_distance(gen.images[i], image, mask)
                                                    for mask, image in self.stamps))
            out.append({"truth": truth})
        return out


def _precision_recall(predicted: list[bool], actual: list[bool]) -> dict:
    tp = sum(p and a for p, a in zip(predicted, actual))
    fp = sum(p and not a for p, a in zip(predicted, actual))
    fn = sum(a and not p for p, a in zip(predicted, actual))
    return {"true_positives": tp, "false_positives": fp, "false_negatives": fn, "positives": tp + fn,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None}


def score_against_truth(records: list[dict], quantile: float = 0.05) -> dict | None:
    """Calibrate the ground-truth thresholds on the clean generations, mark each record's
    ``truth`` verdicts, and return precision/recall of the audit's verdicts (None without
    enough clean generations to calibrate)."""
    rows = [r for r in records if r.get("truth")]
    clean = [r["truth"] for r in rows if r["truth"]["group"] == "clean"]
    if len(clean) < 2:
        return None
    global_threshold = calibrate_threshold([t["nn_distance"] for t in clean], quantile)
    stamp = [t["stamp_distance"] for t in clean if t["stamp_distance"] is not None]
    region_threshold = calibrate_threshold(stamp, quantile) if len(stamp) >= 2 else None
    for r in rows:
        t = r["truth"]
        t["replica"] = bool(t["nn_is_own"] and t["nn_distance"] < global_threshold)
        t["local_replica"] = bool(region_threshold is not None and t["own_masked_distance"] is not None
                                  and t["own_masked_distance"] < region_threshold and not t["replica"])
    planted = [r for r in rows if r["truth"]["group"] in GROUP_KINDS + REGION_KINDS + ("clean",)]
    return {
        "global_threshold": global_threshold, "region_threshold": region_threshold, "quantile": quantile,
        "generations": len(planted),
        "replica": _precision_recall([r["replica"] for r in planted], [r["truth"]["replica"] for r in planted]),
        "local_replica": _precision_recall([r["local_replica"] for r in planted],
                                           [r["truth"]["local_replica"] for r in planted]),
    }
