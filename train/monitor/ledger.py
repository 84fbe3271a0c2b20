"""The per-sample ledger: who is being memorized, from running statistics of normalized signals.

Dense arrays indexed by a slot per sample (the row index for map-style data, a slot assigned on
first sight for streams), so an update costs O(batch) and a 100M-sample ledger is a few arrays
that save to safetensors and load memory-mapped. Per sample and signal we keep the count, running
mean and max of the oriented z (half precision: flags do not need more), plus observations, the
last step seen, the combined score, the flag and the step it was first raised.

Flags follow a policy with hysteresis (raised at ``raise_at``, cleared only below ``clear_at``) so a sample near
the threshold does not flip every step:
- ``calibrated``: the detector heads' probability of memorization (the score is the largest head's
  logit, so the thresholds are logits of ``probability`` / ``probability_off``): the heads' scale is
  the one they were fitted on, not the run's population, so a kind that makes up a large share of
  the rows is still flagged (a z-score against a population that is 14% copies flags none of them),
- ``zscore``: the score's z against all scored samples (population sums kept incrementally),
- ``quantile``: the top fraction of scored samples (a fixed-bin histogram kept incrementally),
- ``absolute``: fixed score thresholds,
- ``none``: the score flags nothing (the trend rule below may).

``margin`` asks for evidence before a flag: the score is a weighted sum of per-signal mean z, and
each mean over n observations carries a standard error of about 1/sqrt(n) (a z-score has unit
spread per observation), so the score compared with the thresholds is the combination minus
``margin`` of its standard errors. A row seen twice needs a large lead over its peers to be
flagged; a row seen fifty times barely pays (docs/detection.md measures what it does to early
false flags and to lead time).

``recent`` scores the flags on a moving average of each row's z instead of its mean over the whole
run (decay ``recent`` per observation, started at 0, the population's average): a row whose
signals turn now is not held back by the epochs in which it looked like its peers. Its standard
error is the moving average's own, sqrt((1 - d) / (1 + d) * (1 - d^(2n))). The means stay in the
ledger for reports; the moving average costs 2 bytes per row and signal, kept only when used.

``trend_signal`` adds a second way to be flagged, meant to come before the copy: the signal's
*trend*, its moving average (decay ``trend_decay``, started at 0) less its run mean, i.e. how fast a
row is being learnt relative to its peers rather than how well it is fit. It is compared in its own
standard errors for a row like its peers (unit-spread z: the moving average's variance, plus the
mean's 1/n, less twice their covariance (1 - d^n)/n), so the bar ``trend_raise_at`` is read off no
data; a row is flagged once it has been over the bar at ``trend_persist`` observations in a row, and
stays flagged by this rule while it stays over. 2 bytes per row for the average, 1 for the streak.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from train.monitor.detector import head_scores, logit
from train.util import write_atomic

HIST_RANGE, HIST_BINS = 8.0, 1600  # score histogram for the quantile policy: [-8, 8] in 0.01 steps


@dataclass
class FlagPolicy:
    policy: str = "zscore"  # calibrated | zscore | quantile | absolute | none (the run config defaults to calibrated)
    min_obs: int = 2  # observations before a sample can be scored and flagged
    raise_at: float = 3.0  # zscore: z of the score; absolute: the score itself
    clear_at: float = 2.0
    quantile: float = 0.02  # quantile policy: flag the top 2% ...
    quantile_off: float = 0.04  # ... and keep them flagged while in the top 4%
    probability: float = 0.73  # calibrated policy: flag at this probability of memorization ...
    probability_off: float = 0.5  # ... and keep the flag while at or above this
    margin: float = 0.0  # standard errors of the score's estimate subtracted before comparing
    recent: float = 0.0  # > 0: flags read a moving average of z with this decay per observation
    trend_signal: Optional[str] = None  # a signal whose rising trend also flags (e.g. "loss"); None: off
    trend_decay: float = 0.8  # the trend's moving average: decay per observation
    trend_raise_at: float = 1.645  # the bar, in the trend's standard errors
    trend_persist: int = 3  # observations in a row over the bar before the trend flags


class Ledger:
    def __init__(self, capacity: int, signals: Sequence[str], weights: Sequence[float], policy: FlagPolicy,
                 streaming: bool = False, heads: Optional[np.ndarray] = None,
                 head_names: Optional[Sequence[str]] = None):
        self.signals, self.policy, self.streaming = tuple(signals), policy, streaming
        self.weights = np.asarray(weights, dtype=np.float32)
        self.heads = heads  # [K, 1 + S] (train/monitor/detector.py): score = the largest head; None: weighted mean
        # the heads' kinds, for the table's head_<kind> columns and which kind each row's score comes from
        self.head_names = tuple(head_names) if head_names is not None else (
            tuple(f"head{k}" for k in range(len(heads))) if heads is not None else ())
        if policy.policy == "calibrated" and heads is None:
            raise ValueError("the calibrated flag policy reads the detector heads' probabilities: use detector=heads")
        if policy.trend_signal is not None and policy.trend_signal not in self.signals:
            raise ValueError(f"monitor.flag.trend_signal={policy.trend_signal} is not among monitor.signals "
                             f"{list(self.signals)}: list it, or set monitor.flag.trend_signal=null to turn the trend rule off")
        self.trend_index = self.signals.index(policy.trend_signal) if policy.trend_signal is not None else None
        S = len(self.signals)
        self.capacity = capacity
        self.slots: dict[int, int] = {}  # streams only: sample-id hash -> slot
        self.obs = np.zeros(capacity, np.int32)
        self.last_step = np.full(capacity, -1, np.int32)
        self.sig_count = np.zeros((capacity, S), np.uint16)
        self.sig_mean = np.zeros((capacity, S), np.float16)
        self.sig_max = np.full((capacity, S), -np.inf, np.float16)
        self.arrays = (self.ARRAYS + (("sig_recent",) if policy.recent > 0 else ())
                       + (("trend_recent", "trend_streak") if self.trend_index is not None else ()))
        if policy.recent > 0:
            self.sig_recent = np.zeros((capacity, S), np.float16)
        if self.trend_index is not None:
            self.trend_recent = np.zeros(capacity, np.float16)
            self.trend_streak = np.zeros(capacity, np.uint8)
        self.score = np.full(capacity, np.nan, np.float32)
        self.flagged = np.zeros(capacity, bool)
        self.first_flagged_step = np.full(capacity, -1, np.int32)
        # population of scored samples, kept in step with every score change
        self.pop = np.zeros(3, np.float64)  # count, sum, sum of squares
        self.hist = np.zeros(HIST_BINS, np.int64)

    # ------------------------------------------------------------------ slots

    def slots_for(self, indices: np.ndarray, id_hashes: Optional[np.ndarray] = None) -> np.ndarray:
        if not self.streaming:
            return indices
        out = np.empty(len(id_hashes), np.int64)
        for i, h in enumerate(id_hashes.tolist()):
            slot = self.slots.get(h)
            if slot is None:
                slot = self.slots[h] = len(self.slots)
                if slot >= self.capacity:
                    self._grow(max(2 * self.capacity, 1024))
            out[i] = slot
        return out

    def _grow(self, capacity: int) -> None:
        for name in self.arrays:
            if name in ("pop", "hist"):
                continue
            old = getattr(self, name)
            fill = {"last_step": -1, "sig_max": -np.inf, "score": np.nan, "first_flagged_step": -1}.get(name, 0)
            new = np.full((capacity,) + old.shape[1:], fill, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        self.capacity = capacity

    # ------------------------------------------------------------------ update

    def _pop_remove(self, scores: np.ndarray) -> None:
        scores = scores[~np.isnan(scores)]
        self.pop -= [len(scores), scores.sum(), (scores.astype(np.float64) ** 2).sum()]
        np.subtract.at(self.hist, self._hist_bin(scores), 1)

    def _pop_add(self, scores: np.ndarray) -> None:
        scores = scores[~np.isnan(scores)]
        self.pop += [len(scores), scores.sum(), (scores.astype(np.float64) ** 2).sum()]
        np.add.at(self.hist, self._hist_bin(scores), 1)

    @staticmethod
    def _hist_bin(scores: np.ndarray) -> np.ndarray:
        return np.clip(((scores + HIST_RANGE) / (2 * HIST_RANGE) * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)

    def _quantile(self, q: float) -> float:
        """Score above which a fraction q of scored samples lies (from the histogram)."""
        total = self.hist.sum()
        if total == 0:
            return np.inf
        above = np.cumsum(self.hist[::-1])
        k = int(np.searchsorted(above, q * total))  # bins from the top holding >= q of the mass
        return -HIST_RANGE + (HIST_BINS - 1 - min(k, HIST_BINS - 1)) * 2 * HIST_RANGE / HIST_BINS

    def thresholds(self) -> tuple[float, float]:
        """(on, off) on the score scale, from the policy and the current population."""
        p = self.policy
        if p.policy == "calibrated":
            return logit(p.probability), logit(p.probability_off)
        if p.policy == "absolute":
            return p.raise_at, p.clear_at
        if p.policy == "none":
            return np.inf, np.inf
        if p.policy == "quantile":
            return self._quantile(p.quantile), self._quantile(p.quantile_off)
        n, s, ss = self.pop
        if n < 2:
            return np.inf, np.inf
        mean = s / n
        std = max(np.sqrt(max(ss / n - mean ** 2, 0.0)), 1e-6)
        return mean + p.raise_at * std, mean + p.clear_at * std

    def scores(self, mean: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(combined score [N], whether any signal that counts was observed [N]) from per-signal z
        [N, S] (the means, or the moving averages with ``recent``) and observation counts [N, S]: the
        largest per-kind head, or the weighted mean of the observed signals, less ``margin`` standard
        errors (a mean's is 1/sqrt(count); a moving average's is in the module docstring)."""
        mean, seen, variance = self._estimates(mean, count)
        if self.heads is not None:
            return self._heads(mean, variance).max(axis=1), seen.any(axis=1)
        w = self.weights[None, :] * seen
        total = np.maximum(w.sum(1), 1e-12)
        se = np.sqrt((w ** 2 * variance).sum(1)) / total
        return (w * mean).sum(1) / total - self.policy.margin * se, w.sum(1) > 0

    def _estimates(self, mean: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z with unobserved signals at 0, which were observed, each estimate's variance), all [N, S]."""
        count = np.asarray(count, np.float32)
        seen = count > 0
        mean = np.where(seen, np.asarray(mean, np.float32), 0.0)
        d = self.policy.recent
        # the variance of each signal's estimate when the row is like its peers (unit-spread z)
        variance = (1 - d) / (1 + d) * (1 - d ** (2 * count)) if d > 0 else 1.0 / np.maximum(count, 1.0)
        return mean, seen, np.where(seen, variance, 0.0)

    def _heads(self, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
        """[N, K] each head's logit less ``margin`` standard errors."""
        se = np.sqrt(variance @ (self.heads[:, 1:] ** 2).T)
        return head_scores(self.heads, mean) - self.policy.margin * se

    def head_values(self, slots: np.ndarray) -> np.ndarray:
        """[len(slots), K] each head's value for these slots, on what the flags read (the means, or
        the moving averages with ``recent``); NaN where a row is not scored. The score is their maximum."""
        held = self.sig_recent if self.policy.recent > 0 else self.sig_mean
        mean, _, variance = self._estimates(held[slots].astype(np.float32), self.sig_count[slots])
        return np.where(np.isnan(self.score[slots])[:, None], np.nan, self._heads(mean, variance))

    def top_heads(self, values: np.ndarray) -> list[Optional[str]]:
        """The name of the largest head per row of :meth:`head_values` (None where not scored)."""
        scored = ~np.isnan(values).any(axis=1)
        top = np.argmax(np.nan_to_num(values, nan=-np.inf), axis=1)
        return [self.head_names[k] if ok else None for k, ok in zip(top.tolist(), scored.tolist())]

    def trend_z(self, recent: np.ndarray, mean: np.ndarray, count: np.ndarray) -> np.ndarray:
        """The trend (moving average less run mean) in its standard errors for a row like its peers;
        NaN where the signal was never observed."""
        d, n = self.policy.trend_decay, np.asarray(count, np.float64)
        variance = ((1 - d) / (1 + d) * (1 - d ** (2 * n)) + (1 - 2 * (1 - d ** n)) / np.maximum(n, 1))
        trend = np.asarray(recent, np.float64) - np.asarray(mean, np.float64)
        return np.where(n > 0, trend / np.sqrt(np.maximum(variance, 1e-12)), np.nan)

    def trend_step(self, streak: np.ndarray, z: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(new streak, flagged by the trend) after one observation (``observed``) of trend z ``z``."""
        over = observed & (np.nan_to_num(z, nan=-np.inf) >= self.policy.trend_raise_at)
        streak = np.where(observed, np.where(over, np.minimum(streak.astype(np.int64) + 1, 255), 0), streak)
        return streak.astype(np.uint8), streak >= self.policy.trend_persist

    def update(self, slots: np.ndarray, z: np.ndarray, step: int) -> None:
        """Fold one gathered batch of oriented z-scores [G, S] (NaN = not observed) into the ledger."""
        slots, keep = np.unique(slots, return_index=True)  # a stream may repeat a sample in one batch
        z = z[keep]
        self._pop_remove(self.score[slots])
        self.obs[slots] += 1
        self.last_step[slots] = step
        seen = ~np.isnan(z)
        count = self.sig_count[slots].astype(np.float32) + seen
        mean = self.sig_mean[slots].astype(np.float32)
        mean = np.where(seen, mean + (np.nan_to_num(z) - mean) / np.maximum(count, 1), mean)
        self.sig_count[slots] = np.minimum(count, np.iinfo(np.uint16).max).astype(np.uint16)
        self.sig_mean[slots] = mean.astype(np.float16)
        self.sig_max[slots] = np.where(seen, np.maximum(self.sig_max[slots].astype(np.float32), np.nan_to_num(z)),
                                       self.sig_max[slots]).astype(np.float16)
        if self.policy.recent > 0:  # the flags read the moving average (started at 0)
            d = self.policy.recent
            recent = self.sig_recent[slots].astype(np.float32)
            recent = np.where(seen, d * recent + (1 - d) * np.nan_to_num(z), recent)
            self.sig_recent[slots] = recent.astype(np.float16)
            score, observed = self.scores(recent, count)
        else:
            score, observed = self.scores(mean, count)
        eligible = (self.obs[slots] >= self.policy.min_obs) & observed
        self.score[slots] = np.where(eligible, score, np.nan)
        self._pop_add(self.score[slots])
        on, off = self.thresholds()
        current = self.score[slots]
        was = self.flagged[slots]
        now = np.where(was, current >= off, current >= on) & eligible
        if self.trend_index is not None:  # or flagged by a rising trend (module docstring)
            j, d = self.trend_index, self.policy.trend_decay
            observed = seen[:, j]
            recent = self.trend_recent[slots].astype(np.float32)
            recent = np.where(observed, d * recent + (1 - d) * np.nan_to_num(z[:, j]), recent)
            self.trend_recent[slots] = recent.astype(np.float16)
            tz = self.trend_z(recent, mean[:, j], count[:, j])
            self.trend_streak[slots], rising = self.trend_step(self.trend_streak[slots], tz, observed)
            now |= rising & (self.obs[slots] >= self.policy.min_obs)
        self.flagged[slots] = now
        newly = now & (self.first_flagged_step[slots] < 0)
        self.first_flagged_step[slots[newly]] = step

    # ------------------------------------------------------------------ persistence

    ARRAYS = ("obs", "last_step", "sig_count", "sig_mean", "sig_max", "score", "flagged", "first_flagged_step",
              "pop", "hist")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.arrays:
            array = getattr(self, name)
            if array.dtype == bool:
                array = array.astype(np.uint8)
            elif array.dtype in (np.uint16, np.uint8):
                array = array.astype(np.int32)
            out[name] = torch.from_numpy(np.ascontiguousarray(array))
        if self.streaming:
            keys = np.fromiter(self.slots.keys(), np.int64, len(self.slots))
            out["slot_keys"] = torch.from_numpy(keys)
            out["slot_values"] = torch.from_numpy(np.fromiter(self.slots.values(), np.int64, len(self.slots)))
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors["sig_mean"].shape[1] != len(self.signals):
            raise ValueError(f"the checkpoint's ledger has {tensors['sig_mean'].shape[1]} signals, the "
                             f"monitor now {len(self.signals)} (monitor.signals changed?)")
        if not self.streaming and tensors["obs"].shape[0] != self.capacity:
            raise ValueError(f"the checkpoint's ledger holds {tensors['obs'].shape[0]} samples, the data "
                             f"set now has {self.capacity}: resume with the same data")
        if ("sig_recent" in tensors) != ("sig_recent" in self.arrays):
            raise ValueError("the checkpoint's ledger was kept with a different monitor.flag.recent (0 or not): "
                             "resume with the flag settings it was trained with")
        if ("trend_recent" in tensors) != ("trend_recent" in self.arrays):
            raise ValueError("the checkpoint's ledger was kept with a different monitor.flag.trend_signal (set or "
                             "not): resume with the flag settings it was trained with")
        for name in self.arrays:
            array = tensors[name].numpy()
            setattr(self, name, array.astype(getattr(self, name).dtype))
        self.capacity = len(self.obs)
        if self.streaming:
            self.slots = dict(zip(tensors["slot_keys"].tolist(), tensors["slot_values"].tolist()))

    def table(self, sample_ids: Optional[Sequence[str]] = None, captions: Optional[Sequence[str]] = None,
              extra: Optional[dict[str, Sequence]] = None):
        """One row per observed-or-known sample, as a pyarrow table."""
        import pyarrow as pa

        n = len(self.slots) if self.streaming else self.capacity
        cols: dict[str, object] = {}
        if sample_ids is not None:
            cols["sample_id"] = list(sample_ids)[:n]
        if captions is not None:
            cols["caption"] = list(captions)[:n]
        cols["observations"] = self.obs[:n]
        for j, name in enumerate(self.signals):
            cols[f"{name}_mean"] = self.sig_mean[:n, j].astype(np.float32)
            seen = self.sig_count[:n, j] > 0
            cols[f"{name}_max"] = np.where(seen, self.sig_max[:n, j].astype(np.float32), np.nan)
            cols[f"{name}_count"] = self.sig_count[:n, j].astype(np.int32)  # observations behind the mean
            if self.policy.recent > 0:
                cols[f"{name}_recent"] = np.where(seen, self.sig_recent[:n, j].astype(np.float32), np.nan)
        if self.trend_index is not None:  # the trend rule's reading: z of the trend and the streak over its bar
            j = self.trend_index
            cols[f"{self.signals[j]}_trend_z"] = self.trend_z(
                self.trend_recent[:n].astype(np.float32), self.sig_mean[:n, j].astype(np.float32),
                self.sig_count[:n, j]).astype(np.float32)
            cols["trend_streak"] = self.trend_streak[:n].astype(np.int32)
        cols.update(score=self.score[:n], flagged=self.flagged[:n], first_flagged_step=self.first_flagged_step[:n],
                    last_step=self.last_step[:n])
        if self.heads is not None:  # the head (kind of memorization) the score comes from, and each head's value
            values = self.head_values(np.arange(n))
            cols["head"] = self.top_heads(values)
            for k, name in enumerate(self.head_names):
                cols[f"head_{name}"] = values[:, k].astype(np.float32)
        for key, values in (extra or {}).items():
            cols[key] = list(values)[:n]
        return pa.table(cols)

    def write_parquet(self, path: Path, **kwargs) -> None:
        import pyarrow.parquet as pq

        table = self.table(**kwargs)
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))

    def summary(self) -> dict:
        observed = self.obs > 0
        return {"observed": int(observed.sum()), "flagged": int(self.flagged.sum()),
                "scored": int(self.pop[0])}
