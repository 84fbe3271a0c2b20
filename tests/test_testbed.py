"""The memorization testbed builder and the ground-truth measures.

Builds are tiny (16 px, a few dozen images) so the whole file runs in seconds on 2 CPU cores.
Expected values come from the build's parameters, from an independent computation (brute force,
torch) or from geometry, never from the builder's own output.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from data.testbed import build_testbed, caption_token_count, ensure_testbed, testbed_path as cached_testbed_path  # noqa: E402
from train.evaluate.measures import (  # noqa: E402
    PixelFeatures,
    calibrate_threshold,
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
from data.testbed.captions import balanced_offsets  # noqa: E402
from launch.testbed.reading import load_image, load_mask, read_manifest, read_rows, training_images  # noqa: E402

TINY = dict(n_clean=24, n_heldout=8, n_global=3, global_repeats=4, n_local_groups=2, local_per_group=4)
GROUPS = ("clean", "heldout", "global", "local")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("testbeds")
    return {
        "a": build_testbed(base / "a", resolution=16, seed=0, **TINY),
        "a_again": build_testbed(base / "a_again", resolution=16, seed=0, **TINY),
        "seed1": build_testbed(base / "seed1", resolution=16, seed=1, **TINY),
        "shape": build_testbed(base / "shape", resolution=16, seed=0, stamp="shape", local_background=True,
                               stamp_corner="tl", **TINY),
    }


# --------------------------------------------------------------------------------------------
# Determinism and bookkeeping
# --------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(builds):
    first, second = all_files(builds["a"]), all_files(builds["a_again"])
    assert first == second
    # the manifest's hashes are those of the files on disk
    listed = read_manifest(builds["a"])["files"]
    assert listed == {k: v for k, v in first.items() if k != "manifest.json"}


def test_different_seed_gives_different_data(builds):
    first, other = all_files(builds["a"]), all_files(builds["seed1"])
    assert first["metadata.jsonl"] != other["metadata.jsonl"]
    ids = lambda root: {r["source_id"] for r in read_rows(root)}  # noqa: E731
    assert ids(builds["a"]) != ids(builds["seed1"])
    assert read_manifest(builds["seed1"])["params"]["seed"] == 1


def test_group_sizes_in_manifest_and_metadata(builds):
    root = builds["a"]
    manifest, rows = read_manifest(root), read_rows(root)
    expected_rows = {"clean": TINY["n_clean"], "heldout": TINY["n_heldout"],
                     "global": TINY["n_global"] * TINY["global_repeats"],
                     "local": TINY["n_local_groups"] * TINY["local_per_group"]}
    expected_images = {**expected_rows, "global": TINY["n_global"]}
    assert Counter(r["group"] for r in rows) == expected_rows
    assert manifest["counts"]["rows"] == expected_rows
    assert manifest["counts"]["images"] == expected_images
    files_per_group = {g: {r["file_name"] for r in rows if r["group"] == g} for g in GROUPS}
    assert {g: len(f) for g, f in files_per_group.items()} == expected_images
    assert manifest["counts"]["train_rows"] == len(rows) - TINY["n_heldout"]


def test_rows_ids_and_splits(builds):
    root = builds["a"]
    rows = read_rows(root)
    assert len({r["sample_id"] for r in rows}) == len(rows), "sample_id must be unique per row"
    for r in rows:
        assert (root / r["file_name"]).is_file()
        assert r["split"] == ("heldout" if r["group"] == "heldout" else "train")
        assert r["captions"][0] == r["text"] and 2 <= len(r["captions"]) <= 5
    # global duplicates: one file, one source, one caption set, distinct sample ids per copy
    by_file = defaultdict(list)
    for r in read_rows(root, group="global"):
        by_file[r["file_name"]].append(r)
    for copies in by_file.values():
        assert len(copies) == TINY["global_repeats"]
        assert len({r["source_id"] for r in copies}) == 1 and len({r["text"] for r in copies}) == 1
        assert sorted(r["copy_index"] for r in copies) == list(range(TINY["global_repeats"]))
    # no source image is in two groups (held-out images are never trained)
    sources = defaultdict(set)
    for r in rows:
        sources[r["group"]].add(r["source_id"])
    for g in GROUPS:
        for h in GROUPS:
            if g < h:
                assert not sources[g] & sources[h], (g, h)
    # masks: local rows point to their group's mask, the others have none
    for r in rows:
        if r["group"] == "local":
            assert r["mask_file"] == f"masks/local-g{r['local_group']}.png" and (root / r["mask_file"]).is_file()
        else:
            assert r["mask_file"] is None
    assert load_mask(root, read_rows(root, group="global")[0]).all()
    assert load_mask(root, read_rows(root, group="clean")[0]) is None


def test_images_are_far_apart(builds):
    """Every distinct image is at least min_distance from every other (no accidental twins)."""
    root = builds["a"]
    files = sorted({r["file_name"] for r in read_rows(root) if r["group"] != "local"})
    images = np.stack([load_image(root, f) for f in files]).reshape(len(files), -1).astype(np.float64)
    d = np.sqrt(((images[:, None] - images[None]) ** 2).mean(-1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= read_manifest(root)["params"]["min_distance"]


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def test_caption_token_count_follows_clip_pretokenizer():
    assert caption_token_count("a photo of a cat") == 5
    assert caption_token_count("keycap 10, flat!") == 6  # keycap 1 0 , flat !
    assert caption_token_count("woman's hat") == 3  # woman 's hat
    assert caption_token_count("Côte d'Ivoire") == 4  # côte d ' ivoire


@pytest.mark.parametrize("levels", [1, 3, 5])
def test_balanced_offsets_have_the_same_mean_for_every_group_size(levels):
    rng = np.random.default_rng(0)
    for n in range(1, 40):
        offsets = balanced_offsets(n, levels, rng)
        assert offsets.min() >= 0 and offsets.max() < levels
        assert offsets.mean() == pytest.approx((levels - 1) / 2)


@pytest.mark.parametrize("build", ["a", "seed1", "shape"])
def test_caption_lengths_match_across_groups(builds, build):
    rows = read_rows(builds[build])
    for per_row in (lambda r: [r["text"]], lambda r: r["captions"]):
        tokens = {g: np.mean([caption_token_count(c) for r in rows if r["group"] == g for c in per_row(r)])
                  for g in GROUPS}
        chars = {g: np.mean([len(c) for r in rows if r["group"] == g for c in per_row(r)]) for g in GROUPS}
        assert max(tokens.values()) - min(tokens.values()) < 0.5, tokens
        assert max(chars.values()) - min(chars.values()) < 3.0, chars


def test_local_phrases_only_in_their_group(builds):
    root = builds["a"]
    phrases = {g["index"]: g["phrase"] for g in read_manifest(root)["local_groups"]}
    assert len(set(phrases.values())) == TINY["n_local_groups"]
    for r in read_rows(root):
        for caption in r["captions"]:
            present = {k for k, p in phrases.items() if p in caption}
            assert present == ({r["local_group"]} if r["group"] == "local" else set()), caption


# --------------------------------------------------------------------------------------------
# Stamps and masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ["a", "shape"])
def test_masks_cover_exactly_the_stamp(builds, build):
    root = builds[build]
    manifest = read_manifest(root)
    for info in manifest["local_groups"]:
        rows = [r for r in read_rows(root, group="local") if r["local_group"] == info["index"]]
        mask = load_mask(root, rows[0])
        x0, y0, x1, y1 = info["box"]
        box = np.zeros_like(mask)
        box[y0:y1, x0:x1] = True
        assert mask.any() and not (mask & ~box).any(), "mask outside the stamp's corner box"
        changed_anywhere = np.zeros_like(mask)
        stamp_pixels = []
        for r in rows:
            stamped, original = load_image(root, r["file_name"]), load_image(root, r["original_file"])
            changed = (stamped != original).any(axis=-1)
            assert not (changed & ~mask).any(), "stamping changed pixels outside the mask"
            changed_anywhere |= changed
            stamp_pixels.append(stamped[mask])
        # inside the mask every image of the group carries the same pixels: the stamp
        for pixels in stamp_pixels[1:]:
            np.testing.assert_array_equal(pixels, stamp_pixels[0])
        if build == "shape":  # saturated shapes differ from any background: mask = what changed
            np.testing.assert_array_equal(changed_anywhere, mask)
        else:
            assert changed_anywhere.sum() >= 0.5 * mask.sum()


def test_shape_build_options(builds):
    manifest = read_manifest(builds["shape"])
    assert all(g["corner"] == "tl" and g["box"][:2] == [0, 0] for g in manifest["local_groups"])
    assert all(g["stamp_source_id"].startswith("shape:") for g in manifest["local_groups"])
    for g in manifest["local_groups"]:  # the shared background colour shows in the top-right pixel
        row = next(r for r in read_rows(builds["shape"], group="local") if r["local_group"] == g["index"])
        corner_pixel = np.asarray(Image.open(builds["shape"] / row["file_name"]).convert("RGB"))[0, -1]
        assert tuple(corner_pixel) == tuple(g["background"])


# --------------------------------------------------------------------------------------------
# Loading, atomic writes, caching, folder sources
# --------------------------------------------------------------------------------------------


def test_loads_as_imagefolder(builds, tmp_path):
    import datasets

    root = builds["a"]
    table = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "hf"))
    rows = read_rows(root)
    assert len(table) == len(rows)
    assert table[0]["image"].size == (16, 16)
    assert {"text", "captions", "sample_id", "group", "source_id", "mask_file", "split"} <= set(table.column_names)
    assert sorted(table["sample_id"]) == sorted(r["sample_id"] for r in rows)
    assert sum(s == "train" for s in table["split"]) == len(rows) - TINY["n_heldout"]


def test_existing_output_is_not_clobbered_without_overwrite(builds, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_testbed(out, resolution=16, **TINY)
    assert (out / "keep.txt").read_text() == "mine"
    build_testbed(out, resolution=16, overwrite=True, **TINY)
    assert not (out / "keep.txt").exists()
    assert all_files(out) == all_files(builds["a"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "temporary folders left behind"


def test_ensure_testbed_builds_once_per_parameters(tmp_path, monkeypatch):
    first = ensure_testbed(tmp_path, resolution=16, **TINY)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    import data.testbed.build as build_module

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached testbed")

    monkeypatch.setattr(build_module, "write_testbed", no_rebuild)
    assert ensure_testbed(tmp_path, resolution=16, **TINY) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    other = ensure_testbed(tmp_path, resolution=16, seed=3, **TINY)
    assert other != first and (other / "manifest.json").is_file()


def test_cli_with_a_knobs_file_builds_what_the_cache_holds(tmp_path, capsys):
    """``python -m data.testbed --config F --out DIR`` (the recipe's and the grids' build) writes the
    bytes :func:`ensure_testbed` caches for the same knobs, at the path :func:`testbed_path` names;
    flags on the command line win over the file."""
    from data.testbed.__main__ import main

    knobs = tmp_path / "knobs.yaml"
    knobs.write_text("resolution: 16\n" + "".join(f"{k}: {v}\n" for k, v in (TINY | {"n_clean": 30}).items()))
    assert main(["--config", str(knobs), "--out", str(tmp_path / "out"), "--n-clean", str(TINY["n_clean"])]) == 0
    assert json.loads(capsys.readouterr().out)["train_rows"] == read_manifest(tmp_path / "out")["counts"]["train_rows"]
    expected = cached_testbed_path(tmp_path / "cache", resolution=16, **TINY)
    assert not expected.exists()
    assert ensure_testbed(tmp_path / "cache", resolution=16, **TINY) == expected
    assert all_files(tmp_path / "out") == all_files(expected)
    knobs.write_text("n_cleen: 3\n")
    with pytest.raises(SystemExit):
        main(["--config", str(knobs), "--out", str(tmp_path / "bad")])
    assert "unknown testbed knob(s): n_cleen" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_unknown_knob_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="n_clena"):
        build_testbed(tmp_path / "x", n_clena=3)


def test_folder_source_with_txt_captions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):  # distinct random blocky images, captions beside them
        pixels = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((40, 50), Image.Resampling.NEAREST).save(src / f"im{i:02d}.png")
        (src / f"im{i:02d}.txt").write_text(f"a pattern number {i}\nanother view of pattern {i}\n")
    knobs = dict(n_clean=12, n_heldout=4, n_global=2, global_repeats=3, n_local_groups=2, local_per_group=3)
    root = build_testbed(tmp_path / "out", resolution=16, source=f"folder:{src}", **knobs)
    rows = read_rows(root)
    assert Counter(r["group"] for r in rows) == {"clean": 12, "heldout": 4, "global": 6, "local": 6}
    assert all(r["source_id"].startswith("folder:im") for r in rows)
    assert read_manifest(root)["local_groups"][0]["stamp_source_id"].startswith("shape:")
    text_of = {f"folder:im{i:02d}.png": f"a pattern number {i}" for i in range(30)}
    assert all(r["text"].startswith(text_of[r["source_id"]]) for r in rows)
    assert all(load_image(root, r["file_name"]).shape == (16, 16, 3) for r in rows[:3])


# --------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------


def test_pixel_distance_basics():
    black, white = np.zeros((8, 8, 3)), np.ones((8, 8, 3))
    assert pixel_distance(black, black) == 0.0
    assert pixel_distance(black, white) == pytest.approx(1.0)
    half = np.full((8, 8, 3), 0.5)
    assert pixel_distance(half, white) == pytest.approx(0.5)
    assert pixel_distance((white * 255).astype(np.uint8), white) == 0.0
    batch = np.stack([black, half, white])
    np.testing.assert_allclose(pixel_distance(batch, white), [1.0, 0.5, 0.0])


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(1)
    train = rng.random((37, 6, 6, 3))
    gen = np.concatenate([train[[5, 30]] + 0.01 * rng.standard_normal((2, 6, 6, 3)), rng.random((4, 6, 6, 3))])
    index, distance = nearest(gen, train, batch_size=8)  # several blocks
    for g in range(len(gen)):
        brute = [pixel_distance(gen[g], t) for t in train]
        assert index[g] == int(np.argmin(brute))
        assert distance[g] == pytest.approx(min(brute), rel=1e-9, abs=1e-12)
    assert list(index[:2]) == [5, 30]


def test_own_rank_counts_the_candidates_closer_than_the_own_image():
    rng = np.random.default_rng(2)
    cand = rng.random((50, 6, 6, 3))
    gen = cand[[3, 7]] + 0.01 * rng.standard_normal((2, 6, 6, 3))
    # own = the candidate the generation was made from (nearest): rank 0; own = a far-away image:
    # every candidate is closer; brute force for a random own image
    far = np.full((6, 6, 3), 10.0)
    far_other = rng.random((6, 6, 3))
    ranks = own_rank(np.stack([gen[0], gen[1], gen[1]]), np.stack([cand[3], far, far_other]), cand, batch_size=16)
    brute = np.mean([pixel_distance(gen[1], c) < pixel_distance(gen[1], far_other) for c in cand])
    assert ranks.tolist() == [0.0, 1.0, pytest.approx(brute)]
    with pytest.raises(ValueError, match="shapes differ"):
        own_rank(gen, cand[:3], cand)


def test_replicas_on_testbed_images(builds):
    root = builds["a"]
    train = training_images(root)
    heldout = np.stack([load_image(root, r["file_name"]) for r in read_rows(root, split="heldout")])
    # held-out images stand in for generations from clean prompts: chance similarity only
    threshold = calibrate_threshold(nearest(heldout, train.images)[1], quantile=0.05)
    assert threshold > 0
    k = train.groups.index("global")
    own, copy = train.source_ids[k], train.images[k]
    assert is_replica(copy, own, train.images, train.source_ids, threshold)
    assert not is_replica(copy, "openmoji:not-this-one", train.images, train.source_ids, threshold)
    shifted = np.roll(copy, shift=(4, 4), axis=(0, 1))
    assert not is_replica(shifted, own, train.images, train.source_ids, threshold)
    unrelated = heldout[0]
    assert not is_replica(unrelated, own, train.images, train.source_ids, threshold)
    result = replica_flags(np.stack([copy, shifted, unrelated]), [own] * 3, train.images, train.source_ids, threshold)
    assert result.flags.tolist() == [True, False, False]
    assert result.nn_source_id[0] == own and result.nn_distance[0] < 1e-6


def test_local_replica(builds):
    root = builds["a"]
    row = read_rows(root, group="local")[0]
    own, mask = load_image(root, row["file_name"]), load_mask(root, row)
    other = load_image(root, read_rows(root, split="heldout")[0]["file_name"])
    with_stamp = other.copy()
    with_stamp[mask] = own[mask]
    assert masked_distance(with_stamp, own, mask) == 0.0
    assert is_local_replica(with_stamp, own, mask, region_threshold=0.05, replica_threshold=0.05)
    assert not is_local_replica(own, own, mask, region_threshold=0.05, replica_threshold=0.05)  # whole copy
    assert not is_local_replica(other, own, mask, region_threshold=0.05, replica_threshold=0.05)  # no stamp
    assert not is_local_replica(with_stamp, own, mask, region_threshold=0.05, whole_is_replica=True)


def test_iou_of_known_boxes():
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 4:12] = True
    region = np.zeros_like(mask)
    region[0:8, 0:8] = True
    assert iou(region, mask) == pytest.approx(16 / (64 + 64 - 16))
    assert iou(mask, mask) == 1.0
    assert iou(~mask, mask) == 0.0
    assert trivial_iou(mask) == pytest.approx(64 / 256)
    assert iou(np.ones_like(mask), mask) == trivial_iou(mask)
    # a soft map peaking on the mask, binarized at the mask's area, recovers it exactly
    soft = mask.astype(float) + 0.01 * np.random.default_rng(0).random(mask.shape)
    assert iou(soft, mask) == 1.0
    # a coarse 4x4 map of the same box is upsampled before binarizing
    coarse = np.zeros((4, 4))
    coarse[1:3, 1:3] = 1.0
    assert iou(coarse, mask) > 0.8
    # an explicit quantile keeps the top share: the top half of a left-to-right ramp
    ramp = np.tile(np.arange(16, dtype=float), (16, 1))
    right_half = np.zeros((16, 16), dtype=bool)
    right_half[:, 8:] = True
    assert iou(ramp, right_half, quantile=0.5) == 1.0


def test_resize_map_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(2).random((5, 7))
    ours = resize_map(values, (16, 12))
    theirs = torch.nn.functional.interpolate(torch.tensor(values)[None, None], size=(16, 12), mode="bilinear",
                                             align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_kernel_distance_separates_sets():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((300, 16))
    same_distribution = rng.standard_normal((300, 16))
    shifted = rng.standard_normal((300, 16)) + 0.5
    different = kernel_distance(a, shifted)
    # With itself the estimate is -O(1/m) (the cross term keeps its diagonal, as in KID), so ~0.
    assert abs(kernel_distance(a, a)) < 0.1 * different
    assert abs(kernel_distance(a, same_distribution)) < 0.01 * different
    assert kernel_distance(a, rng.standard_normal((300, 16)) + 1.0) > different
    assert kernel_distance(a, shifted, subset_size=100, n_subsets=20) == pytest.approx(different, rel=0.5)


def test_kid_on_images_penalizes_degenerate_outputs(builds):
    root = builds["a"]
    train = training_images(root)
    real = train.images[np.array(train.groups) == "clean"]
    heldout = np.stack([load_image(root, r["file_name"]) for r in read_rows(root, split="heldout")])
    rng = np.random.default_rng(4)
    noise = rng.random(heldout.shape)
    grey = np.full_like(heldout, real.mean())
    extractor = PixelFeatures()
    kid_real = image_kid(heldout, real, extractor)
    assert kid_real < image_kid(noise, real, extractor)
    assert kid_real < image_kid(grey, real, extractor)
    assert np.allclose(extractor(heldout), PixelFeatures()(heldout)), "the default extractor must be fixed"
    # by block: the noise differs from real images mostly in sharpness, the grey in colour; flat shares
    blocks = {name: extractor.blocks(x) for name, x in [("real", real), ("held", heldout), ("noise", noise), ("grey", grey)]}
    assert np.allclose(np.concatenate(list(blocks["held"].values()), axis=1), extractor(heldout))
    gap = {name: {b: kernel_distance(blocks[name][b], blocks["real"][b]) for b in blocks["real"]}
           for name in ("held", "noise", "grey")}
    assert gap["noise"]["sharpness"] > 10 * max(gap["held"]["sharpness"], 1e-4)
    assert gap["grey"]["colour"] > 10 * max(gap["held"]["colour"], 1e-4)
    assert flat_fraction(grey) == 1.0 and flat_fraction(noise) < 0.05 and 0.3 < flat_fraction(heldout) < 0.95


def test_kept_base_model_loads_and_follows_the_prompt():
    """The base kept in the repo (configs/testbed/finetune.yaml starts from it) is a real
    diffusers pipeline that generates images, and different prompts give different images."""
    from omegaconf import OmegaConf

    import torch

    from launch.testbed.evaluate import load_pipeline

    repo = Path(__file__).resolve().parents[1]
    base = repo / OmegaConf.load(repo / "configs/testbed/finetune.yaml").model.pretrained
    assert (base / "model_index.json").is_file(), base
    pipe = load_pipeline(base)
    prompts = ["a grinning face emoji, flat round yellow", "a flag of Japan emoji, white with a red disc"]
    images = pipe(prompts, height=32, width=32, num_inference_steps=10, guidance_scale=3.0, output_type="np",
                  generator=[torch.Generator().manual_seed(0) for _ in prompts]).images  # same noise for both
    assert images.shape == (2, 32, 32, 3)
    assert images.std(axis=(1, 2, 3)).min() > 0.05  # not a flat canvas
    assert pixel_distance(images[0], images[1]) > 0.05  # only the text differs, and it changes the picture


def test_the_builder_imports_only_train_util_and_itself():
    """data/testbed is data with ground truth, built below the product: it may use train.util's
    atomic writes and nothing else of copyguard (the measures and drivers that read it sit above)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    found = set()
    for path in (root / "data" / "testbed").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found |= {(path.name, n) for n in names if n.split(".")[0] in ("train", "data", "launch")}
    assert found, "no project imports found: the scan is broken"
    allowed = {n for _, n in found if n == "train.util" or n.startswith("data.testbed")}
    assert {(f, n) for f, n in found if n not in allowed} == set()
