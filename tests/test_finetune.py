"""End to end on the tiny preset: the run directory contract, learning, exact resume, checkpoints
that survive a kill, clear errors, W&B offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, fast_overrides, losses_by_step, make_imagefolder, read_metrics
from safetensors.torch import load_file

from train.finetune import main


def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_run_directory_contract_and_final_pipeline(tmp_path, cache_dir):
    run = main(fast_overrides(cache_dir, tmp_path / "run", **{"validation.prompts": "[a red circle]",
                                                              "validation.num_inference_steps": 2}))
    for name in ("config.yaml", "metrics.jsonl", "final/model_index.json", "checkpoints/checkpoint-3/train_state.json",
                 "checkpoints/checkpoint-6/model.safetensors", "val/step-6/p000-0.png"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "latest").read_text().strip() == "checkpoint-6"
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["train/loss"] > 0 and "perf/samples_per_s" in r for r in rows if "train/loss" in r)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(run / "final")
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0


def test_loss_goes_down_on_a_repeated_batch(tmp_path, cache_dir):
    folder = make_imagefolder(tmp_path / "data", n=4)
    run = main(fast_overrides(cache_dir, tmp_path / "run", **{
        "data.source": "imagefolder", "data.path": str(folder), "train.max_steps": 60, "train.lr": 3e-3,
        "train.lr_scheduler": "constant", "train.checkpoint_every": 1000}))
    losses = list(losses_by_step(run).values())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.parametrize("mitigation", [{}, {"mitigate.agc.enabled": "true", "mitigate.agc.t_bins": 1}],
                         ids=["plain", "agc"])
def test_exact_resume_mid_epoch_matches_a_straight_run(tmp_path, cache_dir, mitigation):
    # 32 samples / batch 4 = 8 batches per epoch: stopping at step 5 of 11 (accumulation 1) is mid-epoch;
    # EMA, caption dropout, random crop and flip all have state or randomness that must carry over,
    # and so do a mitigation's running averages (agc: one loss average for every timestep, so it skips)
    common = {"train.lr_scheduler": "constant", "train.use_ema": "true", "train.ema_decay": 0.9,
              "train.caption_dropout": 0.3, "data.center_crop": "false", "data.random_flip": "true",
              "train.checkpoint_every": 5, **mitigation}
    straight = main(fast_overrides(cache_dir, tmp_path / "a", **{**common, "train.max_steps": 11}))
    first = main(fast_overrides(cache_dir, tmp_path / "b", **{**common, "train.max_steps": 5}))
    resumed = main(fast_overrides(cache_dir, tmp_path / "b", **{**common, "train.max_steps": 11,
                                                                 "train.resume": "latest"}))
    assert first == resumed
    a, b = losses_by_step(straight), losses_by_step(resumed)
    assert list(a) == list(b) == list(range(1, 12))  # resumed rows replace nothing and repeat nothing
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    wa, wb = unet_weights(straight), unet_weights(resumed)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    if mitigation:
        skipped = [r["mitig/agc_skipped"] for r in read_metrics(resumed) if "mitig/agc_skipped" in r]
        assert skipped and max(skipped) > 0  # it acted, after the resume too


def test_resume_with_accumulation_honours_a_larger_max_steps(tmp_path, cache_dir):
    common = {"train.gradient_accumulation_steps": 2, "train.checkpoint_every": 2}
    main(fast_overrides(cache_dir, tmp_path / "r", **{**common, "train.max_steps": 2}))
    run = main(fast_overrides(cache_dir, tmp_path / "r", **{**common, "train.max_steps": 4, "train.resume": "latest"}))
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "train_state.json").read_text())
    assert (state["step"], state["micro_step"], state["samples_seen"]) == (4, 8, 32)
    assert state["data"]["epoch"] == 1 and state["data"]["batch"] == 0  # 8 batches = exactly one epoch


def test_init_from_starts_new_training_from_weights(tmp_path, cache_dir):
    donor = main(fast_overrides(cache_dir, tmp_path / "donor", **{"train.max_steps": 3}))
    run = main(fast_overrides(cache_dir, tmp_path / "new", **{"train.max_steps": 1, "train.lr": 1e-12,
                                                             "model.init_from": str(donor / "final")}))
    start, donor_w = unet_weights(run), unet_weights(donor)
    assert json.loads((run / "checkpoints/checkpoint-1/train_state.json").read_text())["step"] == 1
    assert max(float((start[k] - donor_w[k]).abs().max()) for k in start) < 1e-6  # lr ~0: still the donor


def test_resume_errors_are_clear(tmp_path, cache_dir):
    run = main(fast_overrides(cache_dir, tmp_path / "r", **{"train.max_steps": 3}))
    ckpt = run / "checkpoints" / "checkpoint-3"
    with pytest.raises(SystemExit, match="different model"):
        main(fast_overrides(cache_dir, run, **{"train.max_steps": 4, "train.resume": str(ckpt),
                                               "model.tiny.attention_heads": 2}))
    with pytest.raises(SystemExit, match="not a copyguard checkpoint"):
        main(fast_overrides(cache_dir, tmp_path / "x", **{"train.resume": str(run / "final")}))
    with pytest.raises(SystemExit, match="not a diffusers model folder.*copyguard training checkpoint"):
        main(fast_overrides(cache_dir, tmp_path / "y", **{"model.preset": "null", "model.pretrained": str(ckpt)}))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(SystemExit, match="corrupt"):
        main(fast_overrides(cache_dir, run, **{"train.max_steps": 4, "train.resume": str(ckpt)}))


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
import accelerate
original = accelerate.Accelerator.save_state
calls = []
def save_state(self, *args, **kwargs):
    result = original(self, *args, **kwargs)  # model + optimizer written, train state not yet
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
accelerate.Accelerator.save_state = save_state
from train.finetune import main
main(sys.argv[1:])
"""


def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path, cache_dir):
    run = tmp_path / "k"
    args = fast_overrides(cache_dir, run, **{"train.max_steps": 6, "train.checkpoint_every": 3})
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "checkpoint-3"
    assert (ckpts / ".tmp-checkpoint-6").is_dir() and not (ckpts / "checkpoint-6").exists()
    main(args + ["train.resume=latest"])
    assert json.loads((ckpts / "checkpoint-6" / "train_state.json").read_text())["step"] == 6
    assert not list(ckpts.glob(".tmp-*"))
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_total_limit_keeps_the_newest(tmp_path, cache_dir):
    run = main(fast_overrides(cache_dir, tmp_path / "l", **{"train.max_steps": 6, "train.checkpoint_every": 2,
                                                           "train.checkpoints_total_limit": 2}))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6", "latest"]


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path, cache_dir):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+ \(4 sample\(s\); on this rank: \['shapes-"):
        main(fast_overrides(cache_dir, tmp_path / "nan", **{"train.lr": 1e30, "train.max_steps": 3,
                                                            "train.max_grad_norm": 0, "train.adam_epsilon": 1e-30}))


def test_wandb_offline_run_holds_metrics_and_images(tmp_path, cache_dir):
    args = fast_overrides(cache_dir, tmp_path / "w", **{"logging.wandb": "true", "train.max_steps": 2,
                                                        "train.checkpoint_every": 2, "validation.prompts": "[a circle]",
                                                        "validation.num_inference_steps": 2})
    run = main(args)
    run_dirs = list((run / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    history = next(run_dirs[0].glob("run-*.wandb")).read_bytes()
    assert b"train/loss" in history and b"val/images" in history
    assert list(run_dirs[0].glob("files/media/images/**/*.png"))
    run_id = (run / "wandb_run_id").read_text()
    assert run_dirs[0].name.endswith(run_id)
    main(args[:-0 or None] + ["train.max_steps=3", "train.resume=latest"])
    assert all(d.name.endswith(run_id) for d in (run / "wandb").glob("offline-run-*"))


def test_data_position_maps_to_a_new_world_size_or_says_which_sizes_work():
    from data.datasets import DataPosition
    from train.checkpoint import CheckpointError, TrainState, map_data_position

    # 2 ranks x batch 4 stopped 3 global batches (24 samples) into epoch 1
    state = TrainState(world_size=2, batch_size=4, num_workers=0, data=DataPosition(1, 3, 11))
    assert map_data_position(state, 1, 4, 0, streaming=False) == DataPosition(1, 6, 11)  # 24 / (1 x 4)
    assert map_data_position(state, 3, 4, 0, streaming=False) == DataPosition(1, 2, 11)  # 24 / (3 x 4)
    with pytest.raises(CheckpointError, match=r"24 samples into epoch 1.*whose product divides 24"):
        map_data_position(state, 5, 4, 0, streaming=False)
    with pytest.raises(CheckpointError, match="same processes x batch size x workers"):
        map_data_position(state, 1, 4, 0, streaming=True)
