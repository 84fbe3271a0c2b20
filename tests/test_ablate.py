"""launch/ablate.py: grid expansion and validation, commands for a cluster, summaries, result
tables, and resume on real tiny runs (the smoke grid: 2 variants x 1 seed, 6 steps, testbed)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from launch import ablate  # conftest puts the repo root on the path

SMOKE = REPO / "configs" / "ablation" / "smoke.yaml"
TESTBED = REPO / "configs" / "ablation" / "testbed.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def small_grid(tmp_path) -> Path:
    a = write(tmp_path / "a.yaml", "train:\n  lr: 0.1\n  max_steps: 7\n  batch_size: 3\n")
    b = write(tmp_path / "b.yaml", "train:\n  lr: 0.2\n  batch_size: 4\n")
    return write(tmp_path / "grid.yaml", f"""
name: small
base: [{a}, train.max_steps=9]
seeds: [0, 3]
variants:
  plain: []
  file: [{b}]
  both: [{b}, train.lr=0.3, train.lr=0.4]
""")


# ------------------------------------------------------------------------- expansion


def test_expansion_names_seeds_dirs_and_override_order(small_grid, tmp_path):
    grid = ablate.load_grid(small_grid, out=tmp_path / "out")
    assert [r.name for r in grid.runs] == ["plain/seed0", "plain/seed3", "file/seed0", "file/seed3",
                                           "both/seed0", "both/seed3"]
    by = {r.name: r for r in grid.runs}
    for run in grid.runs:
        assert run.dir == tmp_path / "out" / run.variant / f"seed{run.seed}"
        assert run.cfg.seed == run.seed and Path(run.cfg.output_dir) == run.dir
        assert run.cfg.train.max_steps == 9  # a base key=value beats every file, as on the trainer's CLI
    assert by["plain/seed0"].cfg.train.lr == 0.1 and by["plain/seed0"].cfg.train.batch_size == 3
    assert by["file/seed0"].cfg.train.lr == 0.2 and by["file/seed0"].cfg.train.batch_size == 4  # variant file > base file
    assert by["both/seed3"].cfg.train.lr == 0.4  # variant overrides, later wins
    # the trainer gets files in order, then overrides in order, then the runner's own
    args = ablate.train_args(by["both/seed3"], resume=True)
    assert [Path(args[i]).name for i in (1, 3)] == ["a.yaml", "b.yaml"]
    assert args[4:] == ["train.max_steps=9", "train.lr=0.3", "train.lr=0.4", f"output_dir={by['both/seed3'].dir}",
                        "seed=3", "train.resume=latest"]
    # --only takes names and patterns, --seeds a subset; unknown ones fail
    assert [r.name for r in ablate.select(grid, ["b*"], [3])] == ["both/seed3"]
    with pytest.raises(ablate.GridError, match="matches no variant"):
        ablate.select(grid, ["nope"])
    with pytest.raises(ablate.GridError, match="not one of the grid's seeds"):
        ablate.select(grid, None, [7])


def test_typos_fail_at_expansion_naming_variant_and_key(small_grid, tmp_path):
    text = small_grid.read_text()
    bad = write(tmp_path / "bad.yaml", text + "  typo: [mitigate.captions.replace_pp=0.1]\n")
    with pytest.raises(ablate.GridError, match=r"variant 'typo': unknown config key 'mitigate.captions.replace_pp'"
                                               r".*did you mean 'mitigate.captions.replace_p'"):
        ablate.load_grid(bad)
    overlay = write(tmp_path / "typo_overlay.yaml", "mitigate:\n  weights:\n    moode: drop\n")
    bad = write(tmp_path / "bad2.yaml", text + f"  overlay: [{overlay}]\n")
    with pytest.raises(ablate.GridError, match=r"variant 'overlay': unknown config key 'mitigate.weights.moode' "
                                               r"in .*typo_overlay.yaml"):
        ablate.load_grid(bad)
    bad = write(tmp_path / "bad3.yaml", text.replace("train.max_steps=9", "train.max_step=9"))
    with pytest.raises(ablate.GridError, match=r"base config: unknown config key 'train.max_step'"):
        ablate.load_grid(bad)
    bad = write(tmp_path / "bad4.yaml", text + "  bad_value: [mitigate.weights.mode=sometimes]\n")
    with pytest.raises(ablate.GridError, match=r"variant 'bad_value': mitigate.weights.mode='sometimes' is not allowed"):
        ablate.load_grid(bad)
    bad = write(tmp_path / "bad5.yaml", text + "  missing: [configs/mitigation/nope.yaml]\n")
    with pytest.raises(ablate.GridError, match=r"variant 'missing': config file not found"):
        ablate.load_grid(bad)
    bad = write(tmp_path / "bad6.yaml", "evaluate:\n  testbed: {seed_s: 4}\n" + text)
    with pytest.raises(ablate.GridError, match=r"evaluate.testbed: unknown option 'seed_s'.*did you mean 'seeds'"):
        ablate.load_grid(bad)
    bad = write(tmp_path / "bad7.yaml", "evaluate:\n  testbed: {seeds: 4}\n" + text)  # shapes data
    with pytest.raises(ablate.GridError, match=r"evaluate.testbed scores the grid's testbed: give the grid a testbed"):
        ablate.load_grid(bad)
    # the command line says the same and exits 2 before running anything
    assert ablate.main([str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_the_grid_testbed_is_built_from_knobs_and_checked_against_every_run(tmp_path):
    runs = ("base: [data.source=imagefolder, data.resolution=16, data.filter_column=split, data.filter_value=train]\n"
            "variants:\n  none: []\n  clean: [data.filter_column=group, data.filter_value=clean]\n")
    grid = ablate.load_grid(write(tmp_path / "g.yaml", "testbed: {resolution: 16, n_clean: 24}\n" + runs),
                            out=tmp_path / "o")
    assert grid.data_dir.parent == tmp_path / "o" / "data" and not grid.data_dir.exists()  # built when runs start
    assert all(r.overrides[0] == f"data.path={grid.data_dir}" and r.cfg.data.path == str(grid.data_dir)
               for r in grid.runs)
    other = ablate.load_grid(write(tmp_path / "g2.yaml", "testbed: {resolution: 16, n_clean: 25}\n" + runs),
                             out=tmp_path / "o")
    assert other.data_dir != grid.data_dir  # other knobs, another folder: a stale build is never reused
    # a knobs file underneath, inline knobs over it
    both = ablate.load_grid(write(tmp_path / "g3.yaml", "testbed: {config: configs/testbed/data.yaml, "
                                  "resolution: 16, n_clean: 30}\n" + runs), out=tmp_path / "o")
    assert (both.testbed["n_clean"], both.testbed["n_heldout"], both.testbed["resolution"]) == (30, 100, 16)
    for testbed, base, message in [
        ("{n_cleen: 24}", runs, r"testbed: unknown testbed knob\(s\): n_cleen"),
        ("{config: nope.yaml}", runs, r"testbed.config: file not found: nope.yaml"),
        ("{resolution: 32}", runs, r"variant 'none': data.resolution=16 but the testbed is built at 32 px"),
        ("{resolution: 16}", runs.replace(", data.filter_column=split, data.filter_value=train", ""),
         r"variant 'none': the testbed's held-out rows would be trained"),
        ("{resolution: 16}", runs.replace("clean: [", "clean: [data.path=elsewhere, "),
         r"variant 'clean': the grid's testbed is read as data.source=imagefolder data.path="),
    ]:
        with pytest.raises(ablate.GridError, match=message):
            ablate.load_grid(write(tmp_path / "bad.yaml", f"testbed: {testbed}\n" + base), out=tmp_path / "o")


def test_the_testbed_grid_expands_to_every_mitigation():
    grid = ablate.load_grid(TESTBED, out="/tmp/never-written")
    assert grid.seeds == [0, 1, 2] and grid.reference == "none" and len(grid.runs) == 3 * len(grid.variants)
    cfg = {r.variant: r.cfg for r in grid.runs if r.seed == 0}
    assert cfg["none"].train.max_steps == 3000
    # the data: configs/testbed/data.yaml built into <out>/data, read as a plain folder without held-out rows
    assert grid.testbed["n_clean"] == 1200 and grid.data_dir.parent == Path("/tmp/never-written/data")
    assert (cfg["none"].data.source, cfg["none"].data.path) == ("imagefolder", str(grid.data_dir))
    assert (cfg["none"].data.filter_column, cfg["none"].data.filter_value) == ("split", "train")
    assert cfg["none"].monitor.label_column == "group"
    # clean_only trains the clean images for as many epochs as the other runs do (32 rows a step)
    clean_epochs = 3000 * 32 / 1738
    assert abs(cfg["clean_only"].train.max_steps * 32 / 1200 - clean_epochs) < 0.1
    c = {v: cfg[v].mitigate.captions for v in cfg}
    assert c["captions_mc"].multiple_captions and c["captions_mc"].target == "all"
    assert c["captions_mc_flagged"].multiple_captions and c["captions_mc_flagged"].target == "flagged"
    assert c["captions_rc"].replace_p == 0.1 and c["captions_rc_flagged"].target == "flagged"
    assert c["captions_rt"].add_token_p > 0 and c["captions_cwr"].repeat_word_p > 0
    assert c["captions_gn"].embedding_noise > 0 and c["captions_word_dropout"].drop_word_p > 0
    assert cfg["downweight_flagged"].mitigate.weights.mode == "downweight"
    assert cfg["drop_flagged"].mitigate.weights.mode == "drop" and cfg["dedup"].mitigate.dedup.images
    drop = cfg["drop_flagged"].monitor  # the detector that works on this testbed: loss score, absolute threshold
    assert drop.flag.policy == "absolute" and drop.signal_weights["loss"] == 1.0 and drop.signal_weights["be_mass"] == 0
    assert cfg["dedup_regions"].mitigate.dedup.regions and not cfg["dedup_regions"].mitigate.dedup.images
    for term in ("be_mass", "entropy", "start_token"):
        assert cfg[f"reg_{term}"].mitigate.regularize[term] > 0
    none = cfg["none"].mitigate
    assert not none.dedup.images and none.weights.mode == "none" and none.captions.replace_p == 0
    assert cfg["best"].mitigate.dedup.images and cfg["best"].mitigate.dedup.regions
    assert len({r.config_sha for r in grid.runs}) == len(grid.runs)  # start_token too (W&B redacts "token" keys)


def test_the_v3_grid_extends_the_testbed_grid():
    v5 = ablate.load_grid(TESTBED, out="/tmp/never-written")
    v3 = ablate.load_grid(REPO / "configs" / "ablation" / "testbed_v3.yaml")
    assert v3.name == "testbed-v3" and v3.out == REPO / "runs" / "ablation" / "testbed-v3"
    assert list(v3.variants) == list(v5.variants) and v3.evaluate == v5.evaluate and v3.seeds == v5.seeds
    cfg = {r.variant: r.cfg for r in v3.runs if r.seed == 0}
    assert cfg["none"].train.max_steps == 7500 and cfg["none"].model.pretrained.endswith("openmoji-base-v3")
    assert cfg["clean_only"].train.max_steps == 5178 and cfg["clean_only_steps"].train.max_steps == 7500
    assert cfg["best"].mitigate.dedup.images and cfg["best"].mitigate.dedup.regions
    assert v3.testbed == v5.testbed and v3.data_dir.parent == v3.out / "data"  # the same data, its own copy


def test_extends_merges_variants_and_rejects_loops(small_grid, tmp_path):
    child = write(tmp_path / "sub" / "child.yaml", """
extends: ../grid.yaml
seeds: [5]
variants:
  file: [train.lr=0.7]
  extra: [train.batch_size=2]
""")
    grid = ablate.load_grid(child, out=tmp_path / "out")
    assert grid.name == "child"  # the name (the output folder) is not inherited
    assert list(grid.variants) == ["plain", "file", "both", "extra"] and grid.seeds == [5]
    by = {r.variant: r.cfg for r in grid.runs}
    assert by["plain"].train.max_steps == 9 and by["plain"].train.lr == 0.1  # the parent's base
    assert by["file"].train.lr == 0.7 and by["file"].train.batch_size == 3  # replaced, not merged
    assert by["both"].train.lr == 0.4 and by["extra"].train.batch_size == 2
    loop = write(tmp_path / "loop.yaml", "extends: loop2.yaml\nvariants: {a: []}\n")
    write(tmp_path / "loop2.yaml", "extends: loop.yaml\n")
    with pytest.raises(ablate.GridError, match="extends itself"):
        ablate.load_grid(loop)
    orphan = write(tmp_path / "orphan.yaml", "extends: nowhere.yaml\nvariants: {a: []}\n")
    with pytest.raises(ablate.GridError, match=r"grid file not found: .*nowhere.yaml \(extended by .*orphan.yaml\)"):
        ablate.load_grid(orphan)


def test_extends_replaces_evaluate_options_one_by_one(tmp_path):
    parent = write(tmp_path / "parent.yaml", """
name: parent
base: [train.max_steps=3]
variants: {plain: []}
evaluate:
  testbed: {seeds: 4, steps: 25, draws: 2}
""")
    child = write(tmp_path / "child.yaml", "extends: parent.yaml\nevaluate:\n  testbed: {draws: 3}\n")
    merged = ablate._read_grid(child)
    assert merged["evaluate"] == {"testbed": {"seeds": 4, "steps": 25, "draws": 3}}  # draws replaced, the rest kept
    assert merged["variants"] == {"plain": []} and "name" not in merged
    # the shipped long Twemoji grid changes only the draws of the Twemoji grid it extends
    long = ablate._read_grid(REPO / "configs" / "ablation" / "testbed_twemoji_long.yaml")["evaluate"]["testbed"]
    short = ablate._read_grid(REPO / "configs" / "ablation" / "testbed_twemoji.yaml")["evaluate"]["testbed"]
    assert long == {**short, "draws": 2}


def test_print_commands_and_slurm_array(tmp_path):
    out = tmp_path / "out"
    assert ablate.main([str(SMOKE), "--out", str(out), "--print-commands", "--set", "logging.wandb=true"]) == 0
    lines = (out / "commands.txt").read_text().splitlines()
    assert len(lines) == 2
    train, finish = lines[0].split(" && ")
    words = shlex.split(train)
    assert words[:2] == ["python", "train/finetune.py"]
    assert words[-7:] == ["logging.wandb=true", f"output_dir={out}/none/seed0", "seed=0",
                          "logging.run_name=none-seed0", "logging.wandb_group=smoke", "logging.wandb_job_type=none",
                          "train.resume=latest"]
    assert shlex.split(finish)[:9] == ["python", "launch/ablate.py", "configs/ablation/smoke.yaml", "--out",
                                       str(out), "--only", "none", "--seeds", "0"]
    assert "--config configs/mitigation/captions_rc.yaml" in lines[1]
    sbatch = (out / "slurm_array.sbatch").read_text()
    assert "#SBATCH --array=0-1" in sbatch and str(out / "commands.txt") in sbatch
    assert not (out / "none").exists()  # nothing ran
    # ... but the testbed the array's tasks read is there, and every command points at it
    data = ablate.load_grid(SMOKE, out=out).data_dir
    assert (data / "manifest.json").is_file() and all(f"data.path={data}" in line for line in lines)


# ------------------------------------------------------------------------- summaries and tables


def fake_run(run: Path, seed: int, replica: float, local: float, kid: float) -> Path:
    """A finished run's files, as the trainer and the testbed evaluation write them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run.mkdir(parents=True)
    (run / "config.yaml").write_text("monitor:\n  label_column: group\n  negative_label: clean\n")
    rows = [{"step": s, "train/loss": 1.0 / s, "perf/samples_per_s": float(10 * s)} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [{"step": 3, "val/x": 1}]))
    group = ["clean"] * 6 + ["global"] * 2 + ["local"] * 2
    score = [0.1, 0.2, 0.3, 0.4, 0.5, np.nan, 0.9, 0.35, 0.6, 0.05]
    pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(10)], "observations": [1] * 10,
                             "score": score, "flagged": [False] * 8 + [True, False], "group": group}),
                   run / "ledger.parquet")
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({"generation_seconds": 1.5, "summary": {
        "global_replica_rate": replica, "local_replica_rate": local, "clean_replica_rate": 0.0,
        "clean_local_replica_rate": 0.1, "kid_clean_vs_heldout": kid, "localization_iou": 0.7}}))
    return run


def test_summary_fields_come_from_metrics_ledger_and_eval(tmp_path):
    from train.monitor.detection import detection_metrics

    s = ablate.summarize(fake_run(tmp_path / "r", 0, 0.5, 0.25, 0.02), variant="v", seed=0)
    assert (s["variant"], s["seed"], s["steps"], s["train_loss"], s["samples_per_s"]) == ("v", 0, 3, 1 / 3, 20.0)
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.5, np.nan, 0.9, 0.35, 0.6, 0.05])
    group = np.array(["clean"] * 6 + ["global"] * 2 + ["local"] * 2)
    for label in ("global", "local"):
        expected = detection_metrics(score, group == label, group == "clean")
        assert s[f"det_auc_{label}"] == pytest.approx(expected["auc"])
        assert s[f"det_tpr1fpr_{label}"] == pytest.approx(expected["tpr_at_1fpr"])
    assert s["det_auc_global"] == pytest.approx(0.8)  # 0.9 beats all 5 clean, 0.35 beats 3 of 5: 8/10
    assert (s["flagged"], s["flagged_rate_local"], s["flagged_rate_clean"]) == (1, 0.5, 0.0)
    assert (s["global_replica_rate"], s["local_replica_rate"], s["quality_kid"], s["localization_iou"]) == \
        (0.5, 0.25, 0.02, 0.7)
    assert s["quality_metric"] == "kid_clean_vs_heldout" and s["eval_draws"] == 1

    # a second draw of prompts and seeds (eval-seed1/): every number is the mean of the two
    second = tmp_path / "r" / "eval-seed1"
    second.mkdir()
    (second / "eval.json").write_text(json.dumps({"generation_seconds": 2.5, "summary": {
        "global_replica_rate": 0.7, "local_replica_rate": 0.35, "clean_replica_rate": 0.1,
        "clean_local_replica_rate": 0.1, "kid_clean_vs_heldout": 0.04, "localization_iou": 0.5}}))
    s = ablate.summarize(tmp_path / "r", variant="v", seed=0)
    assert s["eval_draws"] == 2 and s["eval_generation_s"] == 2.0
    assert (s["global_replica_rate"], s["local_replica_rate"], s["clean_replica_rate"], s["quality_kid"],
            s["localization_iou"]) == pytest.approx((0.6, 0.3, 0.05, 0.03, 0.6))
    assert s["eval_draw_seeds"] == [0, 1]


def test_quality_is_compared_on_the_draws_both_runs_have(small_grid, tmp_path):
    """KID moves between draws of prompts and seeds; a variant scored on draws 0 and 3 is compared
    with the reference's mean on draws 0 and 3, not on every draw the reference has."""
    def draws(run: Path, kids: dict[int, float]) -> None:
        for k, kid in kids.items():
            folder = run / ("eval" if k == 0 else f"eval-seed{k}")
            folder.mkdir(exist_ok=True)
            (folder / "eval.json").write_text(json.dumps({"summary": {
                "global_replica_rate": 0.5, "local_replica_rate": 0.5, "kid_clean_vs_heldout": kid}}))

    grid = ablate.load_grid(small_grid, out=tmp_path / "out")
    grid.reference = "plain"
    ref0, ref3, mine = (fake_run(grid.out / v / f"seed{s}", s, 0.5, 0.5, 0.0) for v, s in
                        (("plain", 0), ("plain", 3), ("file", 0)))
    draws(ref0, {0: 0.010, 1: 0.030, 3: 0.020})   # the reference's draw 1 is a bad one
    draws(ref3, {0: 0.012, 1: 0.034})
    draws(mine, {0: 0.0105, 3: 0.0210})
    (mine / "eval-seed3x").mkdir()  # not a draw folder: ignored
    summaries = [ablate.summarize(r, variant=v, seed=s)
                 for r, v, s in ((ref0, "plain", 0), (ref3, "plain", 3), (mine, "file", 0))]
    assert summaries[0]["eval_draw_seeds"] == [0, 1, 3] and summaries[2]["eval_draw_seeds"] == [0, 3]
    assert ablate.quality_by_draw(summaries[:2]) == pytest.approx({0: 0.011, 1: 0.032, 3: 0.020})
    # draws 0 and 3: (0.0105 + 0.0210) / (0.011 + 0.020) - 1 = +1.6%; on the plain means it would be -25%
    change = ablate.paired_quality_change(summaries[2:], summaries[:2])
    assert change == pytest.approx((0.0105 + 0.021) / (0.011 + 0.020) - 1)
    for run, s in zip((ref0, ref3, mine), summaries):
        (run / "summary.json").write_text(json.dumps(s))
    md = ablate.collect(grid)["md"].read_text()
    header = [c.strip() for c in next(l for l in md.splitlines() if l.startswith("| variant")).split("|")[1:-1]]
    row = dict(zip(header, [c.strip() for c in next(l for l in md.splitlines() if l.startswith("| `file`")).split("|")[1:-1]]))
    assert row["KID vs ref"] == "+2%" and row["meets goal"] == "no"  # local -0%
    assert ablate.paired_quality_change(summaries[2:], [{"variant": "plain"}]) is None  # nothing to pair


def test_tables_give_mean_and_std_over_seeds_and_the_goal(small_grid, tmp_path):
    grid = ablate.load_grid(small_grid, out=tmp_path / "out")
    grid.reference = "plain"
    numbers = {("plain", 0): (0.50, 0.40, 0.100), ("plain", 3): (0.70, 0.60, 0.100),
               ("file", 0): (0.02, 0.05, 0.102), ("file", 3): (0.04, 0.05, 0.104),
               ("both", 0): (0.30, 0.05, 0.100)}  # both/seed3 not finished
    for (variant, seed), (g, l, k) in numbers.items():
        run = fake_run(grid.out / variant / f"seed{seed}", seed, g, l, k)
        (run / "summary.json").write_text(json.dumps(ablate.summarize(run, variant=variant, seed=seed)))
    written = ablate.collect(grid)
    import csv

    rows = list(csv.DictReader(open(written["csv"])))
    assert [(r["variant"], r["seed"]) for r in rows] == [("plain", "0"), ("plain", "3"), ("file", "0"),
                                                          ("file", "3"), ("both", "0")]
    md = written["md"].read_text()
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines() if line.startswith("| `")}
    assert list(table) == ["`plain`", "`file`", "`both`"]
    header = [c.strip() for c in next(l for l in md.splitlines() if l.startswith("| variant")).split("|")[1:-1]][1:]
    plain, file, both = (dict(zip(header, table[f"`{v}`"])) for v in ("plain", "file", "both"))
    assert plain["seeds"] == "2" and plain["global replica rate"] == f"0.600 ± {math.sqrt(0.02):.3f}"
    assert both["seeds"] == "1" and both["global replica rate"] == "0.300"  # one seed: no spread
    assert file["global vs ref"] == "-95%" and file["local vs ref"] == "-90%" and file["KID vs ref"] == "+3%"
    assert file["meets goal"] == "yes" and both["meets goal"] == "no" and plain["meets goal"] == "—"
    assert "localization IoU" in header and "det. AUC global" in header
    # fewer prompted copies but more from the empty prompt (the copies moved, not gone): no
    for (variant, seed), unasked in {("plain", 0): 0.02, ("plain", 3): 0.04, ("file", 0): 0.2, ("file", 3): 0.0}.items():
        path = grid.out / variant / f"seed{seed}" / "summary.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"unprompted_global_rate": unasked}))
    md = ablate.collect(grid)["md"].read_text()
    row = next(l for l in md.splitlines() if l.startswith("| `file`"))
    assert row.rstrip(" |").endswith("no: more copies unprompted")  # 0.10 on average against 0.03
    # the plot (matplotlib comes with the test extra): a real PNG with both panels' pixels
    from PIL import Image

    with Image.open(written["png"]) as plot:
        assert plot.format == "PNG" and plot.height > 300
        assert plot.width > 3 * plot.height  # three panels side by side: global, local and clean copies


# ------------------------------------------------------------------------- real runs, resume


def test_real_runs_collect_and_resume(tmp_path, cache_dir):
    out = tmp_path / "out"
    argv = [str(SMOKE), "--out", str(out), "--mode", "inprocess", "--set", f"model.cache_dir={cache_dir}"]
    assert ablate.main(argv) == 0
    import csv

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["variant"], r["seed"]) for r in rows] == [("none", "0"), ("captions_rc", "0")]
    md = (out / "results.md").read_text()
    assert "| `none` | 1 |" in md and "| `captions_rc` | 1 |" in md
    summaries = {v: json.loads((out / v / "seed0" / "summary.json").read_text()) for v in ("none", "captions_rc")}
    for v, s in summaries.items():
        # draws: 2 in the grid: eval/ with --seed 0 and eval-seed1/ with --seed 1, averaged
        draws = [json.loads((out / v / "seed0" / d / "eval.json").read_text()) for d in ("eval", "eval-seed1")]
        assert [d["settings"]["seed"] for d in draws] == [0, 1] and s["eval_draws"] == 2
        assert s["heldout_loss"] == pytest.approx(draws[0]["summary"]["heldout_loss"])  # same noise in every draw
        assert s["local_replica_rate"] == pytest.approx(sum(d["summary"]["local_replica_rate"] for d in draws) / 2)
        assert s["steps"] == 6 and math.isfinite(s["train_loss"]) and s["samples_per_s"] > 0
        assert 0 <= s["det_auc_global"] <= 1 and 0 <= s["det_tpr1fpr_local"] <= 1  # the testbed's group column
        assert 0 <= s["global_replica_rate"] <= 1 and 0 <= s["local_replica_rate"] <= 1
        assert s["quality_kid"] is not None and s["wall_train_s"] > 0
        assert s["clean_own_rank"] == pytest.approx(sum(d["summary"]["clean_own_rank_median"] for d in draws) / 2)
    assert summaries["none"]["train_loss"] != summaries["captions_rc"]["train_loss"]  # RC changed the captions

    # a second invocation re-runs nothing
    grid = ablate.load_grid(SMOKE, out=out, extra=[f"model.cache_dir={cache_dir}"])
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/summary.json")}
    assert ablate.run_grid(grid, grid.runs, mode="inprocess") == {"none/seed0": "skipped", "captions_rc/seed0": "skipped"}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a run whose summary is removed is done again (training finished: summarized only)
    (out / "captions_rc" / "seed0" / "summary.json").unlink()
    assert ablate.run_grid(grid, grid.runs, mode="inprocess") == {"none/seed0": "skipped",
                                                                   "captions_rc/seed0": "summarized"}

    # a run cut short resumes from its checkpoint, then is evaluated again (its final/ is new)
    run = out / "none" / "seed0"
    import shutil

    for name in ("summary.json",):
        (run / name).unlink()
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    (run / "checkpoints" / "latest").write_text("checkpoint-3")
    assert ablate.status(grid.runs[0], grid) == "resume"
    assert ablate.run_grid(grid, grid.runs[:1], mode="inprocess") == {"none/seed0": "resumed"}
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (run / "eval" / "eval.json").stat().st_mtime >= (run / "final" / "model_index.json").stat().st_mtime
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["train_loss"] == pytest.approx(summaries["none"]["train_loss"], rel=1e-5)  # exact resume
