"""Did the monitor flag a row before its copy appeared? Lead time per planted kind.

``python -m launch.testbed.lead_time --run RUN [--out FILE.md]``

Reads ``RUN/ledger.parquet`` (``first_flagged_step`` per row) and ``RUN/onset.parquet`` (written
by a run with ``eval.onset: true``: the first eval step at which the row's prompt gave a replica,
:mod:`train.evaluate.onset`) and reports, per ground-truth group, over the probed rows:

* rows that became copies (whole-image replicas for global / near_global / caption_dup and clean
  rows, local replicas for local / template / moving_local), the share of them flagged strictly
  before their onset step and the median lead (onset - first flag, in optimizer steps);
* rows that never did: the share the monitor flagged anyway (false flags).

Onset is known to within ``eval.every`` steps (the copy appeared after the previous eval), so a
lead shorter than that may be a tie.

Each signal's own lead time, when the run kept ledger snapshots (``monitor.history_every=K``,
``RUN/ledger_history/``): at every snapshot a signal "alerts" on a row when the row's mean z is
above the ``1 - --false-alarm`` quantile of the clean rows' at that snapshot (each signal held to
the same per-snapshot false-alarm rate, so they compare fairly; the heads' score alike); a row's
alert step is the first snapshot that alerts (with ``--persist K``, the K-th of K in a row).
Reported per signal and kind as above, with the share of never-copied probed clean rows that
alerted at some snapshot. ``--trend DECAY`` adds each signal's trend: its moving average (that
decay per observation) less its run mean; for the loss, the trajectory (how fast a row is being
learnt relative to its peers) rather than its level.

``--replay-margins`` / ``--replay-recent`` replay the flags on those snapshots under other settings
of ``monitor.flag.margin`` and ``monitor.flag.recent`` (:func:`replay_flags`), and ``--replay-trend
SIGNAL`` with the trend rule of ``monitor.flag.trend_*`` added (``--replay-trend-bars`` /
``--replay-trend-persist`` / ``--replay-trend-decay``; alone, too, with the score's flags off): per kind, the rows
flagged at any time, in the first six snapshots and at the end, and with onset probes the lead time;
a run without onset probes gets the flag rates alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from launch.testbed.reading import emit_table
from train.evaluate.onset import ONSET_FILE
from train.evaluate.truth import REGION_KINDS


def lead_times(ledger: dict[str, int], onset: list[dict]) -> dict[str, dict]:
    """``ledger``: sample_id -> first flagged step (-1 = never); ``onset``: onset.parquet's rows."""
    out: dict[str, dict] = {}
    for group in sorted({r["group"] for r in onset}):
        rows = [r for r in onset if r["group"] == group]
        key = "first_local_replica_step" if group in REGION_KINDS else "first_replica_step"
        copied = [r for r in rows if r[key] >= 0]
        never = [r for r in rows if r[key] < 0]
        flags = [ledger.get(str(r["sample_id"]), -1) for r in copied]
        before = [r[key] - f for r, f in zip(copied, flags) if 0 <= f < r[key]]
        false_flags = [ledger.get(str(r["sample_id"]), -1) >= 0 for r in never]
        out[group] = {"probed": len(rows), "copied": len(copied),
                      "flagged_before_onset": len(before) / len(copied) if copied else None,
                      "median_lead_steps": float(np.median(before)) if before else None,
                      "median_onset_step": float(np.median([r[key] for r in copied])) if copied else None,
                      "never_copied": len(never),
                      "false_flag_rate": float(np.mean(false_flags)) if never else None}
    return out


def alert_steps(history: dict[int, dict], column: str, false_alarm: float, persist: int = 1) -> dict[str, int]:
    """``history``: snapshot step -> ledger columns (``sample_id``, ``group``, ``observations``,
    ``column``); per sample id, the first step whose value has beaten the clean rows' ``1 - false_alarm``
    quantile at ``persist`` snapshots in a row (-1 = never): a noisy signal crosses the bar now and
    then on any row, a row being memorized stays over it."""
    first: dict[str, int] = {}
    streak: dict[str, int] = {}
    for step in sorted(history):
        cols = history[step]
        values = np.asarray(cols[column], dtype=np.float64)
        seen = (np.asarray(cols["observations"]) > 0) & np.isfinite(values)
        clean = seen & (np.asarray(cols["group"]) == "clean")
        if not clean.any():
            continue
        over = seen & (values > np.quantile(values[clean], 1.0 - false_alarm))
        for sample_id, above in zip(np.asarray(cols["sample_id"]), over):
            streak[str(sample_id)] = streak.get(str(sample_id), 0) + 1 if above else 0
            if streak[str(sample_id)] >= persist:
                first.setdefault(str(sample_id), step)
    return {str(i): first.get(str(i), -1) for step in history for i in history[step]["sample_id"]}


def replay_flags(history: dict[int, dict], signals: list[str], policy, run_recent: float = 0.0,
                 heads: str | None = None) -> tuple[dict[str, int], dict[str, bool]]:
    """The flags a run would have raised under another ``policy`` (a :class:`FlagPolicy`: another
    ``margin`` or ``recent``), replayed on its ledger snapshots with the run's heads (``heads``: its
    ``monitor.heads``): each snapshot's per-signal z re-scored, hysteresis carried from one snapshot to the next. A flag that
    rose and fell between two snapshots is missed, so snapshots at most an epoch apart see every update.

    The flags read the means, or with ``policy.recent`` the moving averages: the snapshots' own
    ``<signal>_recent`` columns when the run kept them with that decay (``run_recent``), otherwise
    rebuilt from the means (:func:`moving_averages`).
    Returns (sample id -> first flagged snapshot step, -1 = never; sample id -> flagged at the last)."""
    from train.monitor.detector import heads_file, load_heads
    from train.monitor.ledger import Ledger

    _, heads = load_heads(signals, heads_file(heads))
    d = policy.recent
    own = d > 0 and d == run_recent
    ledger = Ledger(1, signals, [1.0] * len(signals), policy, heads=heads)  # its scores, thresholds, trend rule
    on, off = ledger.thresholds()  # calibrated / absolute: fixed, not read off the population
    first: dict[str, int] = {}
    flagged: dict[str, bool] = {}
    rebuilt = moving_averages(history, signals, d) if d > 0 and not own else {}
    trend = policy.trend_signal
    trend_recent = moving_averages(history, [trend], policy.trend_decay) if trend else {}
    streak, before = None, None
    for step in sorted(history):
        cols = history[step]
        ids = [str(i) for i in cols["sample_id"]]
        count = _stacked(cols, signals, "count")
        z = rebuilt[step] if rebuilt else _stacked(cols, signals, "recent" if own else "mean")
        score, observed = ledger.scores(z, count)
        eligible = observed & (np.asarray(cols["observations"]) >= policy.min_obs)
        rising = np.zeros(len(ids), bool)
        if trend:  # the trend rule, its streak advanced on the rows seen since the last snapshot
            n = _stacked(cols, [trend], "count")[:, 0]
            streak = np.zeros(len(ids), np.uint8) if streak is None else streak
            new_obs = n > (0 if before is None else before)
            tz = ledger.trend_z(trend_recent[step][:, 0], _stacked(cols, [trend], "mean")[:, 0], n)
            streak, rising = ledger.trend_step(streak, tz, new_obs)
            rising &= np.asarray(cols["observations"]) >= policy.min_obs
            before = n
        for i, sample_id in enumerate(ids):
            now = bool(rising[i] or (eligible[i] and score[i] >= (off if flagged.get(sample_id) else on)))
            flagged[sample_id] = now
            if now:
                first.setdefault(sample_id, step)
    return {i: first.get(i, -1) for i in flagged}, flagged


def _stacked(cols: dict, signals: list[str], field: str) -> np.ndarray:
    """[N, S]: the snapshot's ``<signal>_<field>`` columns, NaN as 0 (the population's average z)."""
    return np.stack([np.nan_to_num(np.asarray(cols[f"{s}_{field}"], np.float64)) for s in signals], axis=1)


def moving_averages(history: dict[int, dict], signals: list[str], decay: float) -> dict[int, np.ndarray]:
    """Per snapshot step, [N, S] moving averages of each row's z (decay ``decay`` per observation,
    started at 0), rebuilt from the change of each mean between snapshots: the new observations'
    mean folded in with weight 1 - decay^k for k new observations (exact for one new observation per
    snapshot, which snapshots an epoch or less apart give nearly always; the means are half precision)."""
    out: dict[int, np.ndarray] = {}
    before_sum = before_count = recent = None
    for step in sorted(history):
        mean, count = _stacked(history[step], signals, "mean"), _stacked(history[step], signals, "count")
        total = mean * count
        if recent is None:
            before_sum, before_count, recent = np.zeros_like(total), np.zeros_like(count), np.zeros_like(total)
        new = count - before_count
        keep = decay ** new
        recent = np.where(new > 0, keep * recent + (1 - keep) * (total - before_sum) / np.maximum(new, 1), recent)
        before_sum, before_count = total, count
        out[step] = recent
    return out


def add_trends(history: dict[int, dict], signals: list[str], decay: float, label: str = "") -> list[str]:
    """Add ``<signal>_trend<label>`` columns to every snapshot: the moving average (``decay``) less the
    run mean, so a row whose z has lately risen above its own average stands out (how fast it is
    being learnt relative to its peers, not how far). Returns the new column names."""
    names = [f"{s}_trend{label}" for s in signals]
    for step, recent in moving_averages(history, signals, decay).items():
        cols = history[step]
        seen = _stacked(cols, signals, "count") > 0
        trend = np.where(seen, recent - _stacked(cols, signals, "mean"), np.nan)
        for j, name in enumerate(names):
            cols[name] = trend[:, j]
    return names


def fmt(value, pct: bool = False) -> str:
    return "—" if value is None else f"{100 * value:.0f}%" if pct else f"{value:.0f}"


def read_history(folder: Path, columns: list[str]) -> dict[int, dict]:
    import pyarrow.parquet as pq

    return {int(f.stem.split("-")[1]): pq.read_table(f, columns=columns).to_pydict()
            for f in sorted(folder.glob("step-*.parquet"))}


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    p = argparse.ArgumentParser(prog="python -m launch.testbed.lead_time", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run folder with ledger.parquet and onset.parquet")
    p.add_argument("--out", help="also write the table here")
    p.add_argument("--false-alarm", type=float, default=0.05,
                   help="per-snapshot share of clean rows a signal may alert on (per-signal lead times)")
    p.add_argument("--replay-margins", type=float, nargs="*", default=[],
                   help="replay the flags on the ledger snapshots with these margins (monitor.flag.margin)")
    p.add_argument("--replay-recent", type=float, nargs="*", default=[],
                   help="... and these moving-average decays (monitor.flag.recent; 0 = the run mean); "
                        "without onset.parquet only the flag rates are reported")
    p.add_argument("--replay-trend", help="replay with the trend rule on this signal (monitor.flag.trend_signal)")
    p.add_argument("--replay-trend-bars", type=float, nargs="+", default=[1.645],
                   help="... at these bars (monitor.flag.trend_raise_at)")
    p.add_argument("--replay-trend-persist", type=int, nargs="+", default=[3],
                   help="... and these streaks (monitor.flag.trend_persist)")
    p.add_argument("--replay-trend-decay", type=float, default=0.8, help="... (monitor.flag.trend_decay)")
    p.add_argument("--persist", type=int, default=1,
                   help="per-signal lead times: a signal alerts once it is over the bar at this many snapshots in a row")
    p.add_argument("--trend", type=float, nargs="*", default=[],
                   help="also each signal's trend at these moving-average decays: the moving average of a "
                        "row's z less its run mean (how fast it is being learnt relative to its peers)")
    a = p.parse_args(argv)
    if a.persist < 1:
        p.error(f"--persist must be >= 1, got {a.persist}")
    if any(not 0 < d < 1 for d in a.trend):
        p.error(f"--trend decays must be in (0, 1), got {a.trend}")
    if a.replay_trend is not None:  # the bounds of monitor.flag.trend_*, named by their options here
        if not 0 < a.replay_trend_decay < 1:
            p.error(f"--replay-trend-decay must be in (0, 1), got {a.replay_trend_decay}")
        if any(not 1 <= k <= 255 for k in a.replay_trend_persist):
            p.error(f"--replay-trend-persist must be in [1, 255], got {a.replay_trend_persist}")
        if any(b <= 0 for b in a.replay_trend_bars):
            p.error(f"--replay-trend-bars must be > 0, got {a.replay_trend_bars}")
    run = Path(a.run)
    replay = bool(a.replay_margins or a.replay_recent or a.replay_trend)
    trends = [None] + [(a.replay_trend, a.replay_trend_decay, bar, k, only) for only in (False, True)
                       for bar in a.replay_trend_bars for k in a.replay_trend_persist] if a.replay_trend else [None]
    snapshots = sorted((run / "ledger_history").glob("step-*.parquet"))
    if replay and not (run / ONSET_FILE).is_file():
        emit_table(replay_lines(run, snapshots, a.replay_margins or [0.0], a.replay_recent or [0.0], trends), a.out)
        return 0
    for name in ("ledger.parquet", ONSET_FILE):
        if not (run / name).is_file():
            raise SystemExit(f"{run / name} is missing" + (" (train with eval.onset=true and eval.every=K)"
                                                            if name == ONSET_FILE else ""))
    ledger_table = pq.read_table(run / "ledger.parquet", columns=["sample_id", "first_flagged_step"]).to_pylist()
    ledger = {str(r["sample_id"]): int(r["first_flagged_step"]) for r in ledger_table}
    result = lead_times(ledger, pq.read_table(run / ONSET_FILE).to_pylist())
    lines = ["| group | probed | became copies | flagged before onset | median lead (steps) | median onset step "
             "| never copied | false flags |", "|---|---|---|---|---|---|---|---|"]
    for group, r in result.items():
        lines.append(f"| {group} | {r['probed']} | {r['copied']} | {fmt(r['flagged_before_onset'], True)} | "
                     f"{fmt(r['median_lead_steps'])} | {fmt(r['median_onset_step'])} | {r['never_copied']} | "
                     f"{fmt(r['false_flag_rate'], True)} |")
    if snapshots:  # each signal's own lead time, at one false-alarm rate
        onset = pq.read_table(run / ONSET_FILE).to_pylist()
        names = [f.name for f in pq.read_schema(snapshots[0])]
        means = [c for c in names if c.endswith("_mean")]
        counts = [c for c in names if c.endswith("_count")] if a.trend else []
        if a.trend and not counts:
            raise SystemExit(f"--trend needs <signal>_count columns in the snapshots ({snapshots[0]}): re-run")
        history = read_history(run / "ledger_history", ["sample_id", "group", "observations", "score"] + means + counts)
        signals = means + ["score"]
        for decay in a.trend:
            signals += add_trends(history, [c.removesuffix("_count") for c in counts], decay, f" ({decay:g})")
        lines += ["", f"Per signal (alert: above the clean rows' {1 - a.false_alarm:.0%} quantile at "
                  f"{a.persist} snapshot(s) in a row; "
                  f"{len(history)} snapshots):", "",
                  "| signal | group | became copies | alerted before onset | median lead (steps) | false alerts |",
                  "|---|---|---|---|---|---|"]
        for signal in signals:
            for group, r in lead_times(alert_steps(history, signal, a.false_alarm, a.persist), onset).items():
                lines.append(f"| {signal.removesuffix('_mean')} | {group} | {r['copied']} | "
                             f"{fmt(r['flagged_before_onset'], True)} | {fmt(r['median_lead_steps'])} | "
                             f"{fmt(r['false_flag_rate'], True)} |")
    if replay:
        lines += replay_lines(run, snapshots, a.replay_margins or [0.0], a.replay_recent or [0.0], trends)
    emit_table(lines, a.out)
    return 0


def replay_lines(run: Path, snapshots: list[Path], margins: list[float], decays: list[float],
                 trends: list | None = None) -> list[str]:
    """Per moving-average decay, margin and trend rule (``trends``: None = without one, whatever the
    run had, or (signal, decay, bar, persist, alone) with ``alone`` = the score's own flags off):
    over every row of each group the share ever flagged, flagged by the sixth snapshot and flagged
    at the last; with onset.parquet, the lead time too."""
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf

    from train.monitor.ledger import FlagPolicy

    if not snapshots:
        raise SystemExit(f"replaying flags needs ledger snapshots: train with monitor.history_every=K ({run})")
    names = [f.name for f in pq.read_schema(snapshots[0])]
    signals = [c.removesuffix("_count") for c in names if c.endswith("_count")]
    if not signals:
        raise SystemExit(f"{snapshots[0]} has no <signal>_count columns (written since the flag margin): re-run")
    missing = {t[0] for t in trends or [] if t is not None} - set(signals)
    if missing:
        raise SystemExit(f"--replay-trend {', '.join(sorted(missing))}: not among the run's signals {signals}")
    monitor = OmegaConf.load(run / "config.yaml").monitor
    flag = OmegaConf.to_container(monitor.flag)
    if monitor.detector != "heads" or flag["policy"] not in ("calibrated", "absolute", "none"):
        raise SystemExit(f"replaying flags needs the heads detector with a calibrated, absolute or none flag policy; "
                         f"{run} used detector={monitor.detector}, policy={flag['policy']} (its thresholds "
                         "follow the population, which the snapshots do not keep)")
    run_recent = float(flag.get("recent", 0.0))
    columns = [f"{s}_{k}" for s in signals for k in ("mean", "count") + (("recent",) if run_recent > 0 else ())]
    history = read_history(run / "ledger_history", ["sample_id", "group", "observations"] + columns)
    onset = pq.read_table(run / ONSET_FILE).to_pylist() if (run / ONSET_FILE).is_file() else []
    last = history[max(history)]
    groups = {str(i): g for i, g in zip(last["sample_id"], last["group"])}
    early = sorted(history)[min(len(history), 6) - 1]  # the first six snapshots
    lines = ["", f"Flags replayed on the {len(history)} snapshots with the shipped heads and the run's flag policy "
             f"({flag['policy']}), reading the run mean (recent 0) or a moving average, less a margin of "
             "standard errors:", "",
             "| recent | margin | trend rule | group | rows | flagged ever | flagged by step " + str(early) + " | flagged at the end "
             "| copies flagged before onset | median lead (steps) | never-copied probes flagged |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    trends = trends or [None]
    alone = [t for t in trends if t is not None and t[4]]  # the score's flags off: recent and margin do nothing
    combos = [(d, m, t) for d in decays for m in margins for t in trends if t is None or not t[4]]
    for decay, margin, trend in combos + [(None, None, t) for t in alone]:
        policy = {**flag, "margin": margin or 0.0, "recent": decay or 0.0, "trend_signal": None}
        if trend is not None:
            signal, trend_decay, bar, persist, only = trend
            policy.update(trend_signal=signal, trend_decay=trend_decay, trend_raise_at=bar, trend_persist=persist)
            if only:  # the score's flags off: only the trend rule flags
                policy.update(policy="none")
        label = "—" if not policy.get("trend_signal") else (
            f"{policy['trend_signal']} {policy['trend_decay']:g} / {policy['trend_raise_at']:g} SE / "
            f"{policy['trend_persist']} in a row" + (" (alone)" if decay is None else ""))
        first, now = replay_flags(history, signals, FlagPolicy(**policy), run_recent, monitor.get("heads"))
        leads = lead_times(first, onset)
        for group in sorted(set(groups.values())):
            ids = [i for i, g in groups.items() if g == group]
            ever = np.mean([first[i] >= 0 for i in ids])
            by_early = np.mean([0 <= first[i] <= early for i in ids])
            at_end = np.mean([now[i] for i in ids])
            r = leads.get(group, {})
            led = fmt(r.get("flagged_before_onset"), True) + (f" of {r['copied']}" if r.get("copied") else "")
            lines.append(f"| {'—' if decay is None else f'{decay:g}'} | {'—' if margin is None else f'{margin:g}'} | "
                         f"{label} | {group} | {len(ids)} | {ever:.1%} | {by_early:.1%} | "
                         f"{at_end:.1%} | {led} | {fmt(r.get('median_lead_steps'))} | "
                         f"{fmt(r.get('false_flag_rate'), True)} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
