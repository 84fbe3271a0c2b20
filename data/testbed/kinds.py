"""The testbed's v6 planted kinds: memorization that a pixel hash and fixed tiles cannot see.

v5 plants pixel-exact repeats (``global``) and one stamp at one fixed place (``local``); a
difference hash and fixed tiles find both before training. Real copying in Stable Diffusion comes
mostly from near-duplicates, shared layouts ("templates") and one caption on many images, so v6
adds four kinds (each off by default; :mod:`data.testbed.build` deals the images and writes rows):

* ``near_global``: every row a *different* transform of one source picture (crop and rescale,
  shift, small rotation, colour jitter, JPEG re-encode, a thin border or a small unrelated
  overlay). :func:`near_copy` draws one.
* ``template``: images that share a card (a patterned frame and header band) and differ in the
  object drawn inside it. :func:`template_card` draws the card and its mask (the frame pixels);
  the object never overlaps the frame, so the mask is exactly the copied region.
* ``caption_dup``: different images that share one caption word for word (no shared pixels).
* ``moving_local``: a group's stamp at a different position, scale and opacity in every image
  (:func:`moving_placement`), so its mask is per image.

Every function here is a pure function of its inputs and a ``numpy`` generator, so a build stays
byte-identical for a seed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

WHITE = (255, 255, 255)
TEMPLATE_PATTERNS = ("striped", "checked", "dotted", "banded")
# (name, frame colour, second colour of the pattern)
TEMPLATE_COLOURS = (
    ("blue", (40, 80, 200), (150, 180, 240)), ("red", (200, 40, 50), (245, 160, 160)),
    ("green", (30, 140, 60), (160, 220, 160)), ("gold", (200, 150, 20), (250, 220, 130)),
    ("purple", (120, 50, 160), (200, 160, 230)), ("teal", (0, 130, 130), (140, 215, 215)),
)
# Words for the shared caption of a caption_dup group: a "kind" the images are said to be.
CAPTION_DUP_WORDS = ("harbor", "meadow", "canyon", "lantern", "orchard", "glacier", "bazaar", "lagoon")


# --------------------------------------------------------------------------------------------
# near_global: transformed copies of one picture
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NearCopyRanges:
    """How far a near-duplicate may move from its source (the issue's ranges as defaults)."""

    crop: tuple[float, float] = (0.6, 1.0)       # kept side as a fraction of the source's
    shift: float = 0.1                           # translation, fraction of the side, each axis
    rotate: float = 12.0                         # degrees, either way
    jitter: float = 0.2                          # brightness, contrast, colour: factor in 1 +- jitter
    jpeg: tuple[int, int] = (30, 90)             # JPEG quality range of the re-encode
    extra: tuple[float, float] = (0.3, 0.3)      # chance of a thin border, of a small overlay (else none)


def near_copy(rgba: Image.Image, resolution: int, rng: np.random.Generator,
              ranges: NearCopyRanges = NearCopyRanges()) -> np.ndarray:
    """One near-duplicate of ``rgba`` (rendered at >= 4x ``resolution``) as (res, res, 3) uint8.

    The geometric steps run on the large render (no aliasing at 32 px); colour, border, overlay
    and the JPEG round trip on the final size, where a web re-encode would happen.
    """
    big = Image.new("RGBA", rgba.size, WHITE + (255,))
    big.alpha_composite(rgba)
    big = big.convert("RGB")
    side = big.size[0]
    angle = float(rng.uniform(-ranges.rotate, ranges.rotate))
    dx, dy = (float(v) for v in rng.uniform(-ranges.shift, ranges.shift, size=2) * side)
    big = big.rotate(angle, resample=Image.Resampling.BICUBIC, translate=(dx, dy), fillcolor=WHITE)
    keep = float(rng.uniform(*ranges.crop))
    crop = int(round(keep * side))
    x0, y0 = (int(v) for v in rng.integers(0, side - crop + 1, size=2))
    small = big.crop((x0, y0, x0 + crop, y0 + crop)).resize((resolution, resolution), Image.Resampling.LANCZOS)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        small = enhance(small).enhance(float(rng.uniform(1 - ranges.jitter, 1 + ranges.jitter)))
    extra = float(rng.uniform())
    pen = ImageDraw.Draw(small)
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    if extra < ranges.extra[0]:
        pen.rectangle((0, 0, resolution - 1, resolution - 1), outline=colour, width=1)
    elif extra < ranges.extra[0] + ranges.extra[1]:
        size = max(2, resolution // 8)
        x, y = (int(v) for v in rng.integers(0, resolution - size + 1, size=2))
        pen.ellipse((x, y, x + size - 1, y + size - 1), fill=colour)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=int(rng.integers(ranges.jpeg[0], ranges.jpeg[1] + 1)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


# --------------------------------------------------------------------------------------------
# template: a shared card around a varying object
# --------------------------------------------------------------------------------------------


@dataclass
class Template:
    """A card: the pixels every member shares, where they are, and where its object goes."""

    name: str                            # "blue striped": the caption says "on the blue striped card"
    rgb: np.ndarray                      # (res, res, 3) uint8, the interior left white
    mask: np.ndarray                     # (res, res) bool, True on the card's own pixels (frame + header)
    interior: tuple[int, int, int, int]  # (x0, y0, x1, y1) where the object is drawn

    @property
    def phrase(self) -> str:
        return f"on the {self.name} card"


def template_card(index: int, resolution: int) -> Template:
    """Card ``index``: a patterned frame with a header band; colours and patterns cycle together,
    so the first 12 cards all differ in both."""
    name, frame, second = TEMPLATE_COLOURS[index % len(TEMPLATE_COLOURS)]
    pattern = TEMPLATE_PATTERNS[index % len(TEMPLATE_PATTERNS)]
    res = resolution
    border, header = max(2, res // 10), max(3, res // 5)
    interior = (border, header, res - border, res - border)
    mask = np.ones((res, res), dtype=bool)
    mask[interior[1]:interior[3], interior[0]:interior[2]] = False
    yy, xx = np.mgrid[0:res, 0:res]
    if pattern == "striped":
        second_at = ((xx + yy) // 2) % 2 == 1
    elif pattern == "checked":
        second_at = ((xx // 2) + (yy // 2)) % 2 == 1
    elif pattern == "dotted":
        second_at = (xx % 3 == 1) & (yy % 3 == 1)
    else:  # banded: the header in the second colour, the frame plain
        second_at = yy < header
    rgb = np.empty((res, res, 3), dtype=np.uint8)
    rgb[:] = WHITE
    rgb[mask] = frame
    rgb[mask & second_at] = second
    return Template(f"{name} {pattern}", rgb, mask, interior)


def on_template(template: Template, rgba: Image.Image) -> np.ndarray:
    """The object (RGBA, any size) scaled to fit the card's interior, centred, on the card."""
    x0, y0, x1, y1 = template.interior
    side = min(x1 - x0, y1 - y0)
    sprite = rgba.convert("RGBa").resize((side, side), Image.Resampling.LANCZOS).convert("RGBA")
    inside = Image.new("RGBA", (x1 - x0, y1 - y0), WHITE + (255,))
    inside.alpha_composite(sprite, ((x1 - x0 - side) // 2, (y1 - y0 - side) // 2))
    out = template.rgb.copy()
    out[y0:y1, x0:x1] = np.asarray(inside.convert("RGB"))
    return out


# --------------------------------------------------------------------------------------------
# moving_local: a stamp anywhere, at any scale and opacity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where one image of a moving_local group carries its stamp."""

    size: int      # stamp side in pixels
    x0: int
    y0: int
    opacity: float


# corners a stamp with anchors is drawn near, in the order anchors take them: top-left, bottom-right,
# top-right, bottom-left (as (x, y) with 0 = the low edge, 1 = the high edge)
ANCHORS = ((0, 0), (1, 1), (1, 0), (0, 1))


def moving_placement(resolution: int, scale: tuple[float, float], min_opacity: float,
                     rng: np.random.Generator, anchors: int = 0, jitter: float = 0.15) -> Placement:
    """A box of side ``scale`` x resolution and an opacity in [min, 1]. ``anchors`` = 0: anywhere
    inside the image; k > 0: in one of the first k corners of ANCHORS (drawn per image), moved
    inward by up to ``jitter`` x resolution on each axis (a watermark's usual places, never one tile)."""
    size = int(round(float(rng.uniform(*scale)) * resolution))
    size = min(max(size, 4), resolution)
    if anchors:
        ax, ay = ANCHORS[int(rng.integers(0, anchors))]
        room = resolution - size
        x0, y0 = (min(room, int(rng.integers(0, int(jitter * resolution) + 1))) for _ in range(2))
        x0, y0 = (room - x0 if ax else x0), (room - y0 if ay else y0)
    else:
        x0, y0 = (int(v) for v in rng.integers(0, resolution - size + 1, size=2))
    return Placement(size, x0, y0, round(float(rng.uniform(min_opacity, 1.0)), 3))


def paste_stamp(image: np.ndarray, stamp_rgb: np.ndarray, footprint: np.ndarray, where: Placement) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with the stamp blended in at ``where``; and the mask of the pixels it covers."""
    out = image.astype(np.float64)
    box = (slice(where.y0, where.y0 + where.size), slice(where.x0, where.x0 + where.size))
    region = out[box]
    region[footprint] = (1 - where.opacity) * region[footprint] + where.opacity * stamp_rgb[footprint]
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[box] = footprint
    return np.rint(out).astype(np.uint8), mask
