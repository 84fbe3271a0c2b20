"""Ground-truth measures of memorization and quality, written once for the whole project.

All functions take numpy arrays or torch tensors (moved to CPU) and work in numpy float64.
Images are float in [0, 1] shaped ``(H, W, C)`` or batches ``(N, H, W, C)``; uint8 input is
divided by 255. Masks are ``(H, W)``: bool, uint8 (> 127 is inside) or float (> 0.5 is inside).

Replica definitions (what "memorized" means in copyguard's evaluation):

* **replica** — a generation from a planted prompt whose nearest training image (pixel RMSE) is
  its own source (same ``source_id``) at a distance below a threshold. The threshold is a low
  quantile of the same nearest-neighbour distances for generations from *clean* prompts
  (:func:`calibrate_threshold`), i.e. closer to a training image than clean generations ever
  get by chance.
* **near-duplicate replica** (testbed v6) — also a copy when the generation is a crop, zoom,
  turn or shift of the source picture that no training row shows: :func:`aligned_nearest`
  compares under the best-aligned warp, against a threshold calibrated the same way.
* **local replica** — the stamp region matches (RMSE inside the mask below a region threshold,
  calibrated the same way on clean generations' masked distances to the stamp) while the whole
  image is not a replica.

Quality: :func:`kernel_distance` is the unbiased KID (MMD² with a cubic polynomial kernel) over
features from a fixed extractor. A mitigation that stops copying by emitting blur, noise or
one generic image moves its output distribution away from the held-out images and is penalized;
it cannot lower KID without producing images whose statistics match the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------


def as_array(x: Any) -> np.ndarray:
    """numpy float64 from an array, tensor or list of images; uint8 scaled to [0, 1]."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    elif isinstance(x, (list, tuple)):
        x = np.stack([as_array(v) for v in x])
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    return x.astype(np.float64, copy=False)


def as_mask(mask: Any) -> np.ndarray:
    """A bool mask from bool, uint8 (> 127) or float (> 0.5) input."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if mask.dtype == np.uint8:
        return mask > 127
    return mask > 0.5


def _flat(images: Any) -> np.ndarray:
    """(N, D) rows from a batch of images (or one image -> one row)."""
    array = as_array(images)
    if array.ndim == 3:
        array = array[None]
    return array.reshape(array.shape[0], -1)


# --------------------------------------------------------------------------------------------
# Pixel distances and nearest neighbours
# --------------------------------------------------------------------------------------------


def pixel_distance(a: Any, b: Any) -> np.ndarray | float:
    """Normalized L2 (root mean squared difference) over the last three axes (H, W, C).

    0 for identical images, 1 for black vs white. Batches broadcast: one image against a batch
    gives one distance per batch item.
    """
    diff = as_array(a) - as_array(b)
    value = np.sqrt(np.mean(diff ** 2, axis=(-3, -2, -1)))
    return float(value) if np.ndim(value) == 0 else value


def masked_distance(a: Any, b: Any, mask: Any) -> np.ndarray | float:
    """RMSE of (H, W, C) images restricted to the pixels where ``mask`` (H, W) is set."""
    inside = as_mask(mask)
    if not inside.any():
        raise ValueError("masked_distance: the mask is empty")
    diff = (as_array(a) - as_array(b))[..., inside, :]  # (..., n_inside, C)
    value = np.sqrt(np.mean(diff ** 2, axis=(-2, -1)))
    return float(value) if np.ndim(value) == 0 else value


def nearest(gen_images: Any, train_images: Any, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each generated image, the index of and the pixel RMSE to its nearest training image.

    Squared distances come from ``|g|² + |t|² - 2 g·t`` with matrix products over blocks of
    ``batch_size`` training images, in float64 so exact copies come out at (numerically) zero.
    """
    gen, train = _flat(gen_images), _flat(train_images)
    if gen.shape[1] != train.shape[1]:
        raise ValueError(f"nearest: image sizes differ ({gen.shape[1]} vs {train.shape[1]} values)")
    if len(train) == 0:
        raise ValueError("nearest: no training images")
    best_d2 = np.full(len(gen), np.inf)
    best_i = np.zeros(len(gen), dtype=np.int64)
    gen_sq = np.einsum("ij,ij->i", gen, gen)
    for start in range(0, len(train), batch_size):
        block = train[start:start + batch_size]
        d2 = gen_sq[:, None] + np.einsum("ij,ij->i", block, block)[None, :] - 2.0 * gen @ block.T
        i = np.argmin(d2, axis=1)
        d = d2[np.arange(len(gen)), i]
        better = d < best_d2
        best_d2[better], best_i[better] = d[better], i[better] + start
    return best_i, np.sqrt(np.maximum(best_d2, 0.0) / gen.shape[1])


def _warp(images, params):
    """``images`` (B, C, H, W) under similarity transforms ``params`` (B, 4): zoom, angle (radians),
    shift x, shift y (fractions of the side); the uncovered border white, as the testbed fills it.
    Returns (B, H*W*C) rows."""
    import torch
    import torch.nn.functional as F

    zoom, angle, dx, dy = params.unbind(1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of f sides is 2f there
    theta = torch.stack([torch.stack([cos, -sin, 2 * dx], 1), torch.stack([sin, cos, 2 * dy], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = 1.0 - F.grid_sample(1.0 - images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.permute(0, 2, 3, 1).reshape(len(images), -1)  # flat rows in (H, W, C) order, as _flat


def aligned_nearest(gen_images: Any, references: Any, zooms: Sequence[float] = (1.0, 1.15, 1.3, 1.45, 1.6),
                    angles: Sequence[float] = (-12.0, -6.0, 0.0, 6.0, 12.0),
                    shifts: Sequence[float] = (-0.2, -0.1, 0.0, 0.1, 0.2), refine_steps: int = 40
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For each generation, the nearest reference when a zoom (crop), rotation or shift of it
    counts as the reference, and the pixel RMSE to its best-aligned warp.

    The default grid spans what a crop to 60% of the side, a turn of 12 degrees and a shift of 20%
    do; a grid point is ~1.5 px off at 32 px, which costs sharp drawings most of their closeness,
    so each (generation, reference) pair's best grid point is refined by gradient descent on the
    four parameters (grid_sample is differentiable).
    """
    import torch

    gens = torch.from_numpy(_flat(gen_images)).float()
    refs_hwc = as_array(references)
    refs_hwc = refs_hwc[None] if refs_hwc.ndim == 3 else refs_hwc
    if len(refs_hwc) == 0 or gens.shape[1] != refs_hwc[0].size:
        raise ValueError(f"aligned_nearest: generations hold {gens.shape[1]} values each, references "
                         f"{refs_hwc.shape[1:] if len(refs_hwc) else 'none'}")
    refs = torch.from_numpy(refs_hwc).float().permute(0, 3, 1, 2)
    n, m = len(gens), len(refs)
    grid = torch.tensor([[z, np.radians(a), x, y] for z in zooms for a in angles for x in shifts for y in shifts],
                        dtype=torch.float32)
    t = len(grid)
    with torch.no_grad():
        warps = _warp(refs.repeat_interleave(t, 0), grid.repeat(m, 1))
        d2 = torch.cdist(gens.double(), warps.double()).pow(2).reshape(n, m, t)
    best = d2.argmin(2)                                        # (n, m): the best grid point per pair
    params = grid[best.reshape(-1)].clone().requires_grad_(True)
    pair_refs = refs.repeat(n, 1, 1, 1)                          # pair (i, j) -> reference j
    targets = gens.repeat_interleave(m, 0)                       # ... and generation i
    optimizer = torch.optim.Adam([params], lr=0.01)
    for _ in range(refine_steps):
        optimizer.zero_grad()
        loss = (_warp(pair_refs, params) - targets).pow(2).mean(1)
        loss.sum().backward()
        optimizer.step()
    with torch.no_grad():
        refined = (_warp(pair_refs, params).double() - targets.double()).pow(2).mean(1)
    coarse = d2.gather(2, best[..., None]).reshape(-1) / gens.shape[1]
    distance = torch.minimum(refined, coarse).reshape(n, m).sqrt().numpy()
    return distance.argmin(1), distance.min(1)


def own_rank(gen_images: Any, own_images: Any, candidates: Any, batch_size: int = 1024) -> np.ndarray:
    """Per generation, the share of ``candidates`` strictly closer to it (pixel RMSE) than its
    prompt's own image: 0 when the own image is the nearest, ~0.5 for a generation that has
    nothing to do with its prompt. How well generations follow their prompts, without copying:
    a held-out prompt's own image was never trained, so a low rank there is generalization.
    """
    gen, own, cand = _flat(gen_images), _flat(own_images), _flat(candidates)
    if gen.shape != own.shape or gen.shape[1] != cand.shape[1]:
        raise ValueError(f"own_rank: shapes differ (generations {gen.shape}, own {own.shape}, candidates {cand.shape})")
    own_d2 = np.einsum("ij,ij->i", gen - own, gen - own)
    gen_sq = np.einsum("ij,ij->i", gen, gen)
    closer = np.zeros(len(gen), dtype=np.int64)
    for start in range(0, len(cand), batch_size):
        block = cand[start:start + batch_size]
        d2 = gen_sq[:, None] + np.einsum("ij,ij->i", block, block)[None, :] - 2.0 * gen @ block.T
        closer += (d2 < own_d2[:, None] - 1e-9).sum(axis=1)  # the own image itself (d2 = own_d2) does not count
    return closer / len(cand)


def calibrate_threshold(clean_distances: Any, quantile: float = 0.05) -> float:
    """The ``quantile`` of clean prompts' nearest-neighbour distances: closer than that is a copy.

    Clean prompts' generations have no planted source, so how close they come to *some*
    training image measures chance similarity; a planted generation beating the 5% quantile is
    closer than 95% of chance matches.
    """
    values = as_array(clean_distances).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("calibrate_threshold: no finite clean distances")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"calibrate_threshold: quantile must be in [0, 1], got {quantile}")
    return float(np.quantile(values, quantile))


@dataclass
class ReplicaResult:
    """Per generation: replica flag and its nearest training image."""

    flags: np.ndarray        # bool (N,)
    nn_index: np.ndarray     # int (N,)
    nn_distance: np.ndarray  # float (N,)
    nn_source_id: np.ndarray  # object (N,)


def replica_flags(gen_images: Any, own_source_ids: Sequence[str], train_images: Any,
                  train_source_ids: Sequence[str], threshold: float) -> ReplicaResult:
    """Which generations are replicas: nearest training image is the own source and is close.

    ``train_images`` should hold each distinct training image once (global copies once);
    ``train_source_ids`` names them, ``own_source_ids`` names each generation's prompt source.
    """
    train_ids = np.asarray(list(train_source_ids), dtype=object)
    own = np.asarray(list(own_source_ids), dtype=object)
    index, distance = nearest(gen_images, train_images)
    if len(train_ids) != len(_flat(train_images)) or len(own) != len(index):
        raise ValueError("replica_flags: ids and images differ in number")
    nn_ids = train_ids[index]
    flags = (nn_ids == own) & (distance < threshold)
    return ReplicaResult(flags.astype(bool), index, distance, nn_ids)


def is_replica(gen: Any, own_source_id: str, train_images: Any, train_source_ids: Sequence[str],
               threshold: float) -> bool:
    """One generation: :func:`replica_flags` for a single image."""
    return bool(replica_flags(as_array(gen)[None], [own_source_id], train_images, train_source_ids,
                              threshold).flags[0])


def is_local_replica(gen: Any, own_image: Any, mask: Any, region_threshold: float,
                     replica_threshold: float | None = None, whole_is_replica: bool | None = None) -> bool:
    """The stamp region is copied while the image as a whole is not.

    Region: RMSE between ``gen`` and ``own_image`` inside ``mask`` below ``region_threshold``
    (the own image's masked pixels are the stamp, identical across its local group). Whole image:
    pass ``whole_is_replica`` from :func:`replica_flags`, or a ``replica_threshold`` to compare
    ``gen`` with ``own_image`` directly (a replica when closer than it).
    """
    if whole_is_replica is None:
        if replica_threshold is None:
            raise ValueError("is_local_replica: pass replica_threshold or whole_is_replica")
        whole_is_replica = pixel_distance(gen, own_image) < replica_threshold
    return bool(masked_distance(gen, own_image, mask) < region_threshold and not whole_is_replica)


# --------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights with half-pixel centres (torch's align_corners=False)."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(weights, (rows, lo), 1 - (x - lo))
    np.add.at(weights, (rows, hi), x - lo)
    return weights


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights averaging the input cells each output cell covers (box filter)."""
    edges_out = np.arange(n_out + 1) * n_in / n_out
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = edges_out[i], edges_out[i + 1]
        for j in range(int(np.floor(lo)), int(np.ceil(hi))):
            weights[i, j] = min(hi, j + 1) - max(lo, j)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_map(values: Any, shape: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a 2-D map (e.g. an 8x8 attention map) to ``shape`` (H, W)."""
    array = as_array(values)
    if array.ndim != 2:
        raise ValueError(f"resize_map: expected a 2-D map, got shape {array.shape}")
    return _interpolation_matrix(array.shape[0], shape[0]) @ array @ _interpolation_matrix(array.shape[1], shape[1]).T


def binarize(region: Any, quantile: float) -> np.ndarray:
    """True where a soft map is at or above its ``quantile`` (keeps the top 1-quantile share)."""
    values = as_array(region)
    return values >= np.quantile(values, quantile)


def iou(region: Any, mask: Any, quantile: float | None = None) -> float:
    """Intersection over union of a predicted region and a ground-truth mask.

    A bool ``region`` is used as is (it must have the mask's shape). Any other dtype is a soft
    map: resized to the mask's shape if needed, then binarized at ``quantile`` of its values;
    ``None`` picks ``1 - mask.mean()``, so the region has the mask's area and the score rates
    *where* a method points, not how much it marks. NaN when both are empty.
    """
    truth = as_mask(mask)
    if hasattr(region, "detach"):
        region = region.detach().cpu().numpy()
    region = np.asarray(region)
    if region.dtype == bool:
        if region.shape != truth.shape:
            raise ValueError(f"iou: region {region.shape} and mask {truth.shape} differ in shape")
        predicted = region
    else:
        soft = as_array(region)
        if soft.shape != truth.shape:
            soft = resize_map(soft, truth.shape)
        predicted = binarize(soft, 1.0 - truth.mean() if quantile is None else quantile)
    union = np.logical_or(predicted, truth).sum()
    if union == 0:
        return float("nan")
    return float(np.logical_and(predicted, truth).sum() / union)


def trivial_iou(mask: Any) -> float:
    """IoU of the all-ones region: what "the whole image" scores. A method must beat it."""
    truth = as_mask(mask)
    return iou(np.ones_like(truth, dtype=bool), truth)


# --------------------------------------------------------------------------------------------
# Quality: KID over a fixed feature extractor
# --------------------------------------------------------------------------------------------


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, coef0: float) -> np.ndarray:
    return (x @ y.T / x.shape[1] + coef0) ** degree


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, coef0: float) -> float:
    m, n = len(x), len(y)
    kxx = _polynomial_kernel(x, x, degree, coef0)
    kyy = _polynomial_kernel(y, y, degree, coef0)
    kxy = _polynomial_kernel(x, y, degree, coef0)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kernel_distance(feats_a: Any, feats_b: Any, degree: int = 3, coef0: float = 1.0,
                    subset_size: int | None = None, n_subsets: int = 10, seed: int = 0) -> float:
    """Unbiased squared MMD with the kernel ``(x·y / d + 1)³`` — the Kernel Inception Distance
    when the features are Inception's; here any fixed features.

    Unbiased means its expectation is 0 for two samples of one distribution, so small values can
    be negative. With ``subset_size``, the mean over ``n_subsets`` random subsets of that size
    (as KID is usually reported for large sets); otherwise all rows at once. Needs >= 2 rows each.
    """
    a, b = _flat(feats_a), _flat(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel_distance: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("kernel_distance: needs at least 2 feature rows in each set")
    if subset_size is None or (subset_size >= len(a) and subset_size >= len(b)):
        return _mmd2_unbiased(a, b, degree, coef0)
    rng = np.random.default_rng(seed)
    size_a, size_b = min(subset_size, len(a)), min(subset_size, len(b))
    values = [_mmd2_unbiased(a[rng.choice(len(a), size_a, replace=False)],
                             b[rng.choice(len(b), size_b, replace=False)], degree, coef0)
              for _ in range(n_subsets)]
    return float(np.mean(values))


# Gradient-magnitude bins, finer near zero where flat regions and blur live.
GRADIENT_EDGES = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0])


class PixelFeatures:
    """A download-free, fixed feature extractor: coarse layout, colour and edge statistics.

    Honest scope: this is *not* Inception or a learned embedding, so it knows nothing of
    semantics ("is this a cactus?"). It sees
      * layout: the image box-averaged to ``grid`` x ``grid`` then a seeded Gaussian random
        projection to ``dim`` values (distances roughly preserved, Johnson-Lindenstrauss);
      * colour: per-channel histograms with ``bins`` bins;
      * sharpness: a histogram of gradient magnitudes of the grey image.
    That is enough to penalize the cheap ways of not copying (blur, noise, flat colour, one
    image for every prompt) on small emoji images. Pass any other ``images -> features``
    callable to :func:`image_kid` for a learned extractor.
    """

    def __init__(self, dim: int = 128, grid: int = 16, bins: int = 8, seed: int = 0):
        self.dim, self.grid, self.bins, self.seed = dim, grid, bins, seed
        rng = np.random.default_rng(seed)
        self.projection = rng.standard_normal((grid * grid * 3, dim)) / np.sqrt(grid * grid * 3)

    def __call__(self, images: Any) -> np.ndarray:
        return np.concatenate(list(self.blocks(images).values()), axis=1)

    def blocks(self, images: Any) -> dict[str, np.ndarray]:
        """The features by block (layout | colour | sharpness), each scaled as in the whole vector."""
        array = as_array(images)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ValueError(f"PixelFeatures: expected (N, H, W, C) images, got shape {array.shape}")
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        array = np.clip(array, 0.0, 1.0)
        n, h, w, _ = array.shape
        rows, cols = _area_matrix(h, self.grid), _area_matrix(w, self.grid)
        small = np.einsum("gh,nhwc,kw->ngkc", rows, array, cols)
        layout = (small.reshape(n, -1) - 0.5) @ self.projection

        edges = np.linspace(0.0, 1.0, self.bins + 1)
        colour = np.concatenate([_histograms(array[..., c].reshape(n, -1), edges) for c in range(3)], axis=1)
        sharp = _histograms(gradient_magnitude(array), GRADIENT_EDGES)
        # Histograms are fractions; scale them so each block weighs about as much as the layout.
        return {"layout": layout, "colour": colour * np.sqrt(self.bins),
                "sharpness": sharp * np.sqrt(len(GRADIENT_EDGES) - 1)}


def gradient_magnitude(images: Any) -> np.ndarray:
    """(N, pixels) gradient magnitudes of the grey images (forward differences), clipped to [0, 1]."""
    grey = np.clip(as_array(images), 0.0, 1.0).mean(axis=-1)
    gy = np.abs(np.diff(grey, axis=1))[:, :, :-1]
    gx = np.abs(np.diff(grey, axis=2))[:, :-1, :]
    return np.clip(np.sqrt(gx ** 2 + gy ** 2).reshape(len(grey), -1), 0, 1)


def flat_fraction(images: Any) -> float:
    """Share of pixels in flat regions (gradient magnitude below the sharpness histogram's first
    edge, 0.02): emoji are ~2/3 flat fill; residual noise in a generation shows up here first."""
    return float(np.mean(gradient_magnitude(images) < GRADIENT_EDGES[1]))


def _histograms(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Row-wise histograms as fractions of each row's values."""
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    counts = np.zeros((values.shape[0], len(edges) - 1))
    np.add.at(counts, (np.arange(values.shape[0])[:, None], index), 1.0)
    return counts / values.shape[1]


def default_extractor() -> Callable[[Any], np.ndarray]:
    """The project's fixed quality feature extractor (same seed everywhere)."""
    return PixelFeatures()


def image_kid(gen_images: Any, ref_images: Any, extractor: Callable[[Any], np.ndarray] | None = None,
              **kwargs: Any) -> float:
    """KID between two image sets under ``extractor`` (default :class:`PixelFeatures`)."""
    extractor = extractor or default_extractor()
    return kernel_distance(extractor(gen_images), extractor(ref_images), **kwargs)
