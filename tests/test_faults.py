"""Faults a real fine-tune meets (issue 20) end as a counted skip or one clear line, never as a
library traceback, a hang, or a silently wrong run."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from conftest import fast_overrides, make_imagefolder, read_metrics
from omegaconf import OmegaConf
from PIL import Image

from data.config import DataConfig
from data.datasets import BadSampleError, DataError, build_train_data, load_table


def data_cfg(folder: Path, **kw):
    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with({"source": "imagefolder", "path": str(folder), "resolution": 32, "num_workers": 0, **kw})
    return cfg


def first_batch(cfg, batch_size=6) -> dict:
    data = build_train_data(cfg, batch_size=batch_size, seed=0, rank=0, world=1, cache_dir="")
    return next(iter(data.loader))


def png_header(width: int, height: int) -> bytes:
    """A few hundred bytes that PIL opens as a width x height greyscale PNG (the pixel data is
    cut short: only the header matters to the size checks, which come before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------
# 2, 3: images that decode small but resize huge, and decompression bombs
# --------------------------------------------------------------------------------------------


def test_an_extreme_aspect_ratio_is_a_bad_sample_not_a_huge_resize(tmp_path):
    folder = make_imagefolder(tmp_path / "f", n=6)
    Image.new("RGB", (1, 2000), (200, 10, 10)).save(folder / "img" / "1.png")  # 32 x 64000 after resize
    batch = first_batch(data_cfg(folder))
    assert batch["bad"] == ["row 1"] and "id-1" not in batch["sample_id"] and len(batch["sample_id"]) == 6
    with pytest.raises(BadSampleError, match=r"img/1.png.*1x2000.*data.max_aspect_ratio"):
        first_batch(data_cfg(folder, on_bad_sample="error"))
    batch = first_batch(data_cfg(folder, max_aspect_ratio=2000))  # the bound is the user's to raise
    assert batch["bad"] == [] and "id-1" in batch["sample_id"]


@pytest.mark.parametrize("size", [(20000, 20000), (10000, 10000)])  # PIL: error; PIL: warning only
def test_oversized_images_are_bad_samples(tmp_path, size):
    folder = make_imagefolder(tmp_path / "f", n=6)
    (folder / "img" / "2.png").write_bytes(png_header(*size))
    batch = first_batch(data_cfg(folder))
    assert batch["bad"] == ["row 2"] and "id-2" not in batch["sample_id"]
    with pytest.raises(BadSampleError, match=rf"img/2.png.*({size[0]}x{size[1]}|{size[0] * size[1]}) pixels.*data.max_image_pixels"):
        first_batch(data_cfg(folder, on_bad_sample="error"))


# --------------------------------------------------------------------------------------------
# 4: bad lines of metadata.jsonl
# --------------------------------------------------------------------------------------------


BAD_LINES = {
    "not UTF-8": b'{"file_name": "img/2.png", "text": "caf\xe9", "sample_id": "id-2"}',
    "not JSON": b'{"file_name": "img/2.png", "text": "picture',
    "leaves the data folder": b'{"file_name": "../outside.png", "text": "up", "sample_id": "id-2"}',
    "no file_name": b'{"text": "picture number 2", "sample_id": "id-2"}',
}


@pytest.mark.parametrize("problem", list(BAD_LINES))
def test_a_bad_metadata_line_is_named_or_skipped(tmp_path, problem, caplog):
    folder = make_imagefolder(tmp_path / "f", n=6)
    Image.new("RGB", (40, 40)).save(tmp_path / "outside.png")
    meta = folder / "metadata.jsonl"
    lines = meta.read_bytes().splitlines()
    lines[2] = BAD_LINES[problem]  # line 3
    meta.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"{meta}:3: .*{problem}.*data.on_bad_sample=skip"):
        load_table(data_cfg(folder, on_bad_sample="error"), "")
    skipped: list[str] = []
    with caplog.at_level(logging.WARNING):
        table, _ = load_table(data_cfg(folder), "", skipped=skipped)
    assert skipped == [f"{meta}:3"] and f"{meta}:3" in caplog.text
    assert table["sample_id"] == ["id-0", "id-1", "id-3", "id-4", "id-5"]
    batch = first_batch(data_cfg(folder), batch_size=5)
    assert sorted(batch["sample_id"]) == ["id-0", "id-1", "id-3", "id-4", "id-5"] and batch["bad"] == []


def test_metadata_table_matches_what_the_image_folder_loader_gave(tmp_path):
    # the table other components read (dedup, monitor, eval): same columns, order, types, paths
    folder = make_imagefolder(tmp_path / "f", n=4)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["group"], rows[2]["score"] = 3, 0.5  # columns only some rows have (in order of first appearance)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]) + "\n")
    table, root = load_table(data_cfg(folder), "")
    assert table.column_names == ["image", "text", "captions", "sample_id", "score", "group"]
    assert [str(table.features[c]) for c in ("text", "group", "score")] == \
        ["Value('string')", "Value('int64')", "Value('float64')"]
    assert table.features["image"].decode is False and table.features["captions"].feature.dtype == "string"
    assert table[0]["image"] == {"bytes": None, "path": str((folder / "img" / "3.png").resolve())}
    assert table["sample_id"] == ["id-3", "id-2", "id-1", "id-0"] and table["group"] == [None, None, 3, None]
    again, _ = load_table(data_cfg(folder), "")
    assert again._fingerprint == table._fingerprint  # caches keyed by it (dedup) stay valid


# --------------------------------------------------------------------------------------------
# 6: links out of the data folder
# --------------------------------------------------------------------------------------------


def test_links_out_of_the_data_folder_are_bad_samples_unless_allowed(tmp_path):
    folder = make_imagefolder(tmp_path / "f", n=6)
    Image.new("RGB", (40, 40), (0, 255, 0)).save(tmp_path / "elsewhere.png")
    (folder / "img" / "1.png").unlink()
    (folder / "img" / "1.png").symlink_to(tmp_path / "elsewhere.png")
    (folder / "img" / "2.png").unlink()
    (folder / "img" / "2.png").symlink_to("/etc/passwd")
    (folder / "img" / "3.png").unlink()
    (folder / "img" / "3.png").symlink_to(folder / "img" / "0.png")  # inside: fine either way
    batch = first_batch(data_cfg(folder))
    assert set(batch["bad"]) == {"row 1", "row 2"} and "id-3" in batch["sample_id"]
    with pytest.raises(BadSampleError, match=r"img/1.png.*elsewhere.png.*outside the data folder.*data.allow_symlinks"):
        first_batch(data_cfg(folder, on_bad_sample="error"))
    batch = first_batch(data_cfg(folder, allow_symlinks=True))
    assert set(batch["bad"]) == {"row 2"} and "id-1" in batch["sample_id"]  # /etc/passwd is still no image


# --------------------------------------------------------------------------------------------
# 9: messages that name the file
# --------------------------------------------------------------------------------------------


def test_a_corrupt_image_is_named_by_its_file(tmp_path):
    folder = make_imagefolder(tmp_path / "f", n=6)
    (folder / "img" / "1.png").write_bytes(b"not a png")
    with pytest.raises(BadSampleError) as info:
        first_batch(data_cfg(folder, on_bad_sample="error"))
    assert str(folder / "img" / "1.png") in str(info.value) and "BytesIO" not in str(info.value)


# --------------------------------------------------------------------------------------------
# 5: damaged run files
# --------------------------------------------------------------------------------------------


def test_a_torn_last_line_of_metrics_is_dropped_on_resume(tmp_path, caplog):
    from train.tracking import Tracker

    rows = [{"step": s, "train/loss": 0.1 * s} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "train/lo')
    with caplog.at_level(logging.WARNING):
        Tracker(OmegaConf.create({"logging": {"wandb": False}}), tmp_path, is_main=True, resume_step=3)
    assert read_metrics(tmp_path) == rows[:3]
    assert "metrics.jsonl:5" in caplog.text


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    """A 6-step run with checkpoints at steps 3 and 6 (monitor on: each holds a ledger)."""
    from train.finetune import main

    run = tmp_path_factory.mktemp("faults") / "run"
    main(fast_overrides(cache_dir, run, **{"train.max_steps": 6, "train.checkpoint_every": 3}))
    return run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "rng_rank0.safetensors", "ledger.safetensors",
                                     "optimizer.bin", "train_state.json"])
def test_a_damaged_checkpoint_is_skipped_by_resume_latest(finished_run, tmp_path, damaged, caplog):
    from train.checkpoint import CheckpointError, complete_checkpoints, find_checkpoint

    run = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints", run / "checkpoints")
    target = run / "checkpoints" / "checkpoint-6" / damaged
    assert target.is_file(), sorted(p.name for p in target.parent.iterdir())
    truncate(target)
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(run, "latest") == run / "checkpoints" / "checkpoint-3"
    assert "checkpoint-6" in caplog.text and damaged in caplog.text
    assert complete_checkpoints(run) == [run / "checkpoints" / "checkpoint-3"]
    with pytest.raises(CheckpointError, match=rf"checkpoint-6.*corrupt.*{damaged}"):
        find_checkpoint(run, str(run / "checkpoints" / "checkpoint-6"))
    truncate(run / "checkpoints" / "checkpoint-3" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_checkpoint(run, "latest")


def test_resume_falls_back_past_a_damaged_checkpoint_and_cleans_leftovers(finished_run, tmp_path, cache_dir):
    from train.finetune import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    truncate(run / "checkpoints" / "checkpoint-6" / "rng_rank0.safetensors")
    (run / "checkpoints" / "checkpoint-1").mkdir()  # left by a kill while pruning
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "tr')  # and the power went
    main(fast_overrides(cache_dir, run, **{"train.max_steps": 6, "train.checkpoint_every": 3,
                                           "train.resume": "latest", "train.checkpoints_total_limit": 2}))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6", "latest"]
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    from train.checkpoint import find_checkpoint

    assert find_checkpoint(run, "latest") == run / "checkpoints" / "checkpoint-6"  # rewritten whole


@pytest.mark.parametrize("failure", ["torch", "enospc"])
def test_a_full_disk_during_a_checkpoint_save_is_one_clear_line(tmp_path, cache_dir, monkeypatch, failure):
    import accelerate

    import train.checkpoint
    from train.finetune import main

    calls = []
    if failure == "torch":
        original = accelerate.Accelerator.save_state

        def save_state(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4310")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    else:
        original = train.checkpoint.save_file

        def save_file(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(*args, **kwargs)

        monkeypatch.setattr(train.checkpoint, "save_file", save_file)
    run = tmp_path / "run"
    args = fast_overrides(cache_dir, run, **{"train.max_steps": 6, "train.checkpoint_every": 3})
    with pytest.raises(SystemExit) as info:
        main(args)
    message = str(info.value)
    assert "\n" not in message and message.startswith("error: ")
    assert str(run / "checkpoints" / "checkpoint-6") in message and "space" in message
    assert "train.resume=latest" in message
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial save is not left to fill the disk
    monkeypatch.undo()
    main(args + ["train.resume=latest"])  # recovery: from checkpoint-3
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_from_before_the_size_list_are_still_checked(finished_run, tmp_path):
    # train_state.json lists each file's size; an older checkpoint has no list: the file formats
    # themselves (safetensors header, torch's zip directory) must show the damage
    from train.checkpoint import checkpoint_problem

    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(finished_run / "checkpoints" / "checkpoint-6", ckpt)
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state.pop("files")
    (ckpt / "train_state.json").write_text(json.dumps(state))
    assert checkpoint_problem(ckpt) is None
    for name in ("model.safetensors", "rng_rank0.safetensors", "ledger.safetensors", "optimizer.bin",
                 "random_states_0.pkl"):
        original = (ckpt / name).read_bytes()
        truncate(ckpt / name)
        assert name in (checkpoint_problem(ckpt) or ""), name
        (ckpt / name).write_bytes(original)


# ---- the run folder, ground truth, and the loop's own checks --------------------------------


def test_a_new_run_refuses_a_folder_that_holds_another_run(tmp_path, cache_dir):
    """A second run in the first one's folder used to prune its checkpoints, mix the metrics and
    overwrite its files. Now it is refused; overwrite=true moves the old run aside, whole."""
    from train.finetune import main

    run = tmp_path / "run"
    main(fast_overrides(cache_dir, run, **{"train.max_steps": 4, "train.checkpoint_every": 2,
                                           "train.checkpoints_total_limit": 3}))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(SystemExit, match=r"already holds a run .*train\.resume=latest.*output_dir.*overwrite=true"):
        main(fast_overrides(cache_dir, run, **{"train.max_steps": 2}))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing touched
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4]

    main(fast_overrides(cache_dir, run, **{"train.max_steps": 2, "train.checkpoint_every": 2, "overwrite": "true"}))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1
    assert sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == before  # the old run, whole
    assert [r["step"] for r in read_metrics(aside[0]) if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2]  # the new one alone
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]


def test_a_missing_data_folder_fails_before_any_model_loads_or_folder_is_made(tmp_path, cache_dir, monkeypatch):
    import train.finetune as finetune

    monkeypatch.setattr(finetune, "build_models", lambda *a: pytest.fail("models were loaded"))
    with pytest.raises(SystemExit, match=r"data\.path=.*nowhere: no such folder"):
        finetune.main(fast_overrides(cache_dir, tmp_path / "run", **{"data.source": "imagefolder",
                                                                     "data.path": str(tmp_path / "nowhere")}))
    assert not (tmp_path / "run").exists()


def test_an_output_dir_that_cannot_be_written_is_one_clear_line(tmp_path, cache_dir):
    from train.finetune import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"output_dir .*file/run cannot be written .*choose a writable folder"):
        main(fast_overrides(cache_dir, blocker / "run"))


def test_ground_truth_is_scored_only_when_the_user_names_the_column(tmp_path, cache_dir, capsys):
    """A column that merely happens to be called like a label no longer triggers whole-ledger AUC
    passes; a named one is scored every monitor.detection_every log lines."""
    from train.finetune import main

    folder = make_imagefolder(tmp_path / "d", n=8)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    rows = [{**json.loads(line), "group": "global" if i < 2 else "clean"} for i, line in enumerate(lines)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"data.source": "imagefolder", "data.path": str(folder), "train.batch_size": 4, "train.max_steps": 6,
              "train.checkpoint_every": 100}
    plain = main(fast_overrides(cache_dir, tmp_path / "plain", **common))
    assert not any(k.startswith("memo/auc") for r in read_metrics(plain) for k in r)
    named = main(fast_overrides(cache_dir, tmp_path / "named", **common, **{
        "monitor.label_column": "group", "monitor.detection_every": 3}))
    scored = [r["step"] for r in read_metrics(named) if "memo/auc/global" in r]
    assert scored == [1, 4]  # log lines 1 and 4 of 6 (every 3rd, from the first)
    capsys.readouterr()
    main(fast_overrides(cache_dir, tmp_path / "missing", **common, **{"monitor.label_column": "kind"}))
    # (the trainer configures logging itself, so its lines go to stderr, not to caplog)
    assert "monitor.label_column=kind: the data has no such column" in capsys.readouterr().err
