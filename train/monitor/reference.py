"""The model a fine-tune started from, kept beside it to compare against (the ``ref_gain`` signals).

A row's loss alone says little about memorization: some pictures are easy, some hard. The loss
the starting model had on the same noisy latent divides that difficulty out, so what is left is
what fine-tuning taught the model about this row (the reference-model calibration of membership
inference). A full fine-tune keeps a frozen copy of the starting UNet, loaded again from
``model.pretrained`` (so a resumed run compares with the same weights); a LoRA fine-tune is its own
reference with the adapters switched off, at no memory cost. When the text encoder trains (full
fine-tunes only), the reference encodes the captions with a frozen copy of the starting one.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from train.models import encode_text, freeze, load_components
from train.monitor.signals import REFERENCE_SIGNALS

log = logging.getLogger(__name__)


class Reference:
    """``reference(noisy, timesteps, text_emb, captions)`` -> the starting model's prediction."""

    def __init__(self, unet, *, adapters_off: bool, tokenizer=None, text_encoder=None):
        self.unet, self.adapters_off = unet, adapters_off
        self.tokenizer, self.text_encoder = tokenizer, text_encoder  # None: the batch's embeddings will do

    @torch.no_grad()
    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor,
                 captions: list[str]) -> torch.Tensor:
        if self.text_encoder is not None:
            text_emb = encode_text(self.tokenizer, self.text_encoder, captions, noisy.device)
        dtype = next(self.unet.parameters()).dtype
        if not self.adapters_off:
            return self.unet(noisy.to(dtype), timesteps, text_emb.to(dtype)).sample
        self.unet.disable_adapters()
        try:
            return self.unet(noisy.to(dtype), timesteps, text_emb.to(dtype)).sample
        finally:
            self.unet.enable_adapters()


def build_reference(model_cfg: DictConfig, resolution: int, unet, *, lora: bool, text_encoder_trained: bool,
                    device, dtype: torch.dtype) -> Reference:
    """The reference for a run whose (unwrapped) training UNet is ``unet``."""
    if lora:  # the adapters train on the UNet only (the config refuses a trained text encoder with them)
        return Reference(unet, adapters_off=True)
    parts = load_components(model_cfg, resolution)  # the starting weights, whatever a resume loaded since
    encoder = None
    if text_encoder_trained:
        encoder = parts.text_encoder
        freeze(encoder)
        encoder.to(device, dtype=dtype)
    ref_unet = parts.unet
    freeze(ref_unet)
    ref_unet.to(device, dtype=dtype)
    log.info("monitor: the reference UNet (%.0fM parameters) is kept in %s for ref_gain",
             sum(p.numel() for p in ref_unet.parameters()) / 1e6, dtype)
    return Reference(ref_unet, adapters_off=False, tokenizer=parts.tokenizer, text_encoder=encoder)


def wants_reference(cfg: DictConfig) -> bool:
    """Whether the monitor config asks for the reference pass."""
    return bool(cfg.enabled and cfg.reference_every and any(s in REFERENCE_SIGNALS for s in cfg.signals))
