"""Overhead of cross-attention capture on a tiny UNet training step (forward + backward).

Not a test (pytest only collects test_*.py). Run:

    HF_HUB_OFFLINE=1 python tests/bench/bench_capture.py [--batch 16] [--size 16] [--repeats 40]

Conditions are timed interleaved, in a shuffled order each round, on two UNets with identical
weights (one plain, one with capture installed), so drifts in machine load hit all conditions
alike. We report medians and ratios to the plain UNet; on a shared machine compare ratios from
one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the repo

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from train.monitor import AttentionCapture  # noqa: E402

LAYOUTS = {
    # The tiny preset from ENVIRONMENT.md: cross-attention at half resolution and in the mid block.
    "tiny": (("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")),
    # SD-like: cross-attention at full latent resolution (where SD's BE layers are).
    "sd-like": (("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")),
}


def build(layout: str, heads: int) -> UNet2DConditionModel:
    torch.manual_seed(0)
    down, up = LAYOUTS[layout]
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=32,
        attention_head_dim=heads,
    ).train()


def step(unet, latents, timesteps, context, target, capture=None) -> float:
    """One forward + backward; returns seconds. Reads the signals when capture records."""
    unet.zero_grad(set_to_none=True)
    start = time.perf_counter()
    pred = unet(latents, timesteps, context).sample
    loss = torch.nn.functional.mse_loss(pred, target)
    if capture is not None and capture.enabled:
        be, tokens = capture.be_map(), capture.token_distribution()
        if capture.with_grad:  # a regularizer on the map, as a trainer would add
            loss = loss + 1e-3 * be.mean()
        capture.reset()
    loss.backward()
    return time.perf_counter() - start


def bench(layout: str, batch: int, size: int, repeats: int, warmup: int, heads: int) -> None:
    plain, hooked = build(layout, heads), build(layout, heads)
    capture = AttentionCapture(hooked, layers="all", be_layers="default").install()
    capture.set_end_token_index(torch.randint(1, 77, (batch,)))

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, size, size, generator=g)
    target = torch.randn(batch, 4, size, size, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 77, 32, generator=g)

    def configure(enabled: bool, with_grad: bool):
        def run():
            capture.enabled, capture.with_grad = enabled, with_grad
            return step(hooked, latents, timesteps, context, target, capture)

        return run

    conditions = {
        "plain (fused SDPA)": lambda: step(plain, latents, timesteps, context, target),
        "installed, disabled": configure(False, False),
        "capture, detached": configure(True, False),
        "capture, with_grad + BE reg": configure(True, True),
    }
    times = {name: [] for name in conditions}
    order = list(conditions)
    rng = random.Random(0)
    for round_ in range(warmup + repeats):
        rng.shuffle(order)
        for name in order:
            elapsed = conditions[name]()
            if round_ >= warmup:
                times[name].append(elapsed)

    base = statistics.median(times["plain (fused SDPA)"])
    print(f"\n{layout}: batch {batch}, {size}x{size} latents, {heads} heads, "
          f"{len(capture.hooked_layers)} attn2 layers hooked, BE layers {capture.be_layers}, "
          f"{repeats} rounds, {torch.get_num_threads()} threads")
    for name, values in times.items():
        median = statistics.median(values)
        q1, _, q3 = statistics.quantiles(values, n=4)
        print(f"  {name:30s} median {median * 1e3:7.1f} ms  IQR [{q1 * 1e3:6.1f}, {q3 * 1e3:6.1f}]"
              f"  ratio {median / base:5.3f}")
    capture.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both")
    args = parser.parse_args()
    for layout in LAYOUTS if args.layout == "both" else [args.layout]:
        bench(layout, args.batch, args.size, args.repeats, args.warmup, args.heads)


if __name__ == "__main__":
    main()
