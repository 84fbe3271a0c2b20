"""The monitor's parts: normalization, ledger and flag policies, detection metrics, the gather
across ranks, and exact resume of the ledger."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import fast_overrides, run_on_two_ranks

from train.monitor.detection import detection_metrics
from train.monitor.ledger import FlagPolicy, Ledger
from train.monitor.signals import be_signals, magnitude_signals, reference_signals, token_signals
from train.monitor.stats import BinnedStats
from train.util import ConfigError


def test_binned_stats_match_each_bins_own_mean_and_std():
    stats = BinnedStats(1, 1000, t_bins=2, length_edges=[10], warmup=1)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (4000,), generator=gen)
    lengths = torch.randint(0, 20, (4000,), generator=gen)
    x = (t >= 500).double() * 5 + (lengths >= 10).double() * 50 + torch.randn(4000, generator=gen, dtype=torch.float64)
    for chunk in range(0, 4000, 100):
        stats.update(x[chunk:chunk + 100, None], stats.bin_of(t[chunk:chunk + 100], lengths[chunk:chunk + 100]))
    z = stats.normalize(x[:, None], stats.bin_of(t, lengths)).double()[:, 0]
    bins = stats.bin_of(t, lengths)
    for b in bins.unique():
        sel = bins == b
        assert abs(float(z[sel].mean())) < 0.1 and abs(float(z[sel].std()) - 1) < 0.1


def test_unwarmed_bins_give_nan():
    stats = BinnedStats(1, 1000, t_bins=4, length_edges=[], warmup=5)
    stats.update(torch.ones(3, 1), torch.zeros(3, dtype=torch.long))
    assert torch.isnan(stats.normalize(torch.ones(1, 1), torch.zeros(1, dtype=torch.long))).all()


def test_ledger_flags_outliers_with_hysteresis():
    ledger = Ledger(100, ["a"], [1.0], FlagPolicy(policy="zscore", min_obs=2, raise_at=3.0, clear_at=1.0))
    rng = np.random.default_rng(0)
    slots = np.arange(100)
    for step in range(4):
        z = rng.normal(size=(100, 1)).astype(np.float32)
        z[7] = 6.0  # one sample far above the population
        ledger.update(slots, z, step)
    assert ledger.flagged.nonzero()[0].tolist() == [7]
    assert ledger.first_flagged_step[7] == 1 and (ledger.first_flagged_step[np.arange(100) != 7] == -1).all()


def test_absolute_policy_hysteresis_keeps_a_flag_between_off_and_on():
    ledger = Ledger(1, ["a"], [1.0], FlagPolicy(policy="absolute", min_obs=1, raise_at=3.0, clear_at=1.0))
    ledger.update(np.array([0]), np.array([[2.0]], np.float32), 0)
    assert not ledger.flagged[0]  # 2.0 < on
    ledger.update(np.array([0]), np.array([[6.0]], np.float32), 1)  # mean 4.0
    assert ledger.flagged[0] and ledger.first_flagged_step[0] == 1
    ledger.update(np.array([0]), np.array([[-1.0]], np.float32), 2)  # mean 2.33: between off and on
    assert ledger.flagged[0]
    ledger.update(np.array([0]), np.array([[-6.0]], np.float32), 3)  # mean 0.25 < off
    assert not ledger.flagged[0] and ledger.first_flagged_step[0] == 1


def test_quantile_policy_flags_the_top_fraction():
    ledger = Ledger(1000, ["a"], [1.0], FlagPolicy(policy="quantile", min_obs=1, quantile=0.05, quantile_off=0.1))
    z = np.linspace(-3, 3, 1000, dtype=np.float32)[:, None]
    ledger.update(np.arange(1000), z, 0)
    ledger.update(np.arange(1000), z, 1)  # second pass: thresholds now see the whole population
    assert 40 <= ledger.flagged.sum() <= 60 and ledger.flagged[-40:].all() and not ledger.flagged[:900].any()


def test_nan_signals_do_not_count_as_observations_of_that_signal():
    ledger = Ledger(2, ["a", "b"], [1.0, 1.0], FlagPolicy(min_obs=1))
    ledger.update(np.array([0, 1]), np.array([[1.0, np.nan], [np.nan, np.nan]], np.float32), 0)
    assert ledger.sig_count.tolist() == [[1, 0], [0, 0]]
    assert ledger.score[0] == pytest.approx(1.0) and np.isnan(ledger.score[1])


def test_detection_metrics_match_brute_force():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(1, 1, 50), rng.normal(0, 1, 500)])
    pos = np.arange(550) < 50
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in scores[pos] for n in scores[~pos]])
    got = detection_metrics(scores, pos, ~pos)
    assert got["auc"] == pytest.approx(brute)
    assert got["tpr_at_1fpr"] == pytest.approx(np.mean(scores[pos] > np.quantile(scores[~pos], 0.99, method="higher")))


def test_signal_formulas_on_hand_made_maps():
    flat = torch.full((1, 4, 4), 1 / 16)
    peaked = torch.zeros(1, 4, 4)
    peaked[0, 0, 0] = 1.0
    f, p = be_signals(flat, 0.125), be_signals(peaked, 0.125)
    assert f["be_entropy"].item() == pytest.approx(1.0) and p["be_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert f["be_topk"].item() == pytest.approx(2 / 16) and p["be_topk"].item() == pytest.approx(1.0)
    uniform = token_signals(torch.full((1, 77), 1 / 77))
    assert uniform["token_entropy"].item() == pytest.approx(np.log(77), rel=1e-5)
    eps_c, eps_u = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    half = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mags = magnitude_signals(eps_c, eps_u, half)
    assert mags["magnitude"].item() == pytest.approx(4.0)  # sqrt(16 ones)
    assert mags["be_magnitude"].item() == pytest.approx(2.0 / 0.25)  # ||d*m|| = sqrt(4), mean(m) = 1/4


def test_reference_gain_on_hand_made_predictions():
    target = torch.zeros(1, 4, 2, 2)
    same = reference_signals(target + 1, target + 1, target, topk_frac=0.25)
    assert same["ref_gain"].item() == 0 and same["ref_gain_topk"].item() == 0  # nothing learnt beyond the start
    learnt = reference_signals(target, target + 1, target, topk_frac=0.25)
    assert learnt["ref_gain"].item() == 1 and learnt["ref_gain_topk"].item() == pytest.approx(1.0)
    one_cell = target.clone()
    one_cell[0, :, 0, 0] = 2.0  # the start was wrong in one cell only (16 of squared error), now right
    local = reference_signals(target, one_cell, target, topk_frac=0.25)
    assert local["ref_gain"].item() == 1 and local["ref_gain_topk"].item() == pytest.approx(16 / (16 / 4))
    worse = reference_signals(target + 2, target + 1, target, topk_frac=0.25)
    assert worse["ref_gain"].item() == pytest.approx(-3.0)  # 16 per cell against 4


@pytest.mark.parametrize("kind", ["full", "full_text_encoder", "lora"])
def test_reference_gain_starts_at_zero_and_grows_as_the_run_learns(tmp_path, cache_dir, kind):
    """The reference is the starting model, so the first step's gain is exactly 0 (the weights have
    not moved); training on the same 8 rows for a few steps makes it positive. A resumed run compares
    with the starting weights, not the checkpoint's (with a trained text encoder, its starting copy
    encodes the captions for the reference). The run scores its rows with heads of its own
    (``monitor.heads``: a file whose one head is ref_gain's mean z)."""
    from conftest import read_metrics

    from train.finetune import main

    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"signals": ["ref_gain"], "heads": {"gain": {"bias": 0.0, "coef": {"ref_gain": 1.0}}}}))
    extra = {"monitor.signals": "[loss,ref_gain,ref_gain_topk]", "monitor.reference_every": 1, "monitor.heads": str(heads),
             "monitor.stats_warmup": 1, "data.shapes.num_samples": 8, "train.lr": 3e-3, "train.max_steps": 8,
             "train.checkpoint_every": 4, "train.lr_scheduler": "constant"}
    if kind == "lora":
        extra |= {"train.lora.rank": 4, "train.lr": 3e-2}
    if kind == "full_text_encoder":
        extra |= {"train.text_encoder": "true"}
    run = main(fast_overrides(cache_dir, tmp_path / "run", **extra))
    gains = {row["step"]: row["memo/ref_gain"] for row in read_metrics(run) if "memo/ref_gain" in row}
    assert sorted(gains) == list(range(1, 9))
    assert abs(gains[1]) < 1e-5 and all(np.isfinite(v) for v in gains.values())
    assert np.mean([gains[s] for s in (6, 7, 8)]) > 0.02, gains
    ledger = pq.read_table(run / "ledger.parquet")
    assert {"ref_gain_mean", "ref_gain_topk_mean"} <= set(ledger.column_names)
    score, seen = ledger["score"].to_numpy(), ledger["ref_gain_count"].to_numpy() > 0  # unseen rows: no score
    assert seen.sum() >= 4 and np.isnan(score[~seen]).all()
    np.testing.assert_allclose(score[seen], ledger["ref_gain_mean"].to_numpy()[seen], atol=2e-3)
    # resumed at step 4: the reference is loaded again from the starting model, so the gains match
    main(fast_overrides(cache_dir, tmp_path / "half", **{**extra, "train.max_steps": 4}))
    resumed = main(fast_overrides(cache_dir, tmp_path / "half", **{**extra, "train.resume": "latest"}))
    again = {row["step"]: row["memo/ref_gain"] for row in read_metrics(resumed) if "memo/ref_gain" in row}
    assert all(again[s] == pytest.approx(gains[s], abs=1e-5) for s in (5, 6, 7, 8)), (again, gains)


def test_reference_pass_with_lora_under_zero3_is_refused():
    """A LoRA reference switches the adapters off on the training UNet, which ZeRO-3 partitions.
    (The engine is faked: ZeRO-3 is checked before anything is launched.)"""
    from types import SimpleNamespace

    from train.config import load_config
    from train.finetune import check_engine

    cfg = load_config(overrides=["train.lora.rank=4", "monitor.signals=[loss,ref_gain]", "monitor.reference_every=4",
                                 "validation.prompts=[]", "eval.every=0", "train.use_ema=false"])  # ZeRO-3's other refusals
    engine = lambda stage: SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(  # noqa: E731
        zero_stage=stage)), device=torch.device("cpu"))
    assert check_engine(cfg, engine(2)) == 2
    with pytest.raises(ConfigError, match="ZeRO-3 partitions"):
        check_engine(cfg, engine(3))
    cfg.monitor.reference_every = 0
    cfg.monitor.signals = ["loss"]
    assert check_engine(cfg, engine(3)) == 3


def test_reference_signals_without_the_reference_pass_are_refused(tmp_path, cache_dir):
    from train.finetune import main

    with pytest.raises(SystemExit, match="monitor.signals lists ref_gain, which need .* monitor.reference_every"):
        main(fast_overrides(cache_dir, tmp_path / "run", **{"monitor.signals": "[loss,ref_gain]"}))


def _ranks_keep_identical_ledgers():
    """Each of two ranks feeds different samples; after the gather both ledgers are the same."""
    import hashlib

    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    from train.monitor.config import MonitorConfig
    from train.models import byte_level_tokenizer
    from train.monitor.monitor import Monitor, StepRecord

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # same model on both ranks
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    tok = byte_level_tokenizer()
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=77))
    cfg = OmegaConf.structured(MonitorConfig)
    cfg.merge_with({"stats_warmup": 1, "probe_every": 1, "magnitude_every": 1, "flag": {"min_obs": 1}})
    monitor = Monitor(cfg, unet, tok, enc, DDPMScheduler(), num_samples=20)
    gen = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data per rank
    for step in range(3):
        captions = [f"rank {accelerator.process_index} sample {i} step {step}" for i in range(4)]
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        emb = enc(ids)[0]
        latents, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
        t = torch.randint(0, 1000, (4,), generator=gen)
        noisy = DDPMScheduler().add_noise(latents, noise, t)
        monitor.before_forward(captions)
        pred = unet(noisy, t, emb).sample
        loss = ((pred - noise) ** 2).mean((1, 2, 3))
        index = torch.arange(4) + 4 * accelerator.process_index + 8 * (step % 2)
        batch = {"index": index, "sample_id": [str(i) for i in index.tolist()]}
        monitor.after_forward(accelerator, StepRecord(batch, step, loss, pred, latents, noise, noisy, t, emb))
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in monitor.state_tensors().values())).digest()
    mine = torch.tensor(list(digest), dtype=torch.float64)[None]
    everyone = accelerator.gather(mine)
    assert torch.equal(everyone[0], everyone[1]), "ranks hold different ledgers"
    assert monitor.ledger.obs.sum() == 3 * 8 and (monitor.ledger.obs[:16] > 0).all()  # both ranks' samples


def test_ledger_is_identical_on_two_gloo_ranks():
    run_on_two_ranks("test_monitor", "_ranks_keep_identical_ledgers")


def test_resume_restores_the_ledger_exactly(tmp_path, cache_dir):
    from train.finetune import main

    common = {"train.lr_scheduler": "constant", "train.checkpoint_every": 5, "monitor.stats_warmup": 1,
              "monitor.magnitude_every": 2, "monitor.probe_every": 3,
              "monitor.flag.trend_signal": "loss", "monitor.flag.trend_persist": 1}  # the trend rule's state too
    straight = main(fast_overrides(cache_dir, tmp_path / "a", **{**common, "train.max_steps": 10}))
    main(fast_overrides(cache_dir, tmp_path / "b", **{**common, "train.max_steps": 5}))
    resumed = main(fast_overrides(cache_dir, tmp_path / "b", **{**common, "train.max_steps": 10, "train.resume": "latest"}))
    a, b = pq.read_table(straight / "ledger.parquet"), pq.read_table(resumed / "ledger.parquet")
    assert a.column_names == b.column_names and "sample_id" in a.column_names and "be_mass_mean" in a.column_names
    assert "loss_trend_z" in a.column_names and "trend_streak" in a.column_names
    assert a.num_rows == 32 and min(a.column("observations").to_pylist()) >= 1
    for name in a.column_names:
        assert a.column(name).to_pylist() == b.column(name).to_pylist() or np.allclose(
            np.asarray(a.column(name).to_pylist(), float), np.asarray(b.column(name).to_pylist(), float),
            equal_nan=True, atol=1e-6), name
