"""When did each training sample's copy appear? ``onset.parquet``, kept across the run's evals.

With ``eval.onset: true`` on data with ground-truth columns (``group``, ``source_id``: the
memorization testbed), every eval hook probes the same training captions (a seeded draw,
stratified by ``eval.stratify_column``; the monitor's flags do not choose them, so the ground truth
does not depend on the detector it is there to judge), scores them against the ground truth
(:mod:`train.evaluate.truth`) and records, per probed sample, the first step at which one of its
generations was a replica (whole image) or a local replica (its masked region). A flag raised
before that step predicted the copy; the lead time is the difference.

The truth thresholds are calibrated per eval on that eval's clean-row generations (5% quantile),
so a clean row's onset measures how far it stands out from the other clean rows at that step, not
an absolute copy: read the planted rows' onsets as the result and the clean rows' as the noise floor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from train.util import write_atomic

ONSET_FILE = "onset.parquet"
COLUMNS = ("sample_id", "group", "first_replica_step", "first_local_replica_step", "checks", "last_step")


class OnsetTable:
    """Per probed sample: its ground-truth group, the first replica / local-replica step (-1 = not
    yet), how many evals probed it and the last step that did. Reloaded on resume."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            import pyarrow.parquet as pq

            for row in pq.read_table(self.path).to_pylist():
                self.rows[str(row["sample_id"])] = {k: row[k] for k in COLUMNS}

    def update(self, step: int, records: Iterable[dict]) -> int:
        """Fold one eval's judged records in (any seed's replica counts); returns the samples seen."""
        seen: dict[str, dict] = {}
        for record in records:
            truth, sample_id = record.get("truth"), record.get("sample_id")
            if not truth or sample_id is None or "replica" not in truth:
                continue
            now = seen.setdefault(str(sample_id), {"group": truth["group"], "replica": False, "local": False})
            now["replica"] |= bool(truth["replica"])
            now["local"] |= bool(truth["local_replica"])
        for sample_id, now in seen.items():
            row = self.rows.setdefault(sample_id, {"sample_id": sample_id, "group": now["group"],
                                                   "first_replica_step": -1, "first_local_replica_step": -1,
                                                   "checks": 0, "last_step": -1})
            if step <= row["last_step"]:
                continue  # a resumed run repeating an eval it already recorded
            for key, hit in (("first_replica_step", now["replica"]), ("first_local_replica_step", now["local"])):
                if hit and row[key] < 0:
                    row[key] = int(step)
            row["checks"] += 1
            row["last_step"] = int(step)
        return len(seen)

    def write(self) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: [row[k] for row in self.rows.values()] for k in COLUMNS},
                         schema=pa.schema([("sample_id", pa.string()), ("group", pa.string()),
                                           ("first_replica_step", pa.int64()), ("first_local_replica_step", pa.int64()),
                                           ("checks", pa.int64()), ("last_step", pa.int64())]))
        return write_atomic(self.path, lambda tmp: pq.write_table(table, tmp))
