"""Fine-tune Stable Diffusion with accelerate: ``accelerate launch train/finetune.py [--config F] [k=v ...]``.

The training loop is ``run`` below, in execution order. Everything per sample (loss, weights)
stays a vector until the one place the loop reduces it, so monitors and mitigations can act on
single samples while every rank still runs the same forward and backward.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # `python train/finetune.py` / `accelerate launch train/finetune.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from train.util import build_once, seed_of
from data.datasets import DataError, DataPosition, build_train_data, load_table, resolve_source
from train.checkpoint import (CheckpointError, TrainState, find_checkpoint, load_checkpoint,
                              map_data_position, save_checkpoint, weights_divergence)
from train.config import ConfigError, parse_args, save_config
from train.evaluate.hook import run_eval_hook
from train.mitigate.captions import CaptionPerturber
from train.mitigate.regularize import active_terms, attention_penalties
from train.mitigate.weights import data_weights, flag_weights, loss_map
from train.monitor.monitor import LEDGER_FILE, Monitor
from train.models import ModelError, freeze, load_components, save_pipeline, unet_fingerprint, weight_dtype
from train.tracking import Tracker

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
# One batch: text, noise, per-sample loss
# --------------------------------------------------------------------------------------------


def captions_for_batch(batch: dict, seed: int, caption_dropout: float,
                       keep: Optional[torch.Tensor] = None) -> list[str]:
    """The caption each sample trains on; dropout to "" is seeded per (epoch, sample) for resume.
    ``keep`` (per sample, in [0, 1]) scales the chance of keeping the caption: a sample keeps it
    with probability (1 - caption_dropout) x keep (de-duplication by caption)."""
    if caption_dropout <= 0 and keep is None:
        return list(batch["text"])
    import random

    keep = [1.0] * len(batch["text"]) if keep is None else keep.tolist()
    # drop below p + (1 - p)(1 - keep): exactly caption_dropout where keep = 1
    return ["" if random.Random(seed_of(seed, "caption-dropout", batch["epoch"], sid)).random()
            < caption_dropout + (1 - caption_dropout) * (1 - k) else text
            for text, sid, k in zip(batch["text"], batch["sample_id"], keep)]


def encode_text(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    return text_encoder(ids, return_dict=False)[0]


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


def new_window() -> dict:
    """Sums over the steps since the last log line."""
    return {"loss_sum": 0.0, "samples": 0, "bad": [], "skipped": 0, "t0": time.perf_counter(), "steps": 0,
            "weight_sum": 0.0, "perturbed": 0}


def gather_strings(accelerator, items: list[str]) -> list[str]:
    """Every rank's items, on every rank (bad-sample names are rare, so objects are fine)."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return [s for part in gather_object([list(items)]) for s in part]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> Path:
    """Train as ``cfg`` says; return the run directory."""
    out = Path(cfg.output_dir).expanduser()
    accelerator = build_accelerator(cfg)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    zero_stage = check_engine(cfg, accelerator)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    tcfg = cfg.train
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    resume_from = find_checkpoint(out, tcfg.resume)
    if tcfg.resume == "latest" and resume_from is None:
        log.info("train.resume=latest: no checkpoint in %s yet, starting from step 0", out)

    # Models: the frozen parts in the compute dtype, the trained ones in fp32 (accelerate autocasts).
    plugin = accelerator.state.deepspeed_plugin
    with accelerator.main_process_first(), zero3_init_disabled(plugin):  # first process builds preset/data
        parts = load_components(cfg.model, cfg.data.resolution)
        data_cfg = resolve_source(cfg.data, cfg.model.cache_dir, cfg.seed)
    tokenizer, text_encoder, vae, unet, noise_scheduler = (
        parts.tokenizer, parts.text_encoder, parts.vae, parts.unet, parts.noise_scheduler)
    dtype = weight_dtype(tcfg.mixed_precision)
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

        ema = EMAModel(unet.parameters(), decay=tcfg.ema_decay, model_cls=type(unet), model_config=unet.config)
        ema.to(device)

    trained = [unet] + ([text_encoder] if tcfg.text_encoder else [])
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tcfg)
    lr_scheduler = build_lr_scheduler(optimizer, tcfg)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = tcfg.batch_size
    if tcfg.text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)

    # Each rank draws its own noise and timesteps; the generator is part of the checkpoint.
    rng = torch.Generator(device=device).manual_seed(seed_of(cfg.seed, "noise", rank))
    state = TrainState(world_size=world, batch_size=tcfg.batch_size, num_workers=cfg.data.num_workers,
                       model=fingerprint)
    streaming = data_cfg.source == "webdataset"
    position = DataPosition()
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, rng, ema, fingerprint)
        lr_scheduler.load_state_dict({**state.lr_scheduler, "lr_lambdas": [None] * len(optimizer.param_groups)})
        position = map_data_position(state, world, tcfg.batch_size, cfg.data.num_workers, streaming)
        state.data, state.world_size, state.batch_size = position, world, tcfg.batch_size
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, position.epoch, position.batch)
    # Map-style data: the table first, for the de-duplication weights (known from the data alone:
    # whole-image rows, region tile maps), which may decide how rows are sampled.
    mcfg = cfg.mitigate
    table, root = (None, None) if streaming else load_table(data_cfg, cfg.model.cache_dir)
    dedup, regions = data_weights(mcfg.weights, table, data_cfg.image_column, data_cfg.resolution,
                                  cfg.model.cache_dir, root)
    sample_weights = keep_caption = None
    if mcfg.weights.dedup_by == "sampling":  # rows drawn in proportion instead of weighted in the loss
        sample_weights, dedup = dedup, None
        log.info("de-duplication by sampling: %d of %d rows per epoch", int(sample_weights.sum()), len(table))
    elif mcfg.weights.dedup_by == "caption":  # rows keep their caption in proportion, train in full
        keep_caption, dedup = dedup, None
        log.info("de-duplication by caption: %d of %d rows keep their caption less often (%.0f captioned per epoch)",
                 int((keep_caption < 1).sum()), len(table), float(keep_caption.sum()))
    data = build_train_data(data_cfg, batch_size=tcfg.batch_size, seed=cfg.seed, rank=rank, world=world,
                            cache_dir=cfg.model.cache_dir, position=position,
                            table=None if streaming else (table, root),
                            sample_weights=sample_weights)

    monitor = None
    if cfg.monitor.enabled:
        monitor = Monitor(cfg.monitor, accelerator.unwrap_model(unet), tokenizer, accelerator.unwrap_model(text_encoder),
                          noise_scheduler, num_samples=data.num_samples, table=data.table,
                          id_column=data_cfg.id_column, caption_column=data_cfg.caption_column)
        if resume_from is not None:
            monitor.load(resume_from)

    # Mitigations: caption perturbation, per-sample loss weights, attention regularizers.
    perturb = CaptionPerturber(mcfg.captions, tokenizer, cfg.seed)
    penalties_on = active_terms(mcfg.regularize)
    if penalties_on:
        monitor.capture.with_grad = True  # the penalties backpropagate through the attention

    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    tracker = Tracker(cfg, out, accelerator.is_main_process,
                      resume_step=state.step if resume_from is not None else None)
    progress = tqdm(total=tcfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and cfg.logging.progress_bar))
    log.info("training %s on %s: %s samples, %d process(es) x batch %d x accumulation %d, %d steps",
             parts.source, data_cfg.path, data.num_samples or "streamed", world, tcfg.batch_size,
             tcfg.gradient_accumulation_steps, tcfg.max_steps)

    bad_samples: set[str] = set()  # distinct bad samples met so far, over all ranks
    window = new_window()
    grad_norm = torch.tensor(float("nan"))
    batches = iter(data.loader)
    while state.step < tcfg.max_steps:
        # 1. data
        batch = next(batches)
        pixel_values = batch["pixel_values"].to(device, dtype=dtype, non_blocking=True)
        bsz = pixel_values.shape[0]

        with accelerator.accumulate(unet):
            # 2. latents, noise, timesteps, text
            with torch.no_grad():
                latents = vae.encode(pixel_values).latent_dist.sample(generator=rng)
                latents = (latents * vae.config.scaling_factor).float()
            noise = torch.randn(latents.shape, generator=rng, device=device)
            if tcfg.noise_offset:
                noise = noise + tcfg.noise_offset * torch.randn(
                    (bsz, latents.shape[1], 1, 1), generator=rng, device=device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      generator=rng, device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            flagged, scores = monitor.flags(batch) if monitor is not None else (torch.zeros(bsz, dtype=torch.bool), None)
            captions = captions_for_batch(batch, cfg.seed, tcfg.caption_dropout,
                                          None if keep_caption is None else keep_caption[batch["index"]])
            perturbed = perturb.applies(state.step, flagged)
            captions = perturb(captions, batch["captions"], batch["sample_id"], state.micro_step, perturbed)
            with nullcontext() if tcfg.text_encoder else torch.no_grad():
                text_emb = encode_text(tokenizer, text_encoder, captions, device)
            text_emb = perturb.embedding_noise(text_emb, batch["sample_id"], state.micro_step, perturbed)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise

            # 3. forward (the monitor's attn2 processors keep per-sample attention reductions)
            if monitor is not None:
                monitor.before_forward(captions)
            pred = unet(noisy, timesteps, text_emb, return_dict=False)[0]
            # 4. loss per sample; 5. signals -> gathered -> ledger (same on every rank), flags
            loss_vec = per_sample_loss(pred, target, timesteps, noise_scheduler, tcfg.snr_gamma)
            # what is optimized: the same, weighted under shared regions (the monitor sees the plain loss)
            # de-duplication weights act from timestep dedup_min_t up (below it, every image trains in full)
            dedup_on = (timesteps >= mcfg.weights.dedup_min_t).cpu()
            where = (loss_map(torch.where(dedup_on[:, None, None], regions[batch["index"]], 1.0), latents.shape[-2:])
                     .to(device) if regions is not None else None)
            objective = (per_sample_loss(pred, target, timesteps, noise_scheduler, tcfg.snr_gamma, where)
                         if where is not None else loss_vec)
            penalties = attention_penalties(mcfg.regularize, monitor.capture, timesteps) if penalties_on else {}
            if monitor is not None:
                monitor.after_forward(accelerator, batch, loss_vec, pred, latents, noise, noisy, timesteps,
                                      text_emb, state.step)

            # 6. mitigation: a weight per sample (0 = drop) and attention penalties
            weights = flag_weights(mcfg.weights, flagged, scores, state.step)
            if dedup is not None:
                weights = weights * torch.where(dedup_on, dedup[batch["index"]], 1.0)
            weights = weights.to(device)
            reg_mask = ((flagged if mcfg.regularize.target == "flagged" else torch.ones_like(flagged))
                        & torch.tensor(state.step >= mcfg.regularize.start_step)).to(device, loss_vec.dtype)
            reg_loss = sum((mcfg.regularize[name] * (term * reg_mask).mean() for name, term in penalties.items()),
                           torch.zeros((), device=device))

            # Every rank sees every rank's losses: the finite check decides the same on all ranks.
            all_losses = accelerator.gather(loss_vec.detach())
            finite = torch.isfinite(all_losses)
            if not bool(finite.all()):
                bad_ids = [sid for sid, ok in zip(batch["sample_id"], torch.isfinite(loss_vec)) if not ok]
                if tcfg.on_nonfinite == "error":
                    raise FloatingPointError(
                        f"non-finite loss at step {state.step} ({int((~finite).sum())} sample(s); on this rank: "
                        f"{bad_ids or 'none'}); lower train.lr, or set train.on_nonfinite=skip")
                weights = torch.where(torch.isfinite(loss_vec), weights, torch.zeros_like(weights))
                window["skipped"] += int((~finite).sum())

            # 6-7. reduce, backward, clip, step. A zero weight keeps the sample in the graph, so
            # every rank runs the same backward whatever it drops.
            loss = (torch.where(weights > 0, objective, torch.zeros_like(objective)) * weights).mean() + reg_loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm > 0 else float("inf")
                grad_norm = accelerator.clip_grad_norm_(params, max_norm)
                # grads are all-reduced, so this decision is the same on every rank
                if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    window["skipped"] += bsz
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # Bookkeeping per micro-batch: the data position is the batch just consumed, plus one.
        state.micro_step += 1
        state.samples_seen += bsz * world
        if not streaming:
            nxt = batch["batch"] + 1
            state.data = (DataPosition(batch["epoch"] + 1, 0, state.micro_step)
                          if nxt >= data.batches_per_epoch else DataPosition(batch["epoch"], nxt, state.micro_step))
        else:
            state.data = DataPosition(0, 0, state.micro_step)
        window["loss_sum"] += float(all_losses[finite].sum())
        window["weight_sum"] += float((weights * where.mean(dim=(1, 2, 3))).sum() if where is not None else weights.sum())
        window["perturbed"] += int(perturbed.sum())
        for name, term in penalties.items():
            window[f"mitig/{name}"] = window.get(f"mitig/{name}", 0.0) + float(term.detach().mean())
        window["samples"] += int(finite.sum())
        window["bad"] += batch["bad"]
        if not accelerator.sync_gradients:
            continue

        # 7. one optimizer step done
        lr_scheduler.step()
        if ema is not None:
            ema.step(unet.parameters())
        state.step += 1
        window["steps"] += 1
        progress.update(1)

        if state.step % cfg.logging.every == 0 or state.step == tcfg.max_steps:
            bad_samples.update(gather_strings(accelerator, window["bad"]))
            elapsed = time.perf_counter() - window["t0"]
            samples_per_s = window["steps"] * tcfg.gradient_accumulation_steps * bsz * world / max(elapsed, 1e-9)
            metrics = {
                "train/loss": window["loss_sum"] / max(window["samples"], 1),
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/epoch": state.data.epoch + state.data.batch / data.batches_per_epoch if data.batches_per_epoch else 0.0,
                "train/samples_seen": state.samples_seen,
                "train/nonfinite_skipped": window["skipped"],
                "data/bad_samples": len(bad_samples),
                "perf/samples_per_s": samples_per_s,
                "perf/step_time_s": elapsed / window["steps"],
            }
            micro = window["steps"] * tcfg.gradient_accumulation_steps
            metrics.update({"mitig/mean_weight": window["weight_sum"] / max(micro * bsz, 1),
                            "mitig/perturbed_captions": window["perturbed"]})
            metrics.update({k: v / max(micro, 1) for k, v in window.items() if k.startswith("mitig/")})
            if monitor is not None:
                metrics.update(monitor.metrics())
                tracker.log_histograms(monitor.histograms(), state.step)
                tracker.log_table("memo/top_flagged", monitor.top_flagged(cfg.monitor.table_size), state.step)
            tracker.log(metrics, state.step)
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", sps=f"{samples_per_s:.1f}")
            window = new_window()

        # 8. validation images and checkpoints
        if cfg.validation.prompts and cfg.validation.every and state.step % cfg.validation.every == 0:
            validate(cfg, accelerator, parts, unet, text_encoder, ema, dtype, state.step, out, tracker)
        if cfg.eval.every and (state.step % cfg.eval.every == 0 or state.step == tcfg.max_steps):
            # generate probe prompts (top flagged first), judge copies globally and inside BE regions
            flagged_ids = [r["sample_id"] for r in monitor.top_flagged(cfg.eval.num_prompts)] if monitor else []
            if monitor is not None:
                monitor.capture.enabled = False  # the hook installs its own capture for sampling
            run_eval_hook(cfg.eval, accelerator, parts, unet, text_encoder, data.table, state.step, out, tracker,
                          data_cfg=data_cfg, ema=ema, dtype=dtype, flagged_ids=flagged_ids)
        if state.step % tcfg.checkpoint_every == 0 or state.step == tcfg.max_steps:
            if zero_stage < 3 and world > 1:  # ranks must hold the same weights; say so if not
                divergence = weights_divergence(accelerator, accelerator.unwrap_model(unet))
                tracker.log({"dist/weights_divergence": divergence, "dist/world_size": world}, state.step)
                if divergence > 0:
                    log.warning("ranks hold different weights at step %d (divergence %.3g)", state.step, divergence)
            state.lr_scheduler = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
            path = save_checkpoint(accelerator, out, state, rng, ema, tcfg.checkpoints_total_limit,
                                   extra_files={LEDGER_FILE: monitor.save} if monitor is not None else None)
            log.info("saved %s", path)

    progress.close()
    if monitor is not None:
        monitor.remove()  # the saved and validated model runs the stock attention processors
        if accelerator.is_main_process:
            monitor.write_parquet(out / "ledger.parquet")
    if cfg.validation.prompts and not (cfg.validation.every and state.step % cfg.validation.every == 0):
        validate(cfg, accelerator, parts, unet, text_encoder, ema, dtype, state.step, out, tracker)
    save_final(accelerator, parts, unet, text_encoder, ema, zero_stage, tcfg.text_encoder, out)
    tracker.finish()
    accelerator.end_training()
    return out


# --------------------------------------------------------------------------------------------
# Validation images and the final pipeline
# --------------------------------------------------------------------------------------------


def _pipeline(parts, unet, text_encoder, accelerator, scheduler=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=accelerator.unwrap_model(text_encoder), tokenizer=parts.tokenizer,
        unet=accelerator.unwrap_model(unet), scheduler=scheduler or parts.noise_scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def validate(cfg, accelerator, parts, unet, text_encoder, ema, dtype, step, out, tracker) -> None:
    """Images for the configured prompts; prompts are shared out over ranks so none waits long."""
    from diffusers import DDIMScheduler

    vcfg = cfg.validation
    folder = out / "val" / f"step-{step}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(unet)
    if ema is not None:  # look at the EMA weights, then put the trained ones back
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    pipe = _pipeline(parts, unet, text_encoder, accelerator, DDIMScheduler.from_config(parts.noise_scheduler.config))
    jobs = [(i, j) for i in range(len(vcfg.prompts)) for j in range(vcfg.images_per_prompt)]
    autocast = torch.autocast(accelerator.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    for i, j in jobs[accelerator.process_index::accelerator.num_processes]:
        generator = torch.Generator(device=accelerator.device).manual_seed(vcfg.seed + 1000 * i + j)
        with autocast:
            image = pipe(vcfg.prompts[i], num_inference_steps=vcfg.num_inference_steps,
                         guidance_scale=vcfg.guidance_scale, generator=generator,
                         height=cfg.data.resolution, width=cfg.data.resolution).images[0]
        image.save(folder / f"p{i:03d}-{j}.png")
    model.train()
    if ema is not None:
        ema.restore(model.parameters())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        images = [(folder / f"p{i:03d}-{j}.png", vcfg.prompts[i]) for i, j in jobs]
        tracker.log_images("val/images", images, step)
        tracker.log({"val/num_images": len(images)}, step)


def save_final(accelerator, parts, unet, text_encoder, ema, zero_stage, train_text_encoder, out) -> None:
    """``<run>/final``: a whole diffusers pipeline (EMA weights when EMA is on), published atomically."""
    state_dict = accelerator.get_state_dict(unet) if zero_stage == 3 else None  # a collective under ZeRO-3
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        if state_dict is not None:
            model = type(model).from_config(model.config)
            model.load_state_dict(state_dict)
        if ema is not None:
            ema.copy_to(model.parameters())
        encoder = accelerator.unwrap_model(text_encoder) if train_text_encoder else parts.text_encoder
        final = out / "final"
        if final.exists():
            import shutil

            shutil.rmtree(final)
        model = model.to(torch.float32)
        parts.vae.to(torch.float32)
        encoder.to(torch.float32)
        build_once(final, "model_index.json", lambda tmp: save_pipeline(parts, model, encoder, tmp))
        log.info("saved the final pipeline to %s", final)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> Path:
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
