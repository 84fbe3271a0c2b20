"""The training set as the evaluation sees it: each distinct image once, loaded with the framing
the model was trained on, plus the probe prompts drawn from it.

Rows that point at the same file (duplicated samples, the testbed's global copies) count once:
a duplicate would otherwise fill the k nearest neighbours of Carlini's normalization with one
image and make every close generation look like a copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from data.datasets import BadSampleError, ImageTransform, MapDataset


def _root(data_cfg) -> Path | None:
    path = Path(str(data_cfg.path)).expanduser() if data_cfg.path else None
    return path if path is not None and path.is_dir() else None


def _image_key(value: Any) -> str:
    """A cheap identity for an undecoded image cell: its file path, else a hash of its bytes."""
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        if value.get("bytes"):
            return "sha1:" + hashlib.sha1(value["bytes"]).hexdigest()
    return str(value)


@dataclass
class TrainingSet:
    """Distinct training images of a `datasets` table (image column undecoded, as load_table gives)."""

    table: Any
    data_cfg: Any
    resolution: int
    rows: list[int]              # the first table row of each distinct image
    members: list[list[int]]     # every table row showing that image
    sample_ids: list[str]
    captions: list[str]
    fingerprint: str             # changes when files, their order or the resolution change
    # every row's sample id (or, without an id column, its row number as text) -> its image's
    # position: a flagged repeat of an image finds the image, whichever of its rows was flagged
    position_of_id: dict[str, int] = field(default_factory=dict, repr=False)
    _dataset: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dataset(self) -> MapDataset:
        if self._dataset is None:
            transform = ImageTransform(self.resolution, center_crop=True, random_flip=False)
            self._dataset = MapDataset(self.table, self.data_cfg, transform, seed=0, root=_root(self.data_cfg))
        return self._dataset

    def load_row(self, row: int) -> np.ndarray:
        """Table row ``row`` as float32 [H, W, 3] in [0, 1] (centre crop at the resolution)."""
        pixels = self.dataset.load(row, 0)["pixel_values"]  # [3, H, W] in [-1, 1]
        return ((pixels.permute(1, 2, 0).numpy() + 1.0) / 2.0).clip(0.0, 1.0).astype(np.float32)

    def images(self, positions: Sequence[int]) -> np.ndarray:
        """Distinct images ``positions`` (indices into ``rows``); an unreadable one is black, so
        positions keep their meaning (it can never be anyone's nearest copy of a real image)."""
        out = np.zeros((len(positions), self.resolution, self.resolution, 3), dtype=np.float32)
        for i, position in enumerate(positions):
            try:
                out[i] = self.load_row(self.rows[position])
            except BadSampleError:
                pass
        return out

    def position_of_row(self, row: int) -> int | None:
        return self._row_to_position.get(row)

    def __post_init__(self) -> None:
        self._row_to_position = {r: p for p, rs in enumerate(self.members) for r in rs}

    # ---- ground truth (the testbed's columns) -----------------------------------------------

    def mask(self, row: int, shape: tuple[int, int]) -> np.ndarray | None:
        """The row's ground-truth copied region as bool ``shape`` when the data has one
        (``mask_file``, as the testbed writes for local copies), else None."""
        if "mask_file" not in self.table.column_names:
            return None
        relative = self.table[row]["mask_file"]
        root = _root(self.data_cfg)
        if not relative or root is None:
            return None
        with Image.open(root / relative) as image:
            mask = image.convert("L")
            if mask.size != (shape[1], shape[0]):
                mask = mask.resize((shape[1], shape[0]), Image.NEAREST)
            return np.asarray(mask) > 127

    def column(self, name: str, row: int) -> Any:
        return self.table[row][name] if name in self.table.column_names else None


def training_set(table, data_cfg, resolution: int) -> TrainingSet:
    """Group the table's rows by image and fingerprint the result for feature caching."""
    captions = table[data_cfg.caption_column]
    ids = table[data_cfg.id_column] if data_cfg.id_column in table.column_names else None
    first: dict[str, int] = {}
    members: dict[str, list[int]] = {}
    # In batches: a data set with embedded image bytes must not be pulled into memory whole.
    row = 0
    for batch in table.select_columns([data_cfg.image_column]).iter(batch_size=1024):
        for cell in batch[data_cfg.image_column]:
            key = _image_key(cell)
            first.setdefault(key, row)
            members.setdefault(key, []).append(row)
            row += 1
    keys = list(first)
    digest = hashlib.sha256(f"v1|{resolution}".encode())
    for key in keys:
        digest.update(key.encode())
        path = Path(key)
        if not key.startswith("sha1:") and path.is_file():
            stat = path.stat()
            digest.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    rows = [first[k] for k in keys]
    position_of_id = {str(ids[r]) if ids is not None else str(r): p for p, k in enumerate(keys) for r in members[k]}
    return TrainingSet(
        table=table, data_cfg=data_cfg, resolution=resolution, rows=rows, members=[members[k] for k in keys],
        sample_ids=[str(ids[r]) if ids is not None else hashlib.sha1(keys[p].encode()).hexdigest()[:12]
                    for p, r in enumerate(rows)],
        captions=[str(captions[r] or "") for r in rows], fingerprint=digest.hexdigest()[:16],
        position_of_id=position_of_id)


# --------------------------------------------------------------------------------------------
# Probe prompts
# --------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """A prompt to generate from, and what we know about it."""

    prompt: str
    kind: str = "user"           # flagged | train | heldout | user
    sample_id: str | None = None  # the training sample the prompt is the caption of
    row: int | None = None        # its table row (ground-truth masks, own image)


def _random_order(trainset: TrainingSet, seed: int, column: str | None) -> list[int]:
    """Distinct images in a seeded random order; with ``column`` (e.g. a ground-truth ``group``),
    round-robin over its values, so rare groups get the same share as common ones."""
    rng = np.random.default_rng(seed)
    if not column or column not in trainset.table.column_names:
        return [int(p) for p in rng.permutation(len(trainset))]
    groups: dict[str, list[int]] = {}
    for position, row in enumerate(trainset.rows):
        groups.setdefault(str(trainset.table[row][column]), []).append(position)
    order = {g: [int(p) for p in rng.permutation(ps)] for g, ps in sorted(groups.items())}
    out: list[int] = []
    while any(order.values()):
        for g in sorted(order):
            if order[g]:
                out.append(order[g].pop(0))
    return out


def select_probes(cfg, trainset: TrainingSet | None, flagged_ids: Sequence[str] = (),
                  heldout_prompts: Sequence[str] = (), seed: int = 0) -> list[Probe]:
    """``cfg.num_prompts`` probes: the top flagged samples (``flagged_ids``, most suspicious
    first), held-out prompts, then random training captions; empty shares go to the last group.
    The same seed gives the same probes, so evals at different steps compare like with like."""
    total = cfg.num_prompts
    probes: list[Probe] = []
    used: set[int] = set()
    if trainset is not None and flagged_ids:
        by_id = {**trainset.position_of_id, **{sid: p for p, sid in enumerate(trainset.sample_ids)}}
        for sid in flagged_ids:
            if len(probes) >= round(total * cfg.flagged_fraction):
                break
            position = by_id.get(str(sid))
            if position is not None and position not in used:
                used.add(position)
                probes.append(Probe(trainset.captions[position], "flagged", trainset.sample_ids[position],
                                    trainset.rows[position]))
    heldout = list(dict.fromkeys([*cfg.heldout_prompts, *heldout_prompts]))
    probes += [Probe(p, "heldout") for p in heldout[:round(total * cfg.heldout_fraction)]]
    if trainset is not None:
        for position in _random_order(trainset, seed, getattr(cfg, "stratify_column", None)):
            if len(probes) >= total:
                break
            if int(position) not in used and trainset.captions[position]:
                used.add(int(position))
                probes.append(Probe(trainset.captions[position], "train", trainset.sample_ids[position],
                                    trainset.rows[position]))
    return probes[:total]
