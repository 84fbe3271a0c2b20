"""Running population statistics per (timestep bin, prompt-length bin), to normalize signals.

Attention and loss depend strongly on the noise level, and attention over tokens on how many real
tokens a caption has (token count alone can "detect" a group whose captions are longer). A sample is
therefore compared with samples at similar t and of similar caption length: z = (x - mean) / std of
its bin. Bins merge each batch with Chan's parallel update, with the past's weight capped at
``horizon`` observations so the statistics follow the model as it trains. Updated with gathered
values, so every rank holds the same numbers.
"""

from __future__ import annotations

import torch


class BinnedStats:
    def __init__(self, num_signals: int, num_train_timesteps: int, t_bins: int, length_edges: list[int],
                 horizon: int = 2000, warmup: int = 8):
        self.t_bins, self.num_train_timesteps = t_bins, num_train_timesteps
        self.length_edges = torch.tensor(sorted(length_edges), dtype=torch.float64)
        self.l_bins = len(length_edges) + 1
        shape = (num_signals, t_bins * self.l_bins)
        self.count = torch.zeros(shape, dtype=torch.float64)
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.m2 = torch.zeros(shape, dtype=torch.float64)
        self.horizon, self.warmup = horizon, max(2, warmup)  # one observation has no spread

    def bin_of(self, timesteps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        tb = (timesteps.double() * self.t_bins / self.num_train_timesteps).long().clamp(0, self.t_bins - 1)
        lb = torch.bucketize(lengths.double(), self.length_edges, right=True)
        return tb * self.l_bins + lb

    def _per_signal(self, values: torch.Tensor, bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bins may be [B] (one bin per sample) or [B, S] (signals read at different t, e.g. a probe)."""
        values, bins = values.double().cpu(), bins.long().cpu()
        return values, (bins[:, None].expand_as(values) if bins.ndim == 1 else bins)

    def normalize(self, values: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """[B, S] raw -> [B, S] z against the bins' current statistics; NaN until a bin has warmed up."""
        values, bins = self._per_signal(values, bins)
        rows = torch.arange(values.shape[1])[None, :].expand_as(bins)
        count = self.count[rows, bins]
        std = (self.m2[rows, bins] / count.clamp_min(1)).clamp_min(0).sqrt()
        z = (values - self.mean[rows, bins]) / std.clamp_min(1e-6)
        return torch.where(count >= self.warmup, z, torch.full_like(z, float("nan"))).float()

    def update(self, values: torch.Tensor, bins: torch.Tensor) -> None:
        values, bins = self._per_signal(values, bins)
        for s in range(values.shape[1]):
            ok = ~torch.isnan(values[:, s])
            if not bool(ok.any()):
                continue
            x, b = values[ok, s], bins[ok, s]
            n_b = torch.zeros_like(self.count[s]).index_add_(0, b, torch.ones_like(x))
            sum_b = torch.zeros_like(self.mean[s]).index_add_(0, b, x)
            mean_b = sum_b / n_b.clamp_min(1)
            m2_b = torch.zeros_like(self.m2[s]).index_add_(0, b, (x - mean_b[b]) ** 2)
            seen = n_b > 0
            # cap the past's weight so the bins track a drifting model
            n_old = self.count[s].clamp_max(self.horizon)
            scale = torch.where(self.count[s] > 0, n_old / self.count[s].clamp_min(1), torch.ones_like(n_old))
            m2_old = self.m2[s] * scale
            n = n_old + n_b
            delta = mean_b - self.mean[s]
            new_mean = self.mean[s] + delta * n_b / n.clamp_min(1)
            new_m2 = m2_old + m2_b + delta ** 2 * n_old * n_b / n.clamp_min(1)
            self.mean[s] = torch.where(seen, new_mean, self.mean[s])
            self.m2[s] = torch.where(seen, new_m2, self.m2[s])
            self.count[s] = torch.where(seen, n, self.count[s])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("count", "mean", "m2"):
            if state[key].shape != getattr(self, key).shape:
                raise ValueError(f"monitor statistics of shape {tuple(state[key].shape)} do not fit "
                                 f"{tuple(getattr(self, key).shape)} (monitor.signals or bins changed?)")
            setattr(self, key, state[key].clone().to(torch.float64))
