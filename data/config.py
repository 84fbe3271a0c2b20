"""The ``data`` section of the run config: where the training data is and how it is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from train.util import bounded, choice


@dataclass
class ShapesDataConfig:
    """The small synthetic data set copyguard makes itself for the embedded default."""

    num_samples: int = 256
    image_size: int = 64


@dataclass
class DataConfig:
    source: str = choice("imagefolder", "hf", "webdataset", "shapes")
    path: Optional[str] = None  # folder, data set name/path, or shard pattern ("a/{000..009}.tar")
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    captions_column: str = "captions"  # optional list of alternate captions
    id_column: str = "sample_id"  # optional; a content hash otherwise
    filter_column: Optional[str] = None  # keep only rows whose filter_column == filter_value
    filter_value: Optional[str] = None
    resolution: int = bounded(512, ge=8)
    center_crop: bool = True
    random_flip: bool = False
    num_workers: int = bounded(2, ge=0)
    on_bad_sample: str = choice("skip", "error")  # skip (count + warn) | error
    # Bad samples, not loaded: resizing the short side of a 1 x 400000 image to data.resolution
    # makes a 32 x 12.8M one (seconds and gigabytes); the centre crop keeps little of it anyway.
    max_aspect_ratio: float = bounded(10.0, ge=1.0)  # longer side / shorter side, checked before decoding
    # Decoding costs memory and time in proportion (a 20000 x 20000 PNG is a few KB on disk). The
    # default is PIL's decompression-bomb limit; PIL itself refuses more than twice that.
    max_image_pixels: int = bounded(89_478_485, ge=1, le=178_956_970)  # width x height
    # Off: an image path must stay inside the data folder after links are resolved (a link to
    # /etc/passwd or another data set is a bad sample). On: links are followed anywhere.
    allow_symlinks: bool = False
    shuffle_buffer: int = bounded(1000, ge=1)  # webdataset only: sample shuffle buffer per worker
    shapes: ShapesDataConfig = field(default_factory=ShapesDataConfig)
