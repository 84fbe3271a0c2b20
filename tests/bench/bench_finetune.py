"""Throughput of train/finetune.py against a minimal plain loop over the same model, data and batch.

Not a test (pytest only collects test_*.py). Run:

    python tests/bench/bench_finetune.py [--steps 60] [--warmup 10] [--repeats 3] [--batch 16] [--monitor]

The trainer runs with the memorization monitor off unless --monitor is given (its cost is
measured by tests/bench/bench_monitor.py), so this prices the loop itself.

Each round runs both, in alternating order, in this process: the real trainer (``run(cfg)``,
logging every 10 steps, no checkpoints or validation inside the timed steps) and a plain loop
(VAE encode, text encode, noise, UNet forward, MSE, backward, clip, AdamW; no accelerate, no
per-sample bookkeeping). Samples/s are measured over the steps after the warm-up. We report the
median over rounds of the per-round ratio trainer / plain; on a shared machine only the ratio
from one run means anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"})
# the tiny preset on generated shapes (the tests' base layer), not the embedded demo
os.environ.setdefault("COPYGUARD_BASE_CONFIG", str(Path(__file__).resolve().parents[1] / "base.yaml"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data.datasets import build_train_data, resolve_source  # noqa: E402
from train.config import load_config  # noqa: E402
from train.finetune import encode_text, run  # noqa: E402
from train.models import freeze, load_components  # noqa: E402


def config(out: Path, cache: Path, steps: int, batch: int, every: int, extra: tuple[str, ...] = ()):
    return load_config(overrides=[*extra,
        f"output_dir={out}", f"model.cache_dir={cache}", f"train.max_steps={steps}", f"train.batch_size={batch}",
        f"train.checkpoint_every={10 * steps}", f"logging.every={every}", "logging.progress_bar=false",
        "validation.prompts=[]", "train.lr_scheduler=constant", "train.lr_warmup_steps=0",
    ])


def trainer_samples_per_s(cfg, warmup: int) -> float:
    from accelerate.state import AcceleratorState, GradientState

    run(cfg)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    rows = [json.loads(l) for l in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "perf/step_time_s" in r and r["step"] > warmup]
    seconds = sum(r["perf/step_time_s"] * cfg.logging.every for r in timed)
    return len(timed) * cfg.logging.every * cfg.train.batch_size / seconds


def plain_samples_per_s(cfg, warmup: int) -> float:
    torch.manual_seed(cfg.seed)
    parts = load_components(cfg.model, cfg.data.resolution)
    data_cfg = resolve_source(cfg.data, cfg.model.cache_dir, cfg.seed)
    data = build_train_data(data_cfg, batch_size=cfg.train.batch_size, seed=cfg.seed, rank=0, world=1,
                            cache_dir=cfg.model.cache_dir)
    freeze(parts.vae)
    freeze(parts.text_encoder)
    unet, sched = parts.unet.train(), parts.noise_scheduler
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batches = iter(data.loader)
    start = None
    for step in range(cfg.train.max_steps):
        if step == warmup:
            start = time.perf_counter()
        batch = next(batches)
        with torch.no_grad():
            latents = parts.vae.encode(batch["pixel_values"]).latent_dist.sample() * parts.vae.config.scaling_factor
            text = encode_text(parts.tokenizer, parts.text_encoder, batch["text"], "cpu")
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],))
        pred = unet(sched.add_noise(latents, noise, t), t, text).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return (cfg.train.max_steps - warmup) * cfg.train.batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--monitor", action="store_true", help="keep the memorization monitor on")
    args = parser.parse_args()
    extra = () if args.monitor else ("monitor.enabled=false",)
    ratios, trainer_sps, plain_sps = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for r in range(args.repeats):
            cfg = config(Path(tmp) / f"run{r}", cache, args.steps, args.batch, every=args.warmup, extra=extra)
            order = ("trainer", "plain") if r % 2 == 0 else ("plain", "trainer")
            result = {}
            for which in order:
                result[which] = (trainer_samples_per_s if which == "trainer" else plain_samples_per_s)(cfg, args.warmup)
            trainer_sps.append(result["trainer"])
            plain_sps.append(result["plain"])
            ratios.append(result["trainer"] / result["plain"])
            print(f"round {r}: trainer {result['trainer']:.1f} samples/s, plain {result['plain']:.1f}, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "batch": args.batch, "steps": args.steps,
                      "monitor": args.monitor,
                      "trainer_samples_per_s_median": statistics.median(trainer_sps),
                      "plain_samples_per_s_median": statistics.median(plain_sps),
                      "ratio_median": statistics.median(ratios), "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
