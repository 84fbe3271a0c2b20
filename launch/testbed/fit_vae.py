"""Fit the tiny preset's autoencoder on the testbed's clean images and write a full diffusers
pipeline (tiny tokenizer/text encoder/UNet/scheduler + the fitted VAE) that model.pretrained loads.

Why: the tiny preset's VAE is randomly initialised and frozen; decode(encode(x)) is further from x
than the mean image is (pixel RMSE 0.46 vs 0.25 on the 32-px testbed), so no generation can ever
look like a training image. Real SD ships a trained VAE; this gives the tiny one the same property.

With ``--bpe-merges N`` it also swaps the preset's byte-level tokenizer (one token per character)
for a CLIP tokenizer with N BPE merges learned on the training captions, and sizes a fresh text
encoder for it: real SD ships a word-level vocabulary too, and the tiny text encoder tells prompts
apart far better with whole words (docs/testbed.md).

usage: python -m launch.testbed.fit_vae --config configs/testbed/common.yaml --out runs/testbed/tiny-ae [--steps 1000] [--bpe-merges 2000] [data.path=DIR]
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from train.config import load_config
from train.models import caption_bpe_tokenizer, ensure_tiny, tiny_text_encoder
from launch.testbed.reading import load_image, read_rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--bpe-merges", type=int, default=0,
                   help="learn a BPE tokenizer with this many merges on the training captions (0: keep bytes)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.bpe_merges < 0:
        p.error(f"--bpe-merges must be >= 0 (got {a.bpe_merges}; 0 keeps the byte-level tokenizer)")
    cfg = load_config(a.config, ["model.preset=tiny", "model.pretrained=null"] + a.overrides)
    torch.manual_seed(0)
    data = cfg.data  # data.path: the folder python -m data.testbed built
    rows = read_rows(data.path, split="train", group="clean")  # the VAE never sees planted or held-out images
    x = torch.from_numpy(np.stack([load_image(data.path, r["file_name"]) for r in rows])).permute(0, 3, 1, 2) * 2 - 1
    preset = ensure_tiny(cfg.model.tiny, cfg.data.resolution, cfg.model.cache_dir)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(preset, subfolder="vae")
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(a.steps):
        idx = torch.randint(0, len(x), (a.batch,), generator=g)
        xb = x[idx]
        flip = torch.rand(a.batch, generator=g) < 0.5  # flips for variety; the testbed itself is never flipped
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        mse = torch.nn.functional.mse_loss(rec, xb)
        kl = post.kl().mean() / xb[0].numel()
        loss = mse + a.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step} mse {mse.item():.5f} rmse01 {mse.sqrt().item() / 2:.4f} kl {kl.item():.3f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    all_rows = read_rows(data.path)
    report = {}
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)])
        scale = float(1.0 / z.std())
        vae.register_to_config(scaling_factor=scale)
        for group in ("clean", "global", "local", "heldout"):
            files = sorted({r["file_name"] for r in all_rows if r["group"] == group})
            xg = torch.from_numpy(np.stack([load_image(data.path, f) for f in files])).permute(0, 3, 1, 2) * 2 - 1
            rec = vae.decode(vae.encode(xg).latent_dist.mean).sample.clamp(-1, 1)
            report[group] = float(((rec - xg) / 2).pow(2).mean(dim=(1, 2, 3)).sqrt().mean())
    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(preset, tmp)
    shutil.rmtree(tmp / "vae")
    vae.save_pretrained(tmp / "vae")
    if a.bpe_merges:
        # Every training caption, alternates included (what the base and the fine-tune will read);
        # held-out captions are left out, so their unseen words fall back to sub-word pieces.
        texts = [t for r in read_rows(data.path, split="train") for t in [r["text"], *r.get("captions", [])]]
        tokenizer = caption_bpe_tokenizer(texts, a.bpe_merges)
        torch.manual_seed(cfg.model.tiny.init_seed)
        for sub in ("tokenizer", "text_encoder"):
            shutil.rmtree(tmp / sub)
        tokenizer.save_pretrained(tmp / "tokenizer")
        tiny_text_encoder(cfg.model.tiny, tokenizer).save_pretrained(tmp / "text_encoder")
    info = {"steps": a.steps, "seconds": round(time.time() - t0, 1), "scaling_factor": scale,
            "recon_rmse": report, "trained_on": f"{len(rows)} clean rows of {data.path}", "preset": str(preset),
            "bpe_merges": a.bpe_merges}
    (tmp / "copyguard_vae.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
