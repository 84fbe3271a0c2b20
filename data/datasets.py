"""Training data: image folders, `datasets` data sets and webdataset shards -> batches.

Every sample carries a stable ``sample_id`` (from the data, else a hash of the image bytes), its
caption and the list of alternate captions, and an integer ``index`` (row number, -1 for streams)
so the per-sample ledger can use dense arrays.

Order is a pure function of (seed, epoch, position), never of a library's hidden RNG, which is what
makes resume exact: map-style data draws one permutation per epoch and gives each rank every
``world``-th batch of it; streams give each rank and worker a fixed share of the shards and skip
what they already produced. Augmentation (random crop, flip) is seeded per sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from train.util import seed_of

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class DataError(ValueError):
    """Data that cannot be trained on; the message names the sample or setting."""


class BadSampleError(DataError):
    """A missing or corrupt image or an empty caption, with data.on_bad_sample=error."""


# --------------------------------------------------------------------------------------------
# Image preprocessing (PIL + numpy; torchvision cannot be relied on beside every torch build)
# --------------------------------------------------------------------------------------------


@dataclass
class ImageTransform:
    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = to_rgb(image)
        w, h = image.size
        scale = self.resolution / min(w, h)
        size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
        w, h = image.size
        if self.center_crop:
            left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
        else:
            left, top = rng.randint(0, w - self.resolution), rng.randint(0, h - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (icons and emoji are drawn on transparency)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, where: str, max_pixels: Optional[int] = None,
                 max_aspect_ratio: Optional[float] = None) -> Image.Image:
    """The decoded image; its size is checked from the header first, so an image too large to
    decode, or one that would resize huge, costs nothing (see :func:`check_image_size`)."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its pixel limit and raises above twice it; max_pixels decides here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        check_image_size(image.size, where, max_pixels, max_aspect_ratio)
        image.load()
        return image
    except BadSampleError:
        raise
    except Image.DecompressionBombError as exc:  # above twice PIL's limit: it never returns the image
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise BadSampleError(f"image too large {where}: {found.group(1) if found else 'too many'} pixels, "
                             f"more than data.max_image_pixels={max_pixels} and PIL's own limit (shrink it)") from exc
    except UnidentifiedImageError as exc:  # its message names a BytesIO object, not the file
        raise BadSampleError(f"corrupt image {where}: not an image file PIL can read "
                             "(unknown format or damaged data)") from exc
    except Exception as exc:  # a damaged file can make a decoder raise almost anything
        raise BadSampleError(f"corrupt image {where}: {type(exc).__name__}: {exc}") from exc


def check_image_size(size: tuple[int, int], where: str, max_pixels: Optional[int],
                     max_aspect_ratio: Optional[float]) -> None:
    """Refuse, before decoding, what would cost far more than its file size suggests: a 20000 x
    20000 PNG of a few KB decodes to 400 MB, and a 1 x 400000 one is resized (short side to the
    resolution, then cropped) to 32 x 12.8M pixels at resolution 32."""
    w, h = size
    if w < 1 or h < 1:
        raise BadSampleError(f"corrupt image {where}: it is {w}x{h} pixels")
    if max_pixels is not None and w * h > max_pixels:
        raise BadSampleError(f"image too large {where}: {w}x{h} pixels, more than data.max_image_pixels="
                             f"{max_pixels} (shrink it, or raise data.max_image_pixels)")
    ratio = max(w, h) / min(w, h)
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        raise BadSampleError(f"image too elongated {where}: {w}x{h} pixels, aspect ratio {ratio:.4g} above "
                             f"data.max_aspect_ratio={max_aspect_ratio:g} (crop it, or raise data.max_aspect_ratio)")


def image_limits(cfg: DictConfig) -> dict:
    """decode_image's size limits from a data config (configs saved before they existed: none)."""
    return {"max_pixels": cfg.get("max_image_pixels"), "max_aspect_ratio": cfg.get("max_aspect_ratio")}


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links resolved, is ``root`` or below it (links resolved too)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except (OSError, ValueError):
        return False


def clean_captions(text: Any, alternates: Any, where: str) -> list[str]:
    """The primary caption first, then distinct non-empty alternates; empty primary is bad."""
    text = (text or "").strip() if isinstance(text, str) else ""
    if not text:
        raise BadSampleError(f"empty caption for {where}")
    captions = [text]
    for alt in alternates or []:
        if isinstance(alt, str) and alt.strip() and alt.strip() not in captions:
            captions.append(alt.strip())
    return captions


# --------------------------------------------------------------------------------------------
# Map-style data: image folders and `datasets` data sets
# --------------------------------------------------------------------------------------------


class MapDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` whose image column is left undecoded, so bad images are ours to handle.

    Items are requested as ``(index, epoch, batch)`` tuples by :class:`EpochBatchSampler`.
    """

    def __init__(self, table, cfg: DictConfig, transform: ImageTransform, seed: int, root: Optional[Path]):
        self.table, self.cfg, self.transform, self.seed, self.root = table, cfg, transform, seed, root
        self.has_ids = cfg.id_column in table.column_names
        self.has_alternates = cfg.captions_column in table.column_names

    def __len__(self) -> int:
        return len(self.table)

    def _image_bytes(self, value: Any, where: str) -> bytes:
        if isinstance(value, dict) and value.get("bytes"):
            return value["bytes"]
        path = value.get("path") if isinstance(value, dict) else value
        if not path:
            raise BadSampleError(f"no image for {where}")
        path = Path(path)
        # An image folder's paths, and relative paths of a `datasets` folder, belong to the data
        # folder: a link out of it (to /etc/passwd, another data set) is not read unless allowed.
        # (Absolute paths a `datasets` table holds are that data set's own choice.)
        contained = self.root is not None and (self.cfg.source == "imagefolder" or not path.is_absolute())
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        if contained and not self.cfg.get("allow_symlinks", False) and not inside(path, self.root):
            raise BadSampleError(f"image {path} ({where}) resolves to {os.path.realpath(path)}, outside the "
                                 f"data folder {self.root}; copy it in, or set data.allow_symlinks=true to follow links")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise BadSampleError(f"missing image {path} ({where}): {exc.strerror or exc}") from exc

    def load(self, index: int, epoch: int) -> dict:
        row = self.table[index]
        where = f"row {index}" + (f", sample_id {row[self.cfg.id_column]}" if self.has_ids else "")
        value = row[self.cfg.image_column]
        name = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        where = f"{name} ({where})" if name else where  # the file, when the row names one
        captions = clean_captions(row.get(self.cfg.caption_column),
                                  row.get(self.cfg.captions_column) if self.has_alternates else None, where)
        data = self._image_bytes(value, where)
        image = decode_image(data, where, **image_limits(self.cfg))
        sample_id = str(row[self.cfg.id_column]) if self.has_ids else hashlib.sha1(data).hexdigest()
        rng = random.Random(seed_of(self.seed, epoch, index))
        return {"pixel_values": self.transform(image, rng), "text": captions[0], "captions": captions,
                "sample_id": sample_id, "index": index}

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        index, epoch, batch = key
        bad: list[str] = []
        # A bad sample is replaced by the next good row: deterministic, and the batch keeps its
        # size, so every rank runs the same shapes. The count travels with the batch.
        for offset in range(len(self)):
            try:
                sample = self.load((index + offset) % len(self), epoch)
                break
            except BadSampleError as exc:
                if self.cfg.on_bad_sample == "error":
                    raise BadSampleError(f"{exc} (set data.on_bad_sample=skip to skip bad samples)") from None
                log.warning("skipping bad sample: %s", exc)
                bad.append(f"row {(index + offset) % len(self)}")
        else:
            raise DataError("every sample in the data set is bad (missing/corrupt images or empty captions)")
        sample.update(epoch=epoch, batch=batch, bad=bad)
        return sample


class EpochBatchSampler(torch.utils.data.Sampler):
    """Endless batches of ``(index, epoch, batch)``: one seeded permutation per epoch, each rank
    taking every ``world``-th batch of it, starting anywhere (exact resume without replaying).

    With ``weights`` (one per row, >= 0; shuffled epochs only) an epoch holds ``floor(sum of weights / max weight)``
    rows drawn in proportion to their weights: a row repeated r times with weight 1 / r comes
    about once per epoch, and every batch slot trains at full weight (see :meth:`order`)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, shuffle: bool,
                 start_epoch: int = 0, start_batch: int = 0, weights: Optional[torch.Tensor] = None):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.weights = None
        if weights is not None:
            if not shuffle:
                raise DataError("sampling weights draw each epoch at random: they need shuffle=True")
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (n,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) \
                    or float(weights.max()) <= 0:
                raise DataError(f"sampling weights must be {n} finite values >= 0, not all zero")
            self.weights = weights / weights.max()  # <= 1: a row is drawn at most once per epoch
        self.epoch_rows = n if self.weights is None else int(self.weights.sum())
        self.batches_per_epoch = self.epoch_rows // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise DataError(f"an epoch has {self.epoch_rows} samples, fewer than one global batch "
                            f"({batch_size} per device x {world} processes)")
        self.start_epoch, self.start_batch = start_epoch, start_batch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(seed_of(self.seed, "epoch", epoch))
        perm = torch.randperm(self.n, generator=generator)
        if self.weights is None:
            return perm
        # Systematic sampling along the shuffled rows: lay their weights end to end and keep the
        # row under each of epoch_rows evenly spaced points (random offset). A row's chance is
        # its weight x epoch_rows / total (<= 1), and the epoch length is fixed, which keeps
        # every rank's batch count equal and resume positions valid.
        ends = torch.cumsum(self.weights[perm], 0)
        step = float(ends[-1]) / self.epoch_rows
        points = (float(torch.rand((), generator=generator, dtype=torch.float64)) + torch.arange(
            self.epoch_rows, dtype=torch.float64)) * step
        # (the clamp only guards the last point against float rounding at the very end)
        return perm[torch.searchsorted(ends, points, right=True).clamp(max=self.n - 1)]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, batch = self.start_epoch, self.start_batch
        while True:
            order = self.order(epoch)
            for b in range(batch, self.batches_per_epoch):
                start = (b * self.world + self.rank) * self.batch_size
                yield [(int(i), epoch, b) for i in order[start:start + self.batch_size]]
            epoch, batch = epoch + 1, 0


MAX_WARNED_LINES = 20  # bad metadata lines warned one by one; the rest are counted


def read_metadata(root: Path, on_bad_sample: str, skipped: Optional[list] = None):
    """An image folder's ``metadata.jsonl`` as the table `datasets`' imagefolder loader makes
    (an undecoded ``image`` column first, with absolute paths, then the other keys in order of
    first appearance; rows in file order), read here line by line so that a bad line is named
    by file and line number: not UTF-8, not a JSON object, no ``file_name``, or a ``file_name``
    that leaves the folder. ``on_bad_sample=skip`` leaves such lines out with a warning and
    appends ``"<file>:<line>"`` to ``skipped``; ``error`` refuses the file.

    A missing image is not a bad line: it is a bad sample when (if ever) it is loaded, as before.
    """
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    meta = root / "metadata.jsonl"
    base = Path(os.path.realpath(root))  # as the imagefolder loader: links in data.path resolved
    paths: list[str] = []
    rows: list[dict] = []
    bad: list[tuple[int, str]] = []
    digest = hashlib.sha256(str(base).encode())
    with open(meta, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                bad.append((number, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                    "save the file as UTF-8"))
                continue
            except json.JSONDecodeError as exc:
                bad.append((number, f"not JSON ({exc.msg} at column {exc.colno})"))
                continue
            name = row.get("file_name") if isinstance(row, dict) else None
            if not isinstance(row, dict):
                bad.append((number, "not a JSON object"))
            elif not isinstance(name, str) or not name.strip():
                bad.append((number, "no file_name"))
            elif os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
                bad.append((number, f"file_name {name!r} leaves the data folder (file names are relative to "
                                    f"{root} and stay inside it)"))
            else:
                path = str(base / os.path.normpath(name))
                paths.append(path)
                rows.append(row)
                digest.update(raw)
                try:  # changed images change the fingerprint (caches keyed by it, e.g. dedup)
                    stat = os.stat(path)
                    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
                except OSError:
                    digest.update(b"missing")
    if bad:
        first = f"{meta}:{bad[0][0]}: {bad[0][1]}"
        if on_bad_sample == "error":
            more = f" (and {len(bad) - 1} more bad line(s))" if len(bad) > 1 else ""
            raise DataError(f"{first}{more}; fix the line, or set data.on_bad_sample=skip to leave bad lines out")
        for number, problem in bad[:MAX_WARNED_LINES]:
            log.warning("skipping bad metadata line %s:%d: %s", meta, number, problem)
        if len(bad) > MAX_WARNED_LINES:
            log.warning("skipping %d more bad line(s) of %s", len(bad) - MAX_WARNED_LINES, meta)
        if skipped is not None:
            skipped.extend(f"{meta}:{number}" for number, _ in bad)
    if not rows:
        raise DataError(f"{meta} has no usable rows" + (f" ({len(bad)} bad line(s), e.g. {first})" if bad else ""))
    if any("image" in row for row in rows):
        raise DataError(f"{meta}: a key is named 'image', the column the image files get; rename it")
    order = list(dict.fromkeys("image" if key == "file_name" else key for row in rows for key in row))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    arrays = {}
    for key in order:  # the image column where file_name was, as the `datasets` loader
        if key == "image":
            arrays[key] = pa.array([{"bytes": None, "path": p} for p in paths], type=image_type)
            continue
        values = [row.get(key) for row in rows]
        try:
            arrays[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"{meta}: the values of '{key}' do not share one type ({exc}); "
                            "make them all text, all numbers or all lists") from exc
    arrow = pa.Table.from_pydict(arrays)
    features = datasets.Features.from_arrow_schema(arrow.schema)
    features["image"] = datasets.Image(decode=False)
    # A fingerprint from the content, so it is the same on every rank and in every run
    return datasets.Dataset(InMemoryTable(arrow), info=datasets.DatasetInfo(features=features),
                            split=datasets.Split.TRAIN, fingerprint=digest.hexdigest()[:16])


def load_table(cfg: DictConfig, cache_dir: str, skipped: Optional[list] = None):
    """The `datasets` table behind map-style sources, with the image column left undecoded.

    ``skipped``: a list that gets ``"<file>:<line>"`` for each bad metadata.jsonl line left out
    (data.on_bad_sample=skip), so the caller can count them with the bad samples."""
    import datasets

    if cfg.source == "imagefolder":
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise DataError(f"data.path={cfg.path}: image folder not found")
        if not (root / "metadata.jsonl").is_file() and not (root / "metadata.csv").is_file():
            raise DataError(f"data.path={cfg.path}: no metadata.jsonl with file_name and {cfg.caption_column} "
                            "columns (an image folder without captions cannot train a text-to-image model)")
        if (root / "metadata.jsonl").is_file():
            if cfg.split != "train":
                raise DataError(f"data.split={cfg.split}: an image folder has one split, 'train'; to train on "
                                "part of it set data.filter_column and data.filter_value")
            table = read_metadata(root, cfg.on_bad_sample, skipped)
        else:  # metadata.csv: the `datasets` loader reads it
            table = datasets.load_dataset("imagefolder", data_dir=str(root), split=cfg.split)
    else:  # "hf": a name on the hub (cached), a folder of data files, or a save_to_disk folder
        path = Path(cfg.path).expanduser()
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                table = table[cfg.split]
        else:
            table = datasets.load_dataset(cfg.path, split=cfg.split)
        root = path if path.is_dir() else None
    for column in (cfg.image_column, cfg.caption_column):
        if column not in table.column_names:
            key = "data.image_column" if column == cfg.image_column else "data.caption_column"
            raise DataError(f"data set {cfg.path} has no column '{column}' (columns: "
                            f"{', '.join(table.column_names)}); set {key}")
    if isinstance(table.features[cfg.image_column], datasets.Image):
        table = table.cast_column(cfg.image_column, datasets.Image(decode=False))
    if cfg.filter_column:
        if cfg.filter_column not in table.column_names:
            raise DataError(f"data.filter_column '{cfg.filter_column}' is not a column of {cfg.path}")
        keep = [str(v) == str(cfg.filter_value) for v in table[cfg.filter_column]]
        table = table.select([i for i, k in enumerate(keep) if k])
    if len(table) == 0:
        raise DataError(f"data set {cfg.path} has no rows" + (" after the filter" if cfg.filter_column else ""))
    return table, root


# --------------------------------------------------------------------------------------------
# Streaming data: webdataset shards
# --------------------------------------------------------------------------------------------


def expand_shards(pattern: str) -> list[str]:
    import braceexpand

    urls = []
    for part in str(pattern).split("::"):
        urls += list(braceexpand.braceexpand(part))
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).expanduser().is_file()]
    if missing:
        raise DataError(f"data.path: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return [str(Path(u).expanduser()) if u in local else u for u in urls]


class ShardStream(torch.utils.data.IterableDataset):
    """Endless samples from tar shards; each (rank, worker) reads its own shards in a seeded order.

    ``skip_batches`` is how many batches this rank already consumed; each worker skips the samples
    it produced for them (the DataLoader takes batches from workers in turn), so a resumed run
    continues the same stream.
    """

    def __init__(self, urls: list[str], cfg: DictConfig, transform: ImageTransform, seed: int,
                 rank: int, world: int, batch_size: int, skip_batches: int = 0):
        self.urls, self.cfg, self.transform, self.seed = urls, cfg, transform, seed
        self.rank, self.world, self.batch_size, self.skip_batches = rank, world, batch_size, skip_batches
        workers = max(1, cfg.num_workers)
        if len(urls) < world * workers:
            raise DataError(f"{len(urls)} shard(s) cannot feed {world} process(es) x {workers} worker(s): "
                            "write more shards or lower data.num_workers")

    def _raw(self, shards: list[str]) -> Iterator[dict]:
        import webdataset as wds

        pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
        yield from pipeline

    def _decode(self, raw: dict, epoch: int) -> dict:
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
            text = raw["txt"].decode("utf-8") if "txt" in raw else meta.get(self.cfg.caption_column)
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise BadSampleError(f"unreadable caption or metadata in {where}: {exc}") from exc
        if not isinstance(meta, dict):
            raise BadSampleError(f"metadata of {where} is not a JSON object")
        captions = clean_captions(text, meta.get(self.cfg.captions_column), where)
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None:
            raise BadSampleError(f"no image ({'/'.join(IMAGE_KEYS)}) in {where}")
        image = decode_image(raw[key], where, **image_limits(self.cfg))
        sample_id = str(meta.get(self.cfg.id_column) or hashlib.sha1(raw[key]).hexdigest())
        rng = random.Random(seed_of(self.seed, epoch, sample_id))
        return {"pixel_values": self.transform(image, rng), "text": captions[0], "captions": captions,
                "sample_id": sample_id, "index": -1, "epoch": epoch, "batch": -1}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Batches alternate between workers, worker 0 first. After k batches the next one must come
        # from the stream that made batch k, so a fresh loader's worker w takes over stream
        # (w + k) % workers, which had made every workers-th batch.
        worker = (worker + self.skip_batches) % workers
        mine = max(0, (self.skip_batches - worker + workers - 1) // workers)
        skip = mine * self.batch_size
        bad: list[str] = []
        epoch = 0
        while True:
            shards = list(self.urls)
            random.Random(seed_of(self.seed, "shards", epoch)).shuffle(shards)
            shards = shards[self.rank::self.world][worker::workers]
            rng = random.Random(seed_of(self.seed, "buffer", epoch, self.rank, worker))
            buffer: list[dict] = []
            for raw in self._shuffled(self._raw(shards), rng, buffer):
                try:
                    sample = self._decode(raw, epoch)
                except BadSampleError as exc:
                    if self.cfg.on_bad_sample == "error":
                        raise BadSampleError(f"{exc} (set data.on_bad_sample=skip to skip bad samples)") from None
                    if skip == 0:
                        log.warning("skipping bad sample: %s", exc)
                        bad.append(f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}")
                    continue
                if skip > 0:  # already trained on before the resume
                    skip -= 1
                    continue
                sample["bad"], bad = bad, []
                yield sample
            epoch += 1

    def _shuffled(self, stream: Iterator[dict], rng: random.Random, buffer: list) -> Iterator[dict]:
        size = max(1, self.cfg.shuffle_buffer)
        for item in stream:
            buffer.append(item)
            if len(buffer) >= size:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


def collate(samples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "text": [s["text"] for s in samples],
        "captions": [s["captions"] for s in samples],
        "sample_id": [s["sample_id"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "epoch": samples[0]["epoch"],
        "batch": samples[0]["batch"],
        "bad": [b for s in samples for b in s["bad"]],  # where the bad samples that were skipped are
    }


@dataclass
class DataPosition:
    """Where the next batch starts: map-style (epoch, batch in epoch); streams: batches consumed."""

    epoch: int = 0
    batch: int = 0
    batches_consumed: int = 0


@dataclass
class TrainData:
    loader: torch.utils.data.DataLoader
    num_samples: Optional[int]  # None for streams
    batches_per_epoch: Optional[int]
    table: Any = None  # the `datasets` table (map-style), for eval hooks and the ledger
    root: Optional[Path] = None  # folder that relative image paths in the table start from


def resolve_source(cfg: DictConfig, cache_dir: str, seed: int) -> DictConfig:
    """Sources the project makes itself become an image folder on first use."""
    if cfg.source == "shapes":
        from data.shapes import ensure_shapes

        cfg = cfg.copy()
        cfg.path = str(ensure_shapes(Path(cache_dir).expanduser() / "data", cfg.shapes.num_samples,
                                     cfg.shapes.image_size, seed=seed))
        cfg.source = "imagefolder"
    return cfg


def build_train_data(cfg: DictConfig, *, batch_size: int, seed: int, rank: int, world: int,
                     cache_dir: str, position: DataPosition | None = None, table: Optional[tuple] = None,
                     sample_weights: Optional[torch.Tensor] = None) -> TrainData:
    """The training loader. ``table``: ``load_table``'s (table, root), when the caller already has
    it; ``sample_weights``: one per row, rows drawn in proportion (map-style data only)."""
    position = position or DataPosition()
    transform = ImageTransform(cfg.resolution, cfg.center_crop, cfg.random_flip)
    common = dict(num_workers=cfg.num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                  persistent_workers=cfg.num_workers > 0)
    if cfg.source == "webdataset":
        stream = ShardStream(expand_shards(cfg.path), cfg, transform, seed, rank, world, batch_size,
                             skip_batches=position.batches_consumed)
        loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, **common)
        return TrainData(loader, None, None)
    table, root = table if table is not None else load_table(cfg, cache_dir)
    dataset = MapDataset(table, cfg, transform, seed, root)
    sampler = EpochBatchSampler(len(dataset), batch_size, rank, world, seed, shuffle=True,
                                start_epoch=position.epoch, start_batch=position.batch, weights=sample_weights)
    if position.batch >= sampler.batches_per_epoch:
        raise DataError(f"cannot resume at batch {position.batch} of an epoch that now has "
                        f"{sampler.batches_per_epoch} batches (did the data set or batch size change?)")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **common)
    return TrainData(loader, len(dataset), sampler.batches_per_epoch, table, root)
