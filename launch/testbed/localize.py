"""Does the bright-ending map outline what a local replica copied? IoU per region kind.

``python -m launch.testbed.localize --model RUN/final [--testbed DIR] [--seeds 4] [--per-group 6] [--reference BASE/final] [--out FILE.json]``

Generates the region kinds' prompts (local stamps, v6 cards and moving stamps: ``--per-group``
rows per stamp or card), clean prompts and the held-out calibration prompts with the audit's
sampler (:func:`train.evaluate.sampling.generate_with_capture`), which gives both maps
localization can read: the bright-ending map of the last denoising step (``be``) and the region
map ``be_magnitude`` (the BE map weighted by the early text-conditional difference; ``eval.region_map``),
and, with ``--reference`` (the model the fine-tune started from), ``ref_gain``: each generation
noised again and denoised by both models, the map of latent cells where the fine-tune's error is
below the reference's (what fine-tuning taught, cell by cell: the monitor's ``ref_gain_topk`` as a
map), and ``agreement_x_ref_gain``, the two maps multiplied (:func:`joint_map`). It judges the
generations as ``python -m launch.testbed.evaluate`` does
(:func:`launch.testbed.evaluate.score`), and reports, per map and kind, over the generations that
ARE local replicas:

* ``iou``: the map binarized at the mask's area (:func:`train.evaluate.local.localization_iou`)
  against the own image's ground-truth mask (stamp / card pixels);
* ``all_ones_iou``: what marking the whole image scores;
* ``clean_map_iou``: the saliency-free baseline: the maps of clean-prompt generations (no copied
  region) scored against the same masks: where the model attends to the end token anyway;
* ``moving_local_anywhere``: the same over the moving-stamp generations that draw their stamp at
  any place of its group (``stamp_anywhere``), against the mask of the place it was found at.

The issue's bar: ``iou`` >= 0.5 and >= 0.2 above both baselines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from launch.testbed.evaluate import REGION_KINDS, load_pipeline, score, select_prompts, testbed_of_run
from launch.testbed.reading import load_mask, read_manifest
from train.evaluate.local import localization_iou, prompt_maps


def generate(pipe, texts: list[str], seeds: int, resolution: int, steps: int, guidance: float,
             batch: int = 64, first_seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(P, S, H, W, 3) images and {map kind: (P, S, h, w) maps}, generation (i, k) seeded by first_seed + k."""
    from train.evaluate.config import EvalConfig
    from train.evaluate.sampling import generate_with_capture

    jobs = [(i, k) for i in range(len(texts)) for k in range(seeds)]
    images, be, region = [], [], []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        gen = generate_with_capture(pipe, [texts[i] for i, _ in chunk], [first_seed + k for _, k in chunk], steps=steps,
                                    guidance_scale=guidance, height=resolution, width=resolution,
                                    region_map="be_magnitude", region_map_steps=EvalConfig.region_map_steps)
        images.append(np.asarray(gen.images, dtype=np.float32))
        be.append(np.asarray(gen.be_maps, dtype=np.float32))
        region.append(np.asarray(gen.region_maps, dtype=np.float32))
    def per_prompt(parts: list[np.ndarray]) -> np.ndarray:
        joined = np.concatenate(parts)
        return joined.reshape(len(texts), seeds, *joined.shape[1:])

    images, region = per_prompt(images), per_prompt(region)
    return images, {"be": per_prompt(be), "be_magnitude": region, **seed_maps(images, region)}


def seed_maps(images: np.ndarray, region: np.ndarray) -> dict[str, np.ndarray]:
    """The region map read over each prompt's seeds ((P, S, ...) in; :func:`train.evaluate.local.prompt_maps`):
    ``be_magnitude_seeds`` averaged, ``be_magnitude_agreement`` also times the seeds' pixel agreement."""
    P, S = region.shape[:2]
    flat_images, flat_maps = images.reshape(P * S, *images.shape[2:]), region.reshape(P * S, *region.shape[2:])
    ids = np.repeat(np.arange(P), S)
    return {name: prompt_maps(flat_images, flat_maps, ids, agreement).reshape(region.shape)
            for name, agreement in (("be_magnitude_seeds", False), ("be_magnitude_agreement", True))}


def ref_gain_maps(pipe, reference, images: np.ndarray, texts: list[str], timesteps=(100, 300),
                  batch: int = 64) -> np.ndarray:
    """(P, S, h, w): per generation, the reference's squared error less the fine-tune's per latent
    cell (clipped at 0), summed over ``timesteps``, with noise fixed per generation. Both read the
    image through the fine-tune's VAE (fine-tuning leaves it frozen), each with its own text encoder."""
    import torch
    from diffusers import DDPMScheduler

    from launch.testbed.evaluate import _torch_generator
    from train.models import encode_text
    from train.monitor.signals import cell_error

    P, S = images.shape[:2]
    flat = images.reshape(P * S, *images.shape[2:])
    prompts = [texts[i] for i in range(P) for _ in range(S)]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def encode(model, chunk: list[str]):
        return encode_text(model.tokenizer, model.text_encoder, chunk, "cpu")

    out = []
    with torch.no_grad():
        for start in range(0, len(flat), batch):
            pixels = torch.from_numpy(flat[start:start + batch]).permute(0, 3, 1, 2)
            latents = pipe.vae.encode(pixels * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
            chunk = prompts[start:start + batch]
            cond, cond_ref = encode(pipe, chunk), encode(reference, chunk)
            noise = torch.stack([torch.randn(latents.shape[1:], generator=_torch_generator(f"ref-gain|{start + j}"))
                                 for j in range(len(chunk))])
            gain = torch.zeros(latents.shape[0], *latents.shape[2:])
            for t in timesteps:
                steps = torch.full((len(chunk),), t, dtype=torch.long)
                noisy = scheduler.add_noise(latents, noise, steps)
                target = (scheduler.get_velocity(latents, noise, steps)
                          if scheduler.config.prediction_type == "v_prediction" else noise)
                err = cell_error(pipe.unet(noisy, steps, cond).sample, target)
                gain += (cell_error(reference.unet(noisy, steps, cond_ref).sample, target) - err).clamp_min(0)
            out.append(gain.numpy())
    joined = np.concatenate(out)
    return joined.reshape(P, S, *joined.shape[1:])


def joint_map(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Where two maps of the same grid agree: each normalized to sum 1 per generation, multiplied."""
    if first.shape != second.shape:
        raise ValueError(f"joint_map needs maps on one grid, got {first.shape} and {second.shape}")

    def unit(m: np.ndarray) -> np.ndarray:
        return m / np.maximum(m.sum(axis=(-2, -1), keepdims=True), 1e-12)

    return unit(first) * unit(second)


def localization(images: np.ndarray, maps: np.ndarray, prompts, root: str | Path, result: dict | None = None) -> dict:
    """Per region kind: IoU of the map on local replicas and the two baselines (module doc).
    ``result``: the generations' judgement (:func:`score`), when several maps share it."""
    result = result or score(images, prompts, root)
    S = images.shape[1]
    generations = np.array(result["generations"], dtype=object).reshape(len(prompts), S)
    clean_maps = [maps[p, k] for p, prompt in enumerate(prompts) if prompt.group == "clean" and prompt.role == "eval"
                  for k in range(S)]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    out = {}
    # each region kind on its local replicas, against the own image's mask; the moving stamps also
    # where they were drawn anywhere in their group, against the mask of the place they were found at
    for name, kind, flag, mask_file in [(k, k, "local_replica", None) for k in REGION_KINDS] + [
            ("moving_local_anywhere", "moving_local", "stamp_anywhere", "stamp_anywhere_mask")]:
        ious, ones, baseline, all_ious = [], [], [], []
        for p, prompt in enumerate(prompts):
            if prompt.group != kind or prompt.role != "eval":
                continue
            for k in range(S):
                gen = generations[p, k]
                mask = load_mask(root, {"mask_file": gen[mask_file] if mask_file else prompt.mask_file,
                                        "group": prompt.group, "file_name": prompt.file_name})
                value, trivial = localization_iou(maps[p, k], mask)
                all_ious.append(value)
                if gen[flag]:
                    ious.append(value)
                    ones.append(trivial)
                    baseline.append(np.mean([localization_iou(m, mask)[0] for m in clean_maps]) if clean_maps else np.nan)
        if all_ious:
            out[name] = {"generations": len(all_ious), "local_replicas": len(ious), "iou": mean(ious),
                         "all_ones_iou": mean(ones), "clean_map_iou": mean(baseline), "iou_all_generations": mean(all_ious)}
    return {"kinds": out, "map_shape": list(maps.shape[2:]),
            "local_replica_rates": {k: v.get("local_replica_rate") for k, v in result["groups"].items() if k in REGION_KINDS}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.testbed.localize", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a pipeline folder, e.g. RUN/final")
    p.add_argument("--testbed", help="the testbed folder (default: the one RUN/config.yaml trained on)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--per-group", type=int, default=6, help="prompts per stamp / card")
    p.add_argument("--clean", type=int, default=32, help="clean prompts (the saliency-free baseline)")
    p.add_argument("--calibration", type=int, default=100, help="held-out prompts that set the thresholds")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0,
                   help="draw: which rows per stamp and which clean rows (as evaluate --seed), sampler seeds from seed x seeds")
    p.add_argument("--reference", help="the pipeline the fine-tune started from: adds the ref_gain map")
    p.add_argument("--out", help="also write the result here (JSON)")
    a = p.parse_args(argv)
    root = Path(a.testbed) if a.testbed else testbed_of_run(a.model)
    prompts = [q for q in select_prompts(root, a.per_group, a.clean, a.calibration, a.seed)
               if q.group in REGION_KINDS + ("clean",) or q.role == "calibration"]
    pipe = load_pipeline(a.model)
    images, maps = generate(pipe, [q.text for q in prompts], a.seeds, int(read_manifest(root)["params"]["resolution"]),
                            a.steps, a.guidance, first_seed=a.seed * a.seeds)
    if a.reference:
        maps["ref_gain"] = ref_gain_maps(pipe, load_pipeline(a.reference), images, [q.text for q in prompts])
        maps["agreement_x_ref_gain"] = joint_map(maps["be_magnitude_agreement"], maps["ref_gain"])
    judged = score(images, prompts, root)  # one judgement; each map is read against the same replicas
    result = {kind: localization(images, m, prompts, root, judged) for kind, m in maps.items()}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
