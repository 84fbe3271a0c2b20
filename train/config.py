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
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from train.evaluate.config import EvalConfig, validate_eval
from train.models import LoraConfig, ModelConfig
from train.monitor.config import MonitorConfig
from train.util import ConfigError, bounded, choice, in_range, range_text

REPO_ROOT = Path(__file__).resolve().parents[1]
# The first layer of every run: the embedded default. COPYGUARD_BASE_CONFIG names another (the
# tests use tests/base.yaml, a seconds-long tiny run); `--config` files layer over either.
BASE_CONFIG = Path(os.environ.get("COPYGUARD_BASE_CONFIG", REPO_ROOT / "configs" / "base.yaml"))


# --------------------------------------------------------------------------------------------
# Schema. Defaults here suit a real SD fine-tune; configs/base.yaml holds the embedded CPU default.
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    max_steps: int = bounded(1000, ge=1)  # optimizer steps
    batch_size: int = bounded(4, ge=1)  # per device, per micro-step
    gradient_accumulation_steps: int = bounded(1, ge=1)
    lr: float = bounded(1e-5, gt=0.0)
    lr_scheduler: str = "constant"  # any diffusers get_scheduler name
    lr_warmup_steps: int = bounded(0, ge=0)
    optimizer: str = choice("adamw", "adamw8bit")  # adamw8bit needs bitsandbytes
    adam_beta1: float = bounded(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = bounded(0.999, ge=0.0, lt=1.0)
    weight_decay: float = bounded(1e-2, ge=0.0)
    adam_epsilon: float = bounded(1e-8, gt=0.0)
    max_grad_norm: float = bounded(1.0, ge=0.0)  # 0 = no clipping
    mixed_precision: str = choice("no", "fp16", "bf16")
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    use_ema: bool = False
    ema_decay: float = bounded(0.9999, ge=0.0, le=1.0)
    snr_gamma: Optional[float] = bounded(None, gt=0.0)  # min-SNR weighting (5.0 is the paper's value)
    noise_offset: float = bounded(0.0, ge=0.0)
    caption_dropout: float = bounded(0.0, ge=0.0, lt=1.0)  # probability of training on the empty prompt (CFG)
    text_encoder: bool = False  # also train the text encoder
    checkpoint_every: int = bounded(500, ge=1)
    checkpoints_total_limit: Optional[int] = bounded(None, ge=1)
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    on_nonfinite: str = choice("error", "skip")  # skip: every rank skips the same step
    lora: LoraConfig = field(default_factory=LoraConfig)  # train.lora.rank > 0: LoRA fine-tuning


@dataclass
class LoggingConfig:
    every: int = bounded(10, ge=1)  # log train/ and perf/ every N optimizer steps
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
    every: int = bounded(0, ge=0)  # steps; 0 = only at the end (when prompts are given)
    num_inference_steps: int = bounded(25, ge=1)
    guidance_scale: float = 5.0
    images_per_prompt: int = bounded(1, ge=1)
    seed: int = 0


def schema() -> type:
    """The run config's dataclass, composed from each component's own. Built on demand so that a
    mitigation added to the registry brings its ``mitigate.<name>`` section with it."""
    from train.mitigate import REGISTRY

    mitigate = make_dataclass("MitigationConfig", [(name, cls.Config, field(default_factory=cls.Config))
                                                   for name, cls in REGISTRY.items()])
    sections = [("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig), ("logging", LoggingConfig),
                ("validation", ValidationConfig), ("monitor", MonitorConfig), ("mitigate", mitigate),
                ("eval", EvalConfig)]
    return make_dataclass("Config", [
        ("output_dir", str, field(default="outputs/run")),
        # a new run refuses a folder that holds another run; overwrite=true moves the old one aside
        ("overwrite", bool, field(default=False)),
        ("seed", int, field(default=0)),
        *[(name, cls, field(default_factory=cls)) for name, cls in sections]])


Config = schema()


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


def _check_sections(layer: DictConfig, schema_node: DictConfig, origin: str, prefix: str = "") -> None:
    """A section (``train``, ``monitor.flag``...) must be given as a mapping, not a plain value."""
    for key, value in layer.items():
        if key not in schema_node:
            continue
        expected = schema_node._get_node(key)
        if isinstance(expected, DictConfig) and OmegaConf.get_type(expected) is not dict:
            if not isinstance(value, DictConfig):
                raise ConfigError(f"config key '{prefix}{key}' in {origin} is a section: give it as a mapping of "
                                  f"keys, not {value!r}")
            _check_sections(value, expected, origin, f"{prefix}{key}.")


def load_config(config_files: list[str] | None = None, overrides: list[str] | None = None,
                base: Path | None = BASE_CONFIG) -> DictConfig:
    """Merge schema <- base.yaml <- config files <- ``key=value`` overrides; validate; return it."""
    schema_cfg = OmegaConf.structured(schema())
    valid = _schema_keys(schema_cfg)
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

    cfg = schema_cfg
    for layer, origin in layers:
        _check_keys(layer, valid, origin)
        _check_sections(layer, schema_cfg, origin)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            raise ConfigError(f"bad value for config key '{key}' in {origin}: {exc.msg}") from exc
    OmegaConf.set_readonly(cfg, False)
    validate(cfg)
    return cfg


def check_fields(node: DictConfig, kind: type, prefix: str = "") -> None:
    """Every value against what its dataclass field declares: allowed values (``choice``), a range
    (``bounded``), finite floats; the message names the key, the value and what is allowed."""
    for f in fields(kind):
        key, value = f"{prefix}{f.name}", node[f.name]
        nested = OmegaConf.get_type(value) if isinstance(value, DictConfig) else None
        if nested is not None and is_dataclass(nested):
            check_fields(value, nested, key + ".")
            continue
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join(repr(c) if c is not None else "null" for c in f.metadata["choices"])
            hint = (" (YAML reads a bare yes/no/on/off as true/false: quote it, e.g. key='no')"
                    if str(value) in ("True", "False") else "")
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}{hint}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
        if "range" in f.metadata and value is not None and not in_range(value, *f.metadata["range"]):
            raise ConfigError(f"{key}={value} is out of range: must be {range_text(*f.metadata['range'])}")


def validate(cfg: DictConfig) -> None:
    """Refuse settings that cannot work, naming the keys involved: each field as its component
    declares it, then the settings that involve more than one section."""
    check_fields(cfg, OmegaConf.get_type(cfg))
    m, d, t, v = cfg.model, cfg.data, cfg.train, cfg.validation
    if bool(m.pretrained) == bool(m.preset):
        raise ConfigError("set exactly one of model.pretrained (folder or hub id) and model.preset "
                          f"(got pretrained={m.pretrained!r}, preset={m.preset!r})")
    if d.source != "shapes" and not d.path:
        raise ConfigError(f"data.source={d.source} needs data.path")
    if d.resolution % 8:
        raise ConfigError(f"data.resolution must be a multiple of 8, got {d.resolution}")
    if (d.filter_column is None) != (d.filter_value is None):
        raise ConfigError("set both data.filter_column and data.filter_value, or neither")
    if t.resume is not None and m.init_from is not None:
        raise ConfigError("train.resume continues a run; model.init_from starts a new one from "
                          "weights: set one of them")
    if t.resume is not None and cfg.overwrite:
        raise ConfigError("train.resume continues the run in output_dir; overwrite=true moves it aside: set one")
    if t.lora.rank and t.text_encoder:
        raise ConfigError("train.lora trains adapters on the UNet only: set train.text_encoder=false")
    if v.every > 0 and not v.prompts:
        raise ConfigError("validation.every > 0 needs validation.prompts")
    mon = cfg.monitor
    from train.monitor.signals import REFERENCE_SIGNALS, SIGNALS

    unknown = [s for s in list(mon.signals) + list(mon.signal_weights) if s not in SIGNALS]
    if unknown:
        raise ConfigError(f"monitor.signals: unknown signal '{unknown[0]}' (known: {', '.join(SIGNALS)})")
    if mon.flag.clear_at > mon.flag.raise_at and mon.flag.policy != "quantile":
        raise ConfigError("monitor.flag.clear_at must be <= monitor.flag.raise_at (hysteresis)")
    if mon.flag.policy == "calibrated" and mon.detector != "heads":
        raise ConfigError("monitor.flag.policy=calibrated flags by the detector heads' probability: set "
                          "monitor.detector=heads, or another monitor.flag.policy (zscore, quantile, absolute)")
    if mon.detector == "heads":
        from train.monitor.detector import heads_file

        try:
            heads_file(mon.heads)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    if "neighbours" in mon.signals and mon.neighbours.embedding == "sscd-torchscript" and not mon.neighbours.sscd_model:
        raise ConfigError("monitor.neighbours.embedding=sscd-torchscript needs monitor.neighbours.sscd_model "
                          "(the TorchScript file)")
    wanted = [s for s in mon.signals if s in REFERENCE_SIGNALS]
    if wanted and not mon.reference_every:
        raise ConfigError(f"monitor.signals lists {', '.join(wanted)}, which need the starting model's pass: set "
                          "monitor.reference_every (configs/monitor/reference.yaml: 4), or drop them")
    if mon.flag.probability_off > mon.flag.probability:
        raise ConfigError("monitor.flag.probability_off must be <= monitor.flag.probability (hysteresis)")
    if mon.flag.quantile > mon.flag.quantile_off:
        raise ConfigError("monitor.flag.quantile must be <= monitor.flag.quantile_off")
    from train.mitigate import REGISTRY

    for name, cls in REGISTRY.items():
        section = cfg.mitigate[name]
        problem = cls.check(section, cfg)
        if problem:
            raise ConfigError(problem)
        if cls.active(section) and cls.needs_monitor(section) and not mon.enabled:
            raise ConfigError(f"mitigate.{name} acts on the monitor's flags or attention: set monitor.enabled=true")
    validate_eval(cfg.eval)
    if cfg.eval.every and d.source == "webdataset":
        raise ConfigError("eval.every needs the training set as a table (nearest training images); "
                          "audit a webdataset run's checkpoints with python -m train.audit instead")


# Keys whose values must never reach a file or W&B, whatever a user puts in a config. Matched on
# whole names or suffixes, so that e.g. `start_token` or `add_tokens` (config, not secrets) stay.
_SECRET_NAMES = {"token", "password", "secret", "api_key", "apikey", "auth", "credentials"}
_SECRET_SUFFIXES = ("_api_key", "_apikey", "hf_token", "hub_token", "auth_token", "access_token", "_password",
                    "_secret", "secret_key", "access_key")


def _is_secret(key: str) -> bool:
    key = str(key).lower()
    return key in _SECRET_NAMES or key.endswith(_SECRET_SUFFIXES)


# Secrets inside values: a URL's user:password, signed-URL and token query parameters, an
# Authorization header, NAME_TOKEN=... / --token ... in a shard command (e.g. webdataset's pipe:).
_SECRET_IN_VALUE = [
    (re.compile(r"(?<=://)([^/@\s:]+):[^/@\s]+@"), r"\1:<redacted>@"),
    (re.compile(r"(?i)([?&](?:[\w-]*signature|[\w-]*token|sig|key|password|credential)=)[^&\s'\"]+"), r"\1<redacted>"),
    (re.compile(r"(?i)(authorization:\s*(?:bearer|basic|token)?\s*)[^\s'\"]+"), r"\1<redacted>"),
    (re.compile(r"(?i)(\b[\w]*(?:token|secret|password|api_key|apikey)=)[^\s'\"]+"), r"\1<redacted>"),
    (re.compile(r"(?i)(--(?:[\w-]*token|[\w-]*password|[\w-]*secret|api-key)[ =])[^\s'\"]+"), r"\1<redacted>"),
]


def redact_value(text: str) -> str:
    for pattern, replacement in _SECRET_IN_VALUE:
        text = pattern.sub(replacement, text)
    return text


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain dict with anything that looks like a secret removed, by key or inside a value."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("<redacted>" if _is_secret(k) else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return redact_value(node) if isinstance(node, str) else node

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

