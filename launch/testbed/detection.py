"""How well a run's ledger separates planted samples from clean ones, next to the two baselines.

``python -m launch.testbed.detection --run RUN [--epoch0 RUN0] [--out table.md]``
``python -m launch.testbed.detection --run RUN --history [--signals score loss ...]``

For each planted kind in the run's data vs clean: AUC and TPR@1%FPR of the combined ledger
score, of each detector head's own value (``head_<name>``, ledgers written since the ledger kept
them) and of every signal's running mean, and beside them
* the token-count baseline: the AUC of the caption's token count alone (a signal that only
  follows caption length "detects" captions, not memorization), and
* the same signal's AUC in ``--epoch0``, a ledger from the first epoch of the same fine-tune
  (before the model could memorize the planted copies).
Also the step at which each group's median sample was first flagged. ``--history`` reads the
run's ledger snapshots instead (``monitor.history_every``) and gives, per kind, each signal's AUC at
every snapshot: from when on a signal separates the kind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from train.monitor.detection import detection_by_kind

# the testbed's planted kinds (v5: global, local; v6 adds the rest), each scored against its clean rows
KINDS = ("global", "near_global", "caption_dup", "local", "template", "moving_local")


def load(run: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(Path(run) / "ledger.parquet").to_pydict()
    return {k: np.asarray(v) for k, v in table.items()}


def token_counts(run: Path, captions: np.ndarray) -> np.ndarray:
    """Tokens the model saw per caption (the run's own tokenizer, truncated as in training)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(Path(run) / "final", subfolder="tokenizer")
    ids = tokenizer(list(captions), truncation=True, max_length=tokenizer.model_max_length).input_ids
    return np.asarray([len(i) for i in ids], dtype=np.float64)


def detection_table(run: Path, epoch0: Path | None = None) -> dict:
    led = load(run)
    early = load(epoch0) if epoch0 else None
    groups = led["group"]
    # the score, each detector head's own value (head_<name>: what a per-kind flag reads), every signal
    heads = sorted(k for k in led if k.startswith("head_"))
    signals = ["score"] + heads + sorted(k[:-5] for k in led if k.endswith("_mean"))
    columns = {name: name if name == "score" or name in heads else f"{name}_mean" for name in signals}
    now = {name: detection_by_kind(led[column].astype(float), groups, "clean", KINDS)
           for name, column in columns.items()}
    before = {name: detection_by_kind(early[column].astype(float), early["group"], "clean", KINDS)
              for name, column in columns.items() if column in early} if early is not None else None
    tokens = detection_by_kind(token_counts(run, led["caption"]), groups, "clean", KINDS)
    neg = groups == "clean"
    result: dict = {"kinds": {}}
    for kind in KINDS:
        if kind not in tokens:  # no rows of this kind in the run's data
            continue
        pos = groups == kind
        rows = {}
        for name in signals:
            row = dict(now[name][kind])
            if before is not None:  # an epoch-0 ledger without the kind (or the column) has no AUC for it
                row["auc_epoch0"] = before.get(name, {}).get(kind, {}).get("auc", float("nan"))
            rows[name] = row
        # never-flagged samples count as "later than any step": the median is None unless at
        # least half of the group was flagged
        first = led["first_flagged_step"][pos].astype(float)
        median = float(np.median(np.where(first >= 0, first, np.inf)))
        result["kinds"][kind] = {
            "signals": rows,
            "token_count_auc": tokens[kind]["auc"],
            "flagged_share": float((led["flagged"][pos]).mean()),
            "clean_flagged_share": float(led["flagged"][neg].mean()),
            "median_first_flagged_step": median if np.isfinite(median) else None,
        }
    return result


def history_table(run: Path, signals: list[str]) -> list[str]:
    """Markdown: per planted kind, a row per ledger snapshot with each signal's AUC against clean rows."""
    snapshots = sorted((Path(run) / "ledger_history").glob("step-*.parquet"))
    if not snapshots:
        raise FileNotFoundError(f"{run}/ledger_history holds no snapshots: train with monitor.history_every=N")
    per_step = []
    for path in snapshots:
        led = {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}
        column = {s: s if s == "score" or s.startswith("head_") else f"{s}_mean" for s in signals}
        missing = [s for s in signals if column[s] not in led]
        if missing:
            raise KeyError(f"{path.name} has no {missing}; its signals: {sorted(k[:-5] for k in led if k.endswith('_mean'))}"
                           f", heads: {sorted(k for k in led if k.startswith('head_'))}")
        aucs = {s: detection_by_kind(led[column[s]].astype(float), led["group"], "clean", KINDS) for s in signals}
        per_step.append((int(path.stem.split("-")[1]), aucs))
    lines = []
    for kind in KINDS:
        if kind not in per_step[0][1][signals[0]]:
            continue
        lines += [f"**{kind} vs clean**, AUC per ledger snapshot", "",
                  "| step | " + " | ".join(signals) + " |", "|---|" + "---|" * len(signals)]
        lines += [f"| {step} | " + " | ".join(f"{aucs[s][kind]['auc']:.3f}" for s in signals) + " |"
                  for step, aucs in per_step]
        lines.append("")
    return lines


def markdown(result: dict) -> str:
    lines = []
    for kind, info in result["kinds"].items():
        lines.append(f"**{kind} vs clean** (token-count baseline AUC {info['token_count_auc']:.3f}; "
                     f"flagged: {100 * info['flagged_share']:.0f}% of {kind}, {100 * info['clean_flagged_share']:.1f}% "
                     f"of clean; median first flagged at step {info['median_first_flagged_step']})\n")
        lines.append("| signal | AUC | TPR@1%FPR | AUC at epoch 0 |")
        lines.append("| --- | --- | --- | --- |")
        for name, row in info["signals"].items():
            e0 = row.get("auc_epoch0")
            lines.append(f"| {name} | {row['auc']:.3f} | {row['tpr_at_1fpr']:.3f} | "
                         f"{'' if e0 is None else f'{e0:.3f}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--epoch0", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--history", action="store_true", help="AUC per ledger snapshot (monitor.history_every)")
    parser.add_argument("--signals", nargs="+", default=["score", "loss"],
                        help="--history: which signals (or head_<name> columns)")
    args = parser.parse_args(argv)
    if args.history:
        text = "\n".join(history_table(args.run, args.signals))
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    result = detection_table(args.run, args.epoch0)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
