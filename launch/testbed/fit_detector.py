"""Fit the default detector's per-kind heads on one testbed run's ledger; report them on others.

``python -m launch.testbed.fit_detector --fit RUN [RUN ...] [--validate RUN ...] [--drop SIGNAL ...] [--only SIGNAL ...] [--one-head NAME | --head NAME=KIND[,KIND] ...] [--add-to FILE] [--write [FILE]] [--out FILE.md]``

The heads (:mod:`train.monitor.detector`) are logistic regressions of ground truth (the ledger's
``group`` column) on the per-signal mean z-scores: a "global" head for the whole-image kinds
(global, near_global, caption_dup) and a "local" head for the region kinds (local, template,
moving_local), each against the clean rows. ``--validate`` runs are scored with the fitted heads
unchanged: the rule is fit on one testbed and judged on testbeds it never saw. Beside each
number: the equal-weight mean of all signals (the earlier default) and the loss alone.
``--write`` stores the heads in train/monitor/detector.json (what ``monitor.detector: heads`` uses),
``--write FILE`` elsewhere (``monitor.heads=FILE`` then uses them). ``--only`` fits on some signals
alone, ``--one-head NAME`` one head for every planted kind, ``--head NAME=KIND,KIND`` (repeated) heads
with the kinds one names, and ``--add-to FILE`` keeps FILE's heads and adds the new one (how
``detector_reference.json`` was made from the shipped heads). "own head AUC" scores each kind by the
head fit on it alone, what a per-kind flag reads, beside the ledger's score (the largest head).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from launch.testbed.reading import emit_table
from train.evaluate.truth import GROUP_KINDS, REGION_KINDS
from train.monitor.detection import detection_by_kind
from train.monitor.config import FlagConfig
from train.monitor.detector import DETECTOR_FILE, fit_heads, head_scores, heads_array, heads_file, logit
from train.monitor.signals import SIGNALS


def ledger_means(run: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """([N, S] per-signal mean z in SIGNALS order (0 where a signal was not computed), [N] group)."""
    table = pq.read_table(Path(run) / "ledger.parquet").to_pydict()
    if "group" not in table:
        raise SystemExit(f"{run}/ledger.parquet has no group column (train with monitor.label_column=group)")
    means = np.stack([np.nan_to_num(np.asarray(table.get(f"{s}_mean", [0.0] * len(table["group"])), dtype=np.float64))
                      for s in SIGNALS], axis=1)
    return means, np.asarray(table["group"]).astype(str)


def scores(spec: dict, means: np.ndarray) -> dict[str, np.ndarray]:
    return {"heads": head_scores(heads_array(spec, SIGNALS)[1], means).max(axis=1), "equal-weight mean": means.mean(axis=1),
            "loss only": means[:, SIGNALS.index("loss")]}


def parse_head(text: str, present: set[str]) -> tuple[str, list[str]]:
    """``NAME=KIND,KIND`` -> (NAME, [KIND, ...]); every kind must be planted in the fitted runs."""
    name, _, members = text.partition("=")
    kinds = [k for k in members.split(",") if k]
    if not name or not kinds:
        raise SystemExit(f"--head {text!r}: give NAME=KIND[,KIND...]")
    unknown = [k for k in kinds if k not in GROUP_KINDS + REGION_KINDS]
    if unknown:
        raise SystemExit(f"--head {text!r}: unknown kinds {unknown} (planted kinds: {', '.join(GROUP_KINDS + REGION_KINDS)})")
    missing = [k for k in kinds if k not in present]
    if missing:
        raise SystemExit(f"--head {text!r}: the fitted runs have no rows of {missing}")
    return name, kinds


def own_head(spec: dict, kind: str) -> str | None:
    """The one head whose positives include ``kind`` (None when none or several do)."""
    owners = [name for name, head in spec["heads"].items() if kind in head.get("positives", [])]
    return owners[0] if len(owners) == 1 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.testbed.fit_detector", description=__doc__.split("\n")[0])
    p.add_argument("--fit", nargs="+", required=True, help="run folder(s) whose ledgers fit the heads")
    p.add_argument("--validate", nargs="*", default=[], help="run folders scored with the fitted heads")
    p.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of the logistic regressions")
    p.add_argument("--probability", type=float, default=FlagConfig.probability,
                   help="the calibrated flag policy's threshold: the share of rows at or above it is reported")
    p.add_argument("--drop", nargs="*", default=[], choices=SIGNALS,
                   help="fit and score without these signals (as a run that does not compute them)")
    p.add_argument("--only", nargs="+", choices=SIGNALS,
                   help="fit on these signals alone (the new heads get no weight on any other)")
    p.add_argument("--one-head", metavar="NAME",
                   help="fit one head, NAME, for every planted kind instead of a global and a local head")
    p.add_argument("--head", action="append", default=[], metavar="NAME=KIND[,KIND]",
                   help="fit a head NAME on these planted kinds (repeat for more heads) instead of a global and a local head")
    p.add_argument("--add-to", metavar="FILE",
                   help="keep the heads in FILE (a shipped set's name, e.g. default, or a .json path) and add the fitted ones")
    p.add_argument("--write", nargs="?", const=str(DETECTOR_FILE), metavar="FILE",
                   help=f"store the heads in FILE (default {DETECTOR_FILE}, what monitor.heads=null uses; "
                        "monitor.heads=FILE uses another)")
    p.add_argument("--out", help="also write the table here")
    a = p.parse_args(argv)
    dropped = [SIGNALS.index(s) for s in a.drop]

    def read(run: str) -> tuple[np.ndarray, np.ndarray]:
        means, groups = ledger_means(run)
        means[:, dropped] = 0.0  # what the monitor records for a signal it never computes
        return means, groups

    fitted = [read(run) for run in a.fit]
    means, groups = np.concatenate([m for m, _ in fitted]), np.concatenate([g for _, g in fitted])
    if a.only:
        means[:, [i for i, s in enumerate(SIGNALS) if s not in a.only]] = 0.0
    present = set(groups)
    kinds = {name: [k for k in members if k in present]
             for name, members in (("global", GROUP_KINDS), ("local", REGION_KINDS))}
    if a.one_head and a.head:
        raise SystemExit("--one-head and --head both name the heads: give one of them")
    if a.one_head:
        kinds = {a.one_head: [k for members in kinds.values() for k in members]}
    if a.head:
        named = [parse_head(h, present) for h in a.head]
        twice = sorted({name for name, _ in named if [n for n, _ in named].count(name) > 1})
        if twice:
            raise SystemExit(f"--head names {twice} more than once: give each head its own name")
        kinds = dict(named)
    spec = fit_heads(means, groups, SIGNALS, {k: v for k, v in kinds.items() if v}, c=a.c)
    for head in spec["heads"].values():  # where each head came from, kept when heads are added to others
        head["fit_on"] = [str(r) for r in a.fit]
        if a.drop:
            head["without"] = list(a.drop)
        if a.only:
            head["only"] = list(a.only)
    if a.add_to:
        kept = json.loads(heads_file(a.add_to).read_text())  # a shipped set's name or a .json path
        for head in kept["heads"].values():
            head.setdefault("fit_on", kept.get("fit_on", []))
            if kept.get("without"):
                head.setdefault("without", kept["without"])
        clash = sorted(set(kept["heads"]) & set(spec["heads"]))
        if clash:
            raise SystemExit(f"--add-to {a.add_to} already has heads {clash}: name the new ones with --one-head or --head")
        spec["heads"] = {**kept["heads"], **spec["heads"]}
    on = logit(a.probability)
    lines = [f"| run | role | kind | heads AUC | heads TPR@1%FPR | flagged at P >= {a.probability} | own head AUC | "
             "equal-weight AUC | loss-only AUC |", "|---|---|---|---|---|---|---|---|---|"]
    names, matrix = heads_array(spec, SIGNALS)
    for role, runs in (("fit", a.fit), ("validate", a.validate)):
        for run in runs:
            run_means, run_groups = read(run)
            labels = sorted(set(run_groups) - {"clean", "heldout"})
            run_scores = scores(spec, run_means)
            results = {name: detection_by_kind(score, run_groups, "clean", labels) for name, score in run_scores.items()}
            flagged = {kind: float((run_scores["heads"][run_groups == kind] >= on).mean()) for kind in labels + ["clean"]}
            per_head = head_scores(matrix, run_means)
            for kind in labels:
                h, e, l = (results[n].get(kind, {}) for n in ("heads", "equal-weight mean", "loss only"))
                owner = own_head(spec, kind)
                own = (detection_by_kind(per_head[:, names.index(owner)], run_groups, "clean", [kind])[kind]["auc"]
                       if owner else float("nan"))
                lines.append(f"| {run} | {role} | {kind} | {h.get('auc', float('nan')):.3f} | "
                             f"{h.get('tpr_at_1fpr', float('nan')):.2f} | {flagged[kind]:.1%} | {own:.3f} | "
                             f"{e.get('auc', float('nan')):.3f} | {l.get('auc', float('nan')):.3f} |")
            lines.append(f"| {run} | {role} | clean (false flags) | | | {flagged['clean']:.1%} | | | |")
    print(json.dumps(spec["heads"], indent=1))
    emit_table(lines, a.out)
    if a.write:
        Path(a.write).write_text(json.dumps(spec, indent=1) + "\n")
        print(f"wrote {a.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
