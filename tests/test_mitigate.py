"""Each mitigation does what it says and nothing else."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fast_overrides, make_imagefolder, read_metrics
from omegaconf import OmegaConf

from train.mitigate import BuildContext, MitigationStep
from train.mitigate.base import targets
from train.mitigate.captions import CaptionPerturbation, CaptionsConfig
from train.mitigate.dedup import Dedup, DedupConfig, dedup_weights, loss_map, region_dedup_weights
from train.mitigate.flags import FlagWeightsConfig, flag_weights
from train.util import ConfigError
from train.models import byte_level_tokenizer

CAPTION = "a small red circle on a blue background"


def context(**kw) -> BuildContext:
    return BuildContext(**{"seed": 0, "tokenizer": byte_level_tokenizer(), "monitor": None, "caption_dropout": 0.0,
                           "data": None, "cache_dir": "", **kw})


def perturber(**kw) -> CaptionPerturbation:
    cfg = OmegaConf.structured(CaptionsConfig)
    cfg.merge_with(kw)
    return CaptionPerturbation(cfg, context())


def run(p: CaptionPerturbation, n: int, step: int = 0, alternates=None) -> list[str]:
    ids = [f"s{i}" for i in range(n)]
    return p([CAPTION] * n, [alternates or [CAPTION]] * n, ids, step, torch.ones(n, dtype=torch.bool))


def test_random_caption_replacement_rate_and_form():
    p = perturber(replace_p=0.1)
    out = run(p, 4000)
    replaced = [c for c in out if c != CAPTION]
    assert 0.085 < len(replaced) / 4000 < 0.115
    assert all(len(c.split()) == 4 and all(w in p.vocabulary for w in c.split()) for c in replaced)


def is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(w in it for w in short)


def test_random_token_addition_inserts_exactly_n_vocabulary_words():
    p = perturber(add_token_p=1.0, add_tokens=2)
    words = CAPTION.split()
    for c in run(p, 200):
        got = c.split()
        assert len(got) == len(words) + 2 and is_subsequence(words, got)
        extra = list(got)
        for w in words:
            extra.remove(w)
        assert all(w in p.vocabulary for w in extra)


def test_caption_word_repetition_repeats_the_captions_own_words():
    p = perturber(repeat_word_p=1.0, repeat_words=2)
    words = CAPTION.split()
    outs = run(p, 200)
    for c in outs:
        got = c.split()
        assert len(got) == len(words) + 2 and set(got) == set(words) and is_subsequence(words, got)
    assert len(set(outs)) > 20  # positions and words vary per sample


def test_multiple_captions_draws_uniformly_and_dropout_never_empties():
    alts = [CAPTION, "an icon of a red circle", "red circle, flat art"]
    counts = {a: 0 for a in alts}
    for c in run(perturber(multiple_captions=True), 3000, alternates=alts):
        counts[c] += 1
    assert all(900 < n < 1100 for n in counts.values())
    assert all(c.strip() for c in run(perturber(drop_word_p=0.99), 500))


def test_perturbation_is_a_function_of_seed_step_and_sample():
    p = perturber(replace_p=0.5, add_token_p=0.5, shuffle_p=0.5)
    assert run(p, 50, step=3) == run(p, 50, step=3)
    assert run(p, 50, step=3) != run(p, 50, step=4)
    untouched = p([CAPTION] * 4, [[CAPTION]] * 4, list("abcd"), 0, torch.tensor([True, False, True, False]))
    assert untouched[1] == untouched[3] == CAPTION


def step_at(step: int, flags: torch.Tensor, **batch) -> MitigationStep:
    return MitigationStep(batch, step, step, flags, None, torch.zeros(len(flags), dtype=torch.long))


def test_flagged_target_and_start_step():
    p = perturber(target="flagged", start_step=10, replace_p=1.0)
    flags = torch.tensor([True, False])
    assert targets(p.cfg, step_at(5, flags)).tolist() == [False, False]
    assert targets(p.cfg, step_at(10, flags)).tolist() == [True, False]
    assert targets(perturber(replace_p=1.0).cfg, step_at(0, flags)).tolist() == [True, True]
    # nothing configured: the mitigation is not active, so the loop never builds it
    assert not CaptionPerturbation.active(perturber().cfg) and CaptionPerturbation.active(perturber(shuffle_p=0.5).cfg)
    # through the component's hook: only the flagged sample's caption changes, and the share is logged
    out = p.captions(step_at(10, flags, captions=[[CAPTION]] * 2, sample_id=["a", "b"]), [CAPTION] * 2)
    assert out[0] != CAPTION and out[1] == CAPTION
    assert p.metrics() == {"mitig/perturbed_share": (1, 2)}


def test_embedding_noise_has_the_configured_scale_on_masked_samples_only():
    p = perturber(embedding_noise=0.1)
    emb = torch.randn(4, 77, 64)
    mask = torch.tensor([True, True, False, True])
    out = p.embedding_noise(emb, ["a", "b", "c", "d"], 7, mask)
    diff = out - emb
    assert torch.equal(diff[2], torch.zeros_like(diff[2]))
    assert diff[mask].std().item() == pytest.approx(0.1, rel=0.05) and abs(diff[mask].mean().item()) < 0.005
    assert torch.equal(out, p.embedding_noise(emb, ["a", "b", "c", "d"], 7, mask))


def test_flag_weights_modes():
    cfg = OmegaConf.structured(FlagWeightsConfig)
    flags, scores = torch.tensor([True, False, True]), torch.tensor([3.0, 0.0, float("nan")])
    cfg.mode = "drop"
    assert flag_weights(cfg, flags, scores, 0).tolist() == [0.0, 1.0, 0.0]
    cfg.mode, cfg.factor = "downweight", 0.25
    assert flag_weights(cfg, flags, scores, 0).tolist() == [0.25, 1.0, 0.25]
    cfg.mode, cfg.score_on = "score", 1.0
    assert flag_weights(cfg, flags, scores, 0).tolist() == [pytest.approx(1 / 3), 1.0, 1.0]
    cfg.start_step = 5
    assert flag_weights(cfg, flags, scores, 4).tolist() == [1.0, 1.0, 1.0]


def test_budget_stops_a_flagged_row_once_its_loss_is_below_its_peers():
    cfg = OmegaConf.structured(FlagWeightsConfig)
    cfg.mode = "budget"
    flags = torch.tensor([True, True, True, False])
    loss_z = torch.tensor([0.5, -0.5, float("nan"), 2.0])  # ahead of peers, behind, never seen, not flagged
    assert flag_weights(cfg, flags, None, 0, loss_z).tolist() == [0.0, 1.0, 1.0, 1.0]
    cfg.budget_margin = 1.0  # a stricter budget: only rows a full z ahead of their peers stop
    assert flag_weights(cfg, flags, None, 0, loss_z).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_budget_needs_the_loss_signal():
    from train.config import load_config

    with pytest.raises(ConfigError, match="budget reads the monitor's loss signal"):
        load_config(overrides=["mitigate.weights.mode=budget", "monitor.signals=[be_topk]"])


def test_dedup_weights_group_copies_also_resized(tmp_path):
    from PIL import Image

    folder = make_imagefolder(tmp_path / "d", n=4)
    original = Image.open(folder / "img" / "0.png")
    original.save(folder / "img" / "1.png")  # exact copy
    original.resize((64, 64)).save(folder / "img" / "2.png")  # resized copy
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "img" / "3.png")  # unrelated
    import datasets

    table = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").cast_column(
        "image", datasets.Image(decode=False))
    weights = dedup_weights(table, "image", tmp_path / "cache")
    by_id = dict(zip(table["sample_id"], weights.tolist()))
    assert by_id == {"id-0": pytest.approx(1 / 3), "id-1": pytest.approx(1 / 3), "id-2": pytest.approx(1 / 3), "id-3": 1.0}


def test_dedup_weights_keep_colour_variants_apart(tmp_path):
    """make_imagefolder's pictures differ only in their green channel: one difference hash (it
    sees brightness edges only), different colours. The thumbnail check keeps them apart; with
    the check off (max_distance 1) they collapse into one group, as hash-only de-duplication did."""
    import datasets
    from PIL import Image

    from train.mitigate.dedup import dhash

    folder = make_imagefolder(tmp_path / "d", n=3)
    assert len({dhash(Image.open(folder / "img" / f"{i}.png")) for i in range(3)}) == 1
    table = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").cast_column(
        "image", datasets.Image(decode=False))
    assert dedup_weights(table, "image", tmp_path / "cache").tolist() == [1.0, 1.0, 1.0]
    assert dedup_weights(table, "image", tmp_path / "cache", max_distance=1.0).tolist() == [pytest.approx(1 / 3)] * 3


def stamped_folder(folder):
    """13 noise images: rows 0-5 carry one 8x8 stamp in the top-right corner, rows 9-12 are one image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    stamp = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(13):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        if i < 6:
            pixels[:8, 24:] = stamp
        if i > 9:
            pixels = np.asarray(Image.open(folder / "img" / "9.png"))
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        rows.append({"file_name": f"img/{i}.png", "text": f"image number {i}", "sample_id": f"id-{i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_region_dedup_finds_a_shared_stamp_on_different_images(tmp_path):
    """The six stamped images weigh 1/6 under the stamp's tile (top right of 4x4) and 1 elsewhere.
    Four repeats of one image are one distinct image (whole-image repeats are dedup_weights' job),
    so they and the plain images weigh 1 everywhere; a stamp shared by fewer images than min_count
    is ignored."""
    import datasets

    folder = stamped_folder(tmp_path / "d")
    table = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").cast_column(
        "image", datasets.Image(decode=False))
    maps = region_dedup_weights(table, "image", 32, tmp_path / "c", tiles=4, min_count=3, dilate=0)
    stamped = np.ones((4, 4))
    stamped[0, 3] = 1 / 6
    widened = np.ones((4, 4))
    widened[:2, 2:] = 1 / 6  # dilate=1: the stamp's tile and its three neighbours
    dilated = region_dedup_weights(table, "image", 32, tmp_path / "c", tiles=4, min_count=3, dilate=1)
    for sample_id, exact, wide in zip(table["sample_id"], maps, dilated):
        is_stamped = int(sample_id.split("-")[1]) < 6
        np.testing.assert_allclose(exact, stamped if is_stamped else np.ones((4, 4)), rtol=1e-6, err_msg=sample_id)
        np.testing.assert_allclose(wide, widened if is_stamped else np.ones((4, 4)), rtol=1e-6, err_msg=sample_id)
    again = region_dedup_weights(table, "image", 32, tmp_path / "c", tiles=4, min_count=3, dilate=0)  # cached
    np.testing.assert_array_equal(again, maps)
    strict = region_dedup_weights(table, "image", 32, tmp_path / "c", tiles=4, min_count=7)
    assert (strict == 1).all()


def test_min_filter_widens_low_weights_by_the_radius():
    from train.mitigate.dedup import min_filter

    maps = np.ones((1, 5, 5))
    maps[0, 2, 2] = 0.1
    assert (min_filter(maps, 0) == maps).all()
    assert np.argwhere(min_filter(maps, 1)[0] < 1).tolist() == [[r, c] for r in (1, 2, 3) for c in (1, 2, 3)]
    assert (min_filter(maps, 2) == 0.1).all()


def test_region_weights_scale_the_loss_only_under_the_shared_tile():
    """An error confined to the stamp's tile counts 1/6; the same error elsewhere counts in full."""
    from train.finetune import per_sample_loss

    tile_map = torch.ones(2, 4, 4)
    tile_map[:, 0, 3] = 1 / 6
    where = loss_map(tile_map, (16, 16))
    assert where.shape == (2, 1, 16, 16) and where[0, 0, :4, 12:].eq(1 / 6).all() and where[0, 0, 4:].eq(1).all()
    target = torch.zeros(2, 4, 16, 16)
    pred = target.clone()
    pred[0, :, :4, 12:] = 1.0  # sample 0: error under the stamp
    pred[1, :, 8:12, 0:4] = 1.0  # sample 1: the same amount of error on a tile of its own
    plain = per_sample_loss(pred, target, torch.tensor([1, 1]), None, None)
    weighted = per_sample_loss(pred, target, torch.tensor([1, 1]), None, None, where)
    assert plain[0] == plain[1] == pytest.approx(1 / 16)
    assert weighted.tolist() == [pytest.approx(1 / 96), pytest.approx(1 / 16)]


@pytest.mark.parametrize("scope, min_t, expected", [
    # image: (6 stamped x 1/6 + 3 plain x 1 + 4 repeats x 1/4) / 13; region: the stamped rows keep 12 of
    # their 16 tiles in full, the stamp's and its 3 neighbours' (region_dilate 1) at 1/6; one epoch of
    # 13 rows in one batch sees it exactly
    ("image", 0, 5 / 13),
    ("region", 0, (6 * (12 + 4 / 6) / 16 + 3 + 4 / 4) / 13),
    # dedup_min_t above every timestep: the weights never act
    ("image", 1000, 1.0),
    ("region", 1000, 1.0),
])
def test_trainer_applies_both_dedup_weights(tmp_path, cache_dir, scope, min_t, expected):
    from train.finetune import main

    folder = stamped_folder(tmp_path / "d")
    run = main(fast_overrides(cache_dir, tmp_path / "run", **{
        "data.source": "imagefolder", "data.path": str(folder), "train.batch_size": 13, "train.max_steps": 1,
        "mitigate.dedup.images": "true", "mitigate.dedup.regions": "true",
        "mitigate.dedup.region_tiles": 4, "mitigate.dedup.region_min_count": 3,
        "mitigate.dedup.region_scope": scope, "mitigate.dedup.min_t": min_t}))
    weights = [r["mitig/mean_weight"] for r in read_metrics(run) if "mitig/mean_weight" in r]
    assert weights == [pytest.approx(expected, rel=1e-5)]


def test_trainer_can_deduplicate_by_sampling(tmp_path, cache_dir):
    """by=sampling: the 4 repeats count as one row of a 10-row epoch (2 batches of 4 instead
    of 3 of the 13 rows), and every slot trains at full weight."""
    from train.finetune import main

    folder = stamped_folder(tmp_path / "d")
    run = main(fast_overrides(cache_dir, tmp_path / "run", **{
        "data.source": "imagefolder", "data.path": str(folder), "train.batch_size": 4, "train.max_steps": 2,
        "logging.every": 2, "mitigate.dedup.images": "true", "mitigate.dedup.by": "sampling"}))
    last = [r for r in read_metrics(run) if "mitig/mean_weight" in r][-1]
    assert last["mitig/mean_weight"] == 1.0 and last["train/epoch"] == 1.0


def test_trainer_can_deduplicate_by_caption(tmp_path, cache_dir, monkeypatch):
    """by=caption: the 4 repeats (weight 1/4) keep their caption about once in 4 draws and
    train on the empty prompt otherwise; every other row keeps its caption; all at full weight."""
    import train.finetune as finetune

    seen = []
    real_encode = finetune.encode_text
    monkeypatch.setattr(finetune, "encode_text", lambda tok, enc, captions, device: (
        seen.append(list(captions)), real_encode(tok, enc, captions, device))[1])
    folder = stamped_folder(tmp_path / "d")
    run = finetune.main(fast_overrides(cache_dir, tmp_path / "run", **{
        "data.source": "imagefolder", "data.path": str(folder), "train.batch_size": 13, "train.max_steps": 6,
        "logging.every": 6, "monitor.enabled": "false", "train.caption_dropout": 0.0,
        "mitigate.dedup.images": "true", "mitigate.dedup.by": "caption"}))
    captions = [c for batch in seen for c in batch]
    assert len(captions) == 6 * 13  # one epoch of 13 rows per step
    # every other row keeps its caption in all 6 epochs; only the repeats lose theirs
    assert all(captions.count(f"image number {i}") == 6 for i in range(9))
    kept = sum(captions.count(f"image number {i}") for i in range(9, 13))
    assert kept + captions.count("") == 6 * 4
    assert 0.5 * 6 <= kept <= 2 * 6  # ~6 of the repeats' 24 slots captioned (1/4)
    last = [r for r in read_metrics(run) if "mitig/mean_weight" in r][-1]
    assert last["mitig/mean_weight"] == 1.0 and last["train/epoch"] == 6.0


def test_caption_keep_probability_scales_the_dropout():
    """De-duplication by caption reuses the loop's caption-dropout draw: keep 1 is plain dropout,
    draw for draw, and a row keeps its caption with probability (1 - dropout) x keep."""
    from train.finetune import captions_for_batch

    n = 4000
    batch = {"text": ["a caption"] * n, "sample_id": [f"id-{i}" for i in range(n)], "epoch": 3,
             "index": torch.arange(n)}
    plain = captions_for_batch(batch, 0, 0.1)

    def with_keep(keep: float) -> list[str]:
        dedup = Dedup(OmegaConf.structured(DedupConfig(images=True, by="caption")), context(caption_dropout=0.1))
        dedup.keep_caption = torch.full((n,), keep)
        return dedup.captions(step_at(0, torch.zeros(n, dtype=torch.bool), **batch), plain)

    assert with_keep(1.0) == plain
    for keep in (0.0, 0.25):
        kept = sum(c != "" for c in with_keep(keep)) / n
        assert kept == pytest.approx(0.9 * keep, abs=0.02)
    assert sum(c != "" for c in plain) / n == pytest.approx(0.9, abs=0.02)


def test_zero_weight_samples_contribute_exactly_zero_gradient():
    from diffusers import UNet2DConditionModel

    from train.finetune import per_sample_loss

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    x, t, c, target = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.randn(3, 77, 32), torch.randn(3, 4, 8, 8)

    def grads(weights, rows):
        unet.zero_grad()
        loss = per_sample_loss(unet(x[rows], t[rows], c[rows]).sample, target[rows], t[rows], None, None)
        (loss * weights).sum().div(3).backward()
        return [p.grad.clone() for p in unet.parameters()]

    dropped = grads(torch.tensor([1.0, 0.0, 1.0]), [0, 1, 2])
    without = grads(torch.tensor([1.0, 1.0]), [0, 2])
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(dropped, without))


def test_regularizer_gradient_reaches_attention_weights():
    from diffusers import UNet2DConditionModel

    from train.mitigate.regularize import RegularizeConfig, attention_penalties
    from train.monitor import AttentionCapture

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    capture = AttentionCapture(unet, with_grad=True).install()
    capture.set_end_token_index(torch.tensor([5, 9]))
    unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 20]), torch.randn(2, 77, 32))
    cfg = OmegaConf.structured(RegularizeConfig)
    cfg.merge_with({"be_mass": 1.0, "entropy": 1.0, "start_token": 1.0})
    terms = attention_penalties(cfg, capture, torch.tensor([10, 20]))  # the capture answers as the monitor does
    assert set(terms) == {"be_mass", "entropy", "start_token"}
    terms["be_mass"].sum().backward()
    to_k = dict(unet.named_parameters())["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    assert to_k.grad is not None and to_k.grad.abs().sum() > 0


def test_be_mass_regularizer_term_falls_while_training(tmp_path, cache_dir):
    from train.finetune import main

    run = main(fast_overrides(cache_dir, tmp_path / "reg", **{
        "train.max_steps": 12, "train.lr": 3e-3, "train.lr_scheduler": "constant", "train.checkpoint_every": 100,
        "mitigate.regularize.be_mass": 100.0, "mitigate.regularize.max_t": 1000}))
    terms = [r["mitig/be_mass"] for r in read_metrics(run) if "mitig/be_mass" in r]
    assert len(terms) == 12 and np.mean(terms[-3:]) < 0.7 * np.mean(terms[:3])


def test_trainer_stops_flagged_rows_that_are_ahead_of_their_peers(tmp_path, cache_dir):
    """mode=budget in the real trainer: first epoch nothing is flagged yet (full weight); once every
    row is flagged (a threshold everyone passes), the rows whose loss runs below their peers' stop."""
    from train.finetune import main

    run = main(fast_overrides(cache_dir, tmp_path / "run", **{
        "train.batch_size": 8, "train.max_steps": 8, "mitigate.weights.mode": "budget",
        "monitor.detector": "weighted", "monitor.flag.policy": "absolute", "monitor.flag.min_obs": 1,
        "monitor.flag.raise_at": -100, "monitor.flag.clear_at": -100,
        "monitor.t_bins": 1, "monitor.stats_warmup": 2}))  # one noise bin: z-scores from the first batches
    weights = {r["step"]: r["mitig/mean_weight"] for r in read_metrics(run) if "mitig/mean_weight" in r}
    assert all(weights[s] == 1.0 for s in range(1, 5))     # epoch 1 (32 rows / 8): nobody flagged yet
    later = [weights[s] for s in range(5, 9)]  # epoch 2: flagged rows ahead of their peers stop, the rest train
    assert min(later) < 1.0 and max(later) > 0.0


def agc(**kw):
    from train.mitigate.agc import AGCConfig, AntiGradientControl

    cfg = OmegaConf.structured(AGCConfig)
    cfg.merge_with({"enabled": True, **kw})
    return AntiGradientControl(cfg, context())


def agc_step(timesteps, losses, flagged=None) -> MitigationStep:
    n = len(losses)
    flagged = torch.zeros(n, dtype=torch.bool) if flagged is None else torch.tensor(flagged)
    return MitigationStep({}, 5, 5, flagged, None, torch.tensor(timesteps), loss=torch.tensor(losses))


def test_agc_skips_a_sample_far_below_the_running_loss_at_its_timestep():
    m = agc()
    first = m.weights(agc_step([10, 10, 500, 500], [1.0, 1.0, 1.0, 1.0]))
    assert first.tolist() == [1.0] * 4  # no running loss yet at these timesteps: nothing to compare with
    losses = [0.5, 1.0, 0.9, 0.1]
    w = m.weights(agc_step([10, 10, 500, 900], losses))
    # 0.5 x 1.25 < 1 at t=10: skipped; 0.9 x 1.25 >= 1 kept; t=900 has no average yet: kept;
    # the batch loss is the mean over the three kept samples
    assert w.tolist() == pytest.approx([0.0, 4 / 3, 4 / 3, 4 / 3])
    assert float((w * torch.tensor(losses)).mean()) == pytest.approx((1.0 + 0.9 + 0.1) / 3)
    assert m.average[10] == pytest.approx(0.8 * (0.8 * 1.0 + 0.2 * 0.5) + 0.2 * 1.0)  # both t=10 rows folded
    assert m.metrics()["mitig/agc_skipped"] == (1.0, 8)


def test_agc_state_round_trips_and_flagged_target_spares_the_rest():
    m = agc(target="flagged")
    m.weights(agc_step([10, 20], [1.0, 1.0]))
    again = agc(target="flagged")
    again.load_state(json.loads(json.dumps(m.state())))  # as the checkpoint's train_state.json holds it
    assert torch.equal(again.average, m.average) and torch.equal(again.seen, m.seen)
    w = again.weights(agc_step([10, 20], [0.1, 0.1], flagged=[True, False]))
    assert w.tolist() == pytest.approx([0.0, 2.0])  # both far below their averages; only the flagged one skips
    with pytest.raises(ValueError, match="t_bins"):
        agc(t_bins=10).load_state(m.state())
