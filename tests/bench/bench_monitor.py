"""Cost of the memorization monitor: trainer samples/s with the monitor off vs on, side by side.

Not a test. Run:  python tests/bench/bench_monitor.py [--steps 60] [--repeats 3]

Variants (each round runs all of them in a rotated order, in this process):
  off        monitor.enabled=false
  drawn      bright ending read from the training forward (no extra pass), no magnitude pass
  probe10    plus a no-grad probe pass at t=20 every 10 steps (the default), no magnitude pass
  magnitude  the default plus the empty-prompt magnitude pass every step (its cost alone)
Ratios are to `off` within the same round; we report their medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import config, trainer_samples_per_s  # noqa: E402

VARIANTS = {
    "off": ("monitor.enabled=false",),
    "drawn": ("monitor.be_mode=drawn", "monitor.magnitude_every=0"),
    "probe10": ("monitor.be_mode=probe", "monitor.probe_every=10", "monitor.magnitude_every=0"),
    "magnitude": ("monitor.be_mode=probe", "monitor.probe_every=10", "monitor.magnitude_every=1"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    names = list(VARIANTS)
    ratios = {n: [] for n in names}
    sps = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            result = {}
            for name in order:
                cfg = config(Path(tmp) / f"{name}-{r}", Path(tmp) / "cache", args.steps, args.batch, args.warmup,
                             VARIANTS[name])
                result[name] = trainer_samples_per_s(cfg, args.warmup)
            for name in names:
                sps[name].append(result[name])
                ratios[name].append(result[name] / result["off"])
            print(f"round {r}: " + ", ".join(f"{n} {result[n]:.1f}" for n in names), flush=True)
    print(json.dumps({"samples_per_s_median": {n: statistics.median(v) for n, v in sps.items()},
                      "ratio_to_off_median": {n: statistics.median(v) for n, v in ratios.items()},
                      "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
