"""Score a trained model on the testbed: how many planted prompts give replicas, and at what quality.

``python -m launch.testbed.evaluate --model RUN/final [--testbed DIR] --out OUT [--seeds 4] [--steps 25] [--guidance 3]``

1. Prompts: every distinct global prompt, ``--local-per-group`` local rows per local group,
   ``--clean`` clean rows (scored like the planted prompts) and ``--calibration`` *held-out*
   rows (seeded choices). The held-out prompts set the thresholds: their images were never
   trained, so how close their generations come to a training image is what chance gives a
   model that did not memorize that prompt. Every clean prompt is scored, so the clean rate is
   a measurement of clean memorization; calibrating on clean prompts instead would make it
   about 5% by construction (the scored and the calibration prompts would be exchangeable).
2. Generations: the audit's sampling pipeline (:func:`train.audit.load_model`) with DDIM (trailing
   timesteps, so sampling starts from pure noise), ``--seeds`` images per prompt, one seeded generator per
   (prompt, seed), so an image does not depend on how prompts are batched.
3. Measures (all from :mod:`train.evaluate.measures`):
   * replica threshold = :func:`calibrate_threshold` (5% quantile) of the calibration
     generations' pixel RMSE to their nearest *clean* training image (a prompt that
     regurgitates a planted image must not lower the bar); a generation is a replica when its nearest
     training image is its own source and closer than that (:func:`replica_flags`);
   * region threshold per local group = the same quantile of the calibration generations'
     :func:`masked_distance` to the group's stamp; a local-row generation is a local replica
     when its stamp region is closer than that and the whole image is not a replica
     (:func:`is_local_replica`); clean generations are checked against every stamp;
   * testbed v6 kinds: a near_global or caption_dup generation is a replica when its nearest
     image (training images plus the near-duplicates' untransformed source pictures) belongs to
     the prompt's planted group, whichever copy it is; a near_global one also when its
     best-aligned source picture (:func:`aligned_nearest`: a grid of zooms, turns and shifts) is
     its own and closer than held-out generations come to any source under the same search
     (a new crop of the picture is a copy though no training row shows it); template and
     moving_local generations are judged like local ones on their own image's card / stamp mask
     (a card's threshold per card, a moving stamp's per image, as each sits elsewhere); clean
     generations are checked against every card too (the chance baseline of the template rate);
     a moving_local generation is also checked for its stamp at the place of any image of its
     group (``stamp_anywhere``: a watermark copied elsewhere), with its own calibrated bar;
   * prompt fidelity = :func:`own_rank`: the share of clean training images closer to a clean
     (or held-out) prompt's generation than the prompt's own image (0 = own nearest, ~0.5 = the
     prompt is ignored; ``other_rank_*`` scores against the next prompt's image as a baseline);
   * quality = KID (:func:`image_kid`, default :class:`PixelFeatures` extractor) between all
     clean-prompt generations and the held-out images, next to the KID of the clean training
     images themselves (what a perfect generator of the data would score).
   Rates are per generation (the mean over prompts and seeds); ``*_any_seed`` is the share of
   prompts with at least one of their seeds flagged.
4. ``OUT/eval.json`` (summary + every generation's numbers), ``OUT/grid.png`` (per row: the
   generations of one prompt, then its own training image; global rows, then local, then clean)
   and ``OUT/generations.npz`` (the images, for re-scoring).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train.evaluate.truth import GROUP_KINDS, REGION_KINDS
from train.evaluate.measures import (aligned_nearest, calibrate_threshold, image_kid, masked_distance, nearest,
                                   own_rank, pixel_distance, replica_flags)
from launch.testbed.reading import (heldout_images, load_image, load_mask, placements, read_manifest, read_rows,
                                  stamps as stamps_of, training_images)

# the scored groups (v5's, then v6's where the testbed has them); held-out prompts only calibrate
GROUP_ORDER = ("global", "near_global", "caption_dup", "local", "template", "moving_local", "clean")
# GROUP_KINDS: a generation copying ANY row of its prompt's planted group is a replica (a
# near-duplicate copies the picture whichever transform it reproduces; a shared caption may bring
# back any of its images). REGION_KINDS: a local replica reproduces the region (stamp, card) of the
# prompt's own image. The audit's ground truth (train.evaluate.truth) judges the same way.


@dataclass
class Prompt:
    """One prompt to generate from, and what its generations are compared with."""

    group: str             # global | local | clean | heldout
    role: str              # "eval" (scored) | "calibration" (held-out prompts: set the thresholds)
    text: str
    sample_id: str
    source_id: str
    file_name: str         # the own image (a training image, except for held-out prompts)
    mask_file: str | None  # region kinds: the stamp / card mask
    local_group: int | None
    planted_group: str | None = None  # v6: the rows copying the same thing


def _torch_generator(key: str):
    """A torch generator seeded by a string (a prompt and seed, an image and timestep)."""
    import torch

    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little"))


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "little")])


def select_prompts(root: str | Path, local_per_group: int = 6, n_clean: int = 128, n_calibration: int = 100,
                   seed: int = 0) -> list[Prompt]:
    """Whole-image kinds (global, near_global, caption_dup): one prompt per planted image or shared
    caption. Region kinds (local, template, moving_local): ``local_per_group`` rows per stamp or
    card. Clean: ``n_clean`` rows, all scored. Calibration: ``n_calibration`` held-out rows."""
    rows = read_rows(root, split="train")

    def prompt(row: dict, role: str = "eval") -> Prompt:
        return Prompt(row["group"], role, row["text"], row["sample_id"], row["source_id"], row["file_name"],
                      row.get("mask_file"), row.get("local_group"), row.get("planted_group"))

    prompts: list[Prompt] = []
    for kind in GROUP_KINDS:
        seen: set[str] = set()
        for row in (r for r in rows if r["group"] == kind):
            key = row["source_id"] if kind == "global" else row["planted_group"]
            if key not in seen:
                seen.add(key)
                prompts.append(prompt(row))
    for kind in REGION_KINDS:
        members_of = [r for r in rows if r["group"] == kind]
        for g in sorted({r["local_group"] for r in members_of}):
            members = [r for r in members_of if r["local_group"] == g]
            pick = _rng(seed, f"{kind}-{g}").permutation(len(members))[:local_per_group]
            prompts += [prompt(members[int(i)]) for i in sorted(pick)]
    clean = [r for r in rows if r["group"] == "clean"]
    pick = _rng(seed, "clean").permutation(len(clean))[:n_clean]
    prompts += [prompt(clean[int(i)]) for i in sorted(pick)]
    heldout = read_rows(root, split="heldout")
    if len(heldout) < 4 or n_calibration < 4:
        raise ValueError(f"evaluate: {min(len(heldout), n_calibration)} held-out prompts to calibrate on; "
                         f"at least 4 are needed (the testbed has {len(heldout)} held-out rows)")
    pick = _rng(seed, "heldout").permutation(len(heldout))[:n_calibration]
    prompts += [prompt(heldout[int(i)], "calibration") for i in sorted(pick)]
    return prompts


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def load_pipeline(model: str | Path, spacing: str = "trailing"):
    """The audit's sampling pipeline for ``model`` (a pipeline folder or a training checkpoint),
    with DDIM at ``spacing``: trailing timesteps start sampling from pure noise."""
    from diffusers import DDIMScheduler

    from train.audit import load_model

    pipe, _, _ = load_model(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
    return pipe


def generate(pipe, texts: Sequence[str], seeds: int, resolution: int, steps: int = 25, guidance: float = 3.0,
             batch: int = 64, seed: int = 0) -> np.ndarray:
    """(len(texts), seeds, H, W, 3) float images in [0, 1]; generation (i, k) is seeded by (seed, text i, k)."""
    import torch

    jobs = [(i, k) for i in range(len(texts)) for k in range(seeds)]
    out = np.zeros((len(texts), seeds, resolution, resolution, 3), dtype=np.float32)
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        generators = [_torch_generator(f"{seed}|{texts[i]}|{k}") for i, k in chunk]
        with torch.no_grad():
            images = pipe([texts[i] for i, _ in chunk], height=resolution, width=resolution,
                          num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                          output_type="np").images
        for (i, k), image in zip(chunk, images):
            out[i, k] = image
    return out


def heldout_loss(pipe, root: str | Path, timesteps: int = 10, seed: int = 0, batch: int = 100) -> dict:
    """The denoising loss on the held-out images (never trained) with their captions: the
    training objective at ``timesteps`` evenly spaced t, with noise fixed by (seed, image, t).

    Deterministic for a model, so two models are compared on the very same noisy inputs (no
    sampling noise, unlike KID of generations); a mitigation that stops the model learning the
    data distribution raises it, and it cannot be lowered by copying (the images were never seen).
    """
    import torch

    from train.finetune import encode_text, per_sample_loss

    rows = read_rows(root, split="heldout")
    if not rows:
        raise ValueError(f"{root}: no held-out rows for the held-out loss")
    scheduler = pipe.scheduler
    steps = scheduler.config.num_train_timesteps
    grid = [int((k + 0.5) * steps / timesteps) for k in range(timesteps)]
    per_t = np.zeros(timesteps)
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            pixels = torch.from_numpy(np.stack([load_image(root, r["file_name"]) for r in chunk])).permute(0, 3, 1, 2)
            latents = pipe.vae.encode(pixels * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
            text = encode_text(pipe.tokenizer, pipe.text_encoder, [r["text"] for r in chunk], latents.device)
            for k, t in enumerate(grid):
                noise = torch.stack([torch.randn(latents.shape[1:],
                                                 generator=_torch_generator(f"{seed}|{r['sample_id']}|{t}"))
                                     for r in chunk])
                t_batch = torch.full((len(chunk),), t, dtype=torch.long)
                noisy = scheduler.add_noise(latents, noise, t_batch)
                target = (scheduler.get_velocity(latents, noise, t_batch)
                          if scheduler.config.prediction_type == "v_prediction" else noise)
                pred = pipe.unet(noisy, t_batch, text, return_dict=False)[0]
                per_t[k] += float(per_sample_loss(pred, target, t_batch, scheduler, None).sum())
    per_t /= len(rows)
    return {"heldout_loss": float(per_t.mean()), "images": len(rows), "timesteps": grid,
            "per_timestep": [float(x) for x in per_t]}


# --------------------------------------------------------------------------------------------
# Scoring (no model needed: give it any images, e.g. the training images themselves)
# --------------------------------------------------------------------------------------------


def _rate(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if flags.size else None


def score(images: np.ndarray, prompts: Sequence[Prompt], root: str | Path, quantile: float = 0.05,
          extractor: Any = None) -> dict:
    """Replica, local-replica and quality numbers for ``images`` (P, S, H, W, 3) from ``prompts``."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 5 or len(images) != len(prompts):
        raise ValueError(f"score: expected ({len(prompts)}, seeds, H, W, 3) images, got {images.shape}")
    P, S = images.shape[:2]
    flat = images.reshape(P * S, *images.shape[2:])
    train = training_images(root, with_sources=True)
    if train.images.shape[1:] != images.shape[2:]:
        raise ValueError(f"score: generations are {images.shape[2:]}, training images {train.images.shape[1:]}")
    group = np.array([p.group for p in prompts])
    role = np.array([p.role for p in prompts])
    calib = role == "calibration"
    if not calib.any():
        raise ValueError("score: no calibration (held-out) prompts")

    own = [p.source_id for p in prompts for _ in range(S)]
    result = replica_flags(flat, own, train.images, train.source_ids, np.inf)
    nn_index, nn_distance = result.nn_index.reshape(P, S), result.nn_distance.reshape(P, S)
    nn_is_own = (result.nn_source_id == np.asarray(own, dtype=object)).reshape(P, S)
    planted = np.asarray(train.planted_groups, dtype=object)
    for p, prompt in enumerate(prompts):  # whole-image kinds: any row of the planted group is the prompt's own
        if prompt.group in GROUP_KINDS and prompt.planted_group is not None:
            nn_is_own[p] |= planted[nn_index[p]] == prompt.planted_group
    # Calibrate on how close held-out prompts come to *clean* training images. A prompt that
    # regurgitates a planted image is leakage of the memorization being measured, not chance
    # similarity; counting it would let memorization lower its own threshold.
    clean_train = np.asarray(train.groups) == "clean"
    if not clean_train.any():
        raise ValueError("score: the testbed has no clean training images to calibrate on")
    _, calib_distance = nearest(images[calib].reshape(-1, *images.shape[2:]), train.images[clean_train])
    threshold = calibrate_threshold(calib_distance, quantile)
    replica = nn_is_own & (nn_distance < threshold)

    # Near-duplicates: a new crop, zoom or turn of the source picture is a copy too, though it is
    # no training row; compare with the sources under their best-aligned warp, the bar the same
    # quantile of how close held-out generations come to any source under the same search.
    aligned_distance, aligned_threshold = np.full((P, S), np.nan), None
    near = group == "near_global"
    source_files = {r["source_file"] for r in read_rows(root, split="train", group="near_global")} if near.any() else set()
    source_rows = [i for i, f in enumerate(train.file_names) if f in source_files]
    if source_rows:
        references = train.images[source_rows]
        _, calib_aligned = aligned_nearest(images[calib].reshape(-1, *images.shape[2:]), references)
        aligned_threshold = calibrate_threshold(calib_aligned, quantile)
        index, distance = aligned_nearest(images[near].reshape(-1, *images.shape[2:]), references)
        source_group = planted[source_rows][index].reshape(-1, S)
        aligned_distance[near] = distance.reshape(-1, S)
        own_group = np.array([p.planted_group for p in prompts], dtype=object)[near][:, None]
        replica[near] |= (source_group == own_group) & (aligned_distance[near] < aligned_threshold)

    # Region thresholds: the same quantile of how close held-out generations come to the region,
    # per stamp and per card (shared regions), per image for moving stamps (each its own place).
    stamps, cards = stamps_of(root), stamps_of(root, "template")
    cal_images = images[calib].reshape(-1, *images.shape[2:])

    def region_bar(image: np.ndarray, mask: np.ndarray) -> float:
        return calibrate_threshold(masked_distance(cal_images, image, mask), quantile)

    region_threshold = {g: region_bar(img, mask) for g, (img, mask) in stamps.items()}
    card_threshold = {g: region_bar(img, mask) for g, (img, mask) in cards.items()}

    region_distance = np.full((P, S), np.nan)
    local_replica = np.zeros((P, S), dtype=bool)
    clean_stamp = np.zeros((P, S, max(len(stamps), 1)), dtype=bool)  # clean generation shows stamp g
    clean_card = np.zeros((P, S, max(len(cards), 1)), dtype=bool)    # ... or card g
    for p, prompt in enumerate(prompts):
        if prompt.group in REGION_KINDS:
            own_image = load_image(root, prompt.file_name)
            mask = load_mask(root, asdict(prompt))
            bar = (region_threshold[prompt.local_group] if prompt.group == "local" else
                   card_threshold[prompt.local_group] if prompt.group == "template" else region_bar(own_image, mask))
            region_distance[p] = masked_distance(images[p], own_image, mask)
            local_replica[p] = (region_distance[p] < bar) & ~replica[p]
        elif prompt.group == "clean":
            for g, (img, mask) in stamps.items():
                clean_stamp[p, :, g] = (masked_distance(images[p], img, mask) < region_threshold[g]) & ~replica[p]
            for g, (img, mask) in cards.items():
                clean_card[p, :, g] = (masked_distance(images[p], img, mask) < card_threshold[g]) & ~replica[p]

    # Moving stamps, judged a second way: the stamp drawn where ANY image of its group carries it
    # (a watermark copied to another place is still copied); the bar is the same quantile of how
    # close held-out generations come under the same search, and clean generations give its chance rate.
    places = placements(root) if (group == "moving_local").any() else {}
    place_masks = {}  # the mask file of each placement, in the order of places
    for row in (read_rows(root, split="train", group="moving_local") if places else []):
        place_masks.setdefault(row["local_group"], []).append(row["mask_file"])

    def anywhere(gen: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
        distance = np.stack([masked_distance(gen, image, mask) for image, mask in places[g]])
        return distance.min(axis=0), distance.argmin(axis=0)

    anywhere_threshold = {g: calibrate_threshold(anywhere(cal_images, g)[0], quantile) for g in places}
    stamp_anywhere = np.zeros((P, S), dtype=bool)
    anywhere_mask = np.full((P, S), None, dtype=object)  # where the stamp was found: that image's mask
    clean_anywhere = np.zeros((P, S, max(len(places), 1)), dtype=bool)
    for p, prompt in enumerate(prompts):
        if prompt.group == "moving_local":
            distance, where = anywhere(images[p], prompt.local_group)
            stamp_anywhere[p] = (distance < anywhere_threshold[prompt.local_group]) & ~replica[p]
            anywhere_mask[p] = [place_masks[prompt.local_group][i] for i in where]
        elif prompt.group == "clean":
            for k, g in enumerate(places):
                clean_anywhere[p, :, k] = (anywhere(images[p], g)[0] < anywhere_threshold[g]) & ~replica[p]

    # Prompt fidelity: how many clean training images are closer to a generation than its own
    # image (clean prompts: trained; held-out prompts: never trained). The baseline scores each
    # generation against the next prompt's image instead: what a generation that ignores its
    # prompt gets (not 0.5: some images are closer to everything than others).
    fidelity, baseline = np.full((P, S), np.nan), np.full((P, S), np.nan)
    follows = (group == "clean") | calib
    if follows.sum() >= 2:
        own_images = np.stack([load_image(root, p.file_name) for p, f in zip(prompts, follows) if f])
        gen = images[follows].reshape(-1, *images.shape[2:])
        for out, owns in ((fidelity, own_images), (baseline, np.roll(own_images, 1, axis=0))):
            out[follows] = own_rank(gen, np.repeat(owns, S, axis=0), train.images[clean_train]).reshape(-1, S)

    def group_summary(name: str, mask: np.ndarray) -> dict:
        out = {
            "prompts": int(mask.sum()), "generations": int(mask.sum() * S),
            "replica_rate": _rate(replica[mask]),
            "replica_rate_any_seed": _rate(replica[mask].any(axis=1)),
            "nn_is_own_rate": _rate(nn_is_own[mask]),
            "nn_distance_median": float(np.median(nn_distance[mask])) if mask.any() else None,
        }
        if name in ("clean", "heldout_calibration") and mask.any():
            out.update(own_rank_median=float(np.median(fidelity[mask])),
                       own_in_top1pct_rate=_rate(fidelity[mask] < 0.01),
                       other_rank_median=float(np.median(baseline[mask])),
                       other_in_top1pct_rate=_rate(baseline[mask] < 0.01))
        if name == "near_global":
            out.update(aligned_distance_median=float(np.median(aligned_distance[mask])) if mask.any() else None)
        if name == "moving_local":
            out.update(stamp_anywhere_rate=_rate(stamp_anywhere[mask]),
                       stamp_anywhere_rate_any_seed=_rate(stamp_anywhere[mask].any(axis=1)))
        if name == "clean" and places:  # the chance baseline of the moving stamps' anywhere rate
            out.update(moving_stamp_anywhere_rate=_rate(clean_anywhere[mask].mean(axis=2)))
        if name in REGION_KINDS:
            out.update(local_replica_rate=_rate(local_replica[mask]),
                       local_replica_rate_any_seed=_rate(local_replica[mask].any(axis=1)),
                       region_distance_median=float(np.nanmedian(region_distance[mask])) if mask.any() else None)
        if name == "clean" and stamps:
            per_stamp = clean_stamp[mask]  # (prompts, seeds, groups)
            out.update(local_replica_rate=_rate(per_stamp.mean(axis=2)),  # mean over stamps
                       # the chance baseline of the local group's any-seed rate: one stamp, any of the seeds
                       local_replica_rate_any_seed=_rate(per_stamp.any(axis=1).mean(axis=1)),
                       local_replica_rate_any_stamp=_rate(per_stamp.any(axis=2)))
        if name == "clean" and cards:  # the chance baseline of the template kind's rate
            out.update(template_replica_rate=_rate(clean_card[mask].mean(axis=2)))
        return out

    # v5's three groups always (a v5 evaluation reads as before), v6's where the testbed has them
    groups = {name: group_summary(name, group == name) for name in GROUP_ORDER
              if name in ("global", "local", "clean") or (group == name).any()}
    groups["heldout_calibration"] = group_summary("heldout_calibration", calib)

    # Quality: all clean-prompt generations vs the held-out images.
    quality: dict[str, Any] = {"extractor": "PixelFeatures (train.evaluate.measures.default_extractor)"}
    clean_gen = images[group == "clean"].reshape(-1, *images.shape[2:])
    held = heldout_images(root)
    if len(held) >= 2 and len(clean_gen) >= 2:
        clean_train = train.images[np.array(train.groups) == "clean"]
        quality.update(
            kid_clean_generations_vs_heldout=image_kid(clean_gen, held, extractor),
            kid_clean_training_images_vs_heldout=image_kid(clean_train, held, extractor) if len(clean_train) >= 2 else None,
            generations=int(len(clean_gen)), heldout_images=int(len(held)))

    per_generation = []
    for p, prompt in enumerate(prompts):
        for k in range(S):
            per_generation.append({
                "prompt": p, "seed": k, "group": prompt.group, "role": prompt.role, "sample_id": prompt.sample_id,
                "nn_file": train.file_names[int(nn_index[p, k])], "nn_is_own": bool(nn_is_own[p, k]),
                "nn_distance": float(nn_distance[p, k]), "own_distance": float(pixel_distance(
                    images[p, k], load_image(root, prompt.file_name))),
                "aligned_distance": None if np.isnan(aligned_distance[p, k]) else float(aligned_distance[p, k]),
                "replica": bool(replica[p, k]),
                "own_rank": None if np.isnan(fidelity[p, k]) else float(fidelity[p, k]),
                "region_distance": None if np.isnan(region_distance[p, k]) else float(region_distance[p, k]),
                "local_replica": bool(local_replica[p, k]),
                "stamp_anywhere": bool(stamp_anywhere[p, k]),
                "stamp_anywhere_mask": anywhere_mask[p, k],
            })
    return {
        "thresholds": {"quantile": quantile, "replica": threshold, "near_global_aligned": aligned_threshold,
                       "region": {str(g): t for g, t in sorted(region_threshold.items())},
                       **({"card": {str(g): t for g, t in sorted(card_threshold.items())}} if cards else {}),
                       **({"moving_anywhere": {str(g): t for g, t in sorted(anywhere_threshold.items())}}
                          if places else {})},
        "groups": groups, "quality": quality,
        "prompts": [asdict(p) for p in prompts], "generations": per_generation,
    }


def score_unprompted(images: np.ndarray, root: str | Path, thresholds: dict) -> dict:
    """Planted copies among generations nobody asked for (``images`` (N, H, W, 3) in [0, 1], from
    the empty prompt), with an evaluation's ``thresholds`` ({"replica": float, "region": {group:
    float}}): global copies (nearest training image a planted global one, closer than the replica
    threshold; also how many distinct ones) and stamps (per stamp, as clean prompts' are counted:
    the region thresholds pass 5% of held-out prompts' generations for each). For scale, the
    share of global and local training rows: what a model reproducing its rows would give."""
    train = training_images(root)
    index, distance = nearest(images, train.images)
    copy = (np.asarray(train.groups)[index] == "global") & (distance < thresholds["replica"])
    shown = [masked_distance(images, image, mask) < thresholds["region"][str(group)]
             for group, (image, mask) in stamps_of(root).items()]  # none on a testbed without local groups
    rows = read_rows(root, split="train")
    return {"images": len(images), "global_copy_rate": float(copy.mean()),
            "distinct_global_copied": len({train.file_names[i] for i in index[copy]}),
            "stamp_rate": float((np.stack(shown, axis=1) & ~copy[:, None]).mean()) if shown else None,
            "global_rows": float(np.mean([r["group"] == "global" for r in rows])),
            "local_rows": float(np.mean([r["group"] == "local" for r in rows]))}


# --------------------------------------------------------------------------------------------
# Picture grid
# --------------------------------------------------------------------------------------------


def picture_grid(images: np.ndarray, prompts: Sequence[Prompt], root: str | Path, path: str | Path,
                 rows_per_group: int = 4, scale: int = 3, evaluation: dict | None = None) -> list[dict]:
    """PNG: per row the generations of one prompt | its own training image. Returns the rows shown.

    A thin red frame marks a replica, a blue one a local replica (when ``evaluation`` is given).
    """
    from PIL import Image

    P, S, H, W, _ = images.shape
    flags = {}
    if evaluation:
        for g in evaluation["generations"]:
            flags[(g["prompt"], g["seed"])] = (255, 0, 0) if g["replica"] else (0, 90, 255) if g["local_replica"] else None
    chosen = []
    for name in GROUP_ORDER:
        members = [i for i, p in enumerate(prompts) if p.group == name and p.role == "eval"]
        if name in REGION_KINDS:  # spread the rows over the stamps / cards
            by_group: dict[int, list[int]] = {}
            for i in members:
                by_group.setdefault(prompts[i].local_group, []).append(i)
            members = [i for batch in zip(*by_group.values()) for i in batch] if by_group else []
        chosen += members[:rows_per_group]
    pad, gap = 2, 6
    cell = H * scale
    width = pad + (S + 1) * (cell + pad) + gap
    height = pad + len(chosen) * (cell + pad)
    canvas = Image.new("RGB", (width, max(height, 1)), (90, 90, 90))
    shown = []
    for r, p in enumerate(chosen):
        y = pad + r * (cell + pad)
        for k in range(S):
            tile = Image.fromarray((np.clip(images[p, k], 0, 1) * 255).round().astype(np.uint8))
            tile = tile.resize((cell, cell), Image.NEAREST)
            colour = flags.get((p, k))
            if colour:
                frame = Image.new("RGB", (cell, cell), colour)
                frame.paste(tile.crop((2, 2, cell - 2, cell - 2)), (2, 2))
                tile = frame
            canvas.paste(tile, (pad + k * (cell + pad), y))
        own = Image.fromarray((load_image(root, prompts[p].file_name) * 255).round().astype(np.uint8))
        canvas.paste(own.resize((cell, cell), Image.NEAREST), (pad + S * (cell + pad) + gap, y))
        shown.append({"row": r, "group": prompts[p].group, "prompt": prompts[p].text, "own": prompts[p].file_name})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return shown


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def testbed_of_run(model: str | Path) -> Path:
    """The testbed folder a run trained on: ``data.path`` of ``<run>/config.yaml`` beside
    ``<run>/final`` (a relative path is read from the current folder, as the trainer did)."""
    from omegaconf import OmegaConf

    config = Path(model).expanduser().resolve().parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no --testbed given and no {config} to read it from")
    cfg = OmegaConf.load(config)
    root = Path(str(cfg.data.path)).expanduser() if cfg.data.get("path") else None
    if root is None or not (root / "manifest.json").is_file():
        raise ValueError(f"{config}: data.path={cfg.data.get('path')!r} is not a testbed folder "
                         "(python -m data.testbed builds one); pass --testbed")
    return root


def evaluate(model: str | Path, testbed: str | Path | None, out: str | Path, seeds: int = 4, steps: int = 25,
             guidance: float = 3.0, local_per_group: int = 6, n_clean: int = 128, n_calibration: int = 100, seed: int = 0,
             batch: int = 64, grid_rows: int = 4, quantile: float = 0.05, spacing: str = "trailing",
             rescore: bool = False, unprompted: int = 256) -> dict:
    root = Path(testbed) if testbed else testbed_of_run(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    resolution = int(read_manifest(root)["params"]["resolution"])
    prompts = select_prompts(root, local_per_group, n_clean, n_calibration, seed)
    start = time.perf_counter()
    saved = out / "generations.npz"
    if rescore:  # the measures changed, the model did not: score the saved images again
        if not saved.is_file():
            raise FileNotFoundError(f"--rescore: no {saved} from an earlier evaluation")
        with np.load(saved) as kept:
            images = kept["images"].astype(np.float32) / 255.0
            empty = kept["unprompted"].astype(np.float32) / 255.0 if "unprompted" in kept else None
        if images.shape[:2] != (len(prompts), seeds):
            raise ValueError(f"--rescore: {saved} holds {images.shape[:2]} (prompts, seeds), the settings give "
                             f"{(len(prompts), seeds)}; pass the settings of the earlier evaluation")
        earlier = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
        gen_seconds = earlier.get("generation_seconds")
    else:
        pipe = load_pipeline(model, spacing)
        images = generate(pipe, [p.text for p in prompts], seeds, resolution, steps, guidance, batch, seed)
        # the empty prompt without guidance: the unconditional model (copies drawn unasked)
        empty = (generate(pipe, [""], unprompted, resolution, steps, 1.0, batch, seed)[0] if unprompted
                 else np.zeros((0, resolution, resolution, 3), np.float32))
        gen_seconds = round(time.perf_counter() - start, 1)
        as_uint8, empty_uint8 = ((x * 255).round().astype(np.uint8) for x in (images, empty))
        np.savez_compressed(saved, images=as_uint8, unprompted=empty_uint8)
        # score what is saved, so --rescore reproduces it
        images, empty = as_uint8.astype(np.float32) / 255.0, empty_uint8.astype(np.float32) / 255.0
    result = score(images, prompts, root, quantile)
    result["unprompted"] = score_unprompted(empty, root, result["thresholds"]) if empty is not None and len(empty) else None
    # fixed noise (not the draw's seed): every model and every draw is compared on the same inputs;
    # a property of the model, so --rescore keeps the earlier value when there is one
    loss_keys = ("heldout_loss", "images", "timesteps", "per_timestep")
    if rescore and "heldout_loss" in earlier.get("quality", {}):
        result["quality"].update({k: earlier["quality"][k] for k in loss_keys})
    else:
        result["quality"].update(heldout_loss(pipe if not rescore else load_pipeline(model, spacing), root))
    shown = picture_grid(images, prompts, root, out / "grid.png", grid_rows, evaluation=result)
    g = result["groups"]
    summary = {
        "global_replica_rate": g["global"]["replica_rate"],
        "local_replica_rate": g["local"]["local_replica_rate"],
        "clean_replica_rate": g["clean"]["replica_rate"],
        "clean_local_replica_rate": g["clean"].get("local_replica_rate"),
        "kid_clean_vs_heldout": result["quality"].get("kid_clean_generations_vs_heldout"),
        "heldout_loss": result["quality"]["heldout_loss"],
        "clean_own_rank_median": g["clean"].get("own_rank_median"),
        "unprompted_global_copy_rate": (result["unprompted"] or {}).get("global_copy_rate"),
        "unprompted_stamp_rate": (result["unprompted"] or {}).get("stamp_rate"),
    }
    # v6 kinds: the whole-image replica rate of near_global / caption_dup prompts, the region
    # (local) replica rate of template / moving_local prompts
    for kind in ("near_global", "caption_dup", "template", "moving_local"):
        if kind in g:
            summary[f"{kind}_replica_rate"] = g[kind]["local_replica_rate" if kind in REGION_KINDS else "replica_rate"]
    if "moving_local" in g:
        summary["moving_local_anywhere_rate"] = g["moving_local"]["stamp_anywhere_rate"]
    result = {"summary": summary, "model": str(model), "testbed": str(root),
              "settings": {"seeds": seeds, "steps": steps, "guidance": guidance, "scheduler": f"DDIM ({spacing})",
                           "local_per_group": local_per_group, "n_clean": n_clean,
                           "n_calibration": n_calibration, "seed": seed,
                           "unprompted": 0 if empty is None else len(empty),
                           "resolution": resolution},
              "generation_seconds": gen_seconds, **result, "grid": {"file": "grid.png", "rows": shown}}
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.testbed.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a diffusers pipeline folder, e.g. RUN/final")
    p.add_argument("--testbed", default=None, help="the testbed folder (default: the one RUN/config.yaml trained on)")
    p.add_argument("--out", required=True, help="folder for eval.json, grid.png, generations.npz")
    p.add_argument("--seeds", type=int, default=4, help="generations per prompt")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--local-per-group", type=int, default=6, help="local rows sampled per local group")
    p.add_argument("--clean", type=int, default=128, help="clean rows sampled and scored")
    p.add_argument("--calibration", type=int, default=100,
                   help="held-out rows whose generations set the thresholds (the recipe has 100)")
    p.add_argument("--quantile", type=float, default=0.05, help="calibration quantile of the held-out prompts' distances")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="images per pipeline call")
    p.add_argument("--grid-rows", type=int, default=4, help="grid rows per group")
    p.add_argument("--spacing", default="trailing", choices=("trailing", "leading", "linspace"),
                   help="DDIM timestep spacing")
    p.add_argument("--rescore", action="store_true",
                   help="score OUT/generations.npz of an earlier run again instead of generating")
    p.add_argument("--unprompted", type=int, default=256,
                   help="empty-prompt generations without guidance, checked for planted copies (0 = none)")
    a = p.parse_args(argv)
    result = evaluate(a.model, a.testbed, a.out, a.seeds, a.steps, a.guidance, a.local_per_group, a.clean,
                      a.calibration, a.seed, a.batch, a.grid_rows, a.quantile, a.spacing, a.rescore, a.unprompted)
    print(json.dumps({"summary": result["summary"], "thresholds": result["thresholds"],
                      "generation_seconds": result["generation_seconds"],
                      "groups": {k: {kk: v for kk, v in d.items()} for k, d in result["groups"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
