"""The default detector: per-kind logistic heads over the ledger's signals (monitor.detector=heads)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from train.monitor.detection import detection_by_kind
from train.monitor.detector import fit_heads, head_scores, load_heads
from train.monitor.ledger import FlagPolicy, Ledger
from train.monitor.signals import SIGNALS


def test_the_shipped_heads_cover_every_signal_in_any_order():
    kinds, heads = load_heads(SIGNALS)
    assert kinds == ["global", "local"] and heads.shape == (2, 1 + len(SIGNALS))
    _, reordered = load_heads(list(reversed(SIGNALS)))
    np.testing.assert_array_equal(reordered[:, 1:], heads[:, :0:-1])
    _, subset = load_heads(["loss"])  # a run computing one signal gets that signal's coefficient
    assert subset.shape == (2, 2) and subset[0, 1] == heads[0, 1 + SIGNALS.index("loss")]


def test_a_head_file_naming_an_unknown_signal_is_refused(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"signals": ["loss"], "heads": {"g": {"bias": 0, "coef": {"lossy": 1.0}}}}))
    with pytest.raises(ValueError, match="lossy"):
        load_heads(["loss"], path)


def test_the_ledger_scores_a_sample_by_its_largest_head():
    heads = np.array([[0.0, 2.0, 0.0], [-1.0, 0.0, 3.0]], dtype=np.float32)  # bias, loss, be_topk
    ledger = Ledger(4, ["loss", "be_topk"], [1.0, 1.0], FlagPolicy(min_obs=1), heads=heads)
    z = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.2], [np.nan, -1.0]], dtype=np.float32)
    ledger.update(np.arange(4), z, step=1)
    expected = np.maximum(2.0 * np.nan_to_num(z[:, 0]), -1.0 + 3.0 * z[:, 1])
    np.testing.assert_allclose(ledger.score, expected, rtol=1e-3)
    weighted = Ledger(4, ["loss", "be_topk"], [1.0, 1.0], FlagPolicy(min_obs=1))
    weighted.update(np.arange(4), z, step=1)
    assert weighted.score[0] == pytest.approx(0.5)  # the mean, not a head
    assert "head" not in weighted.table().column_names


def test_the_ledger_table_names_the_head_each_score_comes_from():
    """ledger.parquet's ``head`` is the largest head's name and ``head_<name>`` each head's value
    (margin included, as the score); rows not yet scored get neither."""
    heads = np.array([[0.0, 2.0, 0.0], [-1.0, 0.0, 3.0]], dtype=np.float32)
    ledger = Ledger(5, ["loss", "be_topk"], [1.0, 1.0], FlagPolicy(min_obs=1, margin=0.5), heads=heads,
                    head_names=["global", "local"])
    z = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.2], [np.nan, -1.0]], dtype=np.float32)
    ledger.update(np.arange(4), z, step=1)
    table = ledger.table().to_pydict()
    assert table["head"] == ["global", "local", "global", "global", None]
    values = np.array([table["head_global"], table["head_local"]], dtype=np.float64).T
    np.testing.assert_allclose(np.nanmax(values[:4], axis=1), ledger.score[:4], atol=2e-3)  # means kept in fp16
    # margin 0.5 x the head's standard error (|coef| / sqrt(1 observation)); be_topk unseen in row 3
    assert values[1, 1] == pytest.approx(-1.0 + 3.0 - 0.5 * 3.0, abs=1e-3)
    assert values[3, 0] == pytest.approx(0.0, abs=1e-3)
    assert np.isnan(values[4]).all()
    # the W&B table of flagged rows names the head too (Monitor.top_flagged reads only the ledger here)
    from types import SimpleNamespace

    from train.monitor.monitor import Monitor

    ledger.flagged[:] = [True, True, False, False, False]
    rows = Monitor.top_flagged(SimpleNamespace(ledger=ledger, signals=ledger.signals, table=None), 4)
    assert [(r["slot"], r["head"]) for r in rows] == [(0, "global"), (1, "local")]


def test_fitted_heads_find_each_kind_on_rows_they_were_not_fit_on():
    rng = np.random.default_rng(0)

    def rows(n):  # clean: noise; "global": high loss z; "local": high be_topk z and low token entropy z
        labels = np.array(["clean"] * n + ["global"] * (n // 10) + ["local"] * (n // 10))
        x = rng.normal(size=(len(labels), len(SIGNALS)))
        x[labels == "global", SIGNALS.index("loss")] += 2.5
        x[labels == "local", SIGNALS.index("be_topk")] += 2.0
        x[labels == "local", SIGNALS.index("token_entropy")] -= 2.0
        return x, labels

    spec = fit_heads(*rows(2000), SIGNALS, {"global": ["global"], "local": ["local"]})
    heads = np.array([[h["bias"]] + [h["coef"][s] for s in SIGNALS] for h in spec["heads"].values()])
    x, labels = rows(2000)
    result = detection_by_kind(head_scores(heads, x).max(axis=1), labels, "clean", ["global", "local"])
    assert result["global"]["auc"] > 0.9 and result["local"]["auc"] > 0.9
    assert spec["heads"]["local"]["coef"]["token_entropy"] < 0 < spec["heads"]["global"]["coef"]["loss"]


def test_the_calibrated_policy_flags_a_kind_that_is_too_common_for_a_z_score():
    # 30% of the rows fit far too well: against their own population their score is not an outlier
    # (the z-score policy flags none), but the head's probability says each is memorized
    heads = np.array([[-4.0, 4.0]], np.float32)  # one head on one signal: P = 0.5 at z = 1
    z = np.zeros((100, 1), np.float32)
    z[:30] = 2.0
    ledgers = {name: Ledger(100, ["loss"], [1.0], FlagPolicy(policy=name, min_obs=1, raise_at=3.0, clear_at=2.0),
                            heads=heads) for name in ("zscore", "calibrated")}
    for ledger in ledgers.values():
        for step in range(2):
            ledger.update(np.arange(100), z, step)
    assert not ledgers["zscore"].flagged.any()
    assert ledgers["calibrated"].flagged.nonzero()[0].tolist() == list(range(30))
    # hysteresis on the probability scale: P 0.6 keeps a flag (>= 0.5) but does not raise one (< 0.73)
    ledger = ledgers["calibrated"]
    target_mean = (4.0 + np.log(0.6 / 0.4)) / 4.0  # the flagged rows' running mean z at which P = 0.6
    third = np.full((100, 1), 3 * target_mean - 2 * 2.0, np.float32)  # their mean after a third observation
    ledger.update(np.arange(100), third, 2)
    assert ledger.score[0] == pytest.approx(np.log(0.6 / 0.4), abs=1e-2)
    assert ledger.flagged[:30].all() and not ledger.flagged[30:].any()


def test_the_calibrated_policy_needs_the_heads():
    with pytest.raises(ValueError, match="detector=heads"):
        Ledger(10, ["loss"], [1.0], FlagPolicy(policy="calibrated"))


def test_the_margin_asks_more_of_a_row_seen_few_times():
    # one head on one signal, P = 0.73 at mean z 1.25: two rows share that mean, one seen twice and
    # one seen fifty times; a margin of 2 standard errors (2 * 4 / sqrt(n) on the head's scale)
    # keeps the first unflagged, the second flagged once its mean is well estimated
    heads = np.array([[-4.0, 4.0]], np.float32)
    ledger = Ledger(2, ["loss"], [1.0], FlagPolicy(policy="calibrated", min_obs=1, margin=2.0), heads=heads)
    for step in range(50):
        rows = np.array([0, 1]) if step < 2 else np.array([1])
        ledger.update(rows, np.full((len(rows), 1), 2.0, np.float32), step)
    assert ledger.sig_count[:, 0].tolist() == [2, 50]
    assert ledger.score[0] == pytest.approx(-4.0 + 8.0 - 2 * 4.0 / np.sqrt(2), abs=1e-2)
    assert not ledger.flagged[0] and ledger.flagged[1]
    # first flagged when 4 - 8 / sqrt(n) >= 1, i.e. at the 8th observation (step 7), not at the first
    assert ledger.first_flagged_step[1] == 7
    plain = Ledger(2, ["loss"], [1.0], FlagPolicy(policy="calibrated", min_obs=1), heads=heads)
    plain.update(np.array([0, 1]), np.full((2, 1), 2.0, np.float32), 0)
    assert plain.flagged.all()  # without the margin one observation is enough


def test_the_weighted_score_pays_the_margin_by_its_signals_counts():
    ledger = Ledger(1, ["a", "b"], [1.0, 3.0], FlagPolicy(policy="absolute", min_obs=1, margin=1.0))
    ledger.update(np.array([0]), np.array([[1.0, np.nan]], np.float32), 0)  # only "a" observed, once
    assert ledger.score[0] == pytest.approx(1.0 - 1.0)
    ledger.update(np.array([0]), np.array([[1.0, 2.0]], np.float32), 1)  # a: 2 observations, b: 1
    expected = (1.0 * 1.0 + 3.0 * 2.0) / 4.0 - np.sqrt(1.0 / 2 + 9.0 / 1) / 4.0
    assert ledger.score[0] == pytest.approx(expected, abs=1e-3)


def test_recent_flags_a_row_that_turns_late_sooner_than_its_run_mean():
    # one head on the loss z: a row that looked like its peers for 30 observations, then fits far
    # too well; its mean over the run needs many more observations to cross than a moving average
    heads = np.array([[-4.0, 4.0]], np.float32)
    z = [0.0] * 30 + [3.0] * 30
    first = {}
    for recent in (0.0, 0.5):
        ledger = Ledger(1, ["loss"], [1.0], FlagPolicy(policy="calibrated", min_obs=1, margin=1.0, recent=recent),
                        heads=heads)
        for step, value in enumerate(z):
            ledger.update(np.array([0]), np.array([[value]], np.float32), step)
        first[recent] = int(ledger.first_flagged_step[0])
        assert ledger.sig_mean[0, 0] == pytest.approx(1.5, abs=1e-2)  # the mean is kept either way
    # run mean: 3k / (30 + k) - 1 / sqrt(30 + k) >= 1.25 first at the 26th high observation (step 55);
    # moving average: 3 (1 - 0.5^k) - sqrt(1/3) >= 1.25 at the 2nd (step 31)
    assert first == {0.0: 55, 0.5: 31}
    # moving average after k observations of 3 from 0: 3 (1 - 0.5^k); its standard error ~ sqrt(1/3)
    assert ledger.sig_recent[0, 0] == pytest.approx(3.0, abs=1e-2)
    assert "loss_recent" in ledger.table().column_names


def test_a_ledger_saved_without_moving_averages_is_not_resumed_with_them():
    plain = Ledger(2, ["loss"], [1.0], FlagPolicy(min_obs=1))
    plain.update(np.array([0, 1]), np.ones((2, 1), np.float32), 0)
    recent = Ledger(2, ["loss"], [1.0], FlagPolicy(min_obs=1, recent=0.5))
    with pytest.raises(ValueError, match="monitor.flag.recent"):
        recent.load_tensors(plain.state_tensors())
    again = Ledger(2, ["loss"], [1.0], FlagPolicy(min_obs=1, recent=0.5))
    recent.update(np.array([0]), np.full((1, 1), 2.0, np.float32), 0)
    again.load_tensors(recent.state_tensors())
    np.testing.assert_array_equal(again.sig_recent, recent.sig_recent)


def test_monitor_heads_names_a_shipped_set_or_a_file_and_refuses_a_missing_one(tmp_path):
    from train.config import ConfigError, load_config
    from train.monitor.detector import DETECTOR_FILE, heads_file

    assert heads_file(None) == heads_file("default") == DETECTOR_FILE
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"signals": ["loss"], "heads": {"g": {"bias": -1.0, "coef": {"loss": 2.0}}}}))
    assert load_heads(["loss", "be_topk"], heads_file(str(own)))[1].tolist() == [[-1.0, 2.0, 0.0]]
    with pytest.raises(ConfigError, match="monitor.heads='nosuch'.*shipped: default"):
        load_config(overrides=["monitor.heads=nosuch"])
    with pytest.raises(ConfigError, match="missing.json"):
        load_config(overrides=[f"monitor.heads={tmp_path / 'missing.json'}"])


def test_fit_detector_adds_a_head_on_chosen_signals_to_the_shipped_ones(tmp_path):
    """``fit_detector --only ... --one-head NAME --add-to FILE --write OUT`` keeps FILE's heads as they
    are and adds one head fit on the chosen signals alone, for every planted kind; a name that is
    already taken is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from launch.testbed.fit_detector import main as fit_main
    from train.monitor.detector import DETECTOR_FILE

    rng = np.random.default_rng(0)
    groups = np.array(["clean"] * 300 + ["template"] * 40 + ["global"] * 40 + ["heldout"] * 10)
    cols = {"sample_id": [str(i) for i in range(len(groups))], "group": groups.tolist()}
    for s in SIGNALS:
        x = rng.normal(size=len(groups))
        if s == "ref_gain":
            x[groups != "clean"] += 2.0  # every planted kind gains on the reference
        if s == "loss":
            x[groups == "template"] -= 3.0  # a signal the new head must not use
        cols[f"{s}_mean"] = x.tolist()
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.table(cols), run / "ledger.parquet")
    out = tmp_path / "heads.json"
    assert fit_main(["--fit", str(run), "--only", "ref_gain", "--one-head", "reference",
                     "--add-to", str(DETECTOR_FILE), "--write", str(out)]) == 0
    written, shipped = json.loads(out.read_text()), json.loads(DETECTOR_FILE.read_text())
    assert list(written["heads"]) == ["global", "local", "reference"]
    for name in ("global", "local"):
        assert written["heads"][name]["coef"] == shipped["heads"][name]["coef"]
    new = written["heads"]["reference"]
    assert new["coef"]["ref_gain"] > 0.5 and all(new["coef"][s] == 0 for s in SIGNALS if s != "ref_gain")
    assert set(new["positives"]) == {"template", "global"} and new["fit_on"] == [str(run)]
    kinds, heads = load_heads(SIGNALS, out)
    assert kinds == ["global", "local", "reference"] and heads.shape == (3, 1 + len(SIGNALS))
    with pytest.raises(FileNotFoundError, match="nosuch.*shipped: default"):
        fit_main(["--fit", str(run), "--one-head", "x", "--add-to", "nosuch", "--write", str(out)])
    with pytest.raises(SystemExit, match="already has heads"):
        fit_main(["--fit", str(run), "--one-head", "local", "--add-to", str(DETECTOR_FILE), "--write", str(out)])


def test_fit_detector_fits_the_heads_one_names_and_scores_each_kind_by_its_own_head(tmp_path):
    """``--head NAME=KIND,KIND`` fits one head per named set of kinds; the table's "own head AUC"
    scores a kind by the head fit on it, which sees a kind that the largest head drowns; unknown
    or absent kinds, and --head with --one-head, are refused by name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from launch.testbed.fit_detector import main as fit_main

    rng = np.random.default_rng(1)
    groups = np.array(["clean"] * 400 + ["template"] * 40 + ["global"] * 40)
    cols = {"sample_id": [str(i) for i in range(len(groups))], "group": groups.tolist()}
    for s in SIGNALS:
        x = rng.normal(size=len(groups))
        if s == "loss":
            x[groups == "global"] += 4.0
        if s == "start_mass":
            x[groups == "template"] -= 1.0  # weak: the global head's clean tail outranks it in the max
        cols[f"{s}_mean"] = x.tolist()
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.table(cols), run / "ledger.parquet")
    out, table = tmp_path / "heads.json", tmp_path / "table.md"
    assert fit_main(["--fit", str(run), "--head", "whole=global", "--head", "cards=template",
                     "--write", str(out), "--out", str(table)]) == 0
    heads = json.loads(out.read_text())["heads"]
    assert list(heads) == ["whole", "cards"]
    assert heads["whole"]["positives"] == ["global"] and heads["cards"]["positives"] == ["template"]
    assert heads["whole"]["coef"]["loss"] > 1.0 and heads["cards"]["coef"]["start_mass"] < -0.3
    rows = {line.split("|")[3].strip(): line.split("|") for line in table.read_text().splitlines()[2:]}
    max_auc, own_auc = float(rows["template"][4]), float(rows["template"][7])
    assert own_auc > 0.7 and own_auc > max_auc
    assert float(rows["global"][7]) > 0.95
    with pytest.raises(SystemExit, match="unknown kinds \\['logo'\\]"):
        fit_main(["--fit", str(run), "--head", "x=logo"])
    with pytest.raises(SystemExit, match="no rows of \\['moving_local'\\]"):
        fit_main(["--fit", str(run), "--head", "x=moving_local"])
    with pytest.raises(SystemExit, match="--one-head and --head"):
        fit_main(["--fit", str(run), "--head", "x=global", "--one-head", "y"])
    with pytest.raises(SystemExit, match="--head names \\['x'\\] more than once"):
        fit_main(["--fit", str(run), "--head", "x=global", "--head", "x=template"])


def test_the_trend_rule_flags_a_row_learnt_faster_than_before_and_not_one_that_always_stood_out():
    # the score's own flags off (policy none): only the trend of the loss z flags. Three
    # rows: one like its peers for 20 observations and then fitting far better, one that fit that
    # well from the start (its level stands out, its trajectory does not), one flat
    policy = FlagPolicy(policy="none", min_obs=1, trend_signal="loss", trend_decay=0.8, trend_raise_at=1.645,
                        trend_persist=3)
    ledger = Ledger(3, ["loss"], [1.0], policy)
    for step in range(30):
        z = np.array([[2.5 if step >= 20 else 0.0], [2.5], [0.0]], np.float32)
        ledger.update(np.arange(3), z, step)
    # the rising row's trend (moving average less mean) over its standard error (0.254 at n = 21, 22):
    # step 20 (0.5 - 2.5 / 21) / 0.254 = 1.50, under the bar; step 21 (0.9 - 5 / 22) / 0.254 = 2.65, and
    # it stays over, so the third in a row (step 23) flags it
    assert ledger.first_flagged_step.tolist() == [23, -1, -1]
    table = ledger.table()
    assert table["trend_streak"].to_pylist()[0] == 9 and table["loss_trend_z"].to_pylist()[0] > 1.645
    with pytest.raises(ValueError, match="trend_signal=magnitude"):
        Ledger(3, ["loss"], [1.0], FlagPolicy(trend_signal="magnitude"))


def test_the_trend_z_has_unit_spread_for_rows_like_their_peers():
    # i.i.d. unit z: the trend (moving average from 0 less the run mean) over its standard error
    # must have unit spread at every count, or the bar would mean another false-alarm rate early
    policy = FlagPolicy(policy="absolute", min_obs=1, trend_signal="loss", trend_decay=0.8)
    ledger = Ledger(20000, ["loss"], [1.0], policy)
    rng = np.random.default_rng(0)
    for step in range(12):
        ledger.update(np.arange(20000), rng.normal(size=(20000, 1)).astype(np.float32), step)
        if step in (1, 3, 11):
            tz = ledger.table()["loss_trend_z"].to_numpy()
            assert abs(tz.std() - 1.0) < 0.05 and abs(tz.mean()) < 0.05, (step, tz.std(), tz.mean())


def test_a_ledger_saved_without_the_trend_rule_is_not_resumed_with_it():
    plain = Ledger(2, ["loss"], [1.0], FlagPolicy(min_obs=1))
    plain.update(np.array([0, 1]), np.ones((2, 1), np.float32), 0)
    trend = FlagPolicy(min_obs=1, trend_signal="loss")
    with pytest.raises(ValueError, match="trend_signal"):
        Ledger(2, ["loss"], [1.0], trend).load_tensors(plain.state_tensors())
    kept = Ledger(2, ["loss"], [1.0], trend)
    for step in range(3):
        kept.update(np.array([0]), np.full((1, 1), 2.0, np.float32), step)
    again = Ledger(2, ["loss"], [1.0], trend)
    again.load_tensors(kept.state_tensors())
    np.testing.assert_array_equal(again.trend_recent, kept.trend_recent)
    np.testing.assert_array_equal(again.trend_streak, kept.trend_streak)
