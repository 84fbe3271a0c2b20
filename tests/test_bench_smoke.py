"""The GPU benchmark keeps working: CI runs it at the tiny size on CPU (its numbers mean nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def test_bench_gpu_runs_at_tiny_size_and_prints_its_table():
    cmd = [sys.executable, str(REPO / "tests" / "bench" / "bench_gpu.py"), "--size", "tiny", "--batch", "4",
           "--steps", "4", "--warmup", "1", "--every", "1", "--repeats", "1", "--workers", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in table[2:]] == ["| reference", "| copyguard-off", "| copyguard-on"]
    summary = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    for r in summary["results"].values():  # every configuration trained and was timed and measured
        assert r["step_ms"] > 0 and r["rss_gb"] > 0
        assert r["samples_per_s"] == pytest.approx(4 / (r["step_ms"] / 1000))  # batch 4


@pytest.mark.parametrize("ema_gc", [False, True])
def test_bench_gpu_times_copyguard_with_the_configuration_it_names(tmp_path, ema_gc):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "tests" / "bench" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(size="tiny", resolution=32, workers=0, batch=4, steps=4, every=1, ema_gc=ema_gc)
    from train.config import load_config

    cfg = load_config(overrides=bench.overrides(args, tmp_path, tmp_path / "out"))
    assert cfg.train.use_ema is ema_gc and cfg.train.gradient_checkpointing is ema_gc
