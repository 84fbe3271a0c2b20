"""Memorization monitoring: cross-attention capture and the token positions it needs."""

from .capture import (
    AttentionCapture,
    CaptureAttnProcessor,
    LayerRecord,
    cfg_end_token_index,
    cond_half,
    cross_attention_layers,
    default_be_layers,
    uncond_half,
)
from .tokens import end_token_index, prompt_length

__all__ = [
    "AttentionCapture",
    "CaptureAttnProcessor",
    "LayerRecord",
    "cfg_end_token_index",
    "cond_half",
    "cross_attention_layers",
    "default_be_layers",
    "end_token_index",
    "prompt_length",
    "uncond_half",
]
