"""Run configuration: a dataclass schema merged with YAML files and ``key=value`` overrides.

A run's config is ``schema <- configs/base.yaml <- --config files (in order) <- CLI dotlist``.
Every layer is checked against the schema *before* merging so that a typo fails at start with a
message that names the key and the closest valid one (OmegaConf's own message names only the
parent). Settings that cannot work together are refused here too, not at step 5,000.
"""

from __future__ import annotations

import argparse
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from train.evaluate.config import EvalConfig, validate_eval
from train.util import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "configs" / "base.yaml"


# --------------------------------------------------------------------------------------------
# Schema. Defaults here suit a real SD fine-tune; configs/base.yaml holds the embedded CPU default.
# --------------------------------------------------------------------------------------------


@dataclass
class TinyModelConfig:
    """A small SD-architecture model built offline (CPU runs, tests, the memorization testbed)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    down_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    )
    layers_per_block: int = 1
    attention_heads: int = 4
    cross_attention_dim: int = 32
    text_layers: int = 2
    text_intermediate_size: int = 64
    text_heads: int = 2
    vae_channels: list[int] = field(default_factory=lambda: [32, 64])
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    init_seed: int = 0


@dataclass
class ModelConfig:
    pretrained: Optional[str] = None  # a diffusers folder or a hub id
    preset: Optional[str] = None  # "tiny": build a small model offline
    revision: Optional[str] = None
    variant: Optional[str] = None
    init_from: Optional[str] = None  # start NEW training from a checkpoint's / final's UNet weights
    cache_dir: str = "~/.cache/copyguard"  # built presets and generated data sets live here
    prediction_type: Optional[str] = None  # override the scheduler's (epsilon | v_prediction)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 4  # per device, per micro-step
    gradient_accumulation_steps: int = 1
    lr: float = 1e-5
    lr_scheduler: str = "constant"  # any diffusers get_scheduler name
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw | adamw8bit (needs bitsandbytes)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    use_ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: Optional[float] = None  # min-SNR weighting (5.0 is the paper's value)
    noise_offset: float = 0.0
    caption_dropout: float = 0.0  # probability of training on the empty prompt (enables CFG)
    text_encoder: bool = False  # also train the text encoder
    checkpoint_every: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    on_nonfinite: str = "error"  # error | skip (every rank skips the same step)


@dataclass
class LoggingConfig:
    every: int = 10  # log train/ and perf/ every N optimizer steps
    progress_bar: bool = True
    wandb: bool = False
    wandb_project: str = "copyguard"
    wandb_entity: Optional[str] = None
    wandb_mode: Optional[str] = None  # None: $WANDB_MODE if set, else "offline"
    wandb_group: Optional[str] = None  # e.g. the ablation grid
    wandb_job_type: Optional[str] = None  # e.g. the ablation variant
    run_name: Optional[str] = None


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)
    every: int = 0  # steps; 0 = only at the end (when prompts are given)
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    images_per_prompt: int = 1
    seed: int = 0


@dataclass
class FlagConfig:
    policy: str = "zscore"  # zscore | quantile | absolute (see train/monitor/ledger.py)
    min_obs: int = 2
    # named raise_at/clear_at, not on/off: YAML reads a bare `on:` key as the boolean true
    raise_at: float = 3.0  # flag when the score (zscore: its z; absolute: itself) reaches this
    clear_at: float = 2.0  # ... and keep the flag until it falls below this (hysteresis)
    quantile: float = 0.02
    quantile_off: float = 0.04


@dataclass
class MonitorConfig:
    """Per-sample memorization signals on every batch, a ledger, and flags (train/monitor)."""

    enabled: bool = True
    signals: list[str] = field(default_factory=lambda: [
        "be_mass", "be_topk", "be_entropy", "token_entropy", "start_mass", "loss", "magnitude", "be_magnitude"])
    signal_weights: dict[str, float] = field(default_factory=dict)  # default 1.0 each
    be_layers: Optional[list[str]] = None  # None: the highest-resolution cross-attention of the down path
    # Attention over tokens from the down path and the mid block: every attn2 layer (Ren et al.)
    # cost 10% of a CPU step on the tiny preset, these cost 5% (tests/bench/bench_monitor.py).
    token_layers: Optional[list[str]] = field(default_factory=lambda: ["down_blocks", "mid_block"])
    # drawn: the BE read from samples whose drawn t < be_max_t (free) | probe: a no-grad pass at
    # t=probe_t every probe_every steps. On the testbed both flag alike (docs/testbed.md) and drawn
    # costs 4% of a step vs 7% for probe, so drawn is the default.
    be_mode: str = "drawn"
    be_max_t: int = 100
    probe_t: int = 20
    probe_every: int = 10
    probe_samples: int = 0  # per rank; 0 = the whole micro-batch
    magnitude_every: int = 10  # 0 = never; the extra empty-prompt pass
    magnitude_samples: int = 0  # per rank; 0 = the whole micro-batch
    topk_frac: float = 0.1
    t_bins: int = 10
    length_edges: list[int] = field(default_factory=lambda: [4, 8, 12, 16, 24, 32, 48, 64])
    stats_horizon: int = 2000
    stats_warmup: int = 8
    flag: FlagConfig = field(default_factory=FlagConfig)
    label_column: Optional[str] = None  # a ground-truth column the user names (e.g. "group"): detection AUCs
    negative_label: str = "clean"
    table_size: int = 16  # rows of the W&B table of top flagged samples


@dataclass
class CaptionMitigationConfig:
    """Caption perturbations (Somepalli et al. 2023); the papers' values are in configs/mitigation/."""

    target: str = "all"  # all | flagged
    start_step: int = 0
    multiple_captions: bool = False  # MC
    replace_p: float = 0.0  # RC (paper: 0.1)
    replace_tokens: int = 4
    add_token_p: float = 0.0  # RT (paper: 0.1)
    add_tokens: int = 2
    repeat_word_p: float = 0.0  # CWR (paper: 0.1)
    repeat_words: int = 2
    drop_word_p: float = 0.0
    shuffle_p: float = 0.0
    embedding_noise: float = 0.0  # GN: lambda of N(0, I) on the text embedding (paper: 0.1)


@dataclass
class WeightMitigationConfig:
    mode: str = "none"  # none | downweight | drop | score (see train/mitigate/weights.py)
    factor: float = 0.1
    score_on: float = 1.0
    start_step: int = 0
    dedup: bool = False  # weight 1 / (duplicate group size); needs no monitor
    dedup_max_distance: float = 0.02  # same hash and 8x8 colour thumbnails this close (0-1) = duplicates
    # how the row weights act: loss (each row's loss x its weight) | sampling (rows drawn in
    # proportion, each epoch shorter; every batch slot then trains at full weight) | caption (a row
    # keeps its caption with probability = its weight, else trains on the empty prompt at full
    # weight: a repeat's pixels still train, its caption-image link ~once per epoch)
    dedup_by: str = "loss"
    # region de-duplication (local copies: a stamp/logo in a fixed place on many images): a
    # non-flat tile shared at one place by >= region_min_count distinct images weighs 1 / (their number)
    dedup_regions: bool = False
    region_tiles: int = 8  # tiles per side of the training-resolution image
    region_min_count: int = 20
    region_dilate: int = 1  # marked tiles pass their weight on to neighbours this many tiles away
    region_scope: str = "region"  # region: weight the loss under the shared tiles | image: whole rows
    # de-duplication loss weights apply at timesteps >= dedup_min_t only: below it every image trains
    # in full (the last, low-noise steps refine detail; what an image is is decided at higher noise)
    dedup_min_t: int = 0


@dataclass
class RegularizeMitigationConfig:
    target: str = "all"  # all | flagged
    start_step: int = 0
    be_mass: float = 0.0  # weights of each penalty (train/mitigate/regularize.py); 0 = off
    entropy: float = 0.0
    start_token: float = 0.0
    max_t: int = 200  # be_mass applies to samples drawn below this t


@dataclass
class MitigationConfig:
    captions: CaptionMitigationConfig = field(default_factory=CaptionMitigationConfig)
    weights: WeightMitigationConfig = field(default_factory=WeightMitigationConfig)
    regularize: RegularizeMitigationConfig = field(default_factory=RegularizeMitigationConfig)


@dataclass
class Config:
    output_dir: str = "outputs/run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    mitigate: MitigationConfig = field(default_factory=MitigationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Loading and merging
# --------------------------------------------------------------------------------------------


def _schema_keys(node: Any, prefix: str = "") -> set[str]:
    """Every valid dotted key; a free-form dict field (e.g. monitor.signal_weights) ends in ".*"."""
    keys = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys.add(path)
        if isinstance(value, DictConfig):
            if OmegaConf.get_type(value) is dict:
                keys.add(path + ".*")
            else:
                keys |= _schema_keys(value, path + ".")
    return keys


def _layer_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, (DictConfig, dict)):
            keys += _layer_keys(value, path + ".")
    return keys


def _check_keys(layer: DictConfig, valid: set[str], origin: str) -> None:
    for key in _layer_keys(layer):
        parts = key.split(".")
        inside_free_dict = any(".".join(parts[:i]) + ".*" in valid for i in range(1, len(parts)))
        if key not in valid and not inside_free_dict:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}' in {origin}{hint}")


def load_config(config_files: list[str] | None = None, overrides: list[str] | None = None,
                base: Path | None = BASE_CONFIG) -> DictConfig:
    """Merge schema <- base.yaml <- config files <- ``key=value`` overrides; validate; return it."""
    schema = OmegaConf.structured(Config)
    valid = _schema_keys(schema)
    layers: list[tuple[DictConfig, str]] = []
    for path in ([base] if base is not None else []) + [Path(p) for p in config_files or []]:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:  # yaml syntax errors and the like
            raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping, not {type(layer).__name__}")
        layers.append((layer, str(path)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    if overrides:
        try:
            layers.append((OmegaConf.from_dotlist(list(overrides)), "command-line overrides"))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from exc

    cfg = schema
    for layer, origin in layers:
        _check_keys(layer, valid, origin)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            raise ConfigError(f"bad value for config key '{key}' in {origin}: {exc.msg}") from exc
    OmegaConf.set_readonly(cfg, False)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Refuse settings that cannot work, naming the keys involved."""
    m, d, t, v = cfg.model, cfg.data, cfg.train, cfg.validation
    if bool(m.pretrained) == bool(m.preset):
        raise ConfigError("set exactly one of model.pretrained (folder or hub id) and model.preset "
                          f"(got pretrained={m.pretrained!r}, preset={m.preset!r})")
    if m.preset and m.preset != "tiny":
        raise ConfigError(f"model.preset must be 'tiny', got {m.preset!r}")
    if m.prediction_type not in (None, "epsilon", "v_prediction"):
        raise ConfigError(f"model.prediction_type must be epsilon or v_prediction, got {m.prediction_type!r}")
    sources = ("imagefolder", "hf", "webdataset", "shapes", "testbed")
    if d.source not in sources:
        raise ConfigError(f"data.source must be one of {sources}, got {d.source!r}")
    if d.source == "testbed" and d.random_flip:
        raise ConfigError("data.random_flip=true moves the testbed's stamps to the other corner, so its "
                          "ground-truth masks would be wrong; set data.random_flip=false")
    if d.source not in ("shapes", "testbed") and not d.path:
        raise ConfigError(f"data.source={d.source} needs data.path")
    if d.on_bad_sample not in ("skip", "error"):
        raise ConfigError(f"data.on_bad_sample must be skip or error, got {d.on_bad_sample!r}")
    if d.resolution <= 0 or d.resolution % 8:
        raise ConfigError(f"data.resolution must be a positive multiple of 8, got {d.resolution}")
    if (d.filter_column is None) != (d.filter_value is None):
        raise ConfigError("set both data.filter_column and data.filter_value, or neither")
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every"):
        if t[key] <= 0:
            raise ConfigError(f"train.{key} must be > 0, got {t[key]}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision must be no, fp16 or bf16, got {t.mixed_precision!r}")
    if t.optimizer not in ("adamw", "adamw8bit"):
        raise ConfigError(f"train.optimizer must be adamw or adamw8bit, got {t.optimizer!r}")
    if t.on_nonfinite not in ("error", "skip"):
        raise ConfigError(f"train.on_nonfinite must be error or skip, got {t.on_nonfinite!r}")
    if not 0.0 <= t.caption_dropout < 1.0:
        raise ConfigError(f"train.caption_dropout must be in [0, 1), got {t.caption_dropout}")
    if t.checkpoints_total_limit is not None and t.checkpoints_total_limit < 1:
        raise ConfigError(f"train.checkpoints_total_limit must be >= 1, got {t.checkpoints_total_limit}")
    if t.snr_gamma is not None and t.snr_gamma <= 0:
        raise ConfigError(f"train.snr_gamma must be > 0, got {t.snr_gamma}")
    if t.resume is not None and m.init_from is not None:
        raise ConfigError("train.resume continues a run; model.init_from starts a new one from "
                          "weights: set one of them")
    if v.every < 0 or v.images_per_prompt < 1:
        raise ConfigError("validation.every must be >= 0 and validation.images_per_prompt >= 1")
    if v.every > 0 and not v.prompts:
        raise ConfigError("validation.every > 0 needs validation.prompts")
    mon = cfg.monitor
    from train.monitor.signals import SIGNALS

    unknown = [s for s in list(mon.signals) + list(mon.signal_weights) if s not in SIGNALS]
    if unknown:
        raise ConfigError(f"monitor.signals: unknown signal '{unknown[0]}' (known: {', '.join(SIGNALS)})")
    if mon.be_mode not in ("probe", "drawn"):
        raise ConfigError(f"monitor.be_mode must be probe or drawn, got {mon.be_mode!r}")
    if mon.flag.policy not in ("zscore", "quantile", "absolute"):
        raise ConfigError(f"monitor.flag.policy must be zscore, quantile or absolute, got {mon.flag.policy!r}")
    if mon.flag.clear_at > mon.flag.raise_at and mon.flag.policy != "quantile":
        raise ConfigError("monitor.flag.clear_at must be <= monitor.flag.raise_at (hysteresis)")
    if not 0 < mon.flag.quantile <= mon.flag.quantile_off < 1:
        raise ConfigError("need 0 < monitor.flag.quantile <= monitor.flag.quantile_off < 1")
    if min(mon.probe_every, mon.t_bins) < 1 or mon.magnitude_every < 0:
        raise ConfigError("monitor.probe_every and monitor.t_bins must be >= 1, monitor.magnitude_every >= 0")
    mit = cfg.mitigate
    for key in ("captions", "regularize"):
        if mit[key].target not in ("all", "flagged"):
            raise ConfigError(f"mitigate.{key}.target must be all or flagged, got {mit[key].target!r}")
    if mit.weights.mode not in ("none", "downweight", "drop", "score"):
        raise ConfigError(f"mitigate.weights.mode must be none, downweight, drop or score, got {mit.weights.mode!r}")
    c = mit.captions
    for key in ("replace_p", "add_token_p", "repeat_word_p", "drop_word_p", "shuffle_p"):
        if not 0.0 <= c[key] <= 1.0:
            raise ConfigError(f"mitigate.captions.{key} must be a probability, got {c[key]}")
    uses_flags = (c.target == "flagged" or mit.weights.mode != "none" or
                  (mit.regularize.target == "flagged" and any(mit.regularize[t] > 0 for t in ("be_mass", "entropy", "start_token"))))
    regularizes = any(mit.regularize[t] > 0 for t in ("be_mass", "entropy", "start_token"))
    if (uses_flags or regularizes) and not mon.enabled:
        raise ConfigError("flag-targeted mitigations and attention regularizers need the monitor: set monitor.enabled=true")
    for key in ("dedup", "dedup_regions"):
        if mit.weights[key] and d.source == "webdataset":
            raise ConfigError(f"mitigate.weights.{key} needs the whole data set up front; it is not available for "
                              "webdataset streams")
    if mit.weights.dedup_regions and (mit.weights.region_tiles < 1 or d.resolution % mit.weights.region_tiles
                                      or mit.weights.region_min_count < 2):
        raise ConfigError(f"mitigate.weights.region_tiles must divide data.resolution ({d.resolution}) and "
                          f"region_min_count must be >= 2 (got {mit.weights.region_tiles}, {mit.weights.region_min_count})")
    if mit.weights.dedup_min_t < 0:
        raise ConfigError(f"mitigate.weights.dedup_min_t must be >= 0 (got {mit.weights.dedup_min_t})")
    if not 0.0 <= mit.weights.dedup_max_distance <= 1.0:
        raise ConfigError(f"mitigate.weights.dedup_max_distance must be in [0, 1] (got {mit.weights.dedup_max_distance})")
    if mit.weights.region_dilate < 0:
        raise ConfigError(f"mitigate.weights.region_dilate must be >= 0 (got {mit.weights.region_dilate})")
    if mit.weights.dedup_by not in ("loss", "sampling", "caption"):
        raise ConfigError(f"mitigate.weights.dedup_by must be loss, sampling or caption (got {mit.weights.dedup_by!r})")
    if mit.weights.dedup_by != "loss" and not (mit.weights.dedup or (
            mit.weights.dedup_regions and mit.weights.region_scope == "image")):
        raise ConfigError(f"mitigate.weights.dedup_by={mit.weights.dedup_by} acts on row weights: set "
                          "mitigate.weights.dedup=true (or dedup_regions with region_scope=image)")
    if mit.weights.region_scope not in ("region", "image"):
        raise ConfigError(f"mitigate.weights.region_scope must be region or image (got {mit.weights.region_scope!r})")
    validate_eval(cfg.eval)
    if cfg.eval.every and d.source == "webdataset":
        raise ConfigError("eval.every needs the training set as a table (nearest training images); "
                          "audit a webdataset run's checkpoints with python -m train.audit instead")
    if cfg.logging.every <= 0:
        raise ConfigError(f"logging.every must be > 0, got {cfg.logging.every}")


# Keys whose values must never reach a file or W&B, whatever a user puts in a config. Matched on
# whole names or suffixes, so that e.g. `start_token` or `add_tokens` (config, not secrets) stay.
_SECRET_NAMES = {"token", "password", "secret", "api_key", "apikey", "auth", "credentials"}
_SECRET_SUFFIXES = ("_api_key", "_apikey", "hf_token", "hub_token", "auth_token", "access_token", "_password",
                    "_secret", "secret_key", "access_key")


def _is_secret(key: str) -> bool:
    key = str(key).lower()
    return key in _SECRET_NAMES or key.endswith(_SECRET_SUFFIXES)


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain dict with anything that looks like a secret removed."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("<redacted>" if _is_secret(k) else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(OmegaConf.to_container(cfg, resolve=True))


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    OmegaConf.save(OmegaConf.create(to_container(cfg)), path)


def parse_args(argv: list[str] | None) -> DictConfig:
    """``[--config F ...] [key=value ...]`` -> validated config."""
    parser = argparse.ArgumentParser(
        prog="train/finetune.py",
        description="Fine-tune Stable Diffusion with memorization monitoring.",
        epilog="Overrides are OmegaConf dotlist items, e.g. train.max_steps=20 data.path=/data.",
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config layered over configs/base.yaml (repeatable; later wins)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)

