"""Read a built testbed back: rows, images as float arrays, masks, the distinct training images.

Small helpers so evaluation code does not re-derive the folder's conventions (rows repeat files
for global copies; held-out rows share the metadata; global rows have no mask file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def read_manifest(root: str | Path) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text(encoding="utf-8"))


def read_rows(root: str | Path, split: str | None = None, group: str | None = None) -> list[dict]:
    """Rows of ``metadata.jsonl``, optionally only one split ("train"/"heldout") or group."""
    rows = [json.loads(line) for line in (Path(root) / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [r for r in rows if (split is None or r["split"] == split) and (group is None or r["group"] == group)]


def load_image(root: str | Path, relative: str) -> np.ndarray:
    """An image of the testbed as float32 (H, W, 3) in [0, 1]."""
    with Image.open(Path(root) / relative) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_mask(root: str | Path, row: dict) -> np.ndarray | None:
    """The row's ground-truth region as bool (H, W): the stamp for local rows, everything for
    global rows (the whole image is the copy), None for clean and held-out rows."""
    if row.get("mask_file"):
        with Image.open(Path(root) / row["mask_file"]) as mask:
            return np.asarray(mask.convert("L")) > 127
    if row["group"] == "global":
        with Image.open(Path(root) / row["file_name"]) as image:
            return np.ones((image.height, image.width), dtype=bool)
    return None


def placements(root: str | Path, group: str = "moving_local") -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Every (image, mask) of each sub-group (local stamp, card, moving stamp), in file order."""
    out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for row in read_rows(root, split="train", group=group):
        out.setdefault(row["local_group"], []).append((load_image(root, row["file_name"]), load_mask(root, row)))
    return out


def stamps(root: str | Path, group: str = "local") -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each sub-group's shared region: (the sub-group's first image, its mask), for the local
    stamps or (``group="template"``) the v6 cards. Every image of a sub-group carries the same
    pixels under the mask, so one image stands for the stamp or card."""
    return {g: members[0] for g, members in placements(root, group).items()}


@dataclass
class TrainingImages:
    """Each distinct training image once (global copies collapsed), for nearest-neighbour search."""

    images: np.ndarray       # float32 (N, H, W, 3)
    file_names: list[str]
    source_ids: list[str]
    groups: list[str]
    planted_groups: list[str | None]  # v6 testbeds: the rows copying one thing share it (None: clean, v5)


def training_images(root: str | Path, with_sources: bool = False) -> TrainingImages:
    """Every distinct training image once; ``with_sources`` adds the pictures the v6 near_global
    copies were made from (never trained themselves, but what a generation copying any of the
    transformed copies reproduces)."""
    seen: dict[str, dict] = {}
    for row in read_rows(root, split="train"):
        seen.setdefault(row["file_name"], row)
        if with_sources and row.get("source_file", row["file_name"]) != row["file_name"]:
            seen.setdefault(row["source_file"], row)
    files = sorted(seen)
    return TrainingImages(np.stack([load_image(root, f) for f in files]), files,
                          [seen[f]["source_id"] for f in files], [seen[f]["group"] for f in files],
                          [seen[f].get("planted_group") for f in files])


def evaluation_draws(run: str | Path) -> list[tuple[dict, np.ndarray]]:
    """Each evaluation draw of a run (``eval/``, ``eval-seed<k>/``): its ``eval.json`` and its
    generations as float (prompts, seeds, H, W, 3) in [0, 1]."""
    files = sorted(Path(run).glob("eval*/eval.json"))
    if not files:
        raise FileNotFoundError(f"{run}: no eval*/eval.json (evaluate the run first)")
    return [(json.loads(f.read_text()), np.load(f.parent / "generations.npz")["images"].astype(np.float64) / 255.0)
            for f in files]


def heldout_images(root: str | Path) -> np.ndarray:
    """The held-out images (the quality reference), float32 (N, H, W, 3); N may be 0."""
    images = [load_image(root, r["file_name"]) for r in read_rows(root, split="heldout")]
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), dtype=np.float32)


def emit_table(lines: list[str], out: str | Path | None = None) -> str:
    """Print a markdown table (its lines) and, with ``out``, also write it there."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
    return text
