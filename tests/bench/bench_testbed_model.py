"""Step-time cost of the testbed's v6 model (configs/testbed/model_v6.yaml: cross-attention at
16x16, 8x8 and 4x4) against v5 (configs/testbed/common.yaml: cross-attention at 4x4 and mid only).

Not a test (pytest only collects test_*.py). Run (a few tens of seconds on one thread):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python tests/bench/bench_testbed_model.py [--batch 32] [--repeats 10]

Both models are built offline through the tiny preset's builder (train.models.tiny_pipeline) from
the testbed configs themselves, at the testbed's 32 px. Four conditions, {v5, v6} x monitor
{off, on}, each with its own UNet + text encoder copy and AdamW, are timed interleaved in one
process, in a rotated order each round, so drifts in machine load hit all alike. A step is the
fine-tune's own (train/finetune.py helpers, the testbed's settings): VAE encode + noise, text
encode (the text encoder trains, train.text_encoder: true), UNet forward, min-SNR v-prediction
loss, [monitor], backward through UNet and text encoder, clip, AdamW. ``on`` is the testbed's
monitor (common.yaml's monitor section: drawn BE + token capture, signals, ledger) with
``magnitude_every=0``: its empty-prompt pass (one extra no-grad UNet forward every 10th step by
default) is left out of the median. Median ms/step, ratio to v5 with the same monitor setting.
On a shared machine compare the ratios of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"})
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from train.config import load_config  # noqa: E402
from train.finetune import encode_text, noise_batch, per_sample_loss  # noqa: E402
from train.models import tiny_pipeline  # noqa: E402
from train.monitor.monitor import Monitor, StepRecord  # noqa: E402

MODELS = {"v5": ["configs/testbed/common.yaml"],
          "v6": ["configs/testbed/common.yaml", "configs/testbed/model_v6.yaml"]}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # the monitor gathers through it
    overrides = ["monitor.magnitude_every=0", "monitor.label_column=null"]
    conditions, sizes = {}, {}
    for model, files in MODELS.items():
        cfg = load_config([str(REPO / f) for f in files], overrides)
        pipe = tiny_pipeline(cfg.model.tiny, cfg.data.resolution)
        pipe.vae.requires_grad_(False)
        sizes[model] = (count(pipe.unet), count(pipe.text_encoder))
        for monitor_on in (False, True):
            unet, text_encoder = copy.deepcopy(pipe.unet).train(), copy.deepcopy(pipe.text_encoder).train()
            monitor = (Monitor(cfg.monitor, unet, pipe.tokenizer, text_encoder, pipe.scheduler, num_samples=args.batch)
                       if monitor_on else None)
            params = [*unet.parameters(), *text_encoder.parameters()]
            conditions[(model, "on" if monitor_on else "off")] = dict(
                unet=unet, text_encoder=text_encoder, monitor=monitor, params=params, pipe=pipe, cfg=cfg,
                opt=torch.optim.AdamW(params, lr=1e-4), times=[])
    resolution = next(iter(conditions.values()))["cfg"].data.resolution

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(args.batch, 3, resolution, resolution, generator=g) * 2 - 1
    captions = [f"a {c} emoji number {i} with headstone sticker" for i, c in
                zip(range(args.batch), itertools.cycle(["red", "blue", "green", "black"]))]
    batch = {"index": torch.arange(args.batch), "text": captions}
    names = list(conditions)
    for step in range(args.warmup + args.repeats):
        for name in names[step % len(names):] + names[:step % len(names)]:
            c = conditions[name]
            pipe, tcfg = c["pipe"], c["cfg"].train
            rng = torch.Generator().manual_seed(step)  # the same noise and timesteps for every condition
            t0 = time.perf_counter()
            n = noise_batch(pixels, pipe.vae, pipe.scheduler, rng, 0.0)
            if c["monitor"] is not None:
                c["monitor"].before_forward(captions)
            text = encode_text(pipe.tokenizer, c["text_encoder"], captions, "cpu")
            pred = c["unet"](n.noisy, n.timesteps, text).sample
            loss = per_sample_loss(pred, n.target, n.timesteps, pipe.scheduler, tcfg.snr_gamma)
            if c["monitor"] is not None:
                c["monitor"].after_forward(accelerator, StepRecord(batch, step, loss.detach(), pred, n.latents,
                                                                   n.noise, n.noisy, n.timesteps, text))
            loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(c["params"], tcfg.max_grad_norm)
            c["opt"].step()
            c["opt"].zero_grad(set_to_none=True)
            if step >= args.warmup:
                c["times"].append(time.perf_counter() - t0)

    median = {name: 1000 * statistics.median(c["times"]) for name, c in conditions.items()}
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {resolution} px "
          f"({resolution // 2}x{resolution // 2} latents), median of {args.repeats} steps after {args.warmup} warm-up")
    print(f"{'model':5} {'monitor':7} {'ms/step':>8} {'min-max':>13} {'vs v5':>6} {'vs off':>6} "
          f"{'UNet params':>12} {'+text enc.':>11}")
    for (model, mon), c in conditions.items():
        lo, hi = 1000 * min(c["times"]), 1000 * max(c["times"])
        print(f"{model:5} {mon:7} {median[(model, mon)]:8.0f} {f'{lo:.0f}-{hi:.0f}':>13} "
              f"{median[(model, mon)] / median[('v5', mon)]:6.2f} {median[(model, mon)] / median[(model, 'off')]:6.2f} "
              f"{sizes[model][0]:12,d} {sizes[model][1]:11,d}")


if __name__ == "__main__":
    main()
