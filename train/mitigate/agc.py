"""Anti-gradient control (IET-AGC, Liu et al., ECCV 2024): skip the samples whose loss is already
abnormally low for their noise level.

Memorization shows in the loss before anything else: a sample the model has learned by heart
denoises far better than its peers at the same timestep. IET-AGC keeps an exponential moving
average of the loss per timestep and drops a sample from the gradient when ``loss * ratio`` is
below the average at its timestep; the batch loss is then the mean over the samples kept. No
pass over the data and no flag needed: it acts on what each step measures, so it also reaches
images that have no duplicate and are memorized only because training runs long.

The averages are updated with every rank's losses (gathered), so every rank holds the same ones
and the same decisions would follow from a single process; they are saved with each checkpoint
(``TrainState.extra``) for exact resume. A skipped sample keeps weight 0 in the graph, as every
other weight mitigation does (no rank skips backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig

from train.mitigate.base import BuildContext, Mitigation, MitigationStep, targets
from train.util import bounded, choice


@dataclass
class AGCConfig:
    enabled: bool = False
    ratio: float = bounded(1.25, ge=1.0)  # skip when loss x ratio < the running loss at its timestep
    decay: float = bounded(0.8, ge=0.0, lt=1.0)  # of the per-timestep moving average (the paper's 0.8)
    t_bins: int = bounded(1000, ge=1)  # timesteps share an average in bins (1000 = one per timestep)
    target: str = choice("all", "flagged")  # flagged: only rows the monitor flags may be skipped
    start_step: int = bounded(0, ge=0)


class AntiGradientControl(Mitigation):
    name = "agc"
    Config = AGCConfig

    @classmethod
    def active(cls, cfg: DictConfig) -> bool:
        return bool(cfg.enabled)

    @classmethod
    def needs_monitor(cls, cfg: DictConfig) -> bool:
        return cls.active(cfg) and cfg.target == "flagged"

    def __init__(self, cfg: DictConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.num_timesteps = ctx.num_train_timesteps
        self.average = torch.zeros(cfg.t_bins, dtype=torch.float64)
        self.seen = torch.zeros(cfg.t_bins, dtype=torch.bool)
        self._skipped, self._count = 0.0, 0

    def _bins(self, timesteps: torch.Tensor) -> torch.Tensor:
        t = timesteps.detach().long().cpu().clamp(0, self.num_timesteps - 1)
        return t * self.cfg.t_bins // self.num_timesteps

    def weights(self, step: MitigationStep) -> Optional[torch.Tensor]:
        loss = step.loss.detach().double().cpu()
        bins = self._bins(step.timesteps)
        low = self.seen[bins] & (loss * self.cfg.ratio < self.average[bins])
        skip = low & targets(self.cfg, step).cpu()
        # the batch loss is the mean over the kept samples of every rank: rescale by the kept share
        everyone = step.gather(torch.stack([skip.double(), loss, bins.double()], 1).to(step.loss.device)).cpu()
        kept = float((everyone[:, 0] == 0).sum())
        self._update(everyone[:, 1], everyone[:, 2].long())
        self._skipped += float(everyone[:, 0].sum())
        self._count += len(everyone)
        scale = len(everyone) / kept if kept else 0.0
        return torch.where(skip, 0.0, scale).float()

    def _update(self, loss: torch.Tensor, bins: torch.Tensor) -> None:
        # in sample order, so a bin drawn twice in one batch folds both (same on every rank)
        for b, value in zip(bins.tolist(), loss.tolist()):
            if self.seen[b]:
                self.average[b] = self.cfg.decay * self.average[b] + (1 - self.cfg.decay) * value
            else:
                self.average[b], self.seen[b] = value, True

    def metrics(self) -> dict[str, tuple[float, float]]:
        out = {"mitig/agc_skipped": (self._skipped, self._count)}
        self._skipped, self._count = 0.0, 0
        return out

    def state(self) -> dict:
        return {"average": self.average.tolist(), "seen": self.seen.tolist()}

    def load_state(self, state: dict) -> None:
        if len(state["average"]) != self.cfg.t_bins:
            raise ValueError(f"the checkpoint's mitigate.agc kept {len(state['average'])} timestep bins, "
                             f"the config asks for {self.cfg.t_bins}: resume with the same mitigate.agc.t_bins")
        self.average = torch.tensor(state["average"], dtype=torch.float64)
        self.seen = torch.tensor(state["seen"], dtype=torch.bool)
