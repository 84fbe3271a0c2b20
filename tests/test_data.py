"""The three data formats yield the same samples; bad samples are handled as configured;
order is a pure function of (seed, epoch, position), which is what exact resume relies on."""

from __future__ import annotations

import io
import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import make_imagefolder
from omegaconf import OmegaConf

from data.datasets import BadSampleError, DataPosition, EpochBatchSampler, build_train_data
from train.config import DataConfig


def data_cfg(**kw):
    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with({"resolution": 32, "num_workers": 0, "shuffle_buffer": 1, **kw})
    return cfg


def samples(cfg, n, batch_size=2, **kw):
    """The first n samples a rank-0 single-process loader yields, keyed by sample_id."""
    data = build_train_data(cfg, batch_size=batch_size, seed=0, rank=0, world=1, cache_dir="", **kw)
    out, bad = {}, set()
    for batch in data.loader:
        bad.update(batch["bad"])
        for i, sid in enumerate(batch["sample_id"]):
            out.setdefault(sid, (batch["text"][i], batch["captions"][i], batch["pixel_values"][i]))
        if len(out) >= n:
            return out, bad
    raise AssertionError("loader ended")


def to_hf_disk(folder: Path, out: Path) -> Path:
    import datasets

    rows = [json.loads(l) for l in (folder / "metadata.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_dict({
        "img": [str(folder / r["file_name"]) for r in rows], "caption": [r["text"] for r in rows],
        "alts": [r["captions"] for r in rows], "uid": [r["sample_id"] for r in rows],
    }).cast_column("img", datasets.Image())
    table.save_to_disk(str(out))
    return out


def to_shards(folder: Path, out: Path, per_shard: int = 3) -> str:
    import webdataset as wds

    rows = [json.loads(l) for l in (folder / "metadata.jsonl").read_text().splitlines()]
    out.mkdir()
    with wds.ShardWriter(str(out / "shard-%04d.tar"), maxcount=per_shard) as sink:
        for r in rows:
            sink.write({"__key__": r["sample_id"], "png": (folder / r["file_name"]).read_bytes(),
                        "txt": r["text"], "json": json.dumps({"sample_id": r["sample_id"], "captions": r["captions"]})})
    n = len(list(out.glob("*.tar")))
    return str(out / f"shard-{{0000..{n - 1:04d}}}.tar")


def test_formats_yield_the_same_samples(tmp_path):
    folder = make_imagefolder(tmp_path / "folder", n=6)
    a, _ = samples(data_cfg(source="imagefolder", path=str(folder)), 6)
    b, _ = samples(data_cfg(source="hf", path=str(to_hf_disk(folder, tmp_path / "hf")), image_column="img",
                            caption_column="caption", captions_column="alts", id_column="uid"), 6)
    c, _ = samples(data_cfg(source="webdataset", path=to_shards(folder, tmp_path / "wds")), 6)
    assert sorted(a) == sorted(b) == sorted(c) == [f"id-{i}" for i in range(6)]
    for sid in a:
        assert a[sid][0] == b[sid][0] == c[sid][0] == f"picture number {sid[3:]}"
        assert a[sid][1] == b[sid][1] == c[sid][1] == [f"picture number {sid[3:]}", f"image {sid[3:]}"]
        assert torch.equal(a[sid][2], b[sid][2]) and torch.equal(a[sid][2], c[sid][2])
        assert a[sid][2].shape == (3, 32, 32) and -1 <= a[sid][2].min() < a[sid][2].max() <= 1


def test_content_hash_id_is_stable_and_distinct(tmp_path):
    folder = make_imagefolder(tmp_path / "f", n=4, with_ids=False)
    first, _ = samples(data_cfg(source="imagefolder", path=str(folder)), 4)
    again, _ = samples(data_cfg(source="imagefolder", path=str(folder)), 4)
    assert sorted(first) == sorted(again) and len(first) == 4 and all(len(s) == 40 for s in first)


def spoil(folder: Path) -> None:
    (folder / "img" / "1.png").write_bytes(b"not a png")  # corrupt
    (folder / "img" / "2.png").unlink()  # missing
    rows = [json.loads(l) for l in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[3]["text"] = "   "  # empty caption
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bad_samples_are_counted_and_skipped(tmp_path):
    folder = make_imagefolder(tmp_path / "f", n=8)
    spoil(folder)
    cfg = data_cfg(source="imagefolder", path=str(folder), on_bad_sample="skip")
    data = build_train_data(cfg, batch_size=8, seed=0, rank=0, world=1, cache_dir="")
    batch = next(iter(data.loader))
    assert set(batch["bad"]) == {"row 1", "row 2", "row 3"}
    assert not {"id-1", "id-2", "id-3"} & set(batch["sample_id"])
    assert len(batch["sample_id"]) == 8  # replaced by good rows: every rank keeps its batch shape


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_bad_sample_error_names_the_sample(tmp_path, fmt):
    folder = make_imagefolder(tmp_path / "f", n=6)
    (folder / "img" / "1.png").write_bytes(b"not a png")
    path = str(folder) if fmt == "imagefolder" else to_shards(folder, tmp_path / "wds", per_shard=6)
    cfg = data_cfg(source=fmt, path=path, on_bad_sample="error")
    with pytest.raises(BadSampleError, match=r"corrupt image .*id-1|corrupt image .*id-1"):
        samples(cfg, 6)


def test_webdataset_skips_bad_samples(tmp_path):
    folder = make_imagefolder(tmp_path / "f", n=6)
    spoil(folder)
    # the spoiled folder is read by the shard writer: recreate the missing file as garbage too
    (folder / "img" / "2.png").write_bytes(b"")
    got, bad = samples(data_cfg(source="webdataset", path=to_shards(folder, tmp_path / "wds", per_shard=6)), 3)
    assert len(bad) == 3 and set(got) == {"id-0", "id-4", "id-5"}


def test_folder_without_captions_is_refused(tmp_path):
    (tmp_path / "f").mkdir()
    from data.datasets import DataError

    with pytest.raises(DataError, match="metadata.jsonl"):
        build_train_data(data_cfg(source="imagefolder", path=str(tmp_path / "f")), batch_size=2, seed=0,
                         rank=0, world=1, cache_dir="")


def test_ranks_partition_each_epoch_and_resume_continues_the_order():
    ranks = [list(islice(iter(EpochBatchSampler(20, 3, r, 2, seed=1, shuffle=True)), 6)) for r in range(2)]
    for epoch in range(2):  # 20 // 6 = 3 batches per rank per epoch
        seen = [i for r in ranks for b in r[3 * epoch:3 * epoch + 3] for i, e, _ in b if e == epoch]
        assert len(seen) == len(set(seen)) == 18
    straight = list(islice(iter(EpochBatchSampler(20, 3, 0, 2, seed=1, shuffle=True)), 5))
    resumed = list(islice(iter(EpochBatchSampler(20, 3, 0, 2, seed=1, shuffle=True, start_epoch=0, start_batch=2)), 3))
    assert resumed == straight[2:]
    other_seed = list(islice(iter(EpochBatchSampler(20, 3, 0, 2, seed=2, shuffle=True)), 5))
    assert other_seed != straight


def test_weighted_epochs_draw_rows_in_proportion_to_their_weights():
    # 12 distinct rows and two images repeated 4 times at weight 1/4: 14 rows per epoch
    weights = torch.tensor([1.0] * 12 + [0.25] * 8)
    batches = list(islice(iter(EpochBatchSampler(20, 7, 0, 1, seed=5, shuffle=True, weights=weights)), 2 * 400))
    epochs = [[i for b in batches[k:k + 2] for i, _, _ in b] for k in range(0, len(batches), 2)]  # 2 per epoch
    assert all(len(e) == len(set(e)) == 14 and set(range(12)) <= set(e) for e in epochs)
    counts = torch.bincount(torch.tensor([i for e in epochs for i in e]), minlength=20) / len(epochs)
    assert counts[:12].tolist() == [1.0] * 12
    assert torch.allclose(counts[12:], torch.full((8,), 0.25), atol=0.06), counts[12:]
    # ranks split each epoch; resume continues it; scaling the weights changes nothing
    ranks = [list(islice(iter(EpochBatchSampler(20, 7, r, 2, seed=5, shuffle=True, weights=weights)), 3))
             for r in range(2)]
    assert sorted(i for r in ranks for i, e, _ in r[0]) == sorted(epochs[0])
    straight = list(islice(iter(EpochBatchSampler(20, 7, 0, 1, seed=5, shuffle=True, weights=weights * 3)), 5))
    resumed = list(islice(iter(EpochBatchSampler(20, 7, 0, 1, seed=5, shuffle=True, weights=weights,
                                                 start_epoch=1, start_batch=1)), 2))
    assert resumed == straight[3:] and [e for _, e, _ in straight[2]] == [1] * 7


@pytest.mark.parametrize("weights, match", [
    (torch.zeros(20), "not all zero"), (torch.ones(19), "20 finite values"),
    (torch.tensor([1.0] * 3 + [0.01] * 17), "fewer than one global batch"),
])
def test_bad_sampling_weights_are_refused(weights, match):
    from data.datasets import DataError

    with pytest.raises(DataError, match=match):
        EpochBatchSampler(20, 7, 0, 1, seed=0, shuffle=True, weights=weights)
    with pytest.raises(DataError, match="shuffle=True"):
        EpochBatchSampler(20, 7, 0, 1, seed=0, shuffle=False, weights=torch.ones(20))


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_resume_continues_the_stream(tmp_path, workers):
    folder = make_imagefolder(tmp_path / "f", n=12)
    cfg = data_cfg(source="webdataset", path=to_shards(folder, tmp_path / "wds", per_shard=3),
                   num_workers=workers, shuffle_buffer=4)
    def ids(position, n):
        data = build_train_data(cfg, batch_size=2, seed=3, rank=0, world=1, cache_dir="", position=position)
        return [b["sample_id"] for b in islice(iter(data.loader), n)]
    straight = ids(DataPosition(), 9)
    assert ids(DataPosition(batches_consumed=5), 4) == straight[5:]
    assert len({s for b in straight[:6] for s in b}) == 12  # the first 6 batches are one pass
