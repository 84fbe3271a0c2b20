"""A small captioned image set that copyguard draws itself: coloured shapes on coloured grounds.

It backs the embedded default (`data.source: shapes`) so `accelerate launch train/finetune.py`
runs on a fresh machine with no downloads. Captions say what is drawn ("a red circle on a blue
background") and carry alternates, so caption mitigations have something to draw from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from train.util import build_once

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.3, "large": 0.6}


def draw(shape: str, size: float, fg: tuple, bg: tuple, image_size: int, cx: float, cy: float) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), bg)
    pen = ImageDraw.Draw(image)
    r = size * image_size / 2
    x, y = cx * image_size, cy * image_size
    if shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=fg)
    elif shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=fg)
    elif shape == "triangle":
        pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fg)
    else:
        pen.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fg)
    return image


def build_shapes(out_dir: Path, num_samples: int, image_size: int, seed: int) -> None:
    rng = random.Random(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(COLOURS)
    for i in range(num_samples):
        shape, size_name = rng.choice(SHAPES), rng.choice(list(SIZES))
        fg, bg = rng.sample(names, 2)
        cx, cy = (rng.uniform(0.35, 0.65) for _ in range(2))
        file_name = f"images/{i:05d}.png"
        draw(shape, SIZES[size_name], COLOURS[fg], COLOURS[bg], image_size, cx, cy).save(out_dir / file_name)
        text = f"a {size_name} {fg} {shape} on a {bg} background"
        captions = [text, f"a {fg} {shape} on {bg}", f"{bg} background with a {size_name} {fg} {shape}"]
        rows.append({"file_name": file_name, "text": text, "captions": captions, "sample_id": f"shapes-{i:05d}"})
    with open(out_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def ensure_shapes(cache_dir: Path, num_samples: int, image_size: int, seed: int = 0) -> Path:
    """Build once per (size, count, seed) into the cache, atomically; return the folder."""
    target = Path(cache_dir) / f"shapes-n{num_samples}-s{image_size}-seed{seed}"
    return build_once(target, "metadata.jsonl", lambda tmp: build_shapes(tmp, num_samples, image_size, seed))
