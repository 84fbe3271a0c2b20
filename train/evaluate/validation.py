"""Validation images: the configured prompts drawn with the weights being trained (EMA when on)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from train.evaluate.hook import _ema_weights
from train.evaluate.sampling import sampling_pipeline


@torch.no_grad()
def validation_images(vcfg, resolution: int, accelerator, parts, unet, text_encoder, ema, dtype, step: int,
                      out: Path, tracker) -> None:
    """``val/step-<step>/p<prompt>-<k>.png``; prompts are shared out over ranks so none waits long
    (a collective: call on every rank)."""
    folder = out / "val" / f"step-{step}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(unet)
    pipe = sampling_pipeline(parts.vae, accelerator.unwrap_model(text_encoder), parts.tokenizer, model,
                             parts.noise_scheduler)
    jobs = [(i, j) for i in range(len(vcfg.prompts)) for j in range(vcfg.images_per_prompt)]
    autocast = torch.autocast(accelerator.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with _ema_weights(model, ema):
        model.eval()
        for i, j in jobs[accelerator.process_index::accelerator.num_processes]:
            generator = torch.Generator(device=accelerator.device).manual_seed(vcfg.seed + 1000 * i + j)
            with autocast:
                image = pipe(vcfg.prompts[i], num_inference_steps=vcfg.num_inference_steps,
                             guidance_scale=vcfg.guidance_scale, generator=generator,
                             height=resolution, width=resolution).images[0]
            image.save(folder / f"p{i:03d}-{j}.png")
        model.train()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        images = [(folder / f"p{i:03d}-{j}.png", vcfg.prompts[i]) for i, j in jobs]
        tracker.log_images("val/images", images, step)
        tracker.log({"val/num_images": len(images)}, step)
