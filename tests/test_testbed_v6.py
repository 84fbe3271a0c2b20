"""Testbed v6 kinds: near-duplicates, shared cards, shared captions and moving stamps (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.testbed import build_testbed
from data.testbed.build import TestbedParams

V6 = dict(n_clean=12, n_heldout=4, n_global=1, global_repeats=2, n_local_groups=1, local_per_group=3,
          n_near_global=2, near_global_copies=6, n_templates=2, template_per_group=3, n_caption_dup=2,
          caption_dup_per_group=3, n_moving_groups=2, moving_per_group=4)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    base = tmp_path_factory.mktemp("v6")
    return {"a": build_testbed(base / "a", resolution=32, seed=0, **V6),
            "again": build_testbed(base / "again", resolution=32, seed=0, **V6),
            "seed1": build_testbed(base / "seed1", resolution=32, seed=1, **V6)}


def rows_of(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def pixels(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / name).convert("RGB")).astype(int)


def mask(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / name)) > 127


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(builds):
    assert files(builds["a"]) == files(builds["again"])
    assert files(builds["a"])["metadata.jsonl"] != files(builds["seed1"])["metadata.jsonl"]


def test_every_near_global_copy_differs_and_points_at_its_source(builds):
    root = builds["a"]
    near = [r for r in rows_of(root) if r["group"] == "near_global"]
    assert len(near) == 2 * 6
    for group in {r["planted_group"] for r in near}:
        members = [r for r in near if r["planted_group"] == group]
        images = [pixels(root, r["file_name"]) for r in members]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                assert np.abs(images[i] - images[j]).max() > 0, (members[i]["file_name"], members[j]["file_name"])
        assert len({r["source_file"] for r in members}) == 1 and len({r["text"] for r in members}) == 1
        source = pixels(root, members[0]["source_file"])
        # a transform of the source: closer to it than to the other group's source
        other = next(r for r in near if r["planted_group"] != group)["source_file"]
        for image in images:
            assert np.abs(image - source).mean() < np.abs(image - pixels(root, other)).mean()


def test_template_masks_cover_exactly_the_shared_card(builds):
    root = builds["a"]
    cards = [r for r in rows_of(root) if r["group"] == "template"]
    for group in {r["planted_group"] for r in cards}:
        members = [r for r in cards if r["planted_group"] == group]
        region = mask(root, members[0]["mask_file"])
        images = np.stack([pixels(root, r["file_name"]) for r in members])
        assert (images[:, region] == images[0, region]).all()          # the card: the same in every image
        inside = images[:, ~region].reshape(len(members), -1)
        assert all((inside[0] != other).any() for other in inside[1:])  # the objects differ
        phrase = members[0]["text"].split(",")[0].split(" on the ")[1]
        assert all(f"on the {phrase}" in r["text"] for r in members)


def test_moving_stamps_move_and_their_masks_are_exact(builds):
    root = builds["a"]
    moving = [r for r in rows_of(root) if r["group"] == "moving_local"]
    for group in {r["planted_group"] for r in moving}:
        members = [r for r in moving if r["planted_group"] == group]
        assert len({tuple(r["stamp_box"]) for r in members}) > 1      # not one fixed place
        for r in members:
            stamped, original, region = pixels(root, r["file_name"]), pixels(root, r["original_file"]), mask(root, r["mask_file"])
            assert (stamped[~region] == original[~region]).all()        # nothing outside the mask changed
            assert region.any() and (stamped[region] != original[region]).any(axis=-1).mean() > 0.5
            x0, y0, x1, y1 = r["stamp_box"]
            outside_box = np.ones_like(region)
            outside_box[y0:y1, x0:x1] = False
            assert not region[outside_box].any()


def test_anchored_moving_stamps_sit_near_their_corners_and_vary():
    """moving_anchors=2: every box within the jitter of the top-left or the bottom-right corner,
    both corners used, sizes and places still varied; with 0 the boxes go anywhere."""
    from data.testbed.kinds import moving_placement

    res, reach = 32, int(0.15 * 32)
    boxes = [moving_placement(res, (0.3, 0.5), 0.6, np.random.default_rng(i), anchors=2) for i in range(200)]
    top_left = [b.x0 <= reach and b.y0 <= reach for b in boxes]
    bottom_right = [res - (b.x0 + b.size) <= reach and res - (b.y0 + b.size) <= reach for b in boxes]
    assert all(a or b for a, b in zip(top_left, bottom_right)) and 40 < sum(top_left) < 160
    assert len({(b.x0, b.y0, b.size) for b in boxes}) > 50
    # without anchors the boxes go anywhere: many are near neither of those corners
    anywhere = [moving_placement(res, (0.3, 0.5), 0.6, np.random.default_rng(i)) for i in range(200)]
    assert sum(b.x0 > reach and res - (b.x0 + b.size) > reach for b in anywhere) > 20
    with pytest.raises(ValueError, match="moving_anchors"):
        TestbedParams.create(n_moving_groups=1, moving_anchors=5)


def test_caption_dup_rows_share_one_caption_and_no_pixels(builds):
    root = builds["a"]
    dup = [r for r in rows_of(root) if r["group"] == "caption_dup"]
    for group in {r["planted_group"] for r in dup}:
        members = [r for r in dup if r["planted_group"] == group]
        assert len({r["text"] for r in members}) == 1 and len({r["source_id"] for r in members}) == len(members)
        images = [pixels(root, r["file_name"]) for r in members]
        assert all(np.abs(images[0] - other).mean() > 5 for other in images[1:])


def test_caption_dup_repeats_repeat_each_picture_under_the_shared_caption(tmp_path):
    """caption_dup_repeats=R: every picture of a shared caption appears in R rows, pixel for pixel
    (one file), under that caption; the pictures still differ from one another."""
    knobs = {**V6, "caption_dup_repeats": 3}
    root = build_testbed(tmp_path / "rep", resolution=32, seed=0, **knobs)
    dup = [r for r in rows_of(root) if r["group"] == "caption_dup"]
    assert len(dup) == knobs["n_caption_dup"] * knobs["caption_dup_per_group"] * 3
    for group in {r["planted_group"] for r in dup}:
        members = [r for r in dup if r["planted_group"] == group]
        assert len({r["text"] for r in members}) == 1
        by_picture = {}
        for r in members:
            by_picture.setdefault(r["source_id"], []).append(r)
        assert len(by_picture) == knobs["caption_dup_per_group"]
        assert all(len(rs) == 3 and len({r["file_name"] for r in rs}) == 1 for rs in by_picture.values())
        files = [rs[0]["file_name"] for rs in by_picture.values()]
        assert all(np.abs(pixels(root, files[0]) - pixels(root, f)).mean() > 5 for f in files[1:])
    assert len({r["sample_id"] for r in dup}) == len(dup)
    assert "caption_dup_repeats" in TestbedParams.create(n_caption_dup=1, caption_dup_repeats=2).recorded()
    assert "caption_dup_repeats" not in TestbedParams.create(n_caption_dup=1).recorded()
    with pytest.raises(ValueError, match="caption_dup_repeats"):
        TestbedParams.create(n_caption_dup=1, caption_dup_repeats=0)


def test_v6_knobs_at_their_defaults_stay_out_of_the_record():
    """The v6 knobs at their defaults change nothing a v5 build records (manifest params, cache key)."""
    params = TestbedParams.create(resolution=16, n_clean=4)
    assert "n_near_global" not in params.recorded() and not params.has_v6
    assert "n_near_global" in TestbedParams.create(resolution=16, n_clean=4, n_near_global=1).recorded()


def test_bad_v6_knobs_are_refused():
    with pytest.raises(ValueError, match="moving_scale_min"):
        TestbedParams.create(n_moving_groups=1, moving_scale_min=0.6, moving_scale_max=0.4)
    with pytest.raises(ValueError, match="caption_dup"):
        TestbedParams.create(n_caption_dup=99)


def test_replica_judgement_on_hand_made_generations(builds):
    """A transformed copy (or the untransformed source) of a near-duplicate group is a replica of it;
    an image that shares only the card is a local replica, not a global one; any image of a shared
    caption counts; a moving stamp pasted on another picture is a local replica at its own place, and
    at another image's place it is not, but still counts as the stamp drawn anywhere."""
    from launch.testbed.evaluate import score, select_prompts
    from launch.testbed.reading import load_image

    root = builds["a"]
    prompts = select_prompts(root, local_per_group=2, n_clean=4, n_calibration=4)
    rows = rows_of(root)
    by_group = lambda group: [r for r in rows if r["group"] == group]  # noqa: E731
    first, fresh = {}, []
    cases = []  # (prompt index, image, expected replica, expected local replica)
    anywhere = {}  # case index: expected stamp_anywhere (moving stamps drawn where any image of the group has it)
    found_at = {}  # case index: the mask of the place the stamp must be found at
    for p, prompt in enumerate(prompts):
        if prompt.role == "calibration":
            cases.append((p, load_image(root, prompt.file_name), None, None))
            continue
        if prompt.group == "near_global" and prompt.planted_group not in first:
            first[prompt.planted_group] = p
            members = [r for r in by_group("near_global") if r["planted_group"] == prompt.planted_group]
            cases.append((p, load_image(root, members[-1]["file_name"]), True, False))   # another transform
            cases.append((p, load_image(root, members[0]["source_file"]), True, False))  # the source picture
            fresh.append(len(cases))  # a crop, turn and shift of the picture that no training row shows
            cases.append((p, new_crop(root / members[0]["source_file"]), True, False))
        elif prompt.group == "template":
            other = next(r for r in by_group("template")
                         if r["planted_group"] == prompt.planted_group and r["file_name"] != prompt.file_name)
            cases.append((p, load_image(root, other["file_name"]), False, True))
        elif prompt.group == "caption_dup":
            other = next(r for r in by_group("caption_dup")
                         if r["planted_group"] == prompt.planted_group and r["file_name"] != prompt.file_name)
            cases.append((p, load_image(root, other["file_name"]), True, False))
        elif prompt.group == "moving_local":
            own = next(r for r in rows if r["file_name"] == prompt.file_name)
            region = mask(root, own["mask_file"])
            pasted = load_image(root, by_group("clean")[0]["file_name"]).copy()
            pasted[region] = load_image(root, own["file_name"])[region]
            anywhere[len(cases)] = True
            cases.append((p, pasted, False, True))
            # its own picture without the stamp: a whole-image copy of the row, never a local one
            anywhere[len(cases)] = False
            cases.append((p, load_image(root, own["original_file"]), True, False))
            # the stamp where another image of the group carries it: not at its own place, but copied
            elsewhere = next(r for r in by_group("moving_local") if r["local_group"] == own["local_group"]
                             and not (mask(root, r["mask_file"]) & region).any())
            moved = load_image(root, by_group("clean")[1]["file_name"]).copy()
            other_region = mask(root, elsewhere["mask_file"])
            moved[other_region] = load_image(root, elsewhere["file_name"])[other_region]
            anywhere[len(cases)] = True
            found_at[len(cases)] = elsewhere["mask_file"]
            cases.append((p, moved, False, False))
        elif prompt.group == "clean":
            cases.append((p, np.random.default_rng(p).uniform(size=load_image(root, prompt.file_name).shape), False, False))
    # one generation per (case): every case gets its own prompt slot
    case_prompts = [prompts[p] for p, *_ in cases]
    images = np.stack([image for _, image, *_ in cases])[:, None].astype(np.float32)
    result = score(images, case_prompts, root)
    checked = 0
    for gen, (_, _, replica, local) in zip(result["generations"], cases):
        if replica is None:
            continue
        assert (gen["replica"], gen["local_replica"]) == (replica, local), (gen["group"], gen["sample_id"])
        checked += 1
    assert checked >= 12 and {"near_global", "template", "caption_dup", "moving_local"} <= set(result["groups"])
    assert len(anywhere) >= 6 and all(result["generations"][i]["stamp_anywhere"] == want for i, want in anywhere.items())
    assert found_at and all(result["generations"][i]["stamp_anywhere_mask"] == f for i, f in found_at.items())
    # the fresh crops: the aligned search finds the picture far closer than any training row is
    for i in fresh:
        gen = result["generations"][i]
        assert gen["aligned_distance"] < min(result["thresholds"]["near_global_aligned"], gen["nn_distance"] / 2)


def new_crop(path: Path) -> np.ndarray:
    big = Image.open(path).convert("RGB").resize((128, 128), Image.Resampling.BICUBIC)
    big = big.rotate(7, resample=Image.Resampling.BICUBIC, translate=(6, -4), fillcolor=(255, 255, 255))
    return np.asarray(big.crop((14, 10, 110, 106)).resize((32, 32), Image.Resampling.LANCZOS)) / 255.0


def test_localization_scores_the_map_on_local_replicas_against_both_baselines(builds):
    """A map that is the copied region scores IoU ~1 on local replicas; clean generations' maps
    (here: a fixed blob in one corner) give the saliency-free baseline; the all-ones IoU is the
    mask's area share."""
    from launch.testbed.evaluate import select_prompts
    from launch.testbed.localize import localization
    from launch.testbed.reading import load_image

    root = builds["a"]
    rows = rows_of(root)
    prompts = [q for q in select_prompts(root, local_per_group=2, n_clean=4, n_calibration=4)
               if q.group in ("template", "moving_local", "clean") or q.role == "calibration"]
    images, maps = [], []
    blob = np.zeros((16, 16))
    blob[:4, :4] = 1.0
    for q in prompts:
        if q.group in ("template", "moving_local") and q.role == "eval":
            own = next(r for r in rows if r["file_name"] == q.file_name)
            region = mask(root, own["mask_file"])
            image = load_image(root, by_other(rows, own)["file_name"]).copy()  # another picture...
            image[region] = load_image(root, own["file_name"])[region]         # ... carrying the copied region
            images.append(image)
            maps.append(region.reshape(16, 2, 16, 2).mean(axis=(1, 3)))       # the map is the region
        else:
            images.append(load_image(root, q.file_name))
            maps.append(blob)
    out = localization(np.stack(images)[:, None], np.stack(maps)[:, None], prompts, root)["kinds"]
    for kind in ("template", "moving_local", "moving_local_anywhere"):
        assert out[kind]["local_replicas"] == out[kind]["generations"] > 0
        assert out[kind]["iou"] > 0.9
        assert out[kind]["all_ones_iou"] < 0.6 and out[kind]["clean_map_iou"] < 0.6


def by_other(rows: list[dict], own: dict) -> dict:
    """A clean row whose picture differs from ``own``'s."""
    return next(r for r in rows if r["group"] == "clean" and r["source_id"] != own["source_id"])


def test_seed_maps_mark_what_every_seed_of_a_prompt_draws_alike():
    """Three seeds of one prompt share a stamp in the top-left 8x8 pixels and differ elsewhere; with
    flat region maps the agreement map is highest exactly on the stamp's 4x4 cells, and the seed
    average gives every seed the same map."""
    from launch.testbed.localize import seed_maps

    rng = np.random.default_rng(0)
    images = rng.random((1, 3, 32, 32, 3)).astype(np.float32)
    images[:, :, :8, :8] = 0.3  # the copied stamp: the same pixels in every seed
    region = rng.uniform(0.9, 1.1, (1, 3, 16, 16)).astype(np.float32)
    maps = seed_maps(images, region)
    seeds, agreement = maps["be_magnitude_seeds"], maps["be_magnitude_agreement"]
    assert np.allclose(seeds[0, 0], seeds[0, 2]) and np.isclose(seeds[0, 0].sum(), 1.0)
    top = np.argsort(agreement[0, 0].ravel())[-16:]
    assert sorted(top.tolist()) == sorted((r * 16 + c) for r in range(4) for c in range(4))


def test_joint_map_keeps_only_where_both_maps_point():
    """One map lights the top-left quarter, the other the top half: their product is the top-left
    quarter; maps on different grids are refused."""
    from launch.testbed.localize import joint_map

    left, top = np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4))
    left[..., :, :2], top[..., :2, :] = 1.0, 1.0
    joint = joint_map(left, top)
    assert (joint[0, 0, :2, :2] > 0).all() and joint[0, 0].sum() == joint[0, 0, :2, :2].sum()
    with pytest.raises(ValueError, match="one grid"):
        joint_map(left, np.zeros((1, 1, 8, 8)))
