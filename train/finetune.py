"""Fine-tune Stable Diffusion with accelerate: ``accelerate launch train/finetune.py [--config F] [k=v ...]``.

The training loop is ``run`` below, in execution order. Everything per sample (loss, weights)
stays a vector until the one place the loop reduces it, so monitors and mitigations can act on
single samples while every rank still runs the same forward and backward.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # `python train/finetune.py` / `accelerate launch train/finetune.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from data.datasets import DataError, DataPosition, build_train_data, load_table, resolve_source
from train.checkpoint import (CheckpointError, TrainState, find_checkpoint, load_checkpoint,
                              map_data_position, save_checkpoint, weights_divergence)
from train.config import parse_args, save_config
from train.evaluate.hook import run_eval_hook
from train.evaluate.validation import validation_images
from train.mitigate import BuildContext, Mitigations, MitigationStep, build_mitigations
from train.models import (ModelError, add_lora, encode_text, freeze, load_components, merged_unet, save_lora,
                          save_pipeline, trainable_parameters, unet_fingerprint, weight_dtype)
from train.monitor.monitor import LEDGER_FILE, Monitor, StepRecord
from train.monitor.reference import build_reference, wants_reference
from train.tracking import Tracker
from train.util import ConfigError, build_once, quiet_libraries, seed_of

log = logging.getLogger("copyguard")


# --------------------------------------------------------------------------------------------
# Builders: each takes only the sub-config it needs
# --------------------------------------------------------------------------------------------


def build_accelerator(cfg: DictConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # On a machine without CUDA, `accelerate launch --multi_gpu` starts the ranks but a plain
    # Accelerator() then sees rank 0 of 1 on each (it only forms a gloo group with cpu=True), and
    # DeepSpeed needs the gloo backend named explicitly (with cpu=True it falls back to DDP).
    cpu_ranks = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu_ranks and deepspeed else []
    return Accelerator(
        cpu=cpu_ranks and not deepspeed,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir),
        kwargs_handlers=handlers,
    )


@contextmanager
def zero3_init_disabled(plugin):
    """Load models whole under ZeRO-3: the frozen VAE and text encoder run outside the engine, and
    the UNet is partitioned when accelerate prepares it. accelerate's own switch leaves
    transformers' global DeepSpeed config alive, so every rank would hang in a broadcast inside
    ``CLIPTextModel.from_pretrained`` while another waits elsewhere; unset it explicitly."""
    if plugin is None or int(plugin.zero_stage) != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    with plugin.zero3_init_context_manager(enable=False):
        unset_hf_deepspeed_config()
        yield


def check_engine(cfg: DictConfig, accelerator) -> int:
    """Refuse combinations the launched engine cannot run; return the ZeRO stage (0 = none)."""
    plugin = accelerator.state.deepspeed_plugin
    stage = int(plugin.zero_stage) if plugin is not None else 0
    if plugin is not None and cfg.train.text_encoder:
        raise ConfigError("train.text_encoder=true is not supported under DeepSpeed (one engine per "
                          "model); train the text encoder with DDP")
    if stage == 3 and cfg.train.use_ema:
        raise ConfigError("train.use_ema=true is not supported with DeepSpeed ZeRO-3 (partitioned "
                          "weights); use ZeRO-2 or DDP for EMA")
    if stage == 3 and cfg.eval.every:
        raise ConfigError("eval.every is not supported with DeepSpeed ZeRO-3 (partitioned weights); "
                          "audit saved checkpoints with python -m train.audit instead")
    if stage == 3 and cfg.validation.prompts:
        raise ConfigError("validation.prompts are not supported with DeepSpeed ZeRO-3; use the audit "
                          "on a saved checkpoint instead")
    if stage == 3 and cfg.train.lora.rank and wants_reference(cfg.monitor):
        raise ConfigError("monitor.reference_every with train.lora switches the adapters off on the training "
                          "UNet, whose weights ZeRO-3 partitions; use ZeRO-2 or DDP for the ref_gain signals")
    if cfg.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    return stage


def build_optimizer(params, train_cfg: DictConfig):
    if train_cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'copyguard[bnb]'") from exc
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
               weight_decay=train_cfg.weight_decay, eps=train_cfg.adam_epsilon)


def build_lr_scheduler(optimizer, train_cfg: DictConfig):
    """Built from the *current* config, so a resumed run honours a changed max_steps."""
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(train_cfg.lr_scheduler, optimizer, num_warmup_steps=train_cfg.lr_warmup_steps,
                             num_training_steps=train_cfg.max_steps)
    except ValueError as exc:
        raise ConfigError(f"train.lr_scheduler={train_cfg.lr_scheduler!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Before training: inputs, the run folder, models, data, monitor and mitigations
# --------------------------------------------------------------------------------------------

HISTORY_DIR = "ledger_history"  # monitor.history_every: the ledger's snapshots
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "ledger.parquet", HISTORY_DIR, "final")


def check_inputs(cfg: DictConfig) -> None:
    """Fail on a missing data or model folder before any model loads or any folder is made."""
    def local_path(spec: Optional[str]) -> Optional[Path]:
        # a hub id is "name" or "org/name"; anything else that names no folder is a missing one
        if not spec or Path(spec).expanduser().exists():
            return None
        return Path(spec).expanduser() if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 else None

    if cfg.data.source == "imagefolder" and not Path(cfg.data.path).expanduser().is_dir():
        raise DataError(f"data.path={cfg.data.path}: no such folder (an image folder with metadata.jsonl)")
    if cfg.data.source == "hf" and local_path(cfg.data.path):
        raise DataError(f"data.path={cfg.data.path}: no such folder, and not a data set name")
    for key in ("pretrained", "init_from"):
        if local_path(cfg.model[key]):
            raise ModelError(f"model.{key}={cfg.model[key]}: no such folder, and not a hub id (org/name)")


def claim_output_dir(cfg: DictConfig, out: Path, accelerator) -> None:
    """A new run gets a folder of its own: one holding another run is refused (its checkpoints
    would be pruned and its files overwritten), or moved aside with ``overwrite=true``."""
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and cfg.train.resume is None:
        if not cfg.overwrite:
            raise ConfigError(
                f"output_dir {out} already holds a run ({', '.join(held)}). Continue it with train.resume=latest, "
                "choose another output_dir, or set overwrite=true to move the old run aside (nothing is deleted)")
        accelerator.wait_for_everyone()  # every rank has looked before the folder moves
        if accelerator.is_main_process:
            aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            while aside.exists():  # two overwrites within a second: never rename onto a kept run
                aside = aside.with_name(aside.name + "-1")
            os.replace(out, aside)
            log.warning("overwrite=true: the run that was in %s is now in %s", out, aside)
    accelerator.wait_for_everyone()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{accelerator.process_index}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output_dir {out} cannot be written ({exc.strerror}); choose a writable folder") from None


@dataclass
class Models:
    """What trains and what stays frozen, placed and wrapped for the launched engine."""

    parts: Any  # train.models.Components as loaded (tokenizer, scheduler, frozen modules)
    unet: Any
    text_encoder: Any
    vae: Any
    ema: Any
    optimizer: Any
    lr_scheduler: Any
    params: list
    dtype: torch.dtype
    fingerprint: dict


def build_models(cfg: DictConfig, accelerator) -> Models:
    """The frozen parts in the compute dtype, the trained ones in fp32 (accelerate autocasts)."""
    tcfg, device = cfg.train, accelerator.device
    with accelerator.main_process_first(), zero3_init_disabled(accelerator.state.deepspeed_plugin):
        parts = load_components(cfg.model, cfg.data.resolution)  # the first process builds a preset
    text_encoder, vae, unet = parts.text_encoder, parts.vae, parts.unet
    dtype = weight_dtype(tcfg.mixed_precision)
    if tcfg.lora.rank:  # the base stays frozen; only the adapters train
        add_lora(unet, tcfg.lora, seed_of(cfg.seed, "lora"))
    freeze(vae)
    vae.to(device, dtype=dtype)
    if tcfg.text_encoder:
        text_encoder.train()
    else:
        freeze(text_encoder)
        text_encoder.to(device, dtype=dtype)
    unet.train()
    if tcfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if tcfg.text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if tcfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    fingerprint = unet_fingerprint(unet)
    ema = None
    if tcfg.use_ema:
        from diffusers.training_utils import EMAModel

        # over what trains: the whole UNet, or only a LoRA's adapters
        ema = EMAModel(trainable_parameters(unet), decay=tcfg.ema_decay,
                       **({} if tcfg.lora.rank else {"model_cls": type(unet), "model_config": unet.config}))
        ema.to(device)
    trained = [unet] + ([text_encoder] if tcfg.text_encoder else [])
    params = [p for m in trained for p in trainable_parameters(m)]
    optimizer = build_optimizer(params, tcfg)
    lr_scheduler = build_lr_scheduler(optimizer, tcfg)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tcfg.batch_size
    if tcfg.text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    return Models(parts, unet, text_encoder, vae, ema, optimizer, lr_scheduler, params, dtype, fingerprint)


def restore_state(cfg: DictConfig, accelerator, models: Models, rng: torch.Generator, resume_from: Optional[Path],
                  streaming: bool) -> TrainState:
    """A fresh train state, or the checkpoint's with its data position mapped to this launch."""
    tcfg, world = cfg.train, accelerator.num_processes
    state = TrainState(world_size=world, batch_size=tcfg.batch_size, num_workers=cfg.data.num_workers,
                       model=models.fingerprint)
    if resume_from is None:
        state.data = DataPosition()
        return state
    state = load_checkpoint(accelerator, resume_from, rng, models.ema, models.fingerprint)
    models.lr_scheduler.load_state_dict({**state.lr_scheduler,
                                         "lr_lambdas": [None] * len(models.optimizer.param_groups)})
    position = map_data_position(state, world, tcfg.batch_size, cfg.data.num_workers, streaming)
    state.data, state.world_size, state.batch_size = position, world, tcfg.batch_size
    log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, position.epoch, position.batch)
    return state


# --------------------------------------------------------------------------------------------
# One micro-batch: text, noise, per-sample loss
# --------------------------------------------------------------------------------------------


def captions_for_batch(batch: dict, seed: int, caption_dropout: float) -> list[str]:
    """The caption each sample trains on; dropout to "" (for classifier-free guidance) is seeded
    per (epoch, sample), so a resumed run drops the same ones."""
    if caption_dropout <= 0:
        return list(batch["text"])
    return ["" if random.Random(seed_of(seed, "caption-dropout", batch["epoch"], sid)).random() < caption_dropout
            else text for text, sid in zip(batch["text"], batch["sample_id"])]


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                    snr_gamma: float | None, where: torch.Tensor | None = None) -> torch.Tensor:
    """MSE per sample (never pre-reduced), optionally min-SNR weighted (Hang et al. 2023);
    ``where`` (B, 1, h, w) weighs each latent position (region de-duplication)."""
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if where is not None:
        error = error * where
    loss = error.mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=snr_gamma)
        # v-prediction's target already carries a (snr + 1) factor (see the min-SNR paper, sec. 4)
        weight = clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr
        loss = loss * weight
    return loss


@dataclass
class Noised:
    latents: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    mean: torch.Tensor  # the latent distribution's mean (scaled): what the picture is, without the VAE's sampling noise


@torch.no_grad()
def noise_batch(pixel_values: torch.Tensor, vae, noise_scheduler, rng: torch.Generator, noise_offset: float) -> Noised:
    """Latents, noise and timesteps from this rank's generator (part of the checkpoint: exact resume)."""
    bsz, device = pixel_values.shape[0], pixel_values.device
    dist = vae.encode(pixel_values).latent_dist
    latents = (dist.sample(generator=rng) * vae.config.scaling_factor).float()
    noise = torch.randn(latents.shape, generator=rng, device=device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((bsz, latents.shape[1], 1, 1), generator=rng, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=rng, device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = (noise_scheduler.get_velocity(latents, noise, timesteps)
              if noise_scheduler.config.prediction_type == "v_prediction" else noise)
    return Noised(latents, noise, noisy, timesteps, target, (dist.mean * vae.config.scaling_factor).float())


@dataclass
class Window:
    """Sums over the micro-batches since the last log line (this rank's, reduced when logged)."""

    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    skipped: int = 0
    bad: list = field(default_factory=list)
    grad_norm: Any = None  # of the last optimizer step
    t0: float = field(default_factory=time.perf_counter)


def gather_strings(accelerator, items: list[str]) -> list[str]:
    """Every rank's items, on every rank (bad-sample names are rare, so objects are fine)."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return [s for part in gather_object([list(items)]) for s in part]


def train_micro_batch(cfg: DictConfig, accelerator, m: Models, batch: dict, state: TrainState, rng: torch.Generator,
                      monitor: Optional[Monitor], mitigations: Mitigations, window: Window) -> None:
    """Steps 2-7 of a micro-batch (docs/architecture.md, "The step"); every rank runs the same
    forward and backward whatever its samples' weights."""
    tcfg, device, scheduler = cfg.train, accelerator.device, m.parts.noise_scheduler
    pixel_values = batch["pixel_values"].to(device, dtype=m.dtype, non_blocking=True)
    bsz = pixel_values.shape[0]
    # 2. latents, noise, timesteps; the ledger's flags as they stand; the text as mitigated
    n = noise_batch(pixel_values, m.vae, scheduler, rng, tcfg.noise_offset)
    flagged, scores = monitor.flags(batch) if monitor is not None else (torch.zeros(bsz, dtype=torch.bool), None)
    mstep = MitigationStep(batch, state.step, state.micro_step, flagged, scores, n.timesteps)
    captions = mitigations.captions(mstep, captions_for_batch(batch, cfg.seed, tcfg.caption_dropout))
    with nullcontext() if tcfg.text_encoder else torch.no_grad():
        text_emb = encode_text(m.parts.tokenizer, m.text_encoder, captions, device)
    text_emb = mitigations.text_embedding(mstep, text_emb)

    # 3. forward (the monitor's attn2 processors keep per-sample attention reductions)
    if monitor is not None:
        monitor.before_forward(captions)
    pred = m.unet(n.noisy, n.timesteps, text_emb, return_dict=False)[0]
    # 4. loss per sample; 5. signals -> gathered -> ledger (the monitor sees the plain loss)
    loss_vec = per_sample_loss(pred, n.target, n.timesteps, scheduler, tcfg.snr_gamma)
    mstep.loss, mstep.gather = loss_vec.detach(), accelerator.gather
    weights, where = mitigations.weights_and_map(mstep, n.latents.shape[-2:], device)
    objective = (per_sample_loss(pred, n.target, n.timesteps, scheduler, tcfg.snr_gamma, where)
                 if where is not None else loss_vec)
    terms = mitigations.loss_terms(mstep)
    if monitor is not None:
        monitor.after_forward(accelerator, StepRecord(batch, state.step, loss_vec, pred, n.latents, n.noise, n.noisy,
                                                      n.timesteps, text_emb, n.mean))

    # 6. every rank sees every rank's losses: the finite check decides the same on all ranks
    all_losses = accelerator.gather(loss_vec.detach())
    finite = torch.isfinite(all_losses)
    if not bool(finite.all()):
        if tcfg.on_nonfinite == "error":
            bad_ids = [sid for sid, ok in zip(batch["sample_id"], torch.isfinite(loss_vec)) if not ok]
            raise FloatingPointError(
                f"non-finite loss at step {state.step} ({int((~finite).sum())} sample(s); on this rank: "
                f"{bad_ids or 'none'}); lower train.lr, or set train.on_nonfinite=skip")
        weights = torch.where(torch.isfinite(loss_vec), weights, torch.zeros_like(weights))
        window.skipped += int((~finite).sum())

    # 7. reduce, backward, clip, step. A zero weight keeps the sample in the graph.
    loss = (torch.where(weights > 0, objective, torch.zeros_like(objective)) * weights).mean()
    loss = loss + sum(terms.values(), torch.zeros((), device=device))
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm > 0 else float("inf")
        window.grad_norm = accelerator.clip_grad_norm_(m.params, max_norm)
        # grads are all-reduced, so this decision is the same on every rank
        if window.grad_norm is not None and not torch.isfinite(torch.as_tensor(window.grad_norm)):
            m.optimizer.zero_grad(set_to_none=True)
            window.skipped += bsz
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    window.loss_sum += float(all_losses[finite].sum())
    window.samples += int(finite.sum())
    window.bad += batch["bad"]


def advance_position(state: TrainState, batch: dict, bsz: int, world: int, batches_per_epoch: int,
                     streaming: bool) -> None:
    """The data position after a micro-batch: the batch just consumed, plus one."""
    state.micro_step += 1
    state.samples_seen += bsz * world
    if streaming:
        state.data = DataPosition(0, 0, state.micro_step)
        return
    nxt = batch["batch"] + 1
    state.data = (DataPosition(batch["epoch"] + 1, 0, state.micro_step) if nxt >= batches_per_epoch
                  else DataPosition(batch["epoch"], nxt, state.micro_step))


def log_window(cfg: DictConfig, accelerator, m: Models, state: TrainState, data, window: Window,
               monitor: Optional[Monitor], mitigations: Mitigations, tracker: Tracker, bad_samples: set) -> dict:
    """The ``train/``, ``data/``, ``perf/``, ``mitig/`` and ``memo/`` keys of one log line (a
    collective: every rank reduces its window)."""
    bad_samples.update(gather_strings(accelerator, window.bad))
    elapsed = time.perf_counter() - window.t0
    world, tcfg = accelerator.num_processes, cfg.train
    grad_norm = window.grad_norm
    metrics = {
        "train/loss": window.loss_sum / max(window.samples, 1),
        "train/lr": m.lr_scheduler.get_last_lr()[0],
        "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "train/epoch": state.data.epoch + state.data.batch / data.batches_per_epoch if data.batches_per_epoch else 0.0,
        "train/samples_seen": state.samples_seen,
        "train/nonfinite_skipped": window.skipped,
        "data/bad_samples": len(bad_samples),
        "perf/samples_per_s": window.steps * tcfg.gradient_accumulation_steps * tcfg.batch_size * world / max(elapsed, 1e-9),
        "perf/step_time_s": elapsed / max(window.steps, 1),
        **mitigations.metrics(accelerator),
    }
    if monitor is not None:
        metrics.update(monitor.metrics())
        tracker.log_histograms(monitor.histograms(), state.step)
        tracker.log_table("memo/top_flagged", monitor.top_flagged(cfg.monitor.table_size), state.step)
    tracker.log(metrics, state.step)
    return metrics


def checkpoint(cfg: DictConfig, accelerator, m: Models, state: TrainState, rng, monitor, mitigations: Mitigations,
               zero_stage: int, out: Path, tracker: Tracker) -> None:
    world = accelerator.num_processes
    if zero_stage < 3 and world > 1:  # ranks must hold the same weights; say so if not
        divergence = weights_divergence(accelerator, accelerator.unwrap_model(m.unet))
        tracker.log({"dist/weights_divergence": divergence, "dist/world_size": world}, state.step)
        if divergence > 0:
            log.warning("ranks hold different weights at step %d (divergence %.3g)", state.step, divergence)
    state.lr_scheduler = {k: v for k, v in m.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
    state.extra["mitigate"] = mitigations.state()
    path = save_checkpoint(accelerator, out, state, rng, m.ema, cfg.train.checkpoints_total_limit,
                           extra_files={LEDGER_FILE: monitor.save} if monitor is not None else None)
    log.info("saved %s", path)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> Path:
    """Train as ``cfg`` says; return the run directory."""
    out = Path(cfg.output_dir).expanduser()
    check_inputs(cfg)
    accelerator = build_accelerator(cfg)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    zero_stage = check_engine(cfg, accelerator)
    rank, world, tcfg = accelerator.process_index, accelerator.num_processes, cfg.train
    claim_output_dir(cfg, out, accelerator)
    resume_from = find_checkpoint(out, tcfg.resume)
    if tcfg.resume == "latest" and resume_from is None:
        log.info("train.resume=latest: no checkpoint in %s yet, starting from step 0", out)

    # 1. models, the train state, and the data (each rank its own noise stream, checkpointed)
    m = build_models(cfg, accelerator)
    with accelerator.main_process_first():  # the first process builds a generated data set
        data_cfg = resolve_source(cfg.data, cfg.model.cache_dir, cfg.seed)
    streaming = data_cfg.source == "webdataset"
    rng = torch.Generator(device=accelerator.device).manual_seed(seed_of(cfg.seed, "noise", rank))
    state = restore_state(cfg, accelerator, m, rng, resume_from, streaming)
    skipped_rows: list[str] = []  # metadata lines left out (data.on_bad_sample=skip): bad samples too
    table, root = (None, None) if streaming else load_table(data_cfg, cfg.model.cache_dir, skipped=skipped_rows)
    monitor = None
    if cfg.monitor.enabled:  # the ledger has a row per table row (or grows with a stream)
        reference = None
        if wants_reference(cfg.monitor):  # the starting model, for the ref_gain signals, loaded whole
            with zero3_init_disabled(accelerator.state.deepspeed_plugin):
                reference = build_reference(cfg.model, cfg.data.resolution, accelerator.unwrap_model(m.unet),
                                            lora=bool(tcfg.lora.rank), text_encoder_trained=tcfg.text_encoder,
                                            device=accelerator.device, dtype=m.dtype)
        monitor = Monitor(cfg.monitor, accelerator.unwrap_model(m.unet), m.parts.tokenizer,
                          accelerator.unwrap_model(m.text_encoder), m.parts.noise_scheduler,
                          num_samples=None if streaming else len(table), table=table, id_column=data_cfg.id_column,
                          caption_column=data_cfg.caption_column, reference=reference)
        if resume_from is not None:
            monitor.load(resume_from)
    mitigations = build_mitigations(cfg.mitigate, BuildContext(cfg.seed, m.parts.tokenizer, monitor,
                                                               tcfg.caption_dropout, data_cfg, cfg.model.cache_dir,
                                                               m.parts.noise_scheduler.config.num_train_timesteps))
    mitigations.load_state(state.extra.get("mitigate", {}))  # empty on a fresh start
    # mitigations known from the data alone (de-duplication) may decide how rows are drawn
    sample_weights = None if streaming else mitigations.prepare(table, root)
    data = build_train_data(data_cfg, batch_size=tcfg.batch_size, seed=cfg.seed, rank=rank, world=world,
                            cache_dir=cfg.model.cache_dir, position=state.data,
                            table=None if streaming else (table, root), sample_weights=sample_weights)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    tracker = Tracker(cfg, out, accelerator.is_main_process, resume_step=state.step if resume_from is not None else None)
    log.info("training %s on %s: %s samples, %d process(es) x batch %d x accumulation %d, %d steps; mitigations: %s",
             m.parts.source, data_cfg.path, data.num_samples or "streamed", world, tcfg.batch_size,
             tcfg.gradient_accumulation_steps, tcfg.max_steps, ", ".join(mitigations.names) or "none")
    progress = tqdm(total=tcfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and cfg.logging.progress_bar))

    bad_samples: set[str] = set(skipped_rows)  # distinct bad samples met so far, over all ranks
    window = Window()
    batches = iter(data.loader)
    while state.step < tcfg.max_steps:
        batch = next(batches)
        with accelerator.accumulate(m.unet):
            train_micro_batch(cfg, accelerator, m, batch, state, rng, monitor, mitigations, window)
        advance_position(state, batch, len(batch["sample_id"]), world, data.batches_per_epoch, streaming)
        if not accelerator.sync_gradients:
            continue

        # one optimizer step done
        m.lr_scheduler.step()
        if m.ema is not None:
            m.ema.step(trainable_parameters(m.unet))
        state.step += 1
        window.steps += 1
        progress.update(1)
        last = state.step == tcfg.max_steps
        if state.step % cfg.logging.every == 0 or last:
            metrics = log_window(cfg, accelerator, m, state, data, window, monitor, mitigations, tracker, bad_samples)
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", sps=f"{metrics['perf/samples_per_s']:.1f}")
            window = Window()
        # 8. validation images, the eval hook, checkpoints
        if cfg.validation.prompts and cfg.validation.every and state.step % cfg.validation.every == 0:
            validation_images(cfg.validation, cfg.data.resolution, accelerator, m.parts, m.unet, m.text_encoder,
                              m.ema, m.dtype, state.step, out, tracker)
        if cfg.eval.every and (state.step % cfg.eval.every == 0 or last):
            # probe prompts (top flagged first); copies judged globally and inside BE regions
            # (repeats of one image share a caption; the probes keep one of each, so ask for more)
            flagged_ids = [r["sample_id"] for r in monitor.top_flagged(8 * cfg.eval.num_prompts)] if monitor else []
            if monitor is not None:
                monitor.pause()  # the hook installs its own capture for sampling
            run_eval_hook(cfg.eval, accelerator, m.parts, m.unet, m.text_encoder, data.table, state.step, out,
                          tracker, data_cfg=data_cfg, ema=m.ema, dtype=m.dtype, flagged_ids=flagged_ids)
        if monitor is not None and cfg.monitor.history_every and state.step % cfg.monitor.history_every == 0 \
                and accelerator.is_main_process:  # every rank holds the same ledger
            (out / HISTORY_DIR).mkdir(exist_ok=True)
            monitor.write_parquet(out / HISTORY_DIR / f"step-{state.step:07d}.parquet")
        if state.step % tcfg.checkpoint_every == 0 or last:
            checkpoint(cfg, accelerator, m, state, rng, monitor, mitigations, zero_stage, out, tracker)

    progress.close()
    if monitor is not None:
        monitor.remove()  # the saved and validated model runs the stock attention processors
        if accelerator.is_main_process:
            monitor.write_parquet(out / "ledger.parquet")
    if cfg.validation.prompts and not (cfg.validation.every and state.step % cfg.validation.every == 0):
        validation_images(cfg.validation, cfg.data.resolution, accelerator, m.parts, m.unet, m.text_encoder, m.ema,
                          m.dtype, state.step, out, tracker)
    save_final(accelerator, m, zero_stage, tcfg.text_encoder, out, tcfg.lora.save_merged)
    if accelerator.is_main_process:
        print(summary_text(out, monitor, cfg), flush=True)
    tracker.finish()
    accelerator.end_training()
    return out


# --------------------------------------------------------------------------------------------
# The final pipeline
# --------------------------------------------------------------------------------------------


def save_final(accelerator, m: Models, zero_stage: int, train_text_encoder: bool, out: Path,
               save_merged: bool = True) -> None:
    """``<run>/final``: a whole diffusers pipeline (EMA weights when EMA is on), published atomically."""
    state_dict = accelerator.get_state_dict(m.unet) if zero_stage == 3 else None  # a collective under ZeRO-3
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(m.unet)
        if state_dict is not None:
            model = type(model).from_config(model.config)
            model.load_state_dict(state_dict)
        if m.ema is not None:
            m.ema.copy_to(trainable_parameters(model))
        encoder = accelerator.unwrap_model(m.text_encoder) if train_text_encoder else m.parts.text_encoder
        final = out / "final"
        if final.exists():
            import shutil

            shutil.rmtree(final)
        model = model.to(torch.float32)
        m.parts.vae.to(torch.float32)
        encoder.to(torch.float32)
        lora = bool(getattr(model, "peft_config", None))

        def write(tmp: Path) -> None:
            if lora:  # the adapters for load_lora_weights; the merged pipeline on request
                save_lora(model, tmp / "lora")
            if save_merged or not lora:
                save_pipeline(m.parts, merged_unet(model) if lora else model, encoder, tmp)

        build_once(final, "model_index.json" if save_merged or not lora else "lora", write)
        log.info("saved the final %s to %s", "LoRA adapters" if lora and not save_merged else "pipeline", final)
    accelerator.wait_for_everyone()


def summary_text(out: Path, monitor: Optional[Monitor], cfg: DictConfig) -> str:
    """What a person wants at the end of a run: what the ledger flagged, and where things are."""
    lines = ["", f"== copyguard: run finished in {out}"]
    if monitor is not None:
        lines += monitor.run_summary()
        lines.append(f"ledger (one row per sample): {out / 'ledger.parquet'}")
    evals = sorted((out / "eval").glob("step-*/eval.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if evals:  # the last eval hook: what the model draws now
        import json

        folder, metrics = evals[-1].parent, json.loads(evals[-1].read_text())["metrics"]
        judged = int(metrics.get("eval/num_generations", 0))
        lines.append(f"eval at {folder.name}: {judged} generations; replicas {_pct(metrics.get('eval/replica_rate'))}, "
                     f"local replicas {_pct(metrics.get('eval/local_replica_rate'))}")
        if (folder / "report.json").is_file():
            lines += _truth_lines(json.loads((folder / "report.json").read_text()))
        if (folder / "report.html").is_file():
            lines.append(f"audit report (generations next to their nearest training images): {folder / 'report.html'}")
    lines += [f"pipeline: {out / 'final'}", f"metrics: {out / 'metrics.jsonl'}", ""]
    return "\n".join(lines)


def _truth_lines(report: dict) -> list[str]:
    """Per ground-truth group of the probe prompts: how many generations copy (the report's
    ground-truth verdicts: the planted image for global rows, the stamp for local ones)."""
    groups: dict[str, list[bool]] = {}
    for r in report.get("records", []):
        truth = r.get("truth") or {}
        if truth.get("group"):
            groups.setdefault(truth["group"], []).append(bool(truth.get("replica") or truth.get("local_replica")))
    return [f"  prompts of {group} rows: {sum(v)} of {len(v)} generations copy (ground truth)"
            for group, v in sorted(groups.items())]


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def main(argv: list[str] | None = None) -> Path:
    quiet_libraries()
    try:
        cfg = parse_args(argv)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    try:
        return run(cfg)
    except (ConfigError, CheckpointError, ModelError, DataError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
