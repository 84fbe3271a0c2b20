"""The memorization testbed builder: planted copies with known ground truth.

``python -m data.testbed --out DIR`` (or :func:`build_testbed`) writes a plain image folder with
clean, held-out, globally duplicated and locally stamped images and ground-truth columns in its
``metadata.jsonl``; :mod:`data.testbed.build` describes the layout. The measures that score
generations against it live in the product (:mod:`train.evaluate.measures`) and the experiment
drivers that use both in :mod:`launch.testbed`; this package imports only ``train.util``.
"""

from data.testbed.build import TestbedParams, build_testbed, ensure_testbed, read_knobs, testbed_path, write_testbed
from data.testbed.captions import caption_token_count

__all__ = [
    "TestbedParams", "build_testbed", "ensure_testbed", "read_knobs", "testbed_path", "write_testbed",
    "caption_token_count",
]
