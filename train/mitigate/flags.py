"""Loss weights from the monitor's flags: down-weight or drop what the ledger flags, or weigh each
sample by its ledger score.

A dropped sample gets weight 0 and stays in the batch: every rank runs the same forward and
backward whatever it drops, so DDP/DeepSpeed collectives never wait on a rank that skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig

from train.mitigate.base import Mitigation, MitigationStep
from train.util import bounded, choice


@dataclass
class FlagWeightsConfig:
    # none | downweight (flagged x factor) | drop (flagged x 0) | score (a smooth function of the
    # ledger score: 1 below score_on, falling as 1 / (1 + (score - score_on)))
    mode: str = choice("none", "downweight", "drop", "score")
    factor: float = bounded(0.1, ge=0.0, le=1.0)
    score_on: float = 1.0
    start_step: int = bounded(0, ge=0)


def flag_weights(cfg: DictConfig, flagged: torch.Tensor, scores: Optional[torch.Tensor], step: int) -> torch.Tensor:
    ones = torch.ones(flagged.shape, dtype=torch.float32)
    if cfg.mode == "none" or step < cfg.start_step:
        return ones
    if cfg.mode == "drop":
        return torch.where(flagged, torch.zeros_like(ones), ones)
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

    def weights(self, step: MitigationStep) -> Optional[torch.Tensor]:
        return flag_weights(self.cfg, step.flagged, step.scores, step.step)
