"""How well a score separates memorized samples from the rest, given ground-truth labels.

The one implementation behind the monitor's running ``memo/auc`` numbers, the ablation grid's
``det_auc_*`` columns and the testbed's detection table. Per positive kind against the negative
label: the ROC AUC (ties between a positive and a negative count 1/2, i.e. the Mann-Whitney U
statistic) and the TPR at a fixed FPR, both read off scikit-learn's ROC curve, so a call costs
O(rows log rows) and the monitor can afford it on a ledger of millions of samples.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np
from sklearn.metrics import auc, roc_curve

FPR = 0.01  # the operating point reported beside the AUC: "how many copies are caught at 1% false alarms"


def tpr_key(fpr: float = FPR) -> str:
    """The metric's name: ``tpr_at_1fpr`` for 1%."""
    return f"tpr_at_{100 * fpr:g}fpr"


def detection_metrics(scores: Any, positive: Any, negative: Any, fpr: float = FPR) -> dict[str, float]:
    """AUC and TPR at ``fpr`` of ``scores`` (higher = more memorized) for the rows in the boolean
    masks ``positive`` vs ``negative``. Rows with a NaN score (never scored) are left out; NaN
    results when either side has no scored rows.

    The TPR is taken at a conservative operating point: a row is called positive when its score is
    strictly above the (1 - fpr) quantile of the negative scores (numpy's "higher" method, an
    actual negative score), so at most ``fpr`` of the negatives and usually fewer pass.
    """
    nan = {"auc": float("nan"), tpr_key(fpr): float("nan")}
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[np.asarray(positive, bool)], scores[np.asarray(negative, bool)]
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if len(pos) == 0 or len(neg) == 0:
        return nan
    # Both metrics depend only on the order of the scores; dense ranks keep that order and its ties
    # and are finite where a score may be +-inf (scikit-learn refuses infinities).
    values, ranks = np.unique(np.concatenate([neg, pos]), return_inverse=True)
    truth = np.concatenate([np.zeros(len(neg), bool), np.ones(len(pos), bool)])
    # roc_curve's points call a row positive at score >= threshold, thresholds decreasing from +inf
    # over every distinct score. The trapezoid area under them is roc_auc_score's AUC (one sort
    # serves both metrics); the last point above the cut calls exactly the rows > cut positive.
    fpr_points, tpr, thresholds = roc_curve(truth, ranks, drop_intermediate=False)
    cut = np.searchsorted(values, np.quantile(neg, 1.0 - fpr, method="higher"))
    return {"auc": float(auc(fpr_points, tpr)), tpr_key(fpr): float(tpr[np.count_nonzero(thresholds > cut) - 1])}


def detection_by_kind(scores: Any, labels: Any, negative_label: Any,
                      kinds: Optional[Iterable[Any]] = None, fpr: float = FPR) -> dict[Any, dict[str, float]]:
    """:func:`detection_metrics` per positive kind vs ``negative_label``.

    ``kinds`` defaults to every label but the negative one, sorted; kinds absent from ``labels``
    are left out of the result (a testbed without local groups has no local row).
    """
    labels = np.asarray(labels, dtype=object)
    negative = labels == negative_label
    if kinds is None:
        kinds = sorted(set(labels.tolist()) - {negative_label})
    out = {}
    for kind in kinds:
        positive = labels == kind
        if positive.any():
            out[kind] = detection_metrics(scores, positive, negative, fpr)
    return out
