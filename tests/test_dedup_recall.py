"""launch.testbed.dedup_recall: the de-duplication's recall per planted kind of a v6 testbed (issue 22)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data.testbed import build_testbed
from launch.testbed.dedup_recall import at_pixels, dedup_config, dedup_outcome, main, recall_by_kind

V6 = dict(n_clean=12, n_heldout=4, n_global=1, global_repeats=2, n_local_groups=1, local_per_group=3,
          n_near_global=2, near_global_copies=6, n_templates=2, template_per_group=3, n_caption_dup=2,
          caption_dup_per_group=3, n_moving_groups=2, moving_per_group=4)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    return build_testbed(tmp_path_factory.mktemp("v6") / "data", resolution=32, seed=0, **V6)


def stats(testbed, cache, *overrides):
    cfg = dedup_config(testbed, overrides=[f"model.cache_dir={cache}", *overrides])
    return cfg, recall_by_kind(dedup_outcome(cfg))


def test_known_answers_with_the_best_settings(testbed, tmp_path):
    cfg, s = stats(testbed, tmp_path / "cache")
    assert cfg.mitigate.dedup.images and cfg.mitigate.dedup.by == "sampling"
    assert cfg.mitigate.dedup.region_min_count == 48  # dedup_best.yaml is the default overlay
    assert "heldout" not in s  # held-out rows are never trained
    assert {k: v["rows"] for k, v in s.items()} == {"global": 2, "near_global": 12, "local": 3, "template": 6,
                                                    "moving_local": 8, "caption_dup": 6, "clean": 12}
    g = s["global"]  # two rows of one file: one group, each drawn half as often
    assert (g["recall"], g["sets_hit"], g["sets"], g["false_merges"]) == (1.0, 1, 1, 0.0)
    assert g["row_weight"] == pytest.approx(0.5)
    assert s["clean"]["false_merges"] == 0.0 and s["clean"]["row_weight"] == 1.0
    assert s["caption_dup"]["recall"] == 0.0  # different images: nothing for a hash to see
    # 3 images share the stamp: below 48, no tile is down-weighted anywhere
    assert all(v["any_tile"] == 0.0 for v in s.values())
    assert s["local"]["pixel_recall"] == 0.0 and s["local"]["mask_weight"] == 1.0
    assert s["global"]["pixel_recall"] is None  # no mask file: a whole-image kind


def test_tiles_find_the_fixed_stamp_not_the_moving_one(testbed, tmp_path):
    _, s = stats(testbed, tmp_path / "cache", "region_min_count=3")  # bare key: mitigate.dedup.region_min_count
    local = s["local"]
    assert local["rows_pixel"] == 1.0 and local["pixel_recall"] > 0.5
    assert local["mask_weight"] < 1.0 and local["tile_weight"] < 1.0
    assert s["local"]["recall"] == 0.0  # the whole-image hash does not group different images
    assert s["moving_local"]["pixel_recall"] < local["pixel_recall"]


def test_a_clean_row_copying_a_planted_image_is_a_false_merge(testbed, tmp_path):
    """A clean row pointing at the global image: grouped with both global rows, so every one of
    them counts a false merge; the 12 real clean rows stay apart."""
    root = tmp_path / "data"
    shutil.copytree(testbed, root)
    meta = root / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    glob = next(r for r in rows if r["group"] == "global")
    rows.append({**next(r for r in rows if r["group"] == "clean"), "sample_id": "clean-extra",
                 "file_name": glob["file_name"]})
    meta.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    _, s = stats(root, tmp_path / "cache")
    assert s["global"]["false_merges"] == 1.0 and s["global"]["recall"] == 1.0
    assert s["clean"]["rows"] == 13 and s["clean"]["false_merges"] == pytest.approx(1 / 13)
    assert s["global"]["row_weight"] == pytest.approx(1 / 3)


def test_cli_writes_the_table(testbed, tmp_path):
    out = tmp_path / "recall.md"
    assert main(["--testbed", str(testbed), f"model.cache_dir={tmp_path / 'cache'}", "--out", str(out)]) == 0
    text = out.read_text()
    assert "region_min_count" not in text and ">= 48 images" in text
    assert "| global | 2 | 1 | 1.000 | 1/1 | 0.000 |" in text


def test_tile_map_read_at_pixels():
    tiles = np.arange(4.0).reshape(2, 2)
    assert at_pixels(tiles, (4, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_v5_global_rows_read_from_the_image_folder_are_one_set_per_source():
    from launch.testbed.dedup_recall import planted_set

    # the image folder's table carries source_id but no file_name column
    rows = [{"group": "global", "source_id": s, "sample_id": f"g{i}"} for i, s in enumerate(["a", "a", "b"])]
    assert [planted_set(r) for r in rows] == ["global:a", "global:a", "global:b"]
