"""What the de-duplication finds on each planted kind of a testbed (issue 22): its recall, its
false merges and the weights the rows end up with.

``python -m launch.testbed.dedup_recall --testbed DIR [--config OVERLAY.yaml ...] [key=value ...] [--out FILE.md]``

The settings are a training run's: configs/testbed/common.yaml, then the ``--config`` overlays
(default: configs/mitigation/dedup_best.yaml), then ``key=value`` overrides, with ``data.path``
set to ``--testbed`` (``mitigate.dedup.`` may be left out of a key: ``region_min_count=20``).
The weights come from :class:`train.mitigate.dedup.Dedup`'s own ``prepare`` over the training
rows (``data.filter_*``: held-out rows are never trained), so they are what a trainer would use
(cached under ``model.cache_dir``, shared with training); the whole-image groups behind them are
:func:`train.mitigate.dedup.image_groups`, the tile maps
:func:`train.mitigate.dedup.region_dedup_weights`.

Per kind (``group`` column), over its training rows; a *set* is the rows of one
``planted_group`` (the rows copying one thing; a v5 testbed has none: global rows of one file,
local rows of one stamp form the set):

* recall: the share of rows the whole-image grouping puts in a group with another row of their
  own set; sets hit: the sets with at least one such row;
* false merges: the share of rows grouped with a row of another set or a clean row (a clean
  row: with any other row, its false positives);
* for kinds with masks (local, template, moving_local): the share of mask pixels under
  down-weighted tiles (tile weight < 1, after dilation: pixel recall), and the share of rows
  with any masked pixel down-weighted; for every kind the share of rows with any tile
  down-weighted (for clean rows: the region false positives);
* the mean row weight ``prepare`` gives (a loss weight, a sampling weight with ``by: sampling``,
  a chance to keep the caption with ``by: caption``; 1 without ``images``), the mean tile weight
  over the image and under the mask.

Masks are compared with the tile map at the mask's resolution (tile of a pixel = its position
times tiles / side): exact for the testbed's square images, whose training view is a resize.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from launch.testbed.reading import emit_table, load_mask

REPO = Path(__file__).resolve().parents[2]
COMMON = REPO / "configs" / "testbed" / "common.yaml"
DEFAULT_OVERLAY = REPO / "configs" / "mitigation" / "dedup_best.yaml"
KIND_ORDER = ("global", "near_global", "local", "template", "moving_local", "caption_dup", "clean")

log = logging.getLogger(__name__)


def dedup_config(testbed: str | Path, configs: list[str] | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The run config a trainer on ``testbed`` with these overlays and overrides would have."""
    from train.config import load_config
    from train.mitigate.dedup import DedupConfig

    fields = {f.name for f in dataclasses.fields(DedupConfig)}
    items = []
    for item in overrides or []:
        key = item.split("=", 1)[0]
        items.append(f"mitigate.dedup.{item}" if "." not in key and key in fields else item)
    return load_config([str(COMMON)] + [str(c) for c in (configs or [DEFAULT_OVERLAY])],
                       [f"data.path={Path(testbed).expanduser()}"] + items)


@dataclasses.dataclass
class DedupOutcome:
    """The de-duplication's view of the training rows, in table order."""

    rows: list[dict]               # the table's metadata rows (group, planted_group, mask_file, ...)
    root: Path
    groups: np.ndarray | None      # whole-image group id per row (None: mitigate.dedup.images off)
    row_weights: np.ndarray        # what prepare() gives each row (1 where it gives nothing)
    tiles: np.ndarray | None       # (rows, tiles, tiles) region weights (None: regions off)


def dedup_outcome(cfg: DictConfig) -> DedupOutcome:
    """Run the de-duplication as the trainer does (same table, same calls, same caches)."""
    from data.datasets import load_table, resolve_source
    from train.mitigate.base import BuildContext
    from train.mitigate.dedup import Dedup, dedup_weights, image_groups, region_dedup_weights

    dcfg, cache = cfg.mitigate.dedup, cfg.model.cache_dir
    problem = Dedup.check(dcfg, cfg)
    if problem:
        raise SystemExit(f"dedup_recall: {problem}")
    if not Dedup.active(dcfg):
        raise SystemExit("dedup_recall: mitigate.dedup is off (set images=true and/or regions=true)")
    data_cfg = resolve_source(cfg.data, cache, cfg.seed)
    table, root = load_table(data_cfg, cache)
    dedup = Dedup(dcfg, BuildContext(cfg.seed, None, None, cfg.train.caption_dropout, data_cfg, cache))
    sampling = dedup.prepare(table, root)
    given = next((w for w in (sampling, dedup.rows, dedup.keep_caption) if w is not None), None)
    row_weights = np.ones(len(table)) if given is None else np.asarray(given, dtype=np.float64)
    groups = tiles = None
    image_column = data_cfg.image_column
    if dcfg.images:
        how = (dcfg.max_distance, dcfg.embedding, dcfg.sscd_threshold, dcfg.sscd_model)
        groups = image_groups(table, image_column, root, *how)
        cached = dedup_weights(table, image_column, cache, root, *how)
        if not np.allclose(1.0 / np.bincount(groups)[groups], cached):
            log.warning("the cached whole-image weights in %s do not match the groups computed now "
                        "(a stale cache?): the groups reported are today's", cache)
    if dcfg.regions:  # the same cached call prepare() made (with region_scope: image too)
        tiles = region_dedup_weights(table, image_column, data_cfg.resolution, cache, root, dcfg.region_tiles,
                                     dcfg.region_min_count, dcfg.region_dilate)
    names = [c for c in table.column_names if c != image_column]
    rows = [dict(zip(names, values)) for values in zip(*(table[c] for c in names))]
    return DedupOutcome(rows, Path(root if root is not None else data_cfg.path), groups, row_weights, tiles)


def planted_set(row: dict) -> str:
    """The rows copying one thing share this: ``planted_group`` (v6), else one per global file and
    per local stamp (v5), else the row alone (clean)."""
    if row.get("planted_group"):
        return str(row["planted_group"])
    if row.get("group") == "global":  # the image folder's table has no file_name column: the source names it
        return f"global:{row.get('source_id') or row.get('file_name')}"
    if row.get("group") == "local" and row.get("local_group") is not None:
        return f"local-{row['local_group']}"
    return f"row:{row.get('sample_id', id(row))}"


def at_pixels(tile_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (tiles, tiles) map read at every pixel of an image of ``shape`` (nearest tile)."""
    ty = np.arange(shape[0]) * tile_map.shape[0] // shape[0]
    tx = np.arange(shape[1]) * tile_map.shape[1] // shape[1]
    return tile_map[np.ix_(ty, tx)]


def recall_by_kind(outcome: DedupOutcome) -> dict[str, dict]:
    """Per kind: the numbers of the table (shares in [0, 1]; None where they do not apply)."""
    rows = outcome.rows
    sets = [planted_set(r) for r in rows]
    own = other = None
    if outcome.groups is not None:
        members: dict[int, list[int]] = {}
        for i, g in enumerate(outcome.groups):
            members.setdefault(int(g), []).append(i)
        own = np.array([any(sets[j] == sets[i] for j in members[int(outcome.groups[i])] if j != i)
                        for i in range(len(rows))])
        other = np.array([any(sets[j] != sets[i] for j in members[int(outcome.groups[i])])
                          for i in range(len(rows))])
    kinds = sorted({r["group"] for r in rows}, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k))
    out: dict[str, dict] = {}
    for kind in kinds:
        idx = [i for i, r in enumerate(rows) if r["group"] == kind]
        clean = kind == "clean"
        s: dict = {"rows": len(idx), "sets": None if clean else len({sets[i] for i in idx})}
        s["recall"] = None if own is None or clean else float(own[idx].mean())
        s["sets_hit"] = None if own is None or clean else len({sets[i] for i in idx if own[i]})
        s["false_merges"] = None if other is None else float(other[idx].mean())
        s["row_weight"] = float(outcome.row_weights[idx].mean())
        masked = [i for i in idx if rows[i].get("mask_file")]
        tiles = outcome.tiles
        s["any_tile"] = None if tiles is None else float((tiles[idx] < 1).any(axis=(1, 2)).mean())
        s["tile_weight"] = None if tiles is None else float(tiles[idx].mean())
        s["pixel_recall"] = s["rows_pixel"] = s["mask_weight"] = None
        if tiles is not None and masked:
            under, total, hit, weight = 0, 0, 0, 0.0
            for i in masked:
                mask = load_mask(outcome.root, rows[i])
                weights = at_pixels(tiles[i], mask.shape)[mask]
                under += int((weights < 1).sum())
                total += int(mask.sum())
                hit += bool((weights < 1).any())
                weight += float(weights.sum())
            s["pixel_recall"] = under / max(total, 1)
            s["rows_pixel"] = hit / len(masked)
            s["mask_weight"] = weight / max(total, 1)
        out[kind] = s
    return out


def settings_line(cfg: DictConfig) -> str:
    d = cfg.mitigate.dedup
    parts = []
    if d.images:
        how = (f"dhash + 8x8 thumbnail within {d.max_distance}" if d.embedding == "hash"
               else f"{d.embedding} descriptors linked at cosine >= {d.sscd_threshold}")
        parts.append(f"images ({how}), by {d.by}")
    if d.regions:
        parts.append(f"regions ({d.region_tiles}x{d.region_tiles} tiles shared by >= {d.region_min_count} images, "
                     f"dilate {d.region_dilate}, scope {d.region_scope})")
    return "; ".join(parts)


def report_lines(cfg: DictConfig, outcome: DedupOutcome, stats: dict[str, dict]) -> list[str]:
    def share(v):
        return "—" if v is None else f"{v:.3f}"

    def number(v, digits=3):
        return "—" if v is None else f"{v:.{digits}f}"

    n = len(outcome.rows)
    head = [f"De-duplication of `{cfg.data.path}`: {settings_line(cfg)}."]
    if outcome.groups is not None:
        sizes = np.bincount(outcome.groups)
        head.append(f"{n} training rows in {len(sizes)} whole-image groups; "
                    f"{int((sizes[outcome.groups] > 1).sum())} rows share a group.")
    if outcome.tiles is not None:
        head.append(f"{int((outcome.tiles < 1).any(axis=(1, 2)).sum())} of {n} rows have a down-weighted tile.")
    lines = [" ".join(head), "",
             "| kind | rows | sets | recall (grouped with own set) | sets hit | false merges | "
             "mask px down-weighted | rows with masked px down-weighted | rows with any tile down-weighted | "
             "mean row weight | mean tile weight | mean tile weight under mask |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, s in stats.items():
        hit = "—" if s["sets_hit"] is None else f"{s['sets_hit']}/{s['sets']}"
        lines.append(f"| {kind} | {s['rows']} | {'—' if s['sets'] is None else s['sets']} | {share(s['recall'])} | "
                     f"{hit} | {share(s['false_merges'])} | {share(s['pixel_recall'])} | {share(s['rows_pixel'])} | "
                     f"{share(s['any_tile'])} | {number(s['row_weight'])} | {number(s['tile_weight'])} | "
                     f"{number(s['mask_weight'])} |")
    lines += ["", "False merges of clean rows: grouped with any other row (clean rows copy nothing); their "
              "down-weighted tiles are the region false positives."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.testbed.dedup_recall", description=__doc__.split("\n\n")[0])
    p.add_argument("--testbed", required=True, help="a built testbed folder (python -m data.testbed)")
    p.add_argument("--config", action="append", default=[], metavar="OVERLAY.yaml",
                   help="config overlays after configs/testbed/common.yaml (repeatable; default: "
                        "configs/mitigation/dedup_best.yaml)")
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides; mitigate.dedup keys may be given bare (region_min_count=20)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    cfg = dedup_config(a.testbed, a.config, a.overrides)
    outcome = dedup_outcome(cfg)
    emit_table(report_lines(cfg, outcome, recall_by_kind(outcome)), a.out)
    log.info("dedup_recall: %.1f s", time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
