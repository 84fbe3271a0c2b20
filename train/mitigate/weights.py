"""Per-sample loss weights: down-weight or drop what the monitor flags, or de-duplicate by image hash.

A dropped sample gets weight 0 and stays in the batch: every rank runs the same forward and
backward whatever it drops, so DDP/DeepSpeed collectives never wait on a rank that skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

log = logging.getLogger(__name__)


def flag_weights(cfg: DictConfig, flagged: torch.Tensor, scores: Optional[torch.Tensor], step: int) -> torch.Tensor:
    """``mode``: none | downweight (flagged x factor) | drop (flagged x 0) | score (a smooth
    function of the ledger score: 1 below ``score_on``, falling as 1 / (1 + (score - score_on)))."""
    ones = torch.ones(flagged.shape, dtype=torch.float32)
    if cfg.mode == "none" or step < cfg.start_step:
        return ones
    if cfg.mode == "drop":
        return torch.where(flagged, torch.zeros_like(ones), ones)
    if cfg.mode == "downweight":
        return torch.where(flagged, torch.full_like(ones, cfg.factor), ones)
    excess = torch.nan_to_num(scores.float() - cfg.score_on, nan=0.0).clamp_min(0)
    return 1.0 / (1.0 + excess)


def dhash(image: Image.Image, size: int = 8) -> int:
    """Difference hash: robust to re-encoding and resizing, equal for exact and near-exact copies."""
    grey = np.asarray(image.convert("L").resize((size + 1, size), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0]) if size == 8 else int("".join(map(str, bits.astype(int))), 2)


def dedup_weights(table, image_column: str, cache_dir: Path, root: Optional[Path] = None) -> np.ndarray:
    """1 / (size of the sample's perceptual-hash group), per row; cached by the data's fingerprint.

    Needs no monitor: duplicates are known from the data alone (the classic fix for global copies).
    """
    fingerprint = hashlib.sha256(f"{table._fingerprint}:{image_column}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() / "dedup" / f"{fingerprint}.json"
    if cache.is_file():
        return np.asarray(json.loads(cache.read_text()), dtype=np.float32)
    hashes = []
    for value in table[image_column]:
        try:
            if isinstance(value, dict) and value.get("bytes"):
                image = Image.open(io.BytesIO(value["bytes"]))
            else:
                path = Path(value["path"] if isinstance(value, dict) else value)
                image = Image.open(root / path if root is not None and not path.is_absolute() else path)
            hashes.append(dhash(image))
        except (OSError, ValueError, KeyError):
            hashes.append(-1 - len(hashes))  # unreadable: its own group (the loader skips it anyway)
    _, inverse, counts = np.unique(np.asarray(hashes, dtype=object).astype(str), return_inverse=True, return_counts=True)
    weights = (1.0 / counts[inverse]).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(weights.tolist()))
    tmp.replace(cache)
    log.info("de-duplication: %d rows in %d perceptual-hash groups", len(weights), len(counts))
    return weights
