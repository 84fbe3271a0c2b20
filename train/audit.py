"""Audit a checkpoint for memorization: ``python -m train.audit --checkpoint C --data D --out O``.

``C`` is a diffusers pipeline folder (a run's ``final/``, any SD checkpoint on disk) or a
training checkpoint ``<run>/checkpoints/checkpoint-N`` (its UNet weights on top of the run's
``final/`` or, without one, the base model its ``config.yaml`` names). ``D`` is a data config
YAML, an image folder with ``metadata.jsonl``, or a run directory whose ``config.yaml`` names its
data; when ``C`` lies inside a run, ``D`` defaults to that run's data.

For each prompt and seed the audit generates with DDIM + classifier-free guidance, captures the
bright-ending map at the last step and the text-conditional noise magnitudes, finds the nearest
training image globally and inside the bright-ending region, and writes ``report.json`` and a
self-contained ``report.html``. ``--detect-only`` needs no training images: it ranks prompts by
the BE-masked magnitude and flags robust outliers among the audited prompts (a relative verdict:
absolute magnitudes depend on the model and resolution).

Under ``accelerate launch -m train.audit ...`` the generations are shared out over the processes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from data.datasets import DataError, load_table, resolve_source
from train.config import Config, ConfigError, DataConfig, ModelConfig
from train.evaluate.config import EvalConfig, validate_eval
from train.evaluate.core import Judge, evaluate_probes, summarize
from train.evaluate.report import build_report, write_report
from train.evaluate.sampling import sampling_pipeline
from train.evaluate.trainset import Probe, TrainingSet, select_probes, training_set
from train.evaluate.truth import TruthAnnotator, has_truth, score_against_truth
from train.models import ModelError, check_diffusers_folder, init_unet_from, load_components
from train.util import quiet_libraries

log = logging.getLogger("copyguard.audit")

DETECT_Z = 3.5  # robust z-score above which detect-only flags a generation (Iglewicz & Hoaglin)


class AuditError(ValueError):
    """An audit that cannot run; the message says why."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _section(loaded: DictConfig, schema, where: str) -> DictConfig:
    """One section of a saved config over its schema (other sections are left alone: a run
    written by a newer copyguard may carry sections this one does not know; keys an older one
    wrote and this one dropped are left out with a warning)."""
    base = OmegaConf.structured(schema)
    loaded = loaded if loaded is not None else OmegaConf.create({})
    dropped = [k for k in loaded if k not in base]
    if dropped:
        log.warning("%s: ignoring keys this copyguard does not know: %s", where, ", ".join(map(str, dropped)))
        loaded = OmegaConf.create({k: v for k, v in loaded.items() if k in base})
    try:
        return OmegaConf.merge(base, loaded)
    except Exception as exc:  # omegaconf's validation errors
        raise AuditError(f"cannot read {where}: {exc}") from exc


def _run_config(run: Path) -> DictConfig | None:
    """The parts of a run's config.yaml the audit needs: model, data, train.text_encoder, seed."""
    path = run / "config.yaml"
    if not path.is_file():
        return None
    loaded = OmegaConf.load(path)
    return OmegaConf.create({
        "model": _section(loaded.get("model"), ModelConfig, f"model in {path}"),
        "data": _section(loaded.get("data"), DataConfig, f"data in {path}"),
        "train_text_encoder": bool(OmegaConf.select(loaded, "train.text_encoder", default=False)),
        "seed": int(loaded.get("seed", 0)),
    })


def load_model(checkpoint: str | Path):
    """(pipeline, run config or None, what was loaded) for a diffusers folder or a training checkpoint."""
    from diffusers import StableDiffusionPipeline

    path = Path(checkpoint).expanduser()
    if (path / "train_state.json").is_file() and (path / "model.safetensors").is_file():
        run = path.parent.parent  # <run>/checkpoints/checkpoint-N
        cfg = _run_config(run)
        final = run / "final"
        if (final / "model_index.json").is_file():
            base = StableDiffusionPipeline.from_pretrained(final, safety_checker=None, requires_safety_checker=False)
            parts = (base.vae, base.text_encoder, base.tokenizer, base.unet, base.scheduler)
        elif cfg is not None:
            c = load_components(cfg.model, cfg.data.resolution)
            parts = (c.vae, c.text_encoder, c.tokenizer, c.unet, c.noise_scheduler)
        else:
            raise AuditError(f"{path} is a training checkpoint, but its run folder {run} has neither final/ nor "
                             "config.yaml to rebuild the rest of the pipeline from")
        vae, text_encoder, tokenizer, unet, scheduler = parts
        init_unet_from(unet, str(path))  # the checkpoint's trained (not EMA) UNet weights
        text_weights = path / "model_1.safetensors"  # saved when the text encoder was trained too
        if text_weights.is_file() and cfg is not None and cfg.train_text_encoder:
            from safetensors.torch import load_file

            text_encoder.load_state_dict(load_file(text_weights))
        what = f"training checkpoint {path} (UNet weights on {'final/' if final.is_dir() else 'the base model'})"
    else:
        check_diffusers_folder(path)
        base = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        vae, text_encoder, tokenizer, unet, scheduler = (base.vae, base.text_encoder, base.tokenizer, base.unet,
                                                         base.scheduler)
        cfg = _run_config(path.parent)  # a run's final/ sits beside its config.yaml
        what = f"diffusers pipeline {path}"
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False).eval()
    return sampling_pipeline(vae, text_encoder, tokenizer, unet, scheduler), cfg, what


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _data_from_yaml(path: Path) -> tuple[DictConfig, str, int]:
    loaded = OmegaConf.load(path)
    section = loaded.data if "data" in loaded else loaded
    data_cfg = _section(section, DataConfig, f"the data config {path}")
    cache_dir = OmegaConf.select(loaded, "model.cache_dir", default=None) or Config().model.cache_dir
    return data_cfg, cache_dir, int(OmegaConf.select(loaded, "seed", default=0))


def resolve_data(spec: str | None, run_cfg: DictConfig | None) -> tuple[DictConfig, str, int] | None:
    """(data config, cache dir, seed) from ``--data`` or the checkpoint's run; None if neither."""
    if spec is None:
        if run_cfg is None:
            return None
        return run_cfg.data, run_cfg.model.cache_dir, int(run_cfg.seed)
    path = Path(spec).expanduser()
    if path.is_file():
        return _data_from_yaml(path)
    if path.is_dir():
        if (path / "config.yaml").is_file() and not (path / "metadata.jsonl").is_file():
            return _data_from_yaml(path / "config.yaml")  # a run directory
        data_cfg = OmegaConf.structured(DataConfig)
        data_cfg.source, data_cfg.path = "imagefolder", str(path)
        return data_cfg, Config().model.cache_dir, 0
    raise AuditError(f"--data {spec}: no such file or folder")


def load_training_set(spec, run_cfg, resolution: int | None) -> tuple[TrainingSet, str, int]:
    resolved = resolve_data(spec, run_cfg)
    if resolved is None:
        raise AuditError("no data: pass --data (a data config, an image folder or a run directory), or "
                         "--detect-only to audit without training images")
    data_cfg, cache_dir, seed = resolved
    data_cfg = resolve_source(data_cfg, cache_dir, seed)
    table, _ = load_table(data_cfg, cache_dir)
    captions = [c for c in table[data_cfg.caption_column] if isinstance(c, str) and c.strip()]
    if not captions:
        raise DataError(f"data set {data_cfg.path} has no captions in column '{data_cfg.caption_column}': "
                        "the audit generates from training captions")
    trainset = training_set(table, data_cfg, int(resolution or data_cfg.resolution))
    return trainset, str(data_cfg.path), int(resolution or data_cfg.resolution)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise AuditError(f"--prompts {path}: no prompts (one per line; # starts a comment)")
    return prompts


def probes_for(args, cfg: EvalConfig, trainset: TrainingSet | None) -> list[Probe]:
    if args.prompts:
        prompts = read_prompts(args.prompts)
        by_caption = ({c: p for p, c in reversed(list(enumerate(trainset.captions)))} if trainset is not None else {})
        probes = []
        for prompt in prompts[: args.num_prompts or None]:
            p = by_caption.get(prompt)
            probes.append(Probe(prompt, "train", trainset.sample_ids[p], trainset.rows[p]) if p is not None
                          else Probe(prompt, "user"))
        return probes
    if trainset is None:
        raise AuditError("--detect-only without --data needs --prompts FILE")
    return select_probes(cfg, trainset)


# --------------------------------------------------------------------------------------------
# Detect-only verdicts
# --------------------------------------------------------------------------------------------


def robust_z(values: Sequence[float]) -> np.ndarray:
    """(x - median) / (1.4826 * MAD): how far each value sits out of the bulk, robust to the outliers."""
    x = np.asarray(values, dtype=np.float64)
    median = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - median))
    if mad <= 0:
        mad = max(np.std(x), 1e-12)
    return (x - median) / mad


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.audit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="diffusers folder (run/final) or run/checkpoints/checkpoint-N")
    p.add_argument("--data", help="data config YAML, image folder, or run directory (default: the checkpoint's run)")
    p.add_argument("--out", required=True, help="folder for report.json and report.html")
    p.add_argument("--detect-only", action="store_true", help="no training images: magnitude and BE signals only")
    p.add_argument("--prompts", help="file with one prompt per line (default: training captions)")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized defaults: 16 prompts, 25 DDIM steps (instead of 64 and 50)")
    p.add_argument("--num-prompts", type=int, help="prompts to audit (default: 64, --quick 16)")
    p.add_argument("--stratify", default="group",
                   help="a data column (e.g. ground truth) whose values get equal shares of the prompts, when present")
    p.add_argument("--seeds", type=int, default=1, help="generations per prompt (seeds 0..K-1)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: 50, --quick 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (> 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, help="image side (default: the data's, else the model's)")
    p.add_argument("--similarity", default="pixel", choices=["pixel", "sscd-onnx", "sscd-torchscript"])
    p.add_argument("--sscd-model", help="SSCD .onnx or TorchScript file")
    p.add_argument("--replica-threshold", type=float, help="override the backend's replica threshold")
    p.add_argument("--region", default="quantile", choices=["quantile", "soft"])
    p.add_argument("--region-map-seeds", default="agreement", choices=["agreement", "mean", "none"],
                   help="read each prompt's seeds together for the region map (with --seeds >= 2)")
    p.add_argument("--cache-dir", default="~/.cache/copyguard/eval-features", help="cached training features")
    p.add_argument("--num-cases", type=int, default=12, help="worst cases shown as images")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.num_prompts = args.num_prompts or (16 if args.quick else 64)
    args.steps = args.steps or (25 if args.quick else 50)
    return args


@torch.no_grad()
def estimated_seconds(pipe, cfg: EvalConfig, generations: int, resolution: int, device) -> float:
    """About how long the generations take here: one timed UNet call at the batch size (with the
    unconditional half of guidance), times the calls the audit will make."""
    batch = max(1, min(cfg.batch_size, generations))
    side = resolution // pipe.vae_scale_factor
    x = torch.randn(2 * batch, pipe.unet.config.in_channels, side, side, device=device, dtype=pipe.unet.dtype)
    text = torch.zeros(2 * batch, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim,
                       device=device, dtype=pipe.unet.dtype)
    pipe.unet(x, torch.tensor([10], device=device), text)  # the first call pays one-off costs
    start = time.perf_counter()
    pipe.unet(x, torch.tensor([10], device=device), text)
    return (time.perf_counter() - start) * cfg.steps * -(-generations // batch)


def eval_config(args) -> EvalConfig:
    cfg = EvalConfig(num_prompts=args.num_prompts, seeds=list(range(args.seeds)), steps=args.steps,
                     guidance_scale=args.guidance, batch_size=args.batch_size, similarity=args.similarity,
                     sscd_model=args.sscd_model, replica_threshold=args.replica_threshold, region=args.region,
                     region_map_seeds=args.region_map_seeds,
                     feature_cache=args.cache_dir, num_panels=args.num_cases, flagged_fraction=0.0,
                     heldout_fraction=0.0, stratify_column=args.stratify)
    validate_eval(cfg)
    return cfg


def build_accelerator():
    import os

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # On CPU, without an explicit gloo backend every launched process may believe it is
        # rank 0 of 1 (the same accelerate quirk train/finetune.py works around).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(kwargs_handlers=handlers)


def audit(args) -> Path:
    accelerator = build_accelerator()
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    out = Path(args.out).expanduser()
    cfg = eval_config(args)
    pipe, run_cfg, what = load_model(args.checkpoint)
    pipe.to(accelerator.device)

    trainset, data_name, resolution = None, None, args.resolution
    if not args.detect_only or args.data is not None or not args.prompts:
        try:
            trainset, data_name, resolution = load_training_set(args.data, run_cfg, args.resolution)
        except AuditError:
            if not args.detect_only:
                raise
    if resolution is None:
        resolution = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    probes = probes_for(args, cfg, trainset)

    judge = annotate = None
    if not args.detect_only:
        judge = Judge(cfg, trainset, cfg.feature_cache, accelerator, accelerator.device)
        annotate = TruthAnnotator(trainset) if has_truth(trainset) else None
    generations = len(probes) * len(cfg.seeds)
    eta = estimated_seconds(pipe, cfg, -(-generations // accelerator.num_processes), resolution, accelerator.device)
    log.info("auditing %s: %d prompts x %d seeds at %d px, %d DDIM steps: about %.0f s of generation here%s",
             what, len(probes), len(cfg.seeds), resolution, cfg.steps, eta,
             "" if args.quick or eta < 600 else " (--quick: 16 prompts, 25 steps)")
    result = evaluate_probes(cfg, pipe, probes, height=resolution, width=resolution, judge=judge,
                             accelerator=accelerator, progress=not args.no_progress, annotate=annotate,
                             num_panels=args.num_cases)
    records = result.records
    metrics = {k.removeprefix("eval/"): v for k, v in summarize(result).items()}
    summary = {"num_prompts": len(probes), **metrics}
    truth = None
    if args.detect_only:
        z = robust_z([r["be_magnitude"] for r in records]) if records else []
        for r, value in zip(records, z):
            r["flag_z"], r["flagged"] = float(value), bool(value > DETECT_Z)
        summary["flagged"] = sum(r["flagged"] for r in records)
        summary["flagged_rate"] = summary["flagged"] / max(len(records), 1)
        summary["flag_threshold_z"] = DETECT_Z
    elif annotate is not None:
        truth = score_against_truth(records)

    report, panels = build_report(result, cfg, summary, checkpoint=str(Path(args.checkpoint).expanduser().resolve()),
                                  model=what, data=data_name, resolution=resolution,
                                  threshold=judge.threshold if judge else None, truth=truth,
                                  detect_only=args.detect_only)
    if accelerator.is_main_process:
        write_report(out, report, panels)
        log.info("wrote %s and %s", out / "report.json", out / "report.html")
    accelerator.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> Path:
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return audit(args)
    except (AuditError, ConfigError, ModelError, DataError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
