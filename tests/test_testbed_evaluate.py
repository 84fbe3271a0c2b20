"""launch.testbed.evaluate: the scoring on hand-made "generations", and the CLI end to end on a 2-step run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from data.testbed import build_testbed  # noqa: E402
from launch.testbed.evaluate import main, picture_grid, score, select_prompts  # noqa: E402
from launch.testbed.reading import load_image, load_mask, read_rows  # noqa: E402

TINY = dict(n_clean=24, n_heldout=8, n_global=3, global_repeats=4, n_local_groups=2, local_per_group=4)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory) -> Path:
    return build_testbed(tmp_path_factory.mktemp("tb") / "tb", resolution=16, seed=0, **TINY)


def test_select_prompts(testbed):
    prompts = select_prompts(testbed, local_per_group=2, n_clean=8, n_calibration=6)
    groups = [p.group for p in prompts]
    assert groups.count("global") == TINY["n_global"]  # one per distinct global image
    assert len({p.source_id for p in prompts if p.group == "global"}) == TINY["n_global"]
    assert groups.count("local") == 2 * TINY["n_local_groups"]
    assert groups.count("clean") == 8
    # the held-out prompts (never trained) calibrate, every other prompt is scored
    heldout = {r["sample_id"] for r in read_rows(testbed, split="heldout")}
    calibration = {p.sample_id for p in prompts if p.role == "calibration"}
    assert len(calibration) == 6 and calibration <= heldout
    assert all(p.role == "eval" for p in prompts if p.sample_id not in heldout)
    assert select_prompts(testbed, 2, 8, 6, seed=1) != prompts  # another draw
    with pytest.raises(ValueError, match="held-out prompts to calibrate"):
        select_prompts(testbed, n_calibration=2)


def test_training_images_as_generations_are_replicas(testbed, tmp_path):
    """A "model" that returns its training images copies: global prompts score replicas, a stamp
    pasted on an unrelated image scores a local replica, unrelated images score nothing."""
    prompts = select_prompts(testbed, local_per_group=2, n_clean=8, n_calibration=8)
    heldout = [load_image(testbed, r["file_name"]) for r in read_rows(testbed, split="heldout")]
    seeds = 2
    images = np.zeros((len(prompts), seeds, 16, 16, 3))
    for i, p in enumerate(prompts):
        own = load_image(testbed, p.file_name)
        for k in range(seeds):
            other = heldout[(2 * i + k) % len(heldout)]  # never trained: no nearest image is "own"
            if p.group == "global":
                images[i, k] = own
            elif p.group == "local":
                mask = load_mask(testbed, {"mask_file": p.mask_file, "group": "local"})
                images[i, k] = np.where(mask[..., None], own, other)  # the stamp on an unrelated image
            else:
                images[i, k] = other
    result = score(images, prompts, testbed)
    groups = result["groups"]
    assert groups["global"]["replica_rate"] == 1.0
    # the stamp covers a quarter of a 16-px image, so a pasted stamp can make the whole a replica too
    assert groups["local"]["local_replica_rate"] >= 0.5
    assert groups["local"]["local_replica_rate"] + groups["local"]["replica_rate"] == 1.0
    assert groups["clean"]["replica_rate"] == 0.0
    assert result["thresholds"]["replica"] > 0
    for name in ("global", "local", "clean"):
        for key, value in groups[name].items():
            if key.endswith("rate") or key.endswith("any_seed") or key.endswith("any_stamp"):
                assert 0.0 <= value <= 1.0, (name, key, value)
    assert np.isfinite(result["quality"]["kid_clean_generations_vs_heldout"])
    rows = picture_grid(images, prompts, testbed, tmp_path / "grid.png", rows_per_group=2, evaluation=result)
    assert [r["group"] for r in rows] == ["global"] * 2 + ["local"] * 2 + ["clean"] * 2
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.height > 6 * 16

    # ... and an unrelated image for every prompt is no replica anywhere.
    unrelated = np.stack([[heldout[(i + k) % len(heldout)] for k in range(seeds)] for i in range(len(prompts))])
    groups = score(unrelated, prompts, testbed)["groups"]
    assert groups["global"]["replica_rate"] == 0.0
    assert groups["local"]["replica_rate"] == 0.0


def test_a_model_that_copies_every_clean_image_scores_a_clean_rate_of_one(testbed):
    """The clean rate is a measurement, not the calibration quantile: the thresholds come from
    held-out prompts, so copying every clean image gives 100% and not ~5%."""
    prompts = select_prompts(testbed, local_per_group=2, n_clean=8, n_calibration=8)
    heldout = {r["sample_id"]: load_image(testbed, r["file_name"]) for r in read_rows(testbed, split="heldout")}
    others = list(heldout.values())
    images = np.stack([[load_image(testbed, p.file_name) if p.group == "clean" else others[(i + 1) % len(others)]]
                       for i, p in enumerate(prompts)])
    result = score(images, prompts, testbed)
    assert result["groups"]["clean"]["replica_rate"] == 1.0
    assert result["groups"]["global"]["replica_rate"] == 0.0
    # a copy is as faithful to its prompt as can be; the next prompt's image is not
    assert result["groups"]["clean"]["own_rank_median"] == 0.0
    assert result["groups"]["clean"]["own_in_top1pct_rate"] == 1.0
    assert result["groups"]["clean"]["other_rank_median"] > 0.0
    assert result["groups"]["heldout_calibration"]["prompts"] == 8


def test_clean_prompts_that_show_a_stamp_in_one_seed_set_the_any_seed_baseline(testbed):
    """The chance baseline of a local prompt's "stamp in any seed": clean prompts whose first seed
    shows local group 0's stamp count once for that stamp and never for the others."""
    prompts = select_prompts(testbed, local_per_group=1, n_clean=8, n_calibration=8)
    heldout = [load_image(testbed, r["file_name"]) for r in read_rows(testbed, split="heldout")]
    stamped = next(r for r in read_rows(testbed, split="train") if r["group"] == "local" and r["local_group"] == 0)
    stamp, mask = load_image(testbed, stamped["file_name"]), load_mask(testbed, stamped)
    images = np.stack([[heldout[(i + k) % len(heldout)] for k in range(2)] for i in range(len(prompts))])
    for i, p in enumerate(prompts):
        if p.group == "clean":
            images[i, 0] = np.where(mask[..., None], stamp, images[i, 0])
    clean = score(images, prompts, testbed)["groups"]["clean"]
    assert clean["local_replica_rate_any_seed"] == pytest.approx(1 / TINY["n_local_groups"])
    assert clean["local_replica_rate_any_stamp"] == pytest.approx(0.5)  # seed 0 of each prompt
    assert clean["local_replica_rate"] == pytest.approx(0.5 / TINY["n_local_groups"])


def test_prompts_that_copy_a_planted_image_do_not_lower_the_threshold(testbed):
    """Calibration measures chance closeness to *clean* images: if every calibration generation
    is a global image (leakage), global copies must still count as replicas."""
    prompts = select_prompts(testbed, local_per_group=2, n_clean=8, n_calibration=8)
    heldout = [load_image(testbed, r["file_name"]) for r in read_rows(testbed, split="heldout")]
    leaked = load_image(testbed, next(p.file_name for p in prompts if p.group == "global"))
    images = np.zeros((len(prompts), 1, 16, 16, 3))
    for i, p in enumerate(prompts):
        if p.group == "global":
            images[i, 0] = load_image(testbed, p.file_name)
        elif p.role == "calibration":
            images[i, 0] = leaked
        else:
            images[i, 0] = heldout[i % len(heldout)]
    result = score(images, prompts, testbed)
    assert result["thresholds"]["replica"] > 0.01
    assert result["groups"]["global"]["replica_rate"] == 1.0

def test_unprompted_copies_are_counted_with_the_evaluation_thresholds(testbed):
    """Exact global images count as copies (a clean training image does not: it is no planted
    copy); a noise image carrying a stamp shows that stamp."""
    from launch.testbed.evaluate import score_unprompted
    from launch.testbed.reading import stamps, training_images

    train = training_images(testbed)
    groups = np.asarray(train.groups)
    planted = train.images[groups == "global"]
    image, mask = stamps(testbed)[1]
    stamped = np.random.default_rng(0).random(image.shape).astype(np.float32)
    stamped[mask] = image[mask]
    images = np.concatenate([planted, planted[:1], train.images[groups == "clean"][:3], stamped[None]])
    counted = score_unprompted(images, testbed, {"replica": 1e-3, "region": {"0": 1e-3, "1": 1e-3}})
    assert counted["images"] == 8 and counted["global_copy_rate"] == 4 / 8
    assert counted["distinct_global_copied"] == TINY["n_global"] and counted["stamp_rate"] == 1 / 16  # 1 of 8 images shows 1 of 2 stamps
    rows = TINY["n_clean"] + TINY["n_global"] * TINY["global_repeats"] + TINY["n_local_groups"] * TINY["local_per_group"]
    assert counted["global_rows"] == pytest.approx(TINY["n_global"] * TINY["global_repeats"] / rows)
    assert counted["local_rows"] == pytest.approx(TINY["n_local_groups"] * TINY["local_per_group"] / rows)
    # a looser replica threshold does not make a clean image a planted copy
    assert score_unprompted(images, testbed, {"replica": 10.0, "region": {"0": 1e-3, "1": 1e-3}})["global_copy_rate"] == 4 / 8


def test_unprompted_copies_on_a_testbed_without_stamps(tmp_path):
    from launch.testbed.evaluate import score_unprompted
    from launch.testbed.reading import training_images

    root = build_testbed(tmp_path / "tb", resolution=16, seed=0, **(TINY | {"n_local_groups": 0}))
    planted = training_images(root)
    planted = planted.images[np.asarray(planted.groups) == "global"]
    counted = score_unprompted(planted, root, {"replica": 1e-3, "region": {}})
    assert counted["global_copy_rate"] == 1.0 and counted["stamp_rate"] is None and counted["local_rows"] == 0.0


def test_cli_on_a_two_step_run(testbed, tmp_path, cache_dir):
    from tests.conftest import fast_overrides
    from train.finetune import main as train

    # the testbed read like any user's folder, held-out rows left out; --testbed comes from config.yaml
    run = train(fast_overrides(cache_dir, tmp_path / "run", **{
        "data.source": "imagefolder", "data.path": testbed, "data.filter_column": "split",
        "data.filter_value": "train", "data.resolution": 16, "train.max_steps": 2, "train.checkpoint_every": 2,
        "train.caption_dropout": 0.1, "mitigate.dedup.images": True}))
    out = run / "eval"
    assert main(["--model", str(run / "final"), "--out", str(out), "--seeds", "2", "--steps", "2",
                 "--local-per-group", "1", "--clean", "6", "--calibration", "4", "--unprompted", "3"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["unprompted"]["images"] == 3 and result["settings"]["unprompted"] == 3
    assert (out / "grid.png").is_file() and (out / "generations.npz").is_file()
    for value in result["summary"].values():
        assert value is not None
    for key in ("global_replica_rate", "local_replica_rate", "clean_replica_rate"):
        assert 0.0 <= result["summary"][key] <= 1.0
    assert len(result["generations"]) == 2 * (TINY["n_global"] + TINY["n_local_groups"] + 6 + 4)

    # the quality split by the run's own de-duplication weights: every global repeat is touched
    from launch.testbed.by_weight import split_scores, touched_samples

    touched, root = touched_samples(run)
    rows = read_rows(root, split="train")
    assert {r["sample_id"] for r in rows if r["group"] == "global"} <= touched
    assert len(touched) < len(rows) and str(root) == result["testbed"]
    splits = split_scores(run, touched, root)  # finds run/eval/eval.json
    assert sum(s.get("prompts", 0) for s in splits.values()) == 6
    assert all(np.isfinite(s["kid"]) for s in splits.values() if s["draws"])

    # the KID breakdown: its whole KID is the evaluator's; the held-out images are ~2/3 flat fill
    from launch.testbed.kid_blocks import block_scores

    blocks = block_scores(run)  # finds run/eval/eval.json
    assert blocks["kid"] == pytest.approx(result["quality"]["kid_clean_generations_vs_heldout"], rel=1e-4)
    assert blocks["draws"] == 1 and 0.3 < blocks["heldout_flat"] < 0.95 and 0.0 <= blocks["flat"] <= 1.0
    from launch.testbed.reading import evaluation_draws, heldout_images

    assert blocks["heldout_red"] == pytest.approx(float(heldout_images(root)[..., 0].mean()), rel=1e-6)
    draw, images = evaluation_draws(run)[0]
    clean = [p for p, prompt in enumerate(draw["prompts"]) if prompt["group"] == "clean"]
    assert blocks["red"] == pytest.approx(float(images[clean][..., 0].mean()), rel=1e-6)

    # empty-prompt generations, scored with the run's evaluation thresholds
    from launch.testbed.unprompted import main as unprompted

    assert unprompted(["--runs", str(run), "--images", "3", "--steps", "2", "--out", str(tmp_path / "u.md")]) == 0
    table = (tmp_path / "u.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith(f"| `{run}` | 3 |")

    # the end-of-run row probe: every distinct training row once per timestep, the same numbers twice
    from launch.testbed.row_probe import auc_table, row_statistics

    groups, values = row_statistics(run / "final", root, [20, 500], batch=8)
    assert len(groups) == len({r["sample_id"] for r in rows}) and {"be_topk@20", "rel_gain@500", "loss@20"} <= set(values)
    assert all(v.shape == (len(groups),) and np.isfinite(v).all() for v in values.values())
    again = row_statistics(run / "final", root, [20, 500], batch=5)[1]  # noise is fixed per row, not per batch
    assert all(np.allclose(v, values[k], rtol=1e-4, atol=1e-6) for k, v in again.items())
    # against itself as the reference, fine-tuning taught nothing: every gain is 0
    same = row_statistics(run / "final", root, [20], batch=8, reference=run / "final")[1]
    assert np.allclose(same["loss@20"], values["loss@20"], rtol=1e-4, atol=1e-6)
    assert np.allclose(same["ref_gain@20"], 0, atol=1e-5) and np.allclose(same["ref_gain_topk@20"], 0, atol=1e-5)
    # the same as a map over generations (localize --reference): zero against itself, positive
    # where the reference is worse (a reference whose UNet predicts zeros)
    from launch.testbed.evaluate import load_pipeline
    from launch.testbed.localize import ref_gain_maps
    from launch.testbed.reading import load_image

    pipe, texts = load_pipeline(run / "final"), [r["text"] for r in rows[:2]]
    images = np.stack([[load_image(root, r["file_name"])] * 2 for r in rows[:2]])  # 2 prompts x 2 seeds
    own = ref_gain_maps(pipe, pipe, images, texts)
    latent = pipe.unet.config.sample_size
    assert own.shape == (2, 2, latent, latent) and np.allclose(own, 0, atol=1e-5)
    blind = load_pipeline(run / "final")
    for q in blind.unet.conv_out.parameters():
        q.data.zero_()
    assert (ref_gain_maps(pipe, blind, images, texts) > 0).mean() > 0.5
    # a statistic that is the planted indicator separates its kind perfectly; a constant does not
    marker = np.array([g == "global" for g in groups], dtype=float)
    table = auc_table(groups, {"marker": marker, "constant": np.zeros(len(groups))})
    header = table[0].strip("| ").split(" | ")
    assert header[1:] == ["global", "local"]
    assert table[2] == "| marker | 1.000 | 0.500 |" and table[3] == "| constant | 0.500 | 0.500 |"
    with pytest.raises(ValueError, match="clean rows"):
        auc_table([g for g in groups if g != "clean"], {"marker": marker[np.array(groups) != "clean"]})

    # the held-out loss: deterministic, and a UNet that predicts zeros scores E[noise^2] = 1
    from launch.testbed.evaluate import heldout_loss, load_pipeline

    pipe = load_pipeline(run / "final")
    first = heldout_loss(pipe, result["testbed"])
    assert first["heldout_loss"] == pytest.approx(result["summary"]["heldout_loss"], rel=1e-6)
    assert heldout_loss(pipe, result["testbed"]) == first and first["images"] == TINY["n_heldout"]
    assert first["heldout_loss"] < 1.0
    for p in pipe.unet.conv_out.parameters():
        p.data.zero_()
    assert heldout_loss(pipe, result["testbed"])["heldout_loss"] == pytest.approx(1.0, abs=0.1)

    # --rescore scores the saved images again without the model: same numbers
    (run / "final" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    args = ["--model", str(run / "final"), "--out", str(out), "--seeds", "2", "--local-per-group", "1", "--clean", "6",
            "--calibration", "4"]
    assert main(args + ["--rescore"]) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["summary"] == result["summary"] and again["generations"] == result["generations"]
    with pytest.raises(ValueError, match="holds"):
        main(args[:5] + ["3"] + args[6:] + ["--rescore"])  # 3 seeds asked, 2 saved


def test_detection_table_reports_signals_and_baselines(tmp_path):
    """A ledger whose score separates planted from clean scores AUC 1; the token-count baseline
    is computed from the captions with the run's own tokenizer."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from launch.testbed.detection import detection_table, markdown
    from train.models import byte_level_tokenizer

    run = tmp_path / "run"
    byte_level_tokenizer().save_pretrained(run / "final" / "tokenizer")
    groups = ["clean"] * 40 + ["global"] * 10 + ["local"] * 10
    rng = np.random.default_rng(0)
    score = np.where(np.array(groups) == "global", 5.0, rng.normal(size=60))
    captions = [("a long caption " * 3 if g == "local" else "short caption") for g in groups]
    pq.write_table(pa.table({"group": groups, "caption": captions, "score": score, "loss_mean": -score,
                             "flagged": np.array(groups) == "global",
                             "first_flagged_step": np.where(np.array(groups) == "global", 7, -1)}),
                   run / "ledger.parquet")
    early = tmp_path / "early"  # an epoch-0 ledger written before the heads' columns existed
    early.mkdir()
    pq.write_table(pq.read_table(run / "ledger.parquet"), early / "ledger.parquet")
    table = pq.read_table(run / "ledger.parquet")
    head_local = np.where(np.array(groups) == "local", 2.0, rng.normal(size=60) - 1.0)
    pq.write_table(table.append_column("head_local", pa.array(head_local)), run / "ledger.parquet")
    result = detection_table(run, epoch0=early)
    g, loc = result["kinds"]["global"], result["kinds"]["local"]
    assert loc["signals"]["head_local"]["auc"] == 1.0 and np.isnan(loc["signals"]["head_local"]["auc_epoch0"])
    assert g["signals"]["score"]["auc"] == 1.0 and g["signals"]["score"]["tpr_at_1fpr"] == 1.0
    assert g["signals"]["loss"]["auc"] == 0.0 and g["median_first_flagged_step"] == 7
    assert g["token_count_auc"] == 0.5 and loc["token_count_auc"] == 1.0  # local captions are longer here
    assert "| score | 1.000 | 1.000 | 1.000 |" in markdown(result)

    # --history: per snapshot, the AUC of each signal; the score separates only in the later one
    from launch.testbed.detection import history_table

    with pytest.raises(FileNotFoundError, match="history_every"):
        history_table(run, ["score"])
    (run / "ledger_history").mkdir()
    for step, values in ((250, rng.normal(size=60)), (500, score)):
        pq.write_table(pa.table({"group": groups, "score": values, "loss_mean": -values}),
                       run / "ledger_history" / f"step-{step:07d}.parquet")
    lines = history_table(run, ["score", "loss"])
    table = lines[lines.index("**global vs clean**, AUC per ledger snapshot"):]
    assert table[5].startswith("| 500 | 1.000 | 0.000 |") and table[4].startswith("| 250 |") and "1.000" not in table[4]
    assert "**local vs clean**, AUC per ledger snapshot" in lines
    with pytest.raises(KeyError, match="ref_gain"):
        history_table(run, ["ref_gain"])
