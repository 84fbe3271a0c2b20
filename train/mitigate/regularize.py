"""Differentiable penalties on the captured cross-attention (the monitor captures with gradients).

Per sample, so they can target flagged samples only; the objective gets ``weight x mean`` of each.
- ``be_mass``:     the end-of-text attention mass at the BE layers, for samples at low noise
                   (t < max_t), where the bright ending of memorized samples appears
- ``entropy``:     squared distance of the attention entropy over tokens from the batch's mean
                   (memorized prompts spread attention unusually: pull them back to the population)
- ``start_token``: shortfall of the start-token attention below the batch's mean (memorized
                   prompts move attention off the start token, Ren et al.)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from omegaconf import DictConfig

from train.mitigate.base import BuildContext, Mitigation, MitigationStep, targets
from train.monitor.signals import be_signals, token_signals
from train.util import bounded, choice


@dataclass
class RegularizeConfig:
    target: str = choice("all", "flagged")
    start_step: int = bounded(0, ge=0)
    # the weight of each penalty term; 0 = off (the term names are these field names)
    be_mass: float = bounded(0.0, ge=0.0)
    entropy: float = bounded(0.0, ge=0.0)
    start_token: float = bounded(0.0, ge=0.0)
    max_t: int = bounded(200, ge=1)  # be_mass applies to samples drawn below this t


TERMS = tuple(f.name for f in fields(RegularizeConfig) if f.name not in ("target", "start_step", "max_t"))


def active_terms(cfg: DictConfig) -> list[str]:
    return [t for t in TERMS if cfg[t] > 0]


def attention_penalties(cfg: DictConfig, monitor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    """{term: per-sample penalty [B]} from the attention of the forward that just ran."""
    out = {}
    if cfg.be_mass > 0:
        mass = be_signals(monitor.be_map(), 0.1)["be_mass"]
        out["be_mass"] = mass * (timesteps < cfg.max_t).to(mass.dtype)
    if cfg.entropy > 0 or cfg.start_token > 0:
        tokens = token_signals(monitor.token_distribution())
        if cfg.entropy > 0:
            h = tokens["token_entropy"]
            out["entropy"] = (h - h.detach().mean()) ** 2
        if cfg.start_token > 0:
            s = tokens["start_mass"]
            out["start_token"] = (s.detach().mean() - s).clamp_min(0)
    return out


class AttentionRegularizer(Mitigation):
    name = "regularize"
    Config = RegularizeConfig

    @classmethod
    def active(cls, cfg: DictConfig) -> bool:
        return bool(active_terms(cfg))

    @classmethod
    def needs_monitor(cls, cfg: DictConfig) -> bool:
        return cls.active(cfg)  # the attention comes from the monitor's capture

    def __init__(self, cfg: DictConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.monitor = ctx.monitor
        self.monitor.capture_with_grad()  # the penalties backpropagate through the attention
        self._sums: dict[str, float] = {}
        self._count = 0

    def loss_terms(self, step: MitigationStep) -> dict[str, torch.Tensor]:
        penalties = attention_penalties(self.cfg, self.monitor, step.timesteps)
        mask = targets(self.cfg, step)
        out = {}
        for name, term in penalties.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(term.detach().mean())
            out[name] = self.cfg[name] * (term * mask.to(term.device, term.dtype)).mean()
        self._count += 1
        return out

    def metrics(self) -> dict[str, tuple[float, float]]:
        out = {f"mitig/{name}": (total, self._count) for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return out
