"""Loss weights from the monitor's flags: down-weight or drop what the ledger flags, weigh each
sample by its ledger score, give each flagged row a training budget, or de-duplicate a flagged
row's look-alike group.

A dropped sample gets weight 0 and stays in the batch: every rank runs the same forward and
backward whatever it drops, so DDP/DeepSpeed collectives never wait on a rank that skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig

from train.mitigate.base import BuildContext, Mitigation, MitigationStep
from train.util import bounded, choice


@dataclass
class FlagWeightsConfig:
    # none | downweight (flagged x factor) | drop (flagged x 0) | score (a smooth function of the
    # ledger score: 1 below score_on, falling as 1 / (1 + (score - score_on))) | budget (a flagged
    # row trains on until it has learned its image as well as its peers: weight 0 once its loss z,
    # the ledger's running mean, is at least budget_margin below theirs; it keeps training while
    # behind, so a flag on a hard image costs it nothing) | group (online de-duplication: once a row
    # is flagged, every row of its look-alike group from the monitor's neighbours index weighs
    # 1 / group size, so the group counts as one row; needs "neighbours" in monitor.signals)
    mode: str = choice("none", "downweight", "drop", "score", "budget", "group")
    factor: float = bounded(0.1, ge=0.0, le=1.0)
    score_on: float = 1.0
    budget_margin: float = 0.0
    start_step: int = bounded(0, ge=0)


def flag_weights(cfg: DictConfig, flagged: torch.Tensor, scores: Optional[torch.Tensor], step: int,
                 loss_z: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B] weights; ``loss_z``: the rows' running loss z (oriented: > 0 = lower loss than peers), budget mode."""
    ones = torch.ones(flagged.shape, dtype=torch.float32)
    if cfg.mode == "none" or step < cfg.start_step:
        return ones
    if cfg.mode == "drop":
        return torch.where(flagged, torch.zeros_like(ones), ones)
    if cfg.mode == "budget":
        spent = flagged & (torch.nan_to_num(loss_z.float(), nan=-float("inf")) >= cfg.budget_margin)
        return torch.where(spent, torch.zeros_like(ones), ones)
    if cfg.mode == "downweight":
        return torch.where(flagged, torch.full_like(ones, cfg.factor), ones)
    excess = torch.nan_to_num(scores.float() - cfg.score_on, nan=0.0).clamp_min(0)
    return 1.0 / (1.0 + excess)


class FlagWeights(Mitigation):
    name = "weights"
    Config = FlagWeightsConfig

    @classmethod
    def active(cls, cfg: DictConfig) -> bool:
        return cfg.mode != "none"

    @classmethod
    def needs_monitor(cls, cfg: DictConfig) -> bool:
        return cls.active(cfg)

    @classmethod
    def check(cls, cfg: DictConfig, run_cfg) -> Optional[str]:
        if cfg.mode == "budget" and "loss" not in run_cfg.monitor.signals:
            return "mitigate.weights.mode=budget reads the monitor's loss signal: keep 'loss' in monitor.signals"
        if cfg.mode == "group" and "neighbours" not in run_cfg.monitor.signals:
            return "mitigate.weights.mode=group reads the look-alike groups of the monitor's 'neighbours' signal: " \
                   "add it to monitor.signals"
        return None

    def __init__(self, cfg: DictConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.monitor = ctx.monitor

    def weights(self, step: MitigationStep) -> Optional[torch.Tensor]:
        if self.cfg.mode == "group":
            return self.monitor.group_weights(step.batch) if step.step >= self.cfg.start_step else None
        loss_z = self.monitor.signal_mean(step.batch, "loss") if self.cfg.mode == "budget" else None
        return flag_weights(self.cfg, step.flagged, step.scores, step.step, loss_z)
