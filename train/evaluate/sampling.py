"""Generate with the model's own pipeline (DDIM, classifier-free guidance, fixed seeds) while
reading the two memorization signals that need a generation:

* the **Bright Ending map** (Chen et al., ICLR 2025): cross-attention to the first end-of-text
  token at the *last* denoising step, conditional half of the CFG batch, BE layers (default: the
  highest-resolution attn2 layers), heads and layers averaged -> [h, w] per generation;
* the **text-conditional noise magnitude** (Wen et al., ICLR 2024) per step,
  ``||eps(x_t, c) - eps(x_t, empty)||_2`` over the whole latent, plain and BE-masked
  (``||(eps_c - eps_u) * m||_2 / mean(m)``, ``m`` the BE map upsampled to the latent size).

The two CFG halves are read with a forward hook on the UNet, which sees the pipeline's
``[uncond, cond]`` batch output at every step; the BE map is recorded by
:class:`train.monitor.AttentionCapture`, switched on only for the last step's UNet call.

The masked magnitude needs ``m``, which exists only after the last step. The BE authors run a
second generation with the same seeds to apply it. DDIM with eta = 0 and fixed seeds is
deterministic, so that second pass would see the very same ``x_t`` and the same ``eps``; instead
we keep, per step, the channel-summed squared difference ``sum_c (eps_c - eps_u)^2`` (one
latent-sized plane per generation and step) and apply ``m`` afterwards:
``||d * m||_2^2 = sum_hw m^2 sum_c d^2``. Same numbers, half the compute, little memory.

The same planes give the **region map** that localization reads (``eval.region_map``): ``be`` is
the BE map alone; ``be_magnitude`` (default) weights it, per latent cell, by the text-conditional
difference ``sum_c (eps_c - eps_u)^2`` averaged over the first ``region_map_steps`` denoising
steps. At high noise the prompt decides the layout, and a copied region is where the prompt pulls
the prediction hardest; on the testbed's 16x16 model this outlines stamps and cards better than
the last-step BE map alone (README "Evaluation and audit" has the measurement).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from train.evaluate.config import REGION_MAPS
from train.monitor import AttentionCapture, CaptureAttnProcessor, cfg_end_token_index, cond_half, end_token_index


@dataclass
class Generation:
    """One batch of generations and their signals (all numpy, on the CPU)."""

    images: np.ndarray        # float32 [N, H, W, 3] in [0, 1]
    be_maps: np.ndarray       # float32 [N, h, w]: raw end-token attention probabilities
    magnitude: np.ndarray     # float32 [N, steps]: ||eps_c - eps_u||_2 per step (first step first)
    be_magnitude: np.ndarray  # float32 [N, steps]: ||(eps_c - eps_u) * m||_2 / mean(m) per step
    end_index: np.ndarray     # int64 [N]: the end-token position the map reads
    region_maps: np.ndarray   # float32 [N, h, w]: the map localization reads (module doc: eval.region_map)



def sampling_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline over the given (unwrapped) modules with a DDIM scheduler built
    from ``scheduler``'s config (training runs hold a DDPM scheduler)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def exclusive_capture(unet, be_layers: Sequence[str] | str | None = "default") -> Iterator[AttentionCapture]:
    """An :class:`AttentionCapture` for the BE map only, installed for the duration.

    During training the monitor may already hold capture processors on the same layers; a second
    capture would refuse to wrap them. We put the plain processors they wrap back for the
    duration and restore the monitor's own afterwards, so its records and settings survive.
    """
    previous = dict(unet.attn_processors)
    plain = {name: (p.original if isinstance(p, CaptureAttnProcessor) else p) for name, p in previous.items()}
    if any(isinstance(p, CaptureAttnProcessor) for p in previous.values()):
        unet.set_attn_processor(dict(plain))  # set_attn_processor pops from the dict: pass a copy
    capture = AttentionCapture(unet, layers=None, be_layers=be_layers or "default", enabled=False)
    capture.install()
    try:
        yield capture
    finally:
        capture.remove()
        if plain != previous:
            unet.set_attn_processor(dict(previous))


def _generator(seed: int) -> torch.Generator:
    # CPU generators: the same seed gives the same initial noise on any device.
    return torch.Generator("cpu").manual_seed(int(seed))


@torch.no_grad()
def generate_with_capture(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
                          guidance_scale: float, height: int, width: int,
                          be_layers: Sequence[str] | str | None = "default",
                          autocast_dtype: torch.dtype | None = None, region_map: str = "be_magnitude",
                          region_map_steps: int = 3) -> Generation:
    """Generate ``prompts[i]`` with seed ``seeds[i]`` (one image each) and read the signals.

    Each generation has its own generator, so a result does not depend on which batch or rank
    it was generated in. ``guidance_scale`` must be > 1: without the unconditional branch there
    is no text-conditional magnitude.
    """
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if guidance_scale <= 1.0:
        raise ValueError("guidance_scale must be > 1: the magnitude signal needs classifier-free guidance")
    if region_map not in REGION_MAPS:
        raise ValueError(f"region_map must be one of {REGION_MAPS}, got {region_map!r}")
    unet = pipe.unet
    was_training = unet.training
    unet.eval()

    energy: list[torch.Tensor] = []  # per step: sum_c (eps_c - eps_u)^2, [N, h, w]

    def keep_difference(module, args, kwargs, output):
        eps = output[0] if isinstance(output, tuple) else output.sample
        uncond, cond = eps.float().chunk(2)  # the pipeline stacks [uncond, cond]
        energy.append(((cond - uncond) ** 2).sum(dim=1))

    cond_index = end_token_index(pipe.tokenizer, prompts)
    empty_index = end_token_index(pipe.tokenizer, [""])  # the pipeline's negative prompt is ""
    hook = unet.register_forward_hook(keep_difference, with_kwargs=True)
    autocast = (torch.autocast(pipe.device.type, dtype=autocast_dtype)
                if autocast_dtype not in (None, torch.float32) else nullcontext())
    try:
        with exclusive_capture(unet, be_layers) as capture, autocast:
            capture.set_end_token_index(cfg_end_token_index(cond_index, empty_index))
            capture.enabled = steps == 1

            def record_last_step(pipeline, i, t, tensors):
                # Called after step i: switch recording on for the last step's UNet call only,
                # so the records hold the map at t close to 0 and no other step pays for it.
                capture.enabled = i + 2 == len(pipeline.scheduler.timesteps)
                return tensors

            images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale,
                          height=height, width=width, generator=[_generator(s) for s in seeds],
                          output_type="np", callback_on_step_end=record_last_step).images
            be = cond_half(capture.be_map()).float()  # [N, h, w]
    finally:
        hook.remove()
        unet.train(was_training)

    planes = torch.stack(energy)  # [steps, N, h, w]
    plain, masked = step_magnitudes(planes, be)
    region = be
    if region_map == "be_magnitude":  # the prompt's pull in the first steps, where the layout is decided
        region = _upsampled(be, planes.shape[-2:]) * planes[:max(1, region_map_steps)].mean(0)
    return Generation(np.asarray(images, dtype=np.float32), be.cpu().numpy(), plain.cpu().numpy(),
                      masked.cpu().numpy(), cond_index.numpy(), region.float().cpu().numpy())


def _upsampled(maps: torch.Tensor, size) -> torch.Tensor:
    """[N, h', w'] maps bilinearly resized to [N, *size]."""
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def step_magnitudes(energy: torch.Tensor, be_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain and BE-masked magnitudes per generation and step, each [N, steps].

    ``energy``: [steps, N, h, w] channel-summed squared differences; ``be_maps``: [N, h', w'],
    bilinearly resized to the latent size (h, w) to give ``m``.
    """
    steps, n, h, w = energy.shape
    m = _upsampled(be_maps, (h, w))
    plain = energy.sum(dim=(2, 3)).sqrt()
    masked = (energy * m[None] ** 2).sum(dim=(2, 3)).sqrt() / m.mean(dim=(1, 2)).clamp_min(1e-12)[None]
    return plain.T.contiguous(), masked.T.contiguous()
