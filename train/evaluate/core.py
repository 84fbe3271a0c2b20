"""Generate probes with capture, judge them against the training set, summarize: the part the
training-time eval hook and the offline audit share.

Work is sharded over ranks: each rank generates every ``world``-th (prompt, seed) job and judges
it against the full training feature bank (a matrix product, cheap next to generation); small
per-job records are then gathered on every rank, so every rank computes the same summary and no
rank waits on a long rank-0-only job. Images stay on the rank that made them until the worst
cases are known; only those panels travel.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from train.evaluate.measures import default_extractor, kernel_distance
from train.evaluate.local import be_region, heatmap_overlay, localization_iou, prompt_maps, region_neighbours
from train.evaluate.sampling import Generation, generate_with_capture
from train.evaluate.similarity import PixelBackend, build_backend, feature_bank, gather_lists
from train.evaluate.trainset import Probe, TrainingSet
from train.sscd import to_uint8

log = logging.getLogger(__name__)

KID_REFERENCE_IMAGES = 200


def _rank_world(accelerator) -> tuple[int, int]:
    return (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)


# --------------------------------------------------------------------------------------------
# Judge: similarity to the training set, globally and inside the BE region
# --------------------------------------------------------------------------------------------


class Judge:
    """Holds the backend and the cached training features; judges batches of generations.

    Construction is collective under accelerate (features are extracted in shards when not
    cached): call it on every rank.
    """

    def __init__(self, cfg, trainset: TrainingSet, cache_dir, accelerator=None, device="cpu"):
        self.cfg, self.trainset = cfg, trainset
        self.backend = build_backend(cfg, device)
        self.threshold = (cfg.replica_threshold if cfg.replica_threshold is not None
                          else self.backend.default_threshold)
        fingerprint, count = trainset.fingerprint, len(trainset)
        self.bank = feature_bank(self.backend, fingerprint, count, trainset.images, cache_dir, accelerator)
        self.pixel_size = cfg.pixel_size or trainset.resolution
        self.pixel_bank = None
        if cfg.local:
            if isinstance(self.backend, PixelBackend) and self.backend.size == cfg.pixel_size:
                self.pixel_bank = self.bank
            else:
                pixel = PixelBackend(cfg.pixel_size, cfg.pixel_k, cfg.pixel_alpha)
                self.pixel_bank = feature_bank(pixel, fingerprint, count, trainset.images, cache_dir, accelerator)
        self._kid_reference: np.ndarray | None = None

    def kid_reference(self) -> np.ndarray:
        """Quality-metric features of a fixed random sample of training images."""
        if self._kid_reference is None:
            rng = np.random.default_rng(0)
            count = min(KID_REFERENCE_IMAGES, len(self.trainset))
            positions = sorted(rng.choice(len(self.trainset), count, replace=False).tolist())
            self._kid_reference = default_extractor()(self.trainset.images(positions))
        return self._kid_reference

    def judge(self, gen: Generation, probes: Sequence[Probe]) -> list[dict]:
        cfg, ts = self.cfg, self.trainset
        match = self.backend.match(self.backend.features(gen.images), self.bank)
        replica = self.backend.is_replica(match.score, self.threshold)
        shape = gen.images.shape[1:3]
        weights = np.stack([be_region(m, shape, cfg.region, cfg.region_quantile) for m in gen.region_maps])
        local = (region_neighbours(gen.images, weights, self.pixel_bank, self.pixel_size, cfg.pixel_k,
                                   cfg.pixel_alpha) if self.pixel_bank is not None else None)
        masks = [ts.mask(probe.row, shape) if probe.row is not None else None for probe in probes]
        masks = [m if m is not None and m.any() else None for m in masks]
        # the saliency-free baseline of a region's IoU: the maps of this batch's generations that
        # copy nothing (no planted region, neither a replica nor a local match) on the same mask
        local_match = (local.nl2 < cfg.local_threshold) if local is not None else np.zeros(len(probes), bool)
        plain = [j for j, m in enumerate(masks) if m is None and not replica[j] and not local_match[j]]
        out = []
        for i, probe in enumerate(probes):
            position = int(match.index[i])
            verdict: dict[str, Any] = {
                "similarity": {"backend": self.backend.name, "score_name": self.backend.score_name,
                               "score": float(match.score[i]), "threshold": float(self.threshold),
                               "nearest_position": position, "nearest_sample_id": ts.sample_ids[position],
                               "nearest_caption": ts.captions[position],
                               "nearest_is_own": probe.sample_id is not None and ts.sample_ids[position] == probe.sample_id},
                "replica": bool(replica[i]),
                "local": None, "local_replica": False,
            }
            if local is not None:
                lp = int(local.index[i])
                verdict["local"] = {"nl2": float(local.nl2[i]), "distance": float(local.distance[i]),
                                    "threshold": float(cfg.local_threshold), "region_matches": bool(local_match[i]),
                                    "nearest_position": lp, "nearest_sample_id": ts.sample_ids[lp]}
                verdict["local_replica"] = bool(local_match[i]) and not bool(replica[i])
            if masks[i] is not None:
                verdict["iou"], verdict["trivial_iou"] = localization_iou(gen.region_maps[i], masks[i])
                verdict["clean_map_iou"] = (float(np.mean([localization_iou(gen.region_maps[j], masks[i])[0]
                                                           for j in plain])) if plain else None)
            out.append(verdict)
        return out


# --------------------------------------------------------------------------------------------
# Generation + judgement over ranks
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    records: list[dict]  # one per (probe, seed), in job order, identical on every rank
    panels: dict[int, bytes] = field(default_factory=dict)  # job -> PNG of gen | nearest | heatmap
    kid: float | None = None  # quality: KID of the generations vs training images (None: not computed)


def _region_summary(region_map: np.ndarray, shape: tuple[int, int], cfg, cells: int = 16) -> dict:
    """A compact, JSON-able account of the region (eval.region_map): its box, area and a coarse map."""
    region = be_region(region_map, shape, cfg.region, cfg.region_quantile)
    ys, xs = np.nonzero(region > 0.5)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
    h, w = region_map.shape
    step_y, step_x = max(1, math.ceil(h / cells)), max(1, math.ceil(w / cells))
    coarse = region_map[::step_y, ::step_x]
    return {"map_kind": cfg.region_map, "mode": cfg.region, "quantile": cfg.region_quantile,
            "area": float(region.mean()), "box": box, "map_shape": [h, w], "map": np.round(coarse, 5).tolist()}


def _record(job: int, probe: Probe, seed: int, gen: Generation, i: int, cfg) -> dict:
    be = gen.be_maps[i]
    return {
        "job": job, "prompt": probe.prompt, "seed": int(seed), "kind": probe.kind,
        "sample_id": probe.sample_id, "end_token_index": int(gen.end_index[i]),
        "magnitude": float(gen.magnitude[i].mean()), "magnitude_first": float(gen.magnitude[i][0]),
        "be_magnitude": float(gen.be_magnitude[i].mean()), "be_magnitude_first": float(gen.be_magnitude[i][0]),
        "magnitude_steps": np.round(gen.magnitude[i], 5).tolist(),
        "be_magnitude_steps": np.round(gen.be_magnitude[i], 5).tolist(),
        "be_mean": float(be.mean()), "be_max": float(be.max()),
        "region": _region_summary(gen.region_maps[i], gen.images.shape[1:3], cfg),
    }


def evaluate_probes(cfg, pipe, probes: Sequence[Probe], *, height: int, width: int, judge: Judge | None = None,
                    accelerator=None, autocast_dtype=None, progress: bool = False, num_panels: int | None = None,
                    annotate=None) -> EvalResult:
    """Generate every (probe, seed) job of ``cfg.seeds`` with capture and judge it.

    ``judge=None`` is detect-only: magnitudes and BE signals, no training images. Panels are made
    for the ``num_panels`` (default ``cfg.num_panels``) worst jobs (:func:`worst_first`). ``annotate(gen, probes) -> list[dict]`` adds fields to each
    record while the batch's images are at hand (e.g. ground-truth distances).
    """
    from tqdm.auto import tqdm

    rank, world = _rank_world(accelerator)
    jobs = [(p, s) for p in range(len(probes)) for s in cfg.seeds]
    seeds_together = cfg.region_map_seeds != "none" and len(cfg.seeds) > 1
    if seeds_together:  # a prompt's seeds share a rank and a batch: their maps are read together
        per_batch = max(1, cfg.batch_size // len(cfg.seeds)) * len(cfg.seeds)
        mine = [j for j, (p, _) in enumerate(jobs) if p % world == rank]
    else:
        per_batch = cfg.batch_size
        mine = list(range(len(jobs)))[rank::world]
    batches = [mine[i:i + per_batch] for i in range(0, len(mine), per_batch)]
    records, kid_rows, kept = [], [], {}
    extractor = default_extractor()
    bar = tqdm(total=len(jobs), desc="generate", disable=not progress or rank != 0, dynamic_ncols=True)
    for batch in batches:
        batch_probes = [probes[jobs[j][0]] for j in batch]
        gen = generate_with_capture(pipe, [p.prompt for p in batch_probes], [jobs[j][1] for j in batch],
                                    steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=height,
                                    width=width, be_layers=list(cfg.be_layers) if cfg.be_layers else "default",
                                    autocast_dtype=autocast_dtype, region_map=cfg.region_map,
                                    region_map_steps=cfg.region_map_steps)
        if seeds_together:
            gen = dataclasses.replace(gen, region_maps=prompt_maps(
                gen.images, gen.region_maps, np.array([jobs[j][0] for j in batch]), cfg.region_map_seeds == "agreement"))
        verdicts = judge.judge(gen, batch_probes) if judge is not None else [{} for _ in batch]
        if annotate is not None:
            verdicts = [{**v, **extra} for v, extra in zip(verdicts, annotate(gen, batch_probes))]
        features = extractor(gen.images) if judge is not None and cfg.quality else [None] * len(batch)
        for i, job in enumerate(batch):
            records.append({**_record(job, batch_probes[i], jobs[job][1], gen, i, cfg), **verdicts[i]})
            kid_rows.append((job, features[i]))
            kept[job] = (to_uint8(gen.images[i]), gen.region_maps[i])
        bar.update(len(batch) * world)
    bar.close()

    records = sorted(gather_lists(accelerator, records), key=lambda r: r["job"])
    result = EvalResult(records)
    if judge is not None and cfg.quality:
        rows = sorted(gather_lists(accelerator, kid_rows), key=lambda r: r[0])
        result.kid = _kid([f for _, f in rows], judge)

    count = cfg.num_panels if num_panels is None else num_panels
    chosen = worst_first(records)[:count]
    mine_panels = [(job, panel_png(*kept[job], judge, records[job])) for job in chosen if job in kept]
    result.panels = dict(gather_lists(accelerator, mine_panels))
    return result


def _kid(features: list, judge: Judge) -> float:
    rows = [f for f in features if f is not None]
    if len(rows) < 2:
        return float("nan")
    return kernel_distance(np.stack(rows), judge.kid_reference())


def worst_first(records: list[dict]) -> list[int]:
    """Job ids, most copy-like first: replicas, then local replicas, then by global score
    (higher severity first); detect-only records by BE-masked magnitude."""
    def key(r: dict):
        sim = r.get("similarity")
        if sim is None:
            return (0, 0, -r["be_magnitude"])
        severity = sim["score"] if sim["score_name"] != "nL2" else -sim["score"]
        return (not r["replica"], not r["local_replica"], -severity)

    return [r["job"] for r in sorted(records, key=key)]


def panel_png(image_u8: np.ndarray, be_map: np.ndarray, judge: Judge | None, record: dict,
              min_side: int = 192) -> bytes:
    """generation | nearest training image | BE heatmap overlay, side by side, as PNG bytes
    (small images are enlarged with nearest-neighbour so pixels stay visible)."""
    image = image_u8.astype(np.float32) / 255.0
    tiles = [image]
    sim = record.get("similarity")
    if judge is not None and sim is not None:
        tiles.append(judge.trainset.images([sim["nearest_position"]])[0])
    tiles.append(heatmap_overlay(image, be_map))
    h = image.shape[0]
    gap = np.ones((h, max(2, h // 32), 3), dtype=np.float32)
    strip = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    pil = Image.fromarray(to_uint8(strip))
    if h < min_side:
        factor = math.ceil(min_side / h)
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def summarize(result: EvalResult, prefix: str = "eval/") -> dict[str, float]:
    """The ``eval/`` metrics of one evaluation (NaN where a metric has nothing to average)."""
    records = result.records
    out: dict[str, float] = {
        f"{prefix}num_generations": len(records),
        f"{prefix}magnitude": _mean([r["magnitude"] for r in records]),
        f"{prefix}magnitude_first_step": _mean([r["magnitude_first"] for r in records]),
        f"{prefix}be_magnitude": _mean([r["be_magnitude"] for r in records]),
        f"{prefix}be_mean": _mean([r["be_mean"] for r in records]),
    }
    judged = [r for r in records if "replica" in r]
    if judged:
        out[f"{prefix}replica_rate"] = _mean([float(r["replica"]) for r in judged])
        out[f"{prefix}local_replica_rate"] = _mean([float(r["local_replica"]) for r in judged])
        scores = np.array([r["similarity"]["score"] for r in judged])
        higher = judged[0]["similarity"]["score_name"] != "nL2"
        # DCR's "dataset similarity score": the 95th percentile of per-generation max similarity;
        # for the pixel distance the mirror image, the 5th percentile of nL2.
        out[f"{prefix}similarity_{'p95' if higher else 'p05'}"] = float(np.percentile(scores, 95 if higher else 5))
        for kind in sorted({r["kind"] for r in judged}):
            group = [r for r in judged if r["kind"] == kind]
            out[f"{prefix}{kind}/replica_rate"] = _mean([float(r["replica"]) for r in group])
            out[f"{prefix}{kind}/local_replica_rate"] = _mean([float(r["local_replica"]) for r in group])
    located = [r for r in records if r.get("iou") is not None]
    if located:
        out[f"{prefix}localization_iou"] = _mean([r["iou"] for r in located])
        out[f"{prefix}trivial_iou"] = _mean([r["trivial_iou"] for r in located])
        baseline = [r["clean_map_iou"] for r in located if r.get("clean_map_iou") is not None]
        if baseline:
            out[f"{prefix}clean_map_iou"] = _mean(baseline)
        out[f"{prefix}num_localized"] = len(located)
    if result.kid is not None:
        out[f"{prefix}kid"] = result.kid
    return out
