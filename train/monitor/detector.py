"""The default detector: one logistic head per memorization kind over the ledger's signals.

Each signal's per-sample value in the ledger is an oriented z-score against samples at similar
noise level and caption length (train/monitor/stats.py), so its scale does not depend on the data
set or the model; a head is ``bias + coef . mean_z`` and the score of a sample is the largest head
(``monitor.detector: heads``). One head per kind because the kinds leave different traces: a
whole-image copy shows in the loss, a copied region in the bright-ending and token-attention
signals, and in an equal-weight mean the two cancel (README "Detection").

The heads ship in ``detector.json`` beside this file; ``python -m launch.testbed.fit_detector``
fits them on one run's ledger and reports them on others (docs/detection.md says which runs).
A signal the run does not compute contributes 0, the population average of a z-score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

DETECTOR_FILE = Path(__file__).with_name("detector.json")


def heads_file(heads: str | None) -> Path:
    """The file ``monitor.heads`` names: None or "default" -> detector.json; a shipped set's name
    (e.g. "reference" -> detector_reference.json beside it); else a path to a file that
    ``launch.testbed.fit_detector --write FILE`` wrote."""
    if heads in (None, "default"):
        return DETECTOR_FILE
    path = Path(heads) if str(heads).endswith(".json") else DETECTOR_FILE.with_name(f"detector_{heads}.json")
    if not path.is_file():
        shipped = ["default"] + sorted(p.stem.removeprefix("detector_") for p in DETECTOR_FILE.parent.glob("detector_*.json"))
        raise FileNotFoundError(f"monitor.heads={heads!r}: no file {path} (shipped: {', '.join(shipped)}; "
                                "or a .json path written by launch.testbed.fit_detector --write)")
    return path


def load_heads(signals: Sequence[str], path: str | Path = DETECTOR_FILE) -> tuple[list[str], np.ndarray]:
    """(kind names, [K, 1 + S] array of bias then one coefficient per ``signals`` entry)."""
    return heads_array(json.loads(Path(path).read_text()), signals, source=str(path))


def heads_array(spec: dict, signals: Sequence[str], source: str = "heads") -> tuple[list[str], np.ndarray]:
    """:func:`load_heads` for a heads spec already in memory (what :func:`fit_heads` returns)."""
    kinds, rows = [], []
    for kind, head in spec["heads"].items():
        coef = head["coef"]
        unknown = sorted(set(coef) - set(spec["signals"]))
        if unknown:
            raise ValueError(f"{source}: head {kind} has coefficients for unknown signals {unknown}")
        kinds.append(kind)
        rows.append([float(head["bias"])] + [float(coef.get(s, 0.0)) for s in signals])
    return kinds, np.asarray(rows, dtype=np.float32)


def logit(probability: float) -> float:
    """A probability on the heads' score scale (each head's value is a logit)."""
    return float(np.log(probability / (1.0 - probability)))


def head_scores(heads: np.ndarray, means: np.ndarray) -> np.ndarray:
    """[N, K] head values for [N, S] per-signal mean z (NaN counts as 0)."""
    return heads[:, 0][None, :] + np.nan_to_num(means.astype(np.float32)) @ heads[:, 1:].T


def fit_heads(means: np.ndarray, labels: np.ndarray, signals: Sequence[str], kinds: dict[str, Sequence[str]],
              negative: str = "clean", c: float = 0.1) -> dict:
    """Fit one head per entry of ``kinds`` ({head name: the labels it should find}) against the
    ``negative`` rows: L2-regularised logistic regression with balanced classes, on the raw
    z-means (no rescaling: their scale is already the data-independent one the ledger makes)."""
    from sklearn.linear_model import LogisticRegression

    x = np.nan_to_num(np.asarray(means, dtype=np.float64))
    labels = np.asarray(labels).astype(str)
    heads = {}
    for name, positives in kinds.items():
        rows = np.isin(labels, list(positives)) | (labels == negative)
        y = np.isin(labels[rows], list(positives))
        if y.all() or not y.any():
            raise ValueError(f"fit_heads: head {name} needs rows of {list(positives)} and of {negative!r}")
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x[rows], y)
        heads[name] = {"bias": round(float(model.intercept_[0]), 4),
                       "coef": {s: round(float(w), 4) for s, w in zip(signals, model.coef_[0])},
                       "positives": list(positives)}
    return {"signals": list(signals), "negative": negative, "c": c, "heads": heads}
