"""Per-sample memorization signals, each a vector over the batch (NaN where not observed).

Every signal carries an orientation: +1 when larger values look more like memorization, -1 when
smaller do. The ledger works with oriented, population-normalized values, so "higher = more
suspicious" holds for all of them.

- ``be_mass``       mean end-of-text attention over the BE layers' pixels (bright-ending strength)
- ``be_topk``       share of that end-token mass in the top ``topk_frac`` pixels (spatial concentration;
                    a local copy lights up a region, not the whole map)
- ``be_entropy``    spatial entropy of the end-token map, normalized to [0, 1] (concentrated = low)
- ``token_entropy`` entropy of the pixel-averaged distribution over the 77 tokens (Ren et al.:
                    memorized prompts spread attention away from the start token, so higher)
- ``start_mass``    attention on the start token
- ``loss``          log of the denoising loss; normalized per timestep bin it is the loss relative to
                    the running loss at similar noise (IET-AGC): memorized samples are fit too well
- ``magnitude``     ||eps(x_t, c) - eps(x_t, "")||_2 (Wen et al.), every k steps on a subset
- ``be_magnitude``  the same difference masked by the BE map: ||d * m||_2 / mean(m) (Chen et al.)
- ``ref_gain``      1 - loss / the reference model's loss on the same noisy latent (the model the
                    fine-tune started from): how much fine-tuning taught this row beyond what the base
                    knew, a row's difficulty divided out (reference-calibrated membership scores);
                    every ``reference_every`` steps (train/monitor/reference.py; opt-in)
- ``ref_gain_topk`` that gain in the top ``topk_frac`` latent cells over the reference loss: whether
                    fine-tuning taught one region (a copied stamp) rather than the whole picture
- ``neighbours``    log(1 + the number of distinct rows seen so far whose pooled latent looks like this
                    row's): how often its picture recurs (train/monitor/neighbours.py; opt-in)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ORIENTATION = {
    "be_mass": +1.0, "be_topk": +1.0, "be_entropy": -1.0, "token_entropy": +1.0, "start_mass": +1.0,
    "loss": -1.0, "magnitude": +1.0, "be_magnitude": +1.0, "neighbours": +1.0, "ref_gain": +1.0, "ref_gain_topk": +1.0,
}
SIGNALS = tuple(ORIENTATION)
BE_SIGNALS = ("be_mass", "be_topk", "be_entropy")
MAGNITUDE_SIGNALS = ("magnitude", "be_magnitude")
REFERENCE_SIGNALS = ("ref_gain", "ref_gain_topk")


def be_signals(be_map: torch.Tensor, topk_frac: float = 0.1) -> dict[str, torch.Tensor]:
    """``be_map``: [B, h, w] end-token attention probabilities (heads and BE layers averaged)."""
    flat = be_map.flatten(1).float()
    n = flat.shape[1]
    total = flat.sum(1, keepdim=True).clamp_min(1e-12)
    share = flat / total
    k = max(1, round(topk_frac * n))
    entropy = -(share * share.clamp_min(1e-12).log()).sum(1) / math.log(n) if n > 1 else torch.zeros(len(flat))
    return {"be_mass": flat.mean(1), "be_topk": share.topk(k, dim=1).values.sum(1), "be_entropy": entropy}


def token_signals(distribution: torch.Tensor) -> dict[str, torch.Tensor]:
    """``distribution``: [B, T] attention over tokens, pixels, heads and layers averaged."""
    p = distribution.float().clamp_min(0)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
    return {"token_entropy": -(p * p.clamp_min(1e-12).log()).sum(1), "start_mass": p[:, 0]}


def loss_signal(loss: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"loss": loss.detach().float().clamp_min(1e-12).log()}


def magnitude_signals(eps_cond: torch.Tensor, eps_uncond: torch.Tensor,
                      be_map: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Text-conditional noise magnitude, plain and masked by the BE map (upsampled to the latent)."""
    diff = (eps_cond.float() - eps_uncond.float())
    out = {"magnitude": diff.flatten(1).norm(dim=1)}
    if be_map is not None:
        mask = F.interpolate(be_map[:, None].float(), size=diff.shape[-2:], mode="bilinear", align_corners=False)
        out["be_magnitude"] = (diff * mask).flatten(1).norm(dim=1) / mask.flatten(1).mean(1).clamp_min(1e-12)
    return out


def cell_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, h, w] squared error per latent cell, summed over channels."""
    return (pred.float() - target.float()).pow(2).sum(1)


def reference_signals(pred: torch.Tensor, pred_ref: torch.Tensor, target: torch.Tensor,
                      topk_frac: float = 0.1) -> dict[str, torch.Tensor]:
    """The fine-tune's squared error against the reference's, cell by cell (:func:`cell_error`)."""
    err, err_ref = cell_error(pred, target).flatten(1), cell_error(pred_ref, target).flatten(1)
    scale = err_ref.mean(1).clamp_min(1e-12)
    k = max(1, round(topk_frac * err.shape[1]))
    return {"ref_gain": 1 - err.mean(1) / scale, "ref_gain_topk": (err_ref - err).topk(k, dim=1).values.mean(1) / scale}


def stack(values: dict[str, torch.Tensor], names: tuple[str, ...], batch: int, device) -> torch.Tensor:
    """[B, S] in ``names`` order; NaN for signals not observed this step."""
    out = torch.full((batch, len(names)), float("nan"), device=device)
    for j, name in enumerate(names):
        if name in values:
            out[:, j] = values[name].to(device=device, dtype=out.dtype)
    return out
