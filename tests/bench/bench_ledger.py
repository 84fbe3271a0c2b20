"""What a ledger of N samples costs: memory, checkpoint size, and time per update.

Not a test. Run:  python tests/bench/bench_ledger.py --samples 100000000 [--batch 1024]
Builds a synthetic ledger with the default 8 signals, updates it with random gathered batches,
saves it the way checkpoints do (safetensors) and loads it back memory-mapped, and times one pass of
the ground-truth detection scoring (AUC per kind, as the monitor runs every detection_every log lines).

With ``--neighbours N`` it instead measures the ``neighbours`` signal's index
(train/monitor/neighbours.py) holding N stored rows of the default embedding (4 latent channels x
8 x 8 = 256 numbers): bytes per row, the time to add one gathered batch of new rows (search
against all N, then store) and the share of planted twins it finds, for each ``--index`` (exact;
faiss index_factory strings with faiss-cpu: ``Flat``, ``IVF4096,SQ8`` ...); ``--dim 512
--threshold 0.7 --twin-cosine 0.8`` for SSCD descriptors (``monitor.neighbours.embedding: sscd-onnx``).
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
from train.monitor.config import FlagConfig  # noqa: E402
from train.monitor.ledger import FlagPolicy, Ledger  # noqa: E402
from train.monitor.neighbours import NeighbourIndex  # noqa: E402
from train.monitor.signals import SIGNALS  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def bench_neighbours(stored: int, batch: int, repeats: int = 3, dim: int = 256, threshold: float = 0.99,
                     twin_cosine: float = 0.995, indexes: tuple[str, ...] = ("exact", "Flat"),
                     nprobe: int = 32, train_rows: int = 100_000) -> dict:
    """Time ``NeighbourIndex.add`` of ``batch`` new rows against ``stored`` rows already held, for
    each index (``exact``, or a faiss index_factory string), and its recall: half of each batch are
    twins of stored rows (cosine ``twin_cosine``), the other half new pictures."""
    rng = np.random.default_rng(0)
    matrix = unit_rows(rng, stored, dim)
    # a twin at cosine c: the row plus noise of norm tan(arccos c) in a random direction
    noise = float(np.tan(np.arccos(twin_cosine)))
    batches = []
    for r in range(repeats):
        sources = rng.choice(stored, batch // 2, replace=False)
        twins = matrix[sources] + noise * unit_rows(rng, batch // 2, dim)
        queries = np.concatenate([twins / np.linalg.norm(twins, axis=1, keepdims=True), unit_rows(rng, batch - batch // 2, dim)])
        batches.append((np.arange(stored + r * batch, stored + (r + 1) * batch), queries))
    out = {"stored_rows": stored, "dim": dim, "batch": batch, "threshold": threshold, "twin_cosine": twin_cosine}
    for name in indexes:
        settings = {} if name == "exact" else dict(backend="faiss", faiss_index=name, faiss_nprobe=nprobe,
                                                   faiss_train_rows=min(train_rows, stored))
        try:
            index = NeighbourIndex(dim, threshold, capacity=stored + batch * repeats, **settings)
        except ImportError:
            out[name] = "not installed"
            continue
        t0 = time.perf_counter()
        index._store(np.arange(stored), matrix)  # the rows already held (put in without searching)
        index.stored[:stored] = True
        build_s = time.perf_counter() - t0
        times, found, false = [], [], []
        for slots, queries in batches:
            t0 = time.perf_counter()
            counts = index.add(slots, queries)
            times.append(time.perf_counter() - t0)
            found.append(np.mean(counts[: batch // 2] > 0))
            false.append(np.mean(counts[batch // 2:] > 0))
        per_row = index.nbytes() / (stored + batch * repeats)
        out[name] = {"add_ms_median_per_batch": 1000 * float(np.median(times)), "build_s": build_s,
                     "twins_found": float(np.mean(found)), "new_rows_with_a_false_twin": float(np.mean(false)),
                     "bytes_per_row": per_row, "gib_at_stored": per_row * stored / 2 ** 30,
                     "gib_at_100M": per_row * 10 ** 8 / 2 ** 30,
                     **({"nprobe": nprobe, "train_rows": settings["faiss_train_rows"]} if settings else {})}
        del index
    out["peak_rss_gib"] = rss_gib()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--neighbours", type=int, metavar="N", help="measure the neighbour index at N stored rows")
    parser.add_argument("--dim", type=int, default=256, help="--neighbours: embedding size (256 pooled latent, 512 SSCD)")
    parser.add_argument("--index", nargs="+", default=["exact", "Flat"],
                        help="--neighbours: exact and/or faiss index_factory strings (IVF4096,SQ8 ...)")
    parser.add_argument("--nprobe", type=int, default=32, help="--neighbours: inverted lists scanned per query")
    parser.add_argument("--threshold", type=float, default=0.99, help="--neighbours: look-alike cosine (0.7 for SSCD)")
    parser.add_argument("--twin-cosine", type=float, default=0.995, help="--neighbours: cosine of the planted twins")
    args = parser.parse_args()
    if args.neighbours:
        print(json.dumps(bench_neighbours(args.neighbours, args.batch, dim=args.dim, threshold=args.threshold,
                                          twin_cosine=args.twin_cosine, indexes=tuple(args.index),
                                          nprobe=args.nprobe), indent=1))
        return
    before = rss_gib()
    # the run config's default flags: the loss-trend rule keeps two arrays of its own
    ledger = Ledger(args.samples, SIGNALS, [1.0] * len(SIGNALS), FlagPolicy(trend_signal=FlagConfig().trend_signal))
    arrays = sum(getattr(ledger, n).nbytes for n in ledger.arrays)
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
