"""``python -m data.testbed --out DIR [--config KNOBS.yaml] [--resolution 32] [--seed 0] [--source openmoji|folder:PATH] [knobs]``

Writes a plain image folder: train on it with ``data.source=imagefolder data.path=DIR
data.filter_column=split data.filter_value=train`` (held-out rows never train). ``--config`` reads
the knobs from a YAML mapping (configs/testbed/data.yaml); flags given as well win over it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from data.testbed.build import TestbedParams, build_testbed, read_knobs

HELP = {
    "resolution": "image side in pixels (build at the training resolution: masks are pixel-exact)",
    "seed": "seed for every random choice; same seed and versions = same bytes",
    "source": "openmoji | folder:PATH (metadata.jsonl with file_name/text, or images with .txt captions)",
    "n_clean": "images seen once", "n_heldout": "images never trained (split=heldout)",
    "n_global": "images duplicated whole", "global_repeats": "rows per global image",
    "n_local_groups": "groups sharing a stamp and a caption phrase", "local_per_group": "images per local group",
    "stamp": "auto | emoji | shape (auto: emoji for openmoji, shape for folders)",
    "stamp_size": "stamp box side / image side (0.5 = a corner quarter)",
    "stamp_corner": "cycle | br | tl | tr | bl", "local_background": "each local group shares a pale background",
    "n_captions": "captions per image (text + alternates)",
    "max_name_tokens": "skip images whose name is longer (-1 auto, 0 no limit)",
    "min_filler_words": "neutral filler words every caption ends with",
    "token_levels": "spread of caption token targets (odd)", "char_levels": "spread of character jitter (odd)",
    "min_distance": "minimum pixel RMSE between any two images",
    "dedupe_variants": "OpenMoji: one image per skin-tone/gender family",
    "n_near_global": "v6: pictures planted as near-duplicates (each row a different transform)",
    "near_global_copies": "v6: rows per near_global picture",
    "n_templates": "v6: cards (frame + header) shared by different objects", "template_per_group": "v6: images per card",
    "n_caption_dup": "v6: captions shared word for word by different images",
    "caption_dup_per_group": "v6: images per shared caption",
    "caption_dup_repeats": "v6: rows per caption_dup image (> 1: the image repeated pixel for pixel)",
    "n_moving_groups": "v6: stamps placed at varied position, scale and opacity", "moving_per_group": "v6: images per stamp",
    "moving_scale_min": "v6: smallest stamp side / image side", "moving_scale_max": "v6: largest stamp side / image side",
    "moving_min_opacity": "v6: lowest stamp opacity",
    "moving_anchors": "v6: 0 = moving stamps anywhere; k = near one of k corners, jittered",
}

CHOICES = {"stamp": ("auto", "emoji", "shape"), "stamp_corner": ("cycle", "br", "tl", "tr", "bl")}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.testbed", description=__doc__.strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--config", help="YAML file of knobs (the names below with underscores); flags win")
    defaults = TestbedParams()
    for f in fields(TestbedParams):
        default = getattr(defaults, f.name)
        kind = {bool: _bool, int: int, float: float}.get(type(default), str)
        if f.name == "max_name_tokens":
            kind = int
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default,
                       choices=CHOICES.get(f.name), help=HELP[f.name])
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    known, _ = p.parse_known_args(argv)
    if known.config:  # the file's knobs become the defaults, so flags on the command line still win
        try:
            p.set_defaults(**read_knobs(known.config))
        except (OSError, ValueError) as exc:
            p.error(str(exc))
    args = vars(p.parse_args(argv))
    out, overwrite = args.pop("out"), args.pop("overwrite")
    args.pop("config")
    if args["max_name_tokens"] == 0:
        args["max_name_tokens"] = None
    start = time.time()
    root = build_testbed(out, overwrite=overwrite, **args)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    print(json.dumps({"out": str(root), "seconds": round(time.time() - start, 1), **manifest["counts"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
