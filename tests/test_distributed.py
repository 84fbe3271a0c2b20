"""Two gloo ranks on CPU: DDP and DeepSpeed ZeRO-2 through `accelerate launch`, as users run them.
Each launch costs ~15 s, so these are few and small."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, fast_overrides, read_metrics, run_on_two_ranks

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def launch(launch_args: list[str], overrides: list[str], port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--main_process_port", str(port),
           str(REPO / "train" / "finetune.py"), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_ddp_two_ranks_train_in_step_with_one_run_directory(tmp_path, cache_dir):
    run = tmp_path / "ddp"
    launch(["--config_file", str(REPO / "launch" / "cpu_ddp.yaml")],
           fast_overrides(cache_dir, run, **{"train.max_steps": 4, "train.checkpoint_every": 2,
                                             # a mitigation whose state comes from every rank's losses
                                             "mitigate.agc.enabled": "true", "mitigate.agc.t_bins": 1,
                                             # the starting model's pass on every rank (no collective in it)
                                             "monitor.signals": "[be_mass,loss,ref_gain,ref_gain_topk]",
                                             "monitor.reference_every": 2}), 29611)
    rows = read_metrics(run)
    losses = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]  # one writer, one row per step
    assert losses[-1]["train/samples_seen"] == 4 * 4 * 2  # steps x batch x ranks
    sync = [r for r in rows if "dist/weights_divergence" in r]
    assert [r["dist/world_size"] for r in sync] == [2, 2] and all(r["dist/weights_divergence"] == 0.0 for r in sync)
    # the monitor's gather really crossed ranks: the ledger saw both ranks' samples (32 = the whole set)
    assert losses[-1]["memo/observed"] == 32
    # the passes at steps 0 and 2 (optimizer steps done before the batch) show in log lines 1 and 3
    assert [r["step"] for r in losses if "memo/ref_gain" in r] == [1, 3]
    # agc's running loss average was fed by both ranks' samples and saved with the checkpoint
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "train_state.json").read_text())
    assert state["extra"]["mitigate"]["agc"]["seen"] == [True] and "mitig/agc_skipped" in losses[-1]
    assert (run / "final" / "model_index.json").is_file()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("final")) == ["final"]


def test_deepspeed_zero2_two_ranks_train_save_and_resume(tmp_path, cache_dir):
    pytest.importorskip("deepspeed", reason="DeepSpeed is the optional [deepspeed] extra")
    run = tmp_path / "ds"
    args = ["--use_deepspeed", "--deepspeed_config_file", str(REPO / "launch" / "ds_zero2.json"),
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch(args, fast_overrides(cache_dir, run, **{"train.max_steps": 2, "train.checkpoint_every": 2}), 29612)
    ckpt = run / "checkpoints" / "checkpoint-2"
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors", "train_state.json"} <= {p.name for p in ckpt.iterdir()}
    proc = launch(args, fast_overrides(cache_dir, run, **{"train.max_steps": 4, "train.checkpoint_every": 2,
                                                          "train.resume": "latest"}), 29613)
    assert "resumed from" in proc.stderr + proc.stdout
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "train_state.json").read_text())
    assert (state["step"], state["samples_seen"], state["world_size"]) == (4, 32, 2)
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4]
    assert all(r["dist/weights_divergence"] == 0.0 for r in read_metrics(run) if "dist/weights_divergence" in r)
    assert [r["memo/observed"] for r in read_metrics(run) if "memo/observed" in r][-1] == 32


def _diverge(perturb: bool):
    """Runs on each of two processes: rank 1 nudges one weight when asked to."""
    from accelerate import Accelerator

    from train.checkpoint import weights_divergence

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    if perturb and accelerator.process_index == 1:
        with torch.no_grad():
            model.weight[0, 0] += 1e-3
    divergence = weights_divergence(accelerator, model)
    assert (divergence > 0) == perturb, divergence


@pytest.mark.parametrize("perturb", [False, True])
def test_weights_divergence_sees_one_changed_weight(perturb):
    run_on_two_ranks("test_distributed", "_diverge", perturb)
