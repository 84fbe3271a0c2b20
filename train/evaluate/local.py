"""Local memorization: where in a generation the copy is, and whether that part is copied.

The Bright Ending map marks the patches that copy training data (Chen et al., ICLR 2025). We
turn it into a region (the raw map as soft weights, or its top ``1 - q`` share), then search the
training set for the image that matches the generation *inside that region* and apply Carlini's
normalized-L2 criterion there: the region's distance to its nearest training image against the
mean distance to its k nearest. A **local replica** is a region that matches while the whole
image is not a replica. With a ground-truth mask (the testbed's stamps) the region's IoU is
compared with the trivial all-ones mask's.

The comparison is in pixel space whatever the global backend: SSCD descriptors are global and
have no notion of a region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from train.evaluate.measures import binarize, iou, resize_map, trivial_iou
from train.evaluate.similarity import neighbourhood, normalized_l2, resize_images


def be_region(be_map: np.ndarray, shape: tuple[int, int], mode: str = "quantile",
              quantile: float = 0.8) -> np.ndarray:
    """Pixel weights [H, W] in [0, 1] from a BE map: the map resized and scaled to max 1
    (``soft``) or 1 where the resized map is in its top ``1 - quantile`` (``quantile``)."""
    soft = np.clip(resize_map(be_map, shape), 0.0, None)
    if mode == "soft":
        peak = soft.max()
        return (soft / peak if peak > 0 else np.ones_like(soft)).astype(np.float32)
    if mode == "quantile":
        return binarize(soft, quantile).astype(np.float32)
    raise ValueError(f"unknown region mode {mode!r}")


def prompt_maps(images: np.ndarray, maps: np.ndarray, prompts: np.ndarray, agreement: bool = False) -> np.ndarray:
    """Region maps read over each prompt's seeds: a copied region comes out the same whatever the
    seed, the rest of the picture varies. Per prompt (generations with equal ``prompts`` ids), the
    maps [N, h, w] normalized to sum 1 and averaged; with ``agreement``, times the pixels' agreement
    across the prompt's generations (1 - their standard deviation over seeds, averaged over colours
    and over each map cell). Every generation of a prompt gets its prompt's map."""
    images, maps, prompts = np.asarray(images, np.float32), np.asarray(maps, np.float32), np.asarray(prompts)
    out = np.empty_like(maps)
    for prompt in np.unique(prompts):
        members = np.flatnonzero(prompts == prompt)
        own = maps[members]
        mean = (own / np.maximum(own.sum(axis=(1, 2), keepdims=True), 1e-12)).mean(axis=0)
        if agreement and len(members) > 1:
            spread = torch.from_numpy(images[members].std(axis=0).mean(axis=-1))[None, None]
            cells = torch.nn.functional.adaptive_avg_pool2d(spread, maps.shape[1:])[0, 0].numpy()
            mean = mean * (1.0 - cells)
        out[members] = mean
    return out


@dataclass
class LocalMatch:
    index: np.ndarray     # int [N]: nearest training image inside the region (bank rows)
    distance: np.ndarray  # float [N]: region RMSE to it
    nl2: np.ndarray       # float [N]: region RMSE / (alpha * mean region RMSE to the k nearest)
    area: np.ndarray      # float [N]: region weight as a fraction of the image


def region_neighbours(gen_images: np.ndarray, weights: np.ndarray, pixel_bank: np.ndarray, size: int,
                      k: int = 50, alpha: float = 0.5, block: int = 4096) -> LocalMatch:
    """Nearest training images of each generation inside its own region, by matrix products.

    With per-pixel weights ``w`` (shared by the 3 channels), the weighted squared distance to
    bank row ``t`` is ``sum w g^2 + (t^2) . w - 2 t . (w g)``: two products with the bank per
    block, for all generations at once. ``pixel_bank`` holds the training images resized to
    ``size`` and flattened [M, size*size*3] (PixelBackend features); ``weights`` are [N, H, W] at
    the generations' size and are resized to ``size`` here.
    """
    gen = resize_images(gen_images, size)
    n = len(gen)
    w_small = np.stack([np.clip(resize_map(w, (size, size)), 0.0, 1.0) for w in weights]) if n else np.zeros((0, size, size))
    w = torch.from_numpy(np.repeat(w_small.reshape(n, -1), 3, axis=1)).double()  # HWC order, channel last
    g = torch.from_numpy(gen.reshape(n, -1)).double()
    total = w.sum(dim=1).clamp_min(1e-12)  # = 3 * sum of pixel weights
    g_term = (w * g * g).sum(dim=1)
    wg = w * g
    k = neighbourhood(k, len(pixel_bank))
    best_v = best_i = None
    for start in range(0, len(pixel_bank), block):
        t = torch.from_numpy(np.asarray(pixel_bank[start:start + block])).double()
        d2 = (g_term[:, None] + (w @ (t * t).T) - 2.0 * (wg @ t.T)).clamp_min(0.0)  # [N, b]
        index = torch.arange(start, start + len(t)).expand(n, -1)
        if best_v is not None:
            d2, index = torch.cat([best_v, d2], 1), torch.cat([best_i, index], 1)
        best_v, order = d2.topk(min(k, d2.shape[1]), dim=1, largest=False)
        best_i = index.gather(1, order)
    rmse = (best_v / total[:, None]).sqrt().numpy()
    return LocalMatch(best_i[:, 0].numpy(), rmse[:, 0], normalized_l2(rmse[:, 0], rmse, alpha),
                      w_small.reshape(n, -1).mean(axis=1))


def localization_iou(be_map: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(IoU of the BE map with the ground-truth mask, IoU of the all-ones mask).

    The map is binarized at the mask's own area (measures.iou's default), so the score rates
    where the map points, not how much of the image it marks.
    """
    return iou(np.asarray(be_map, dtype=np.float64), mask), trivial_iou(mask)


# --------------------------------------------------------------------------------------------
# Heatmap overlay for reports and W&B panels
# --------------------------------------------------------------------------------------------

# A perceptually ordered ramp (dark blue -> purple -> orange -> pale yellow), interpolated.
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                  [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float32) / 255.0


def colormap(values: np.ndarray) -> np.ndarray:
    """[..] values in [0, 1] -> [.., 3] RGB in [0, 1]."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (x - lo)[..., None]
    return _RAMP[lo] * (1 - frac) + _RAMP[hi] * frac


def heatmap_overlay(image: np.ndarray, be_map: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The BE map coloured and blended over the image. The map is stretched to its own range
    (min to max): the display shows where attention concentrates, whatever its absolute level."""
    heat = resize_map(be_map, image.shape[:2])
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    return ((1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colormap(heat)).astype(np.float32)
