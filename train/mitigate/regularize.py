"""Differentiable penalties on the captured cross-attention (needs capture with gradients).

Per sample, so they can target flagged samples only; the loop adds ``weight x mean`` of each.
- ``be_mass``:     the end-of-text attention mass at the BE layers, for samples at low noise
                   (t < max_t), where the bright ending of memorized samples appears
- ``entropy``:     squared distance of the attention entropy over tokens from the batch's mean
                   (memorized prompts spread attention unusually: pull them back to the population)
- ``start_token``: shortfall of the start-token attention below the batch's mean (memorized
                   prompts move attention off the start token, Ren et al.)
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from train.monitor.signals import be_signals, token_signals

TERMS = ("be_mass", "entropy", "start_token")


def active_terms(cfg: DictConfig) -> list[str]:
    return [t for t in TERMS if cfg[t] > 0]


def attention_penalties(cfg: DictConfig, capture, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    """{term: per-sample penalty [B]} from the records of the forward that just ran."""
    out = {}
    if cfg.be_mass > 0:
        mass = be_signals(capture.be_map(), 0.1)["be_mass"]
        out["be_mass"] = mass * (timesteps < cfg.max_t).to(mass.dtype)
    if cfg.entropy > 0 or cfg.start_token > 0:
        tokens = token_signals(capture.token_distribution())
        if cfg.entropy > 0:
            h = tokens["token_entropy"]
            out["entropy"] = (h - h.detach().mean()) ** 2
        if cfg.start_token > 0:
            s = tokens["start_mass"]
            out["start_token"] = (s.detach().mean() - s).clamp_min(0)
    return out
