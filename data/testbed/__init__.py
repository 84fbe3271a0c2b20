"""The memorization testbed: planted copies with known ground truth, and the measures that score them.

``python -m data.testbed --out DIR`` (or :func:`build_testbed`) writes an image folder with clean,
held-out, globally duplicated and locally stamped images; :mod:`data.testbed.measures` holds the
ground-truth replica, region and quality measures every other part of copyguard uses. See
:mod:`data.testbed.build` for the folder layout and how duplicates and held-out rows are stored.
"""

from data.testbed.build import TestbedParams, build_testbed, ensure_testbed, write_testbed
from data.testbed.captions import caption_token_count
from data.testbed.measures import (
    PixelFeatures,
    calibrate_threshold,
    default_extractor,
    flat_fraction,
    image_kid,
    iou,
    is_local_replica,
    is_replica,
    kernel_distance,
    masked_distance,
    nearest,
    own_rank,
    pixel_distance,
    replica_flags,
    resize_map,
    trivial_iou,
)

__all__ = [
    "TestbedParams", "build_testbed", "ensure_testbed", "write_testbed", "caption_token_count",
    "PixelFeatures", "calibrate_threshold", "default_extractor", "flat_fraction", "image_kid", "iou", "is_local_replica",
    "is_replica", "kernel_distance", "masked_distance", "nearest", "own_rank", "pixel_distance", "replica_flags",
    "resize_map", "trivial_iou",
]
