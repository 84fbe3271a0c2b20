"""Shared fixtures: hermetic environment (no hub, W&B offline) and a session-wide model/data cache."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Set before anything imports huggingface_hub/datasets/wandb: one hub lookup retries for minutes.
# The tests' base layer (a tiny preset on generated shapes) instead of the embedded demo default.
os.environ["COPYGUARD_BASE_CONFIG"] = str(REPO / "tests" / "base.yaml")
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                   "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"})


@pytest.fixture(scope="session", autouse=True)
def hermetic_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("env")
    for var in ("HF_HOME", "WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        os.environ[var] = str(root / var.lower())
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    yield root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """model.cache_dir shared by every training test: the tiny preset and data are built once."""
    return tmp_path_factory.mktemp("cache")


def fast_overrides(cache_dir: Path, out: Path, **extra) -> list[str]:
    """A run that takes seconds on CPU: tiny preset, 32 shapes at 32 px, batch 4, log every step."""
    items = {
        "output_dir": str(out), "model.cache_dir": str(cache_dir), "data.shapes.num_samples": 32,
        "data.resolution": 32, "data.num_workers": 0, "train.batch_size": 4, "train.max_steps": 6,
        "train.checkpoint_every": 3, "train.lr_warmup_steps": 0, "logging.every": 1,
        "logging.progress_bar": "false", "validation.prompts": "[]",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses_by_step(run: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_metrics(run) if "train/loss" in row}


def make_imagefolder(root: Path, n: int = 6, size: int = 40, with_ids: bool = True, alternates: bool = True) -> Path:
    """A small real image folder with metadata.jsonl: gradients of distinct colours."""
    import numpy as np
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        array = np.stack([np.tile(ramp, (size, 1)), np.full((size, size), 37.0 * i % 256),
                          np.tile(ramp[:, None], (1, size))], -1).astype(np.uint8)
        Image.fromarray(array).save(root / "img" / f"{i}.png")
        row = {"file_name": f"img/{i}.png", "text": f"picture number {i}"}
        if alternates:
            row["captions"] = [f"picture number {i}", f"image {i}"]
        if with_ids:
            row["sample_id"] = f"id-{i}"
        rows.append(row)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Several trainings run in one test process: start each from a clean accelerate state."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_on_two_ranks(module: str, function: str, *args) -> None:
    """Run ``module.function(*args)`` on two gloo ranks (accelerate's debug_launcher) in a FRESH
    interpreter: debug_launcher forks, and a fork of a process whose OpenMP pool already ran (as
    pytest's has, after any earlier test) can deadlock in the child's first torch op."""
    import subprocess

    code = (f"from accelerate import debug_launcher\nimport {module} as m\n"
            f"debug_launcher(m.{function}, args={args!r}, num_processes=2)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
