"""What a ledger of N samples costs: memory, checkpoint size, and time per update.

Not a test. Run:  python tests/bench/bench_ledger.py --samples 100000000 [--batch 1024]
Builds a synthetic ledger with the default 8 signals, updates it with random gathered batches,
saves it the way checkpoints do (safetensors) and loads it back memory-mapped, and times one pass of
the ground-truth detection scoring (AUC per kind, as the monitor runs every detection_every log lines).

With ``--neighbours N`` it instead measures the ``neighbours`` signal's index
(train/monitor/neighbours.py) holding N stored rows of the default embedding (4 latent channels x
8 x 8 = 256 numbers): bytes per row, and the time to add one gathered batch of new rows (search
against all N, then store) for each backend installed (exact; faiss with faiss-cpu); ``--dim 512``
for SSCD descriptors (``monitor.neighbours.embedding: sscd-onnx``).
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
from train.monitor.neighbours import NeighbourIndex  # noqa: E402
from train.monitor.signals import SIGNALS  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def bench_neighbours(stored: int, batch: int, repeats: int = 3, dim: int = 256) -> dict:
    """Time ``NeighbourIndex.add`` of ``batch`` new rows against ``stored`` rows already held."""
    import torch

    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(stored, dim)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    state = {"matrix": torch.from_numpy(matrix), "order": torch.arange(stored),
             "count": torch.zeros(stored + batch * repeats, dtype=torch.int32)}
    out = {"stored_rows": stored, "dim": dim, "batch": batch}
    for backend in ("exact", "faiss"):
        try:
            index = NeighbourIndex(dim, 0.99, backend=backend)
            index.load_tensors(state)
            if backend == "faiss":
                index._faiss_index()  # built once on the first search after a load; not per batch
        except ImportError:
            out[backend] = "not installed"
            continue
        times = []
        for r in range(repeats):
            queries = rng.normal(size=(batch, dim)).astype(np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            t0 = time.perf_counter()
            index.add(np.arange(stored + r * batch, stored + (r + 1) * batch), queries)
            times.append(time.perf_counter() - t0)
        out[backend] = {"add_ms_median_per_batch": 1000 * float(np.median(times))}
        out["bytes_per_row"] = index.bytes_per_row
    out["gib_at_stored"] = out["bytes_per_row"] * stored / 2 ** 30
    out["gib_at_100M"] = out["bytes_per_row"] * 10 ** 8 / 2 ** 30
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--neighbours", type=int, metavar="N", help="measure the neighbour index at N stored rows")
    parser.add_argument("--dim", type=int, default=256, help="--neighbours: embedding size (256 pooled latent, 512 SSCD)")
    args = parser.parse_args()
    if args.neighbours:
        print(json.dumps(bench_neighbours(args.neighbours, args.batch, dim=args.dim), indent=1))
        return
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
