"""copyguard's step time and memory against a plain reference loop, at Stable Diffusion size.

Not a test (CI runs it at --size tiny on CPU as a smoke test: tests/test_bench_smoke.py). Run:

    python tests/bench/bench_gpu.py --size sd15 [--batch 8] [--steps 80] [--warmup 10] [--repeats 3] [--ema-gc]

Builds a randomly initialised SD 1.5 (``sd15``) or SD 2.x (``sd21``) architecture offline (no
download: a byte-level tokenizer stands in for CLIP's, the text encoder keeps CLIP's vocabulary
size), or uses the tiny preset (``tiny``), writes an image folder at the model's resolution, and
runs, each in its own process (clean memory peaks), in alternating order per round:

- ``reference``: what diffusers' train_text_to_image.py does per step: VAE encode and text encode
  in the compute dtype, noise, UNet forward under autocast, MSE, backward, clip, AdamW (+ EMA and
  gradient checkpointing with --ema-gc);
- ``copyguard-off`` / ``copyguard-on``: ``train/finetune.py``'s ``run`` with the monitor off / on
  (defaults), same data, batch, precision, optimizer.

Prints median step time (over steps after the warm-up, then over rounds), samples/s, the ratio to
the reference and peak memory: torch's allocator (max allocated / reserved) on CUDA, the process's
peak RSS on CPU. bf16 on a GPU, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"})
os.environ.setdefault("COPYGUARD_BASE_CONFIG", str(HERE.parents[1] / "base.yaml"))  # the tiny test base
sys.path.insert(0, str(HERE.parents[2]))

import torch  # noqa: E402

SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SIZES = {
    "sd15": dict(resolution=512, unet=SD15_UNET, prediction="epsilon",
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
    "sd21": dict(resolution=512, unet={**SD15_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                                       "use_linear_projection": True}, prediction="v_prediction",
                 text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)),
}
CONFIGS = ("reference", "copyguard-off", "copyguard-on")


def build_model(size: str, folder: Path) -> Path:
    """A random-init SD pipeline of ``size`` saved as a diffusers folder (loaded by from_pretrained)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from train.models import byte_level_tokenizer

    spec = SIZES[size]
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"]))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=spec["resolution"])
    unet = UNet2DConditionModel(**spec["unet"])
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=spec["prediction"])
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=byte_level_tokenizer(), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        pixels = (rng.random((resolution // 8, resolution // 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((resolution, resolution), Image.NEAREST).save(folder / "img" / f"{i}.png")
        rows.append({"file_name": f"img/{i}.png", "text": f"a picture of pattern number {i}", "sample_id": f"p{i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def overrides(args, work: Path, out: Path) -> list[str]:
    cuda = torch.cuda.is_available()
    model = ["model.preset=tiny", "model.pretrained=null"] if args.size == "tiny" else \
        ["model.preset=null", f"model.pretrained={work / 'model'}"]
    return model + [
        f"output_dir={out}", f"model.cache_dir={work / 'cache'}", "data.source=imagefolder", f"data.path={work / 'data'}",
        f"data.resolution={args.resolution}", f"data.num_workers={args.workers}", f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}", f"train.checkpoint_every={10 * args.steps}", f"logging.every={args.every}",
        "logging.progress_bar=false", "validation.prompts=[]", "train.lr=1e-5", "train.lr_warmup_steps=0",
        # 'no' quoted: YAML reads a bare no as false
        "train.mixed_precision=" + ("bf16" if cuda else "'no'"), f"train.use_ema={str(args.ema_gc).lower()}",
        f"train.gradient_checkpointing={str(args.ema_gc).lower()}", "train.caption_dropout=0.0",
    ]


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"alloc_gb": torch.cuda.max_memory_allocated() / 1e9, "reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
    return {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def run_copyguard(args, work: Path, monitor: bool) -> dict:
    from train.config import load_config
    from train.finetune import run

    out = work / f"run-{'on' if monitor else 'off'}-{time.time_ns()}"
    cfg = load_config(overrides=overrides(args, work, out) + [f"monitor.enabled={str(monitor).lower()}"])
    run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r and r["step"] > args.warmup]
    return {"step_s": statistics.median(times), **peak_memory()}


def run_reference(args, work: Path) -> dict:
    """diffusers' train_text_to_image.py step, on copyguard's loader (the same batches)."""
    import torch.nn.functional as F

    from data.datasets import build_train_data
    from train.config import load_config
    from train.finetune import encode_text
    from train.models import freeze, load_components, weight_dtype

    cfg = load_config(overrides=overrides(args, work, work / "ref"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = weight_dtype(cfg.train.mixed_precision)
    parts = load_components(cfg.model, cfg.data.resolution)
    freeze(parts.vae)
    freeze(parts.text_encoder)
    parts.vae.to(device, dtype=dtype)
    parts.text_encoder.to(device, dtype=dtype)
    unet, sched = parts.unet.to(device).train(), parts.noise_scheduler
    if args.ema_gc:
        unet.enable_gradient_checkpointing()
    ema = None
    if args.ema_gc:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=0.9999)
        ema.to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
    data = build_train_data(cfg.data, batch_size=args.batch, seed=0, rank=0, world=1, cache_dir=cfg.model.cache_dir)
    batches = iter(data.loader)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        batch = next(batches)
        pixels = batch["pixel_values"].to(device, dtype=dtype, non_blocking=True)
        with torch.no_grad():
            latents = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
            text = encode_text(parts.tokenizer, parts.text_encoder, batch["text"], device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
        target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        with autocast:
            pred = unet(sched.add_noise(latents, noise, t), t, text).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unet.parameters())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), **peak_memory()}


def one(args) -> None:
    """Child process: one configuration, one JSON line on stdout."""
    work = Path(args.work)
    result = (run_reference(args, work) if args.one == "reference"
              else run_copyguard(args, work, monitor=args.one == "copyguard-on"))
    print("RESULT " + json.dumps({"config": args.one, **result}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", *SIZES], default="sd15")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--every", type=int, default=10, help="copyguard's logging.every (its step times are per window)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--ema-gc", action="store_true", help="EMA + gradient checkpointing (configs/model/sd15.yaml)")
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.resolution = args.resolution or (32 if args.size == "tiny" else SIZES[args.size]["resolution"])
    if args.one:
        return one(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.size != "tiny":
            build_model(args.size, work / "model")
        write_images(work / "data", max(4 * args.batch, 16), args.resolution)
        results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        child = [sys.executable, str(HERE), "--work", str(work), "--resolution", str(args.resolution), *sys.argv[1:]]
        for r in range(args.repeats):
            for config in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                proc = subprocess.run(child + ["--one", config], capture_output=True, text=True)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    raise SystemExit(f"{config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                results[config].append(json.loads(line[len("RESULT "):]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    ref = statistics.median(r["step_s"] for r in results["reference"])
    print(f"\n{args.size}, batch {args.batch}, {args.resolution} px, {'EMA + gradient checkpointing' if args.ema_gc else 'plain'}, "
          f"{device}; median over steps {args.warmup + 1}-{args.steps} and {args.repeats} round(s)\n")
    memory_keys = [k for k in results["reference"][0] if k.endswith("_gb")]
    print("| config | step time | samples/s | vs reference (speed) | " + " | ".join(f"peak {k[:-3]} (GB)" for k in memory_keys) + " |")
    print("| --- " * (4 + len(memory_keys)) + "|")
    summary = {}
    for config, rows in results.items():
        step = statistics.median(r["step_s"] for r in rows)
        memory = {k: max(r[k] for r in rows) for k in memory_keys}
        summary[config] = {"step_ms": 1000 * step, "samples_per_s": args.batch / step, "speed_vs_reference": ref / step,
                           **memory}
        print(f"| {config} | {1000 * step:.1f} ms | {args.batch / step:.1f} | {ref / step:.3f}x | "
              + " | ".join(f"{v:.2f}" for v in memory.values()) + " |")
    print("\n" + json.dumps({"size": args.size, "batch": args.batch, "ema_gc": args.ema_gc, "device": device,
                             "results": summary}, indent=1))


if __name__ == "__main__":
    main()
