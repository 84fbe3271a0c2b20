"""Cost of the memorization monitor on a training step of the tiny preset, monitor off vs on.

Not a test. Run:  python tests/bench/bench_monitor.py [--steps 200] [--batch 16] [--variants NAME ...]

One process, one copy of the same UNet per variant, each with its own optimizer: `off` (no
monitor), `drawn` (BE read from the training forward; no extra pass), `probe10` (a no-grad probe
pass at t=20 every 10th step), `magnitude` (probe10 plus the empty-prompt magnitude pass on every
step, to price that pass alone), two lean settings, `default` (the config's monitor as shipped),
`magnitude10` (the default plus the magnitude pass every 10th step, the earlier default),
`neighbours` (the default plus the online near-duplicate count) and `reference1` / `reference4`
(the default plus the ref_gain signals, the starting UNet's pass on every / every 4th step). Every step runs all of them on the same batch, in a
rotated order, so machine-load drift hits all alike; a step is the full training step (VAE
encode, text encode, UNet forward, per-sample loss, monitor with its gather and ledger update,
backward, clip, AdamW). We report samples/s over all timed steps (mean step time, because the
probe runs on one step in ten) and the ratios to `off`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"})
# the tiny preset on generated shapes (the tests' base layer), not the embedded demo
os.environ.setdefault("COPYGUARD_BASE_CONFIG", str(Path(__file__).resolve().parents[1] / "base.yaml"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tempfile  # noqa: E402

import torch  # noqa: E402

from data.datasets import build_train_data, resolve_source  # noqa: E402
from train.config import load_config  # noqa: E402
from train.finetune import encode_text, per_sample_loss  # noqa: E402
from train.models import freeze, load_components  # noqa: E402
from train.monitor.monitor import Monitor, StepRecord  # noqa: E402
from train.monitor.reference import build_reference, wants_reference  # noqa: E402

VARIANTS = {
    "off": None,
    "drawn": ["monitor.be_mode=drawn", "monitor.magnitude_every=0"],
    "probe10": ["monitor.be_mode=probe", "monitor.probe_every=10", "monitor.magnitude_every=0"],
    "magnitude": ["monitor.be_mode=probe", "monitor.probe_every=10", "monitor.magnitude_every=1"],
    "lean": ["monitor.be_mode=probe", "monitor.probe_every=20", "monitor.magnitude_every=0",
             "monitor.token_layers=[down_blocks,mid_block]"],
    "lean_drawn": ["monitor.be_mode=drawn", "monitor.magnitude_every=0", "monitor.token_layers=[down_blocks,mid_block]"],
    "default": [],  # the run config's monitor as it stands (heads, calibrated flags, drawn BE, no magnitude pass)
    "magnitude10": ["monitor.magnitude_every=10"],  # the default until the magnitude pass was priced out of it
    # the default plus the online near-duplicate count (its index searched on each row's first sighting)
    "neighbours": ["monitor.signals=[be_mass,be_topk,be_entropy,token_entropy,start_mass,loss,magnitude,be_magnitude,"
                   "neighbours]"],
    # the default plus ref_gain / ref_gain_topk: a frozen copy of the starting UNet run on every / every 4th step
    **{f"reference{k}": ["monitor.signals=[be_mass,be_topk,be_entropy,token_entropy,start_mass,loss,magnitude,"
                         f"be_magnitude,ref_gain,ref_gain_topk]", f"monitor.reference_every={k}"] for k in (1, 4)},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which to run (off is always run: the ratios' reference)")
    args = parser.parse_args()
    chosen = {n: VARIANTS[n] for n in VARIANTS if n == "off" or n in args.variants}
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(overrides=[f"model.cache_dir={tmp}", f"train.batch_size={args.batch}"])
        parts = load_components(base.model, base.data.resolution)
        freeze(parts.vae)
        freeze(parts.text_encoder)
        data_cfg = resolve_source(base.data, base.model.cache_dir, base.seed)
        data = build_train_data(data_cfg, batch_size=args.batch, seed=0, rank=0, world=1, cache_dir=tmp)
        runs = {}
        for name, overrides in chosen.items():
            unet = copy.deepcopy(parts.unet).train()
            monitor = None
            if overrides is not None:
                cfg = load_config(overrides=overrides)
                reference = None
                if wants_reference(cfg.monitor):  # the starting weights again, frozen, as a run keeps them
                    reference = build_reference(base.model, base.data.resolution, unet, lora=False,
                                                text_encoder_trained=False, device="cpu", dtype=torch.float32)
                monitor = Monitor(cfg.monitor, unet, parts.tokenizer, parts.text_encoder, parts.noise_scheduler,
                                  num_samples=data.num_samples, table=data.table, reference=reference)
            runs[name] = (unet, monitor, torch.optim.AdamW(unet.parameters(), lr=1e-4), [])
        names = list(chosen)
        batches = iter(data.loader)
        sched = parts.noise_scheduler
        for step in range(args.steps + args.warmup):
            batch = next(batches)
            gen = torch.Generator().manual_seed(step)
            with torch.no_grad():
                latents = parts.vae.encode(batch["pixel_values"]).latent_dist.sample(gen) * parts.vae.config.scaling_factor
                text = encode_text(parts.tokenizer, parts.text_encoder, batch["text"], "cpu")
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
            noisy = sched.add_noise(latents, noise, t)
            for name in names[step % len(names):] + names[:step % len(names)]:
                unet, monitor, opt, times = runs[name]
                t0 = time.perf_counter()
                if monitor is not None:
                    monitor.before_forward(batch["text"])
                pred = unet(noisy, t, text).sample
                loss_vec = per_sample_loss(pred, noise, t, sched, None)
                if monitor is not None:
                    monitor.after_forward(accelerator, StepRecord(batch, step, loss_vec, pred, latents, noise, noisy,
                                                                  t, text))
                loss_vec.mean().backward()
                torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step >= args.warmup:
                    times.append(time.perf_counter() - t0)
    sps = {n: args.batch * len(r[3]) / sum(r[3]) for n, r in runs.items()}
    print(json.dumps({"threads": torch.get_num_threads(), "batch": args.batch, "timed_steps": args.steps,
                      "samples_per_s": sps, "ratio_to_off": {n: sps[n] / sps["off"] for n in sps}}, indent=1))


if __name__ == "__main__":
    main()
