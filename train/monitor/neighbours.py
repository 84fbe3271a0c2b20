"""How many near-duplicates of each row has the run seen? An online count from a compact embedding.

A row whose picture recurs in the data is memorized first (Carlini et al.; Somepalli et al.), and
the count is known from the first epoch, long before a copy can be generated. De-duplication
before training (:mod:`train.mitigate.dedup`) needs the whole data set up front; this count is
built while training, so it also works on streamed data.

* Embedding (:func:`embed`): the VAE posterior mean the step already computed, average-pooled to
  ``side`` x ``side`` cells, centred and L2-normalised: ``channels * side**2`` numbers (256 for SD's
  4 latent channels at the default side 8). It finds exact and near-exact repeats; crops, shifts
  and rotations move it as far as a different picture (docs/detection.md measures which kinds it
  groups).
* Or (``embedding: sscd-onnx`` / ``sscd-torchscript``, :class:`SSCDEmbedder`) the SSCD
  copy-detection descriptor of the training image (512 numbers), which a crop, turn, recolour or
  re-encoding moves much less than a change of picture. It costs one descriptor per row, computed
  at the row's first sighting only (a map-style data set; a streamed one embeds every row it
  reads): an int8 ResNet-50 at 224 px through onnxruntime on the CPU, or a TorchScript SSCD file
  on the training device (docs/detection.md says what it costs).
* Index (:class:`NeighbourIndex`): a row's embedding is stored at its first sighting, compared by
  cosine with every row stored so far, and each pair at or above ``threshold`` raises both rows'
  counts, so ``count[i]`` is the number of distinct seen rows that look like row i. The exact
  search is a matrix product over the stored float32 rows (``4 * dim`` bytes a row: 1 GB at 1M
  rows of dim 256). ``backend: faiss`` keeps the rows in a faiss index built from
  ``faiss_index`` (faiss's index_factory string): ``Flat`` searches every row exactly (the same
  bytes, faster), an inverted file with 8-bit codes (``IVF65536,SQ8``: ``dim`` bytes a row, each
  query scans the ``faiss_nprobe`` nearest of the lists) is what holds 100M rows. A compressed
  index must be trained: the first ``faiss_train_rows`` rows are kept as float32 and searched
  exactly, then train it, move into it and leave the float32 copy behind. ``faiss_index`` may also
  name an index file trained beforehand (docs/detection.md measures recall and cost, and why a
  100M-row index is best trained that way).

Every rank holds the same index and updates it with the gathered batch in the same order, like the
ledger, so all ranks agree on the counts without another collective (a trained faiss index too:
faiss's k-means is seeded, so ranks on like machines train the same lists).

The look-alike pairs also join rows into groups (union-find over slots: a group is every row
linked to another by a chain of look-alikes), so a flag-driven mitigation can act on the whole
group of a flagged row (``mitigate.weights.mode: group``): the online counterpart of the
de-duplication pre-pass, acting only once the monitor says the group is being memorized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def embed(latents: torch.Tensor, side: int = 8) -> torch.Tensor:
    """[B, C * side**2] unit vectors from [B, C, h, w] latents."""
    pooled = F.adaptive_avg_pool2d(latents.detach().float(), side).flatten(1)
    pooled = pooled - pooled.mean(dim=1, keepdim=True)
    return F.normalize(pooled, dim=1)


class NeighbourIndex:
    """Per slot: the count of other stored slots within ``threshold``. The stored embeddings (first
    sighting of each slot) live in a faiss index (``backend="faiss"``) or, for the exact backend and
    while a compressed faiss index waits for its training rows, in an append-only float32 matrix
    whose row ``k`` is slot ``order[k]``."""

    def __init__(self, dim: int, threshold: float, capacity: int = 1024, backend: str = "exact",
                 faiss_index: str = "Flat", faiss_nprobe: int = 32, faiss_train_rows: int = 100_000):
        if backend not in ("exact", "faiss"):
            raise ValueError(f"neighbour backend must be exact or faiss, got {backend!r}")
        if backend == "exact" and faiss_index != "Flat":
            raise ValueError(f"monitor.neighbours.faiss_index={faiss_index!r} needs monitor.neighbours.backend=faiss")
        self.dim, self.threshold, self.backend = dim, float(threshold), backend
        self.faiss_nprobe, self.faiss_train_rows = faiss_nprobe, faiss_train_rows
        rows = capacity if backend == "exact" else 0  # faiss holds the rows (a compressed one after training)
        self.matrix = np.zeros((rows, dim), np.float32)
        self.order = np.zeros(rows, np.int64)
        self.buffered = 0  # rows of ``matrix`` in use
        self.stored = np.zeros(capacity, bool)  # by slot
        self.count = np.zeros(capacity, np.int32)  # by slot
        self.parent = np.arange(capacity, dtype=np.int64)  # by slot: union-find of look-alike groups
        self.members = np.ones(capacity, np.int32)  # by root: rows in the group
        self.group_flagged = np.zeros(capacity, bool)  # by root: a member was flagged
        self._faiss = self._new_faiss_index(faiss_index) if backend == "faiss" else None

    @property
    def size(self) -> int:
        """Rows stored."""
        return self.buffered + (self._faiss.ntotal if self._faiss is not None else 0)

    @staticmethod
    def _grown(array: np.ndarray, capacity: int) -> np.ndarray:
        new = np.zeros((capacity,) + array.shape[1:], array.dtype)
        new[: len(array)] = array
        return new

    def _new_faiss_index(self, factory: str):
        """From an index_factory string, or from a faiss index file trained beforehand (an IVF's lists
        trained with faiss-gpu on a sample of the data, say: no rows wait for training then)."""
        faiss = _import_faiss()
        if Path(factory).is_file():
            try:
                index = faiss.read_index(factory)
            except RuntimeError as exc:
                raise ValueError(f"monitor.neighbours.faiss_index={factory!r} is not a readable faiss index file "
                                 f"({str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from exc
            if index.d != self.dim or index.metric_type != faiss.METRIC_INNER_PRODUCT or index.ntotal:
                raise ValueError(f"monitor.neighbours.faiss_index={factory!r}: expected an empty inner-product "
                                 f"index of {self.dim} numbers a row, the file holds one of {index.d} numbers, "
                                 f"metric {index.metric_type}, {index.ntotal} rows")
            return self._with_ids(index)
        try:
            index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"monitor.neighbours.faiss_index={factory!r} is neither a faiss index_factory "
                             "string nor an index file") from exc
        return self._with_ids(index)

    def _with_ids(self, index):
        faiss = _import_faiss()
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = self.faiss_nprobe
        codes = faiss.downcast_index(ivf if ivf is not None else index)
        if isinstance(codes, (faiss.IndexIVFScalarQuantizer, faiss.IndexScalarQuantizer)) and not codes.is_trained:
            # the codes' range is read off the first rows only: widen it by a tenth on each side
            # so later rows are not clipped (a clipped twin can fall below the threshold)
            codes.sq.rangestat_arg = 0.1
        # an inverted file stores the slots itself; others need the id map
        return index if ivf is not None or isinstance(index, faiss.IndexIDMap) else faiss.IndexIDMap(index)

    def _search(self, queries: np.ndarray) -> list[np.ndarray]:
        """For each query, the stored slots within the threshold (in the faiss index and the float32 rows)."""
        hits = [np.zeros(0, np.int64) for _ in queries]
        if self._faiss is not None and self._faiss.ntotal:
            lims, _, ids = self._faiss.range_search(queries, self.threshold)
            hits = [ids[lims[i]:lims[i + 1]].astype(np.int64) for i in range(len(queries))]
        if self.buffered:
            sims = torch.from_numpy(queries) @ torch.from_numpy(self.matrix[: self.buffered]).T
            hits = [np.concatenate([h, self.order[: self.buffered][row.numpy()]])
                    for h, row in zip(hits, sims >= self.threshold)]
        return hits

    def add(self, slots: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Store the slots seen for the first time and count them against everything stored and
        each other; return every given slot's count."""
        slots, vectors = np.asarray(slots, np.int64), np.asarray(vectors, np.float32)
        if len(slots) and slots.max() >= len(self.stored):
            self._grow_slots(max(2 * len(self.stored), int(slots.max()) + 1))
        _, first = np.unique(slots, return_index=True)  # a stream may repeat a sample in one batch
        new = np.sort(first[~self.stored[slots[first]]])
        if len(new):
            new_slots, queries = slots[new], vectors[new]
            for slot, hits in zip(new_slots, self._search(queries)):
                np.add.at(self.count, hits, 1)
                self.count[slot] += len(hits)
                for hit in hits.tolist():
                    self._union(int(slot), hit)
            close = np.triu((queries @ queries.T) >= self.threshold, k=1)  # pairs inside this batch
            i, j = np.nonzero(close)
            np.add.at(self.count, new_slots[i], 1)
            np.add.at(self.count, new_slots[j], 1)
            for a, b in zip(new_slots[i].tolist(), new_slots[j].tolist()):
                self._union(a, b)
            self._store(new_slots, queries)
            self.stored[new_slots] = True
        return self.count[slots]

    def _store(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        if self._faiss is not None and self._faiss.is_trained:
            self._faiss.add_with_ids(vectors, slots)
            return
        if self.buffered + len(slots) > len(self.matrix):
            capacity = max(2 * len(self.matrix), self.buffered + len(slots))
            self.matrix, self.order = self._grown(self.matrix, capacity), self._grown(self.order, capacity)
        self.matrix[self.buffered:self.buffered + len(slots)] = vectors
        self.order[self.buffered:self.buffered + len(slots)] = slots
        self.buffered += len(slots)
        if self._faiss is not None and self.buffered >= self.faiss_train_rows:
            self._faiss.train(self.matrix[: self.buffered])
            self._move_buffer_to_faiss()

    def _move_buffer_to_faiss(self) -> None:
        self._faiss.add_with_ids(self.matrix[: self.buffered], self.order[: self.buffered])
        self.matrix, self.order = np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        self.buffered = 0

    def _grow_slots(self, capacity: int) -> None:
        old = len(self.stored)
        self.stored, self.count = self._grown(self.stored, capacity), self._grown(self.count, capacity)
        self.members, self.group_flagged = self._grown(self.members, capacity), self._grown(self.group_flagged, capacity)
        self.members[old:] = 1
        self.parent = np.concatenate([self.parent, np.arange(old, capacity, dtype=np.int64)])

    def roots(self) -> np.ndarray:
        """Per slot, the slot that stands for its look-alike group (itself when it has none); read
        only (pointer jumping over a copy of the links, no Python loop over the rows)."""
        roots = self.parent.copy()
        while True:
            up = roots[roots]
            if np.array_equal(up, roots):
                return roots
            roots = up

    def _find(self, slot: int) -> int:
        root = slot
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[slot] != root:  # path compression
            self.parent[slot], slot = root, int(self.parent[slot])
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if self.members[ra] < self.members[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra] += self.members[rb]
        self.group_flagged[ra] |= self.group_flagged[rb]

    def mark_flagged(self, slots: np.ndarray) -> None:
        """Remember that these slots' groups hold a flagged row (for good: the group stays marked)."""
        for slot in np.asarray(slots, np.int64).tolist():
            if slot < len(self.stored):
                self.group_flagged[self._find(slot)] = True

    def group_weights(self, slots: np.ndarray) -> np.ndarray:
        """Per slot: 1 / (rows in its group) when its group holds a flagged row, else 1; so a
        flagged group weighs as much as one row, and an unflagged one is left alone."""
        out = np.ones(len(slots), np.float32)
        for i, slot in enumerate(np.asarray(slots, np.int64).tolist()):
            if 0 <= slot < len(self.stored):
                root = self._find(slot)
                if self.group_flagged[root]:
                    out[i] = 1.0 / self.members[root]
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"matrix": torch.from_numpy(self.matrix[: self.buffered].copy()),
               "order": torch.from_numpy(self.order[: self.buffered].copy()), "count": torch.from_numpy(self.count.copy()),
               "parent": torch.from_numpy(self.parent.copy()), "members": torch.from_numpy(self.members.copy()),
               "group_flagged": torch.from_numpy(self.group_flagged.copy()),
               "stored": torch.from_numpy(self.stored.copy())}
        if self._faiss is not None:
            out["faiss"] = torch.from_numpy(_import_faiss().serialize_index(self._faiss))
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "faiss" in tensors and self._faiss is None:
            raise ValueError("the checkpoint's neighbour index is a faiss index: resume with "
                             "monitor.neighbours.backend=faiss")
        self.matrix, self.order = tensors["matrix"].numpy().copy(), tensors["order"].numpy().copy()
        self.buffered = len(self.order)
        self.count = tensors["count"].numpy().astype(np.int32)
        n = len(self.count)  # a checkpoint from before groups existed: every row its own group
        self.parent = tensors["parent"].numpy().copy() if "parent" in tensors else np.arange(n, dtype=np.int64)
        self.members = tensors["members"].numpy().copy() if "members" in tensors else np.ones(n, np.int32)
        self.group_flagged = tensors["group_flagged"].numpy().copy() if "group_flagged" in tensors else np.zeros(n, bool)
        if "stored" in tensors:
            self.stored = tensors["stored"].numpy().copy()
        else:  # a checkpoint from before the faiss index was saved held every row as float32
            self.stored = np.zeros(n, bool)
            self.stored[self.order] = True
        if self._faiss is not None:
            if "faiss" in tensors:  # the checkpoint's index (its lists and codes) replaces the fresh one
                self._faiss = self._with_ids(_import_faiss().deserialize_index(tensors["faiss"].numpy()))
            if self.buffered and self._faiss.is_trained:  # float32 rows from an exact-backend checkpoint
                self._move_buffer_to_faiss()

    def nbytes(self) -> int:
        """Memory held: the float32 rows, the faiss index (its serialized size: codes, slots, lists)
        and the per-slot counts, flags and group links."""
        held = sum(a.nbytes for a in (self.matrix, self.order, self.stored, self.count, self.parent,
                                      self.members, self.group_flagged))
        if self._faiss is not None:
            held += len(_import_faiss().serialize_index(self._faiss))
        return held


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("monitor.neighbours.backend=faiss needs faiss-cpu or faiss-gpu "
                          "(pip install 'copyguard[neighbours]')") from exc
    return faiss


def neighbour_signal(counts: np.ndarray) -> torch.Tensor:
    """The ledger's ``neighbours`` signal: log(1 + count) (a row seen with 24 look-alikes is not
    24 times as suspicious as one with a single twin)."""
    return torch.from_numpy(np.log1p(np.asarray(counts, np.float64)))


class SSCDEmbedder:
    """SSCD descriptors of a batch's training images (``pixel_values`` in [-1, 1], [B, 3, H, W]);
    rows marked as already stored get zeros (the index reads a row's vector at its first sighting only)."""

    def __init__(self, embedding: str, model_path: Optional[str], device: str | torch.device = "cpu",
                 section: str = "monitor.neighbours"):
        from train.sscd import load_sscd

        kind = embedding.removeprefix("sscd-")
        if kind == "torchscript" and not model_path:  # ``section``: the config keys to name in the error
            raise ValueError(f"{section}.embedding=sscd-torchscript needs {section}.sscd_model (the TorchScript file)")
        self.model = load_sscd(kind, model_path, device)
        self.dim = self.model.features(np.zeros((1, 32, 32, 3), np.float32)).shape[1]

    def __call__(self, pixel_values: torch.Tensor, stored: np.ndarray) -> torch.Tensor:
        out = torch.zeros(len(pixel_values), self.dim, dtype=torch.float32)
        todo = np.flatnonzero(~stored)
        if len(todo):
            images = ((pixel_values[torch.from_numpy(todo).to(pixel_values.device)].detach().float() + 1) / 2)
            features = self.model.features(images.permute(0, 2, 3, 1).cpu().numpy())
            out[torch.from_numpy(todo)] = torch.from_numpy(features)
        return out


def make_index(cfg, latent_channels: int, device: str | torch.device = "cpu"
               ) -> tuple[Optional[NeighbourIndex], Optional[SSCDEmbedder]]:
    """The monitor's index when ``neighbours`` is among its signals (None otherwise), and the SSCD
    embedder when the index holds SSCD descriptors (None: pooled latents; a TorchScript SSCD runs
    on ``device``)."""
    if "neighbours" not in cfg.signals:
        return None, None
    n = cfg.neighbours
    embedder = SSCDEmbedder(n.embedding, n.sscd_model, device) if n.embedding != "latent" else None
    dim = embedder.dim if embedder is not None else latent_channels * n.side ** 2
    return NeighbourIndex(dim, n.threshold, backend=n.backend, faiss_index=n.faiss_index,
                          faiss_nprobe=n.faiss_nprobe, faiss_train_rows=n.faiss_train_rows), embedder
