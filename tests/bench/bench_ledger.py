"""What a ledger of N samples costs: memory, checkpoint size, and time per update.

Not a test. Run:  python tests/bench/bench_ledger.py --samples 100000000 [--batch 1024]
Builds a synthetic ledger with the default 8 signals, updates it with random gathered batches,
saves it the way checkpoints do (safetensors) and loads it back memory-mapped, and times one pass of
the ground-truth detection scoring (AUC per kind, as the monitor runs every detection_every log lines).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from train.monitor.detection import detection_by_kind  # noqa: E402
from train.monitor.ledger import FlagPolicy, Ledger  # noqa: E402
from train.monitor.signals import SIGNALS  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--updates", type=int, default=200)
    args = parser.parse_args()
    before = rss_gib()
    ledger = Ledger(args.samples, SIGNALS, [1.0] * len(SIGNALS), FlagPolicy())
    arrays = sum(getattr(ledger, n).nbytes for n in Ledger.ARRAYS)
    rng = np.random.default_rng(0)
    times = []
    for step in range(args.updates):
        slots = rng.choice(args.samples, args.batch, replace=False) if args.samples < 10 ** 6 else \
            rng.integers(0, args.samples, args.batch)
        z = rng.normal(size=(args.batch, len(SIGNALS))).astype(np.float32)
        z[rng.random(z.shape) < 0.5] = np.nan
        t0 = time.perf_counter()
        ledger.update(slots, z, step)
        times.append(time.perf_counter() - t0)
    # the monitor's ground-truth scoring (monitor.label_column): one pass over the whole ledger
    labels = rng.choice(np.array(["clean", "global", "local"], dtype=object), args.samples, p=[0.9, 0.05, 0.05])
    t0 = time.perf_counter()
    detection_by_kind(rng.normal(size=args.samples), labels, "clean")  # every row scored: the worst case
    detection_s = time.perf_counter() - t0
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = Path(tmp) / "ledger.safetensors"
        t0 = time.perf_counter()
        save_file(ledger.state_tensors(), str(path))
        save_s = time.perf_counter() - t0
        size = path.stat().st_size
        t0 = time.perf_counter()
        loaded = load_file(str(path))
        load_s = time.perf_counter() - t0
        assert loaded["obs"].shape[0] == args.samples
    print(json.dumps({
        "samples": args.samples, "signals": len(SIGNALS), "array_bytes_per_sample": arrays / args.samples,
        "arrays_gib": arrays / 2 ** 30, "peak_rss_growth_gib": rss_gib() - before,
        "checkpoint_file_gib": size / 2 ** 30, "save_s": save_s, "load_s": load_s,
        "update_ms_median_per_batch": 1000 * float(np.median(times)), "batch": args.batch,
        "detection_s_per_pass": detection_s}, indent=1))


if __name__ == "__main__":
    main()
