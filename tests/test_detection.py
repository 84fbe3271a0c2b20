"""train.monitor.detection: AUC and TPR at 1% FPR against hand counts and a brute-force count."""

from __future__ import annotations

import time

import numpy as np
import pytest

from train.monitor.detection import detection_by_kind, detection_metrics


def brute_force(scores, positive, negative):
    """Every positive-negative pair (ties 1/2); TPR as the share of positives strictly above the
    99% 'higher' quantile of the negatives."""
    pos, neg = scores[positive], scores[negative]
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    auc = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    return auc, np.mean(pos > np.quantile(neg, 0.99, method="higher"))


def test_hand_case_with_ties():
    # negatives 0.1 0.2 0.3 0.3, positives 0.3 0.5: 0.3 beats two and ties two (3 of 4 pairs won),
    # 0.5 beats all four -> AUC 7/8. The negatives' top value is 0.3, so only 0.5 is above the cut.
    scores = np.array([0.1, 0.2, 0.3, 0.3, 0.3, 0.5, np.nan])
    positive = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    got = detection_metrics(scores, positive, ~positive)
    assert got == {"auc": 0.875, "tpr_at_1fpr": 0.5}


def test_matches_brute_force_with_ties_and_nans():
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(5, 300))
        scores = rng.integers(0, 6, n).astype(np.float32) if trial % 2 else rng.normal(size=n)
        scores[rng.random(n) < 0.1] = np.nan
        positive = rng.random(n) < 0.3
        if not (positive & ~np.isnan(scores)).any() or not (~positive & ~np.isnan(scores)).any():
            continue
        auc, tpr = brute_force(np.asarray(scores, np.float64), positive, ~positive)
        got = detection_metrics(scores, positive, ~positive)
        assert got["auc"] == pytest.approx(auc, abs=1e-12) and got["tpr_at_1fpr"] == pytest.approx(tpr)


def test_many_negatives_put_the_cut_below_the_top():
    # 1,000 negatives 0..999: the cut is 990 (the 99% 'higher' quantile); positives 989.5 and 995
    # -> only 995 passes. A cut at the maximum (as with few negatives) would pass neither.
    scores = np.concatenate([np.arange(1000.0), [989.5, 995.0]])
    positive = np.arange(1002) >= 1000
    assert detection_metrics(scores, positive, ~positive)["tpr_at_1fpr"] == 0.5


def test_infinite_scores_keep_their_order():
    scores = np.array([0.1, np.inf, -np.inf, np.inf, 0.5, 0.05])
    positive = np.array([0, 0, 0, 1, 1, 1], bool)
    # positives inf (beats 0.1 and -inf, ties inf: 2.5), 0.5 (beats 0.1 and -inf: 2), 0.05 (beats -inf: 1)
    assert detection_metrics(scores, positive, ~positive)["auc"] == pytest.approx(5.5 / 9)


def test_empty_sides_give_nan():
    scores = np.array([1.0, np.nan, 2.0])
    got = detection_metrics(scores, np.array([0, 1, 0], bool), np.array([1, 0, 1], bool))
    assert np.isnan(got["auc"]) and np.isnan(got["tpr_at_1fpr"])


def test_by_kind_scores_each_kind_against_the_negative_label_only():
    labels = np.array(["clean", "clean", "global", "local", "heldout", "clean"], dtype=object)
    scores = np.array([0.0, 1.0, 2.0, 0.5, 9.0, 0.2])
    got = detection_by_kind(scores, labels, "clean")
    assert list(got) == ["global", "heldout", "local"]
    assert got["global"]["auc"] == 1.0 and got["local"]["auc"] == pytest.approx(2 / 3)
    only = detection_by_kind(scores, labels, "clean", kinds=["local", "missing"])
    assert list(only) == ["local"]


def test_a_million_rows_take_a_sort_not_a_pair_count():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1_000_000).astype(np.float32)
    positive = rng.random(1_000_000) < 0.01
    scores[positive] += 1.0
    start = time.perf_counter()
    got = detection_metrics(scores, positive, ~positive)
    assert time.perf_counter() - start < 20  # O(n log n) is ~1 s here; pairs would be 10^10
    assert got["auc"] == pytest.approx(0.76, abs=0.01)  # Phi(1 / sqrt(2))
