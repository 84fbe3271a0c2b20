"""Mitigation ablations: a base config x named variants x seeds, run, scored and tabulated.

``python launch/ablate.py configs/ablation/<grid>.yaml [--out DIR] [--only NAME ...] [--seeds K ...]
[--set KEY=VALUE ...] [--launch PREFIX] [--mode subprocess|inprocess] [--dry-run] [--print-commands]
[--collect-only]``

``--mode subprocess`` (default) starts every training with the grid's launcher and every evaluation
as ``python -m launch.testbed.evaluate``, logging to ``<run>/train.log`` / ``eval.log``;
``--mode inprocess`` runs both in this process, one after the other (one process, no launcher:
tests, a laptop).

A grid file::

    name: testbed                      # W&B group, default output folder runs/ablation/<name>
    launch: accelerate launch          # prefix before train/finetune.py (default), or: python
    reference: none                    # the variant the others are compared with (default: none)
    base:                              # every run: config files (in order) and key=value overrides
      - configs/testbed/common.yaml
      - train.max_steps=2500
    variants:                          # name -> config overlays and/or key=value overrides
      none: []
      rc: [configs/mitigation/captions_rc.yaml]
      rc_flagged: [configs/mitigation/captions_rc.yaml, mitigate.captions.target=flagged]
    seeds: [0, 1, 2]                   # each run gets seed=<k>
    testbed: configs/testbed/data.yaml # optional: the data, python -m data.testbed knobs (a file, or a
                                       # mapping of knobs with an optional config: FILE underneath),
                                       # built once into <out>/data/testbed-<hash>; every run gets
                                       # data.path=<that folder> (before the base's overrides)
    evaluate:                          # optional: how to score a finished run's final/ pipeline
      testbed: {seeds: 4, steps: 25}   # options of python -m launch.testbed.evaluate (its flags, no dashes)
                                       # and draws: N (N evaluations with --seed 0..N-1, averaged;
                                       # further eval-seed<k>/ folders in a run dir count too)

A grid may start from another: ``extends: testbed.yaml`` (a path relative to this grid file) takes
that grid's keys; this file's keys replace them, except ``variants``, which adds to and replaces
the other grid's variants one by one (same name: this file's overlays), and ``evaluate``, whose
options replace the other grid's one by one (``evaluate: {testbed: {draws: 4}}`` keeps every other
option of the extended grid). ``name`` is never inherited.

Config files are paths relative to the repository root (or absolute). A run's config is what
``train/finetune.py`` builds from, in this order: configs/base.yaml, the base's files, the variant's
files, then the overrides: ``data.path`` of the grid's testbed, the base's, the variant's, ``--set``
ones, and the runner's own
(``output_dir=<out>/<variant>/seed<k> seed=<k>``, ``logging.run_name=<variant>-seed<k>`` when W&B is
on, ``train.resume=latest`` when the run dir holds a checkpoint). Like the trainer's own command
line, every key=value beats every file. Every run's config is loaded and validated before
anything runs, so a typo fails at once, naming the variant and the key.

Each run: train (or resume), evaluate ``final/`` when ``evaluate`` says so (into ``<run>/eval``, and
``<run>/eval-seed<k>`` for the further draws of prompts and seeds),
then write ``<run>/summary.json``: the final train loss and the median samples/s (metrics.jsonl);
detection AUC and TPR at 1% FPR of the ledger score for each labelled group against the clean one,
and the flagged share per group (ledger.parquet, when the data has ``monitor.label_column``); the
replica rates, localization IoU (when the evaluation reports one), KID and the held-out loss (the
mean over the evaluation draws: eval/eval.json, eval-seed<k>/eval.json); wall
times (ablate_times.json). A run with a ``summary.json`` is finished and skipped; delete the
file to redo the summary (and the evaluation when ``final/`` is newer), delete the run dir to redo
the training. Then ``<out>/results.csv`` (a row per run), ``<out>/results.md`` (a row per variant,
mean +- std over seeds) and ``<out>/replica_vs_quality.png`` (when matplotlib is installed).

``--print-commands`` writes ``<out>/commands.txt`` (one shell line per unfinished run: the trainer
launch, then this script for that run alone, which evaluates and summarizes) and
``<out>/slurm_array.sbatch`` (one array task per line); afterwards run this script with
``--collect-only`` to build the tables.

W&B (``logging.wandb=true``): runs are named ``<variant>-seed<k>``, grouped by the grid's name and
carry the variant as job type (``logging.wandb_group`` / ``logging.wandb_job_type``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import fnmatch
import hashlib
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train.util import jsonable, write_atomic  # noqa: E402  (after the path is set)

log = logging.getLogger("copyguard.ablate")

GRID_KEYS = ("name", "description", "extends", "base", "variants", "seeds", "testbed", "evaluate", "launch",
             "reference")
EVALUATORS = ("testbed",)
SUMMARY = "summary.json"
# What a run dir holds (the trainer's files, the evaluation's, this script's): a run without a
# complete checkpoint is restarted from scratch only when its folder holds nothing else.
RUN_FILES = {"config.yaml", "metrics.jsonl", "checkpoints", "ledger.parquet", "final", "val", "wandb", "wandb_run_id",
             "eval", "train.log", "eval.log", "ablate_times.json", "summary.json"}
EVAL_DRAW_RE = re.compile(r"^eval(-seed\d+)?(\.log)?$")  # eval/ and eval-seed<k>/ (more draws), their logs
TIMES = "ablate_times.json"
OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")  # key=value (anything else is a config file)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Keys of the resolved config that name where/how a run is stored, not what it trains.
VOLATILE_KEYS = ("output_dir", "train.resume", "logging.run_name", "logging.wandb_group", "logging.wandb_job_type",
                 "model.cache_dir", "logging.progress_bar")


class GridError(ValueError):
    """A grid that cannot run; the message names the grid key, variant or config key."""


# --------------------------------------------------------------------------------------------
# The grid and its expansion
# --------------------------------------------------------------------------------------------


@dataclass
class Layers:
    """Config files (in order) and key=value overrides (in order)."""

    files: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


@dataclass
class Run:
    variant: str
    seed: int
    dir: Path
    files: list[str]          # as written in the grid (relative to the repository root)
    overrides: list[str]      # base, variant, --set, then output_dir / seed / run_name
    cfg: Any                  # the resolved, validated config (OmegaConf)
    env: dict[str, str]       # extra environment for the trainer (W&B group / job type)

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    @property
    def config_sha(self) -> str:
        return config_sha(self.cfg)


@dataclass
class Grid:
    name: str
    path: Path
    base: Layers
    variants: dict[str, Layers]
    seeds: list[int]
    evaluate: dict[str, dict]
    launch: str
    reference: Optional[str]
    out: Path
    extra: list[str] = field(default_factory=list)  # --set overrides
    runs: list[Run] = field(default_factory=list)
    testbed: Optional[dict] = None  # python -m data.testbed knobs of the grid's data
    data_dir: Optional[Path] = None  # where they are built (every run's data.path)


def _layers(items: Any, where: str) -> Layers:
    if items is None:
        return Layers()
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise GridError(f"{where} must be a list of config files and key=value overrides, got {type(items).__name__}")
    layers = Layers()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise GridError(f"{where}: every item must be a config file path or a key=value string, got {item!r}")
        item = item.strip()
        if OVERRIDE_RE.match(item):
            layers.overrides.append(item)
        else:
            if resolve_file(item) is None:
                raise GridError(f"{where}: config file not found: {item}")
            layers.files.append(item)
    return layers


def resolve_file(path: str) -> Optional[Path]:
    """A grid's config path: absolute, or relative to the repository root (else the cwd)."""
    p = Path(path).expanduser()
    for candidate in ([p] if p.is_absolute() else [REPO / p, Path.cwd() / p]):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _evaluate_options() -> set[str]:
    """The option names of ``python -m launch.testbed.evaluate`` (read from its --help)."""
    from launch.testbed import evaluate as testbed_evaluate

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        testbed_evaluate.main(["--help"])
    return {m.replace("-", "_") for m in re.findall(r"--([a-z][a-z0-9-]*)", buffer.getvalue())} - {"help"}


def _parse_evaluate(node: Any) -> dict[str, dict]:
    if node in (None, False, {}):
        return {}
    if not isinstance(node, dict):
        raise GridError(f"evaluate must be a mapping like {{testbed: {{seeds: 4}}}}, got {node!r}")
    out = {}
    for kind, options in node.items():
        if kind not in EVALUATORS:
            raise GridError(f"evaluate.{kind}: unknown evaluator (known: {', '.join(EVALUATORS)})")
        options = {} if options in (None, True) else options
        if not isinstance(options, dict):
            raise GridError(f"evaluate.{kind} must map option names to values, got {options!r}")
        draws = options.get("draws", 1)
        if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
            raise GridError(f"evaluate.{kind}.draws must be a whole number >= 1, got {draws!r}")
        known = _evaluate_options() | {"draws"}
        for key in options:
            key_ = str(key).replace("-", "_")
            if key_ not in known or key_ in ("model", "out"):
                import difflib

                close = difflib.get_close_matches(key_, sorted(known - {"model", "out"}), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise GridError(f"evaluate.{kind}: unknown option '{key}' of python -m launch.testbed.evaluate{hint}")
        out[kind] = {str(k).replace("-", "_"): v for k, v in options.items()}
    return out


def _parse_testbed(node: Any) -> Optional[dict]:
    """The grid's testbed knobs: a knobs file, or a mapping of knobs over an optional ``config`` file."""
    from data.testbed import TestbedParams, read_knobs

    if node in (None, False, {}):
        return None
    node = {"config": node} if isinstance(node, str) else node
    if not isinstance(node, dict):
        raise GridError(f"testbed must be a knobs file or a mapping of python -m data.testbed knobs, got {node!r}")
    node = dict(node)
    knobs: dict = {}
    if "config" in node:
        name = str(node.pop("config"))
        config = resolve_file(name)
        if config is None:
            raise GridError(f"testbed.config: file not found: {name}")
        try:
            knobs = read_knobs(config)
        except ValueError as exc:
            raise GridError(f"testbed.config: {exc}") from None
    knobs.update(node)
    try:
        TestbedParams.create(**knobs)
    except (TypeError, ValueError) as exc:
        raise GridError(f"testbed: {exc}") from None
    return knobs


def _read_grid(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A grid file's keys, with those of the grid it ``extends`` underneath (see the module doc)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise GridError(f"grid file not found: {path}" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise GridError(f"{path}: extends itself (through {' -> '.join(str(p) for p in seen)})")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # yaml syntax and interpolation errors
        raise GridError(f"cannot parse grid file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path} must hold a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown grid key '{unknown[0]}' (known: {', '.join(GRID_KEYS)})")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent.strip():
        raise GridError(f"{path}: extends must name one grid file, got {parent!r}")
    merged = _read_grid(path.parent / parent, seen + (path.resolve(),))
    merged.pop("name", None)  # a grid's name is its output folder: never shared
    variants = {**(merged.get("variants") or {}), **(raw.get("variants") or {})}
    inherited, own = merged.get("evaluate"), raw.get("evaluate")
    if isinstance(inherited, dict) and isinstance(own, dict):  # option by option (module doc)
        evaluate = dict(inherited)
        for kind, options in own.items():
            both = isinstance(evaluate.get(kind), dict) and isinstance(options, dict)
            evaluate[kind] = {**evaluate[kind], **options} if both else options
        raw["evaluate"] = evaluate  # anything malformed is left to the parser's named error
    merged.update(raw)
    merged["variants"] = variants
    return merged


def load_grid(path: str | os.PathLike, out: Optional[str | os.PathLike] = None,
              extra: Iterable[str] = ()) -> Grid:
    """Read a grid file and expand it into validated runs (every config loaded once)."""
    path = Path(path)
    raw = _read_grid(path)
    name = str(raw.get("name") or path.stem)
    if not NAME_RE.match(name):
        raise GridError(f"name {name!r}: use letters, digits and _.+- only")
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise GridError(f"{path}: variants must map at least one variant name to its overlays")
    variants = {}
    for vname, items in variants_raw.items():
        vname = str(vname)
        if not NAME_RE.match(vname):
            raise GridError(f"variant {vname!r}: use letters, digits and _.+- only (it names a folder)")
        variants[vname] = _layers(items, f"variant '{vname}'")
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise GridError(f"seeds must be a non-empty list of integers, got {raw.get('seeds')!r}")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"seeds has duplicates: {seeds}")
    reference = raw.get("reference", "none" if "none" in variants else None)
    if reference is not None and str(reference) not in variants:
        raise GridError(f"reference {reference!r} is not one of the variants ({', '.join(variants)})")
    for item in extra:
        if "=" not in item:
            raise GridError(f"--set {item!r} is not of the form key=value")
    grid = Grid(name=name, path=path.resolve(), base=_layers(raw.get("base"), "base"), variants=variants,
                seeds=list(seeds), evaluate=_parse_evaluate(raw.get("evaluate")),
                launch=str(raw.get("launch") or "accelerate launch"),
                reference=str(reference) if reference is not None else None,
                out=Path(out).expanduser().resolve() if out else REPO / "runs" / "ablation" / name,
                extra=list(extra), testbed=_parse_testbed(raw.get("testbed")))
    if grid.testbed is not None:
        from data.testbed import testbed_path

        grid.data_dir = testbed_path(grid.out / "data", **grid.testbed)
    grid.runs = expand(grid)
    return grid


def expand(grid: Grid) -> list[Run]:
    """variants x seeds, in grid order; each config validated (ConfigError -> GridError naming the variant)."""
    from train.config import ConfigError, load_config

    runs = []
    base_checked: Optional[str] = None
    data = [f"data.path={grid.data_dir}"] if grid.data_dir is not None else []
    for vname, layers in grid.variants.items():
        files = grid.base.files + layers.files
        overrides = data + grid.base.overrides + layers.overrides + grid.extra
        first = None
        for seed in grid.seeds:
            run_dir = grid.out / vname / f"seed{seed}"
            own = [f"output_dir={run_dir}", f"seed={seed}"]
            if first is None:  # load and validate once per variant; a seed changes nothing else
                try:
                    first = load_config([str(resolve_file(f)) for f in files], overrides + own)
                except ConfigError as exc:
                    if base_checked is None:  # is it the base's fault? then say so, once
                        try:
                            load_config([str(resolve_file(f)) for f in grid.base.files],
                                        grid.base.overrides + grid.extra + own)
                            base_checked = ""
                        except ConfigError as base_exc:
                            base_checked = str(base_exc)
                    if base_checked:
                        raise GridError(f"base config: {base_checked}") from None
                    raise GridError(f"variant '{vname}': {exc}") from None
                problem = _testbed_problem(grid, first)
                if problem:
                    raise GridError(f"variant '{vname}': {problem}")
            cfg = copy.deepcopy(first)
            cfg.seed, cfg.output_dir = seed, str(run_dir)
            env = {}
            if cfg.logging.wandb:
                own += [f"logging.run_name={vname}-seed{seed}", f"logging.wandb_group={grid.name}",
                        f"logging.wandb_job_type={vname}"]
                cfg.logging.run_name = f"{vname}-seed{seed}"
                cfg.logging.wandb_group, cfg.logging.wandb_job_type = grid.name, vname
            runs.append(Run(vname, seed, run_dir, files, overrides + own, cfg, env))
    return runs


def _testbed_problem(grid: Grid, cfg) -> Optional[str]:
    """Why a run's data does not fit the grid's testbed (None when it does)."""
    if grid.testbed is None:
        if "testbed" in grid.evaluate:
            return "evaluate.testbed scores the grid's testbed: give the grid a testbed: key (its knobs)"
        return None
    if cfg.data.source != "imagefolder" or str(cfg.data.path) != str(grid.data_dir):
        return (f"the grid's testbed is read as data.source=imagefolder data.path={grid.data_dir}; the run has "
                f"data.source={cfg.data.source} data.path={cfg.data.path}")
    from data.testbed import TestbedParams

    resolution = TestbedParams.create(**grid.testbed).resolution
    if cfg.data.resolution != resolution:
        return f"data.resolution={cfg.data.resolution} but the testbed is built at {resolution} px (its masks are pixel-exact)"
    if cfg.data.filter_column is None:
        return ("the testbed's held-out rows would be trained: set data.filter_column=split data.filter_value=train "
                "(or another filter that leaves them out)")
    return None


def build_data(grid: Grid) -> None:
    """The grid's testbed folder, built before any run reads it (then reused: its name is a hash of
    the knobs and the image source, so other knobs build another folder)."""
    if grid.testbed is None:
        return
    from data.testbed import ensure_testbed

    log.info("testbed data: %s", grid.data_dir)
    ensure_testbed(grid.out / "data", **grid.testbed)


def select(grid: Grid, only: Optional[list[str]] = None, seeds: Optional[list[int]] = None) -> list[Run]:
    """The runs named by --only (names or shell patterns) and --seeds."""
    for pattern in only or []:
        if not any(fnmatch.fnmatchcase(v, pattern) for v in grid.variants):
            raise GridError(f"--only {pattern!r} matches no variant (variants: {', '.join(grid.variants)})")
    for seed in seeds or []:
        if seed not in grid.seeds:
            raise GridError(f"--seeds {seed} is not one of the grid's seeds {grid.seeds}")
    return [r for r in grid.runs
            if (not only or any(fnmatch.fnmatchcase(r.variant, p) for p in only))
            and (not seeds or r.seed in seeds)]


def config_sha(cfg) -> str:
    """What a run trains (not where it is stored), as a short hash: a changed grid shows up.
    (Not train.config.to_container: it redacts every key with "token" in it, e.g. start_token.)"""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True)
    for key in VOLATILE_KEYS:
        *parents, leaf = key.split(".")
        target = data
        for part in parents:
            target = target.get(part, {}) if isinstance(target, dict) else {}
        if isinstance(target, dict):
            target.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Where a run stands
# --------------------------------------------------------------------------------------------


def checkpoint_step(run_dir: Path) -> Optional[int]:
    """Step of the newest complete checkpoint, None without one."""
    from train.checkpoint import STATE_FILE, complete_checkpoints

    found = complete_checkpoints(run_dir)
    if not found:
        return None
    return int(json.loads((found[-1] / STATE_FILE).read_text())["step"])


def final_file(run_dir: Path) -> Path:
    return run_dir / "final" / "model_index.json"


def eval_dir(run_dir: Path, draw: int = 0) -> Path:
    """Draw 0 (the evaluation's own --seed) in eval/, draw k in eval-seed<k>/."""
    return run_dir / ("eval" if draw == 0 else f"eval-seed{draw}")


def eval_file(run_dir: Path, draw: int = 0) -> Path:
    return eval_dir(run_dir, draw) / "eval.json"


def eval_draws(grid: Grid) -> int:
    return int(grid.evaluate.get("testbed", {}).get("draws", 1))


def status(run: Run, grid: Grid) -> str:
    """done | evaluate | summarize | resume | new."""
    d = run.dir
    if (d / SUMMARY).is_file():
        return "done"
    step = checkpoint_step(d) if d.is_dir() else None
    if step is not None and step >= run.cfg.train.max_steps and final_file(d).is_file():
        if grid.evaluate and not all(_eval_fresh(d, k) for k in range(eval_draws(grid))):
            return "evaluate"
        return "summarize"
    return "resume" if step is not None else "new"


def _eval_fresh(run_dir: Path, draw: int = 0) -> bool:
    e, f = eval_file(run_dir, draw), final_file(run_dir)
    return e.is_file() and (not f.is_file() or e.stat().st_mtime >= f.stat().st_mtime)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _launch_prefix(launch: str) -> list[str]:
    argv = shlex.split(launch)
    if not argv:
        return [sys.executable]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    elif shutil.which(argv[0]) is None and (Path(sys.executable).parent / argv[0]).is_file():
        argv[0] = str(Path(sys.executable).parent / argv[0])  # accelerate of this venv
    return argv


def train_args(run: Run, resume: bool) -> list[str]:
    """The trainer's argv (after train/finetune.py) for this run."""
    args = [a for f in run.files for a in ("--config", str(resolve_file(f)))] + list(run.overrides)
    if resume:
        args.append("train.resume=latest")
        if run.cfg.model.init_from:  # the checkpoint holds the weights; init_from would conflict
            args.append("model.init_from=null")
    return args


@contextlib.contextmanager
def _environment(extra: dict[str, str]):
    """``extra`` in os.environ and the repository root as cwd (relative paths in configs, such as
    model.pretrained=runs/testbed/base/final, mean the same as in a subprocess run)."""
    saved = {k: os.environ.get(k) for k in extra}
    cwd = os.getcwd()
    os.environ.update(extra)
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reset_accelerate() -> None:
    """Several trainings in one process: each starts from a clean accelerate state."""
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    except Exception:  # pragma: no cover - an accelerate without these hooks
        pass


def _run_logged(cmd: list[str], logfile: Path, env: dict[str, str]) -> None:
    log.info("$ %s  (log: %s)", shlex.join(cmd), logfile)
    with open(logfile, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(logfile.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"exit status {proc.returncode}: {shlex.join(cmd[:3])} ...\n{tail}")


def train(run: Run, grid: Grid, resume: bool, mode: str) -> None:
    args = train_args(run, resume)
    run.dir.mkdir(parents=True, exist_ok=True)
    if mode == "inprocess":
        from train.finetune import main as finetune

        log.info("training %s in-process: train/finetune.py %s", run.name, shlex.join(args))
        with _environment(run.env):
            try:
                finetune(args)
            finally:
                _reset_accelerate()
                logging.getLogger().setLevel(logging.INFO)
    else:
        cmd = _launch_prefix(grid.launch) + [str(REPO / "train" / "finetune.py")] + args
        _run_logged(cmd, run.dir / "train.log", run.env)


def evaluate_args(run: Run, options: dict[str, Any], draw: int = 0) -> list[str]:
    """Draw k evaluates with --seed (the grid's, default 0) + k: other prompts and seeds."""
    options = {k: v for k, v in options.items() if k != "draws"}
    options["seed"] = int(options.get("seed", 0)) + draw
    args = ["--model", str(run.dir / "final"), "--out", str(eval_dir(run.dir, draw))]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def evaluate(run: Run, grid: Grid, mode: str) -> None:
    if "testbed" not in grid.evaluate:
        return
    for draw in range(eval_draws(grid)):
        if _eval_fresh(run.dir, draw):
            continue
        args = evaluate_args(run, grid.evaluate["testbed"], draw)
        if mode == "inprocess":
            from launch.testbed.evaluate import main as testbed_evaluate

            log.info("evaluating %s in-process: python -m launch.testbed.evaluate %s", run.name, shlex.join(args))
            with _environment({}), contextlib.redirect_stdout(io.StringIO()):
                code = testbed_evaluate(args)
            if code:
                raise RuntimeError(f"launch.testbed.evaluate returned {code}")
        else:
            _run_logged([sys.executable, "-m", "launch.testbed.evaluate", *args],
                        run.dir / f"{eval_dir(run.dir, draw).name}.log", {})


def _add_time(run_dir: Path, key: str, seconds: float) -> None:
    path = run_dir / TIMES
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[key] = round(times.get(key, 0.0) + seconds, 2)
    _write_json(path, times)


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(jsonable(data), indent=1) + "\n")


def execute(run: Run, grid: Grid, mode: str = "subprocess") -> str:
    """Bring one run to a summary.json; return what was done (skipped | trained | resumed | evaluated | summarized)."""
    state = status(run, grid)
    if state == "done":
        done = json.loads((run.dir / SUMMARY).read_text())
        if done.get("config_sha") not in (None, run.config_sha):
            log.warning("%s: finished with a different config than the grid now gives (%s vs %s); "
                        "delete %s to re-run it", run.name, done.get("config_sha"), run.config_sha, run.dir)
        log.info("%s: finished, skipped", run.name)
        return "skipped"
    action = {"new": "trained", "resume": "resumed", "evaluate": "evaluated", "summarize": "summarized"}[state]
    if state == "new" and run.dir.exists() and any(run.dir.iterdir()):
        foreign = sorted(p.name for p in run.dir.iterdir()
                         if p.name not in RUN_FILES and not EVAL_DRAW_RE.match(p.name) and not p.name.startswith("."))
        if foreign:
            raise RuntimeError(f"{run.dir} holds files a run does not write ({', '.join(foreign[:5])}); move them away")
        log.info("%s: %s holds no complete checkpoint; starting it afresh", run.name, run.dir)
        shutil.rmtree(run.dir)
    if state in ("new", "resume"):
        start = time.perf_counter()
        train(run, grid, resume=state == "resume", mode=mode)
        _add_time(run.dir, "train_s", time.perf_counter() - start)
    if grid.evaluate and not all(_eval_fresh(run.dir, k) for k in range(eval_draws(grid))):
        start = time.perf_counter()
        evaluate(run, grid, mode)
        _add_time(run.dir, "eval_s", time.perf_counter() - start)
    summary = summarize(run.dir, run.cfg, variant=run.variant, seed=run.seed, grid=grid.name)
    summary["config_sha"] = run.config_sha
    _write_json(run.dir / SUMMARY, summary)
    log.info("%s: %s; %s", run.name, action, _brief(summary))
    return action


def _brief(summary: dict) -> str:
    keys = ("train_loss", "samples_per_s", "det_auc_global", "det_auc_local", "global_replica_rate",
            "local_replica_rate", "quality_kid")
    return ", ".join(f"{k}={_fmt(summary[k])}" for k in keys if summary.get(k) is not None)


def run_grid(grid: Grid, runs: list[Run], mode: str = "subprocess", stop_on_error: bool = False,
             collect_results: bool = True) -> dict[str, str]:
    """Each run in turn (finished ones skipped), then the tables; {run name: action or 'failed: ...'}."""
    outcome: dict[str, str] = {}
    if runs:
        build_data(grid)
    for i, run in enumerate(runs, 1):
        log.info("[%d/%d] %s", i, len(runs), run.name)
        try:
            outcome[run.name] = execute(run, grid, mode)
        except (Exception, SystemExit) as exc:  # the trainer exits with SystemExit on config/data errors
            if stop_on_error:
                raise
            log.error("%s failed: %s", run.name, exc)
            outcome[run.name] = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if collect_results:
        collect(grid)
    return outcome


# --------------------------------------------------------------------------------------------
# Summary of one run
# --------------------------------------------------------------------------------------------


def _median(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(values)) if values else None


def summarize(run_dir: Path, cfg=None, **identity) -> dict:
    """A finished run's numbers: from metrics.jsonl (loss, samples/s), ledger.parquet (detection
    of the labelled groups), eval/eval.json (replica rates, quality) and ablate_times.json."""
    import numpy as np

    run_dir = Path(run_dir)
    if cfg is None:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / "config.yaml")
    out: dict[str, Any] = {**identity, "run_dir": str(run_dir)}

    rows = []
    if (run_dir / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("train/loss") is not None]
    if train_rows:
        out["steps"] = int(train_rows[-1]["step"])
        out["train_loss"] = float(train_rows[-1]["train/loss"])
        tail = train_rows[-max(1, len(train_rows) // 10):]
        out["train_loss_last10pct"] = float(sum(r["train/loss"] for r in tail) / len(tail))
        out["samples_per_s"] = _median([r.get("perf/samples_per_s") for r in train_rows])
        out["mean_weight"] = _median([r.get("mitig/mean_weight") for r in train_rows])

    ledger = run_dir / "ledger.parquet"
    if ledger.is_file():
        import pyarrow.parquet as pq

        from train.monitor.detection import detection_by_kind

        table = pq.read_table(ledger)
        score = np.asarray(table["score"].to_numpy(zero_copy_only=False), dtype=np.float64)
        flagged = np.asarray(table["flagged"].to_numpy(zero_copy_only=False), dtype=bool)
        observed = np.asarray(table["observations"].to_numpy(zero_copy_only=False)) > 0
        out["observed"] = int(observed.sum())
        out["flagged"] = int(flagged.sum())
        label_column = cfg.monitor.label_column
        if label_column and label_column in table.column_names:
            labels = np.asarray(table[label_column].to_pylist(), dtype=object)
            kinds = sorted({str(x) for x in labels} - {str(cfg.monitor.negative_label)})
            for label, metrics in detection_by_kind(score, labels, cfg.monitor.negative_label, kinds).items():
                out[f"det_auc_{label}"] = metrics["auc"]
                out[f"det_tpr1fpr_{label}"] = metrics["tpr_at_1fpr"]
            for label in sorted({str(x) for x in labels}):
                members = labels == label
                out[f"flagged_rate_{label}"] = float(flagged[members].mean()) if members.any() else None

    if eval_file(run_dir).is_file():
        # every draw found (eval/, eval-seed<k>/): their numbers averaged, one draw's kept apart
        found = {0: eval_file(run_dir)} | {int(p.name[len("eval-seed"):]): p / "eval.json"
                                           for p in run_dir.glob("eval-seed*")
                                           if EVAL_DRAW_RE.match(p.name) and (p / "eval.json").is_file()}
        results = [json.loads(found[k].read_text()) for k in sorted(found)]
        draws = [r.get("summary", {}) for r in results]
        s = {k: mean_std([d.get(k) for d in draws])[0] for k in draws[0]}
        out["eval_draws"] = len(draws)
        out["global_replica_rate"] = s.get("global_replica_rate")
        out["local_replica_rate"] = s.get("local_replica_rate")
        out["clean_replica_rate"] = s.get("clean_replica_rate")
        out["clean_local_replica_rate"] = s.get("clean_local_replica_rate")
        for kind in V6_KINDS:  # testbed v6 only (launch.testbed.evaluate's summary)
            out[f"{kind}_replica_rate"] = s.get(f"{kind}_replica_rate")
        out["moving_local_anywhere_rate"] = s.get("moving_local_anywhere_rate")
        out["heldout_loss"] = s.get("heldout_loss")
        out["clean_own_rank"] = s.get("clean_own_rank_median")
        out["unprompted_global_rate"] = s.get("unprompted_global_copy_rate")
        out["unprompted_stamp_rate"] = s.get("unprompted_stamp_rate")
        iou = [k for k in s if "iou" in k.lower()]
        out["localization_iou"] = s[iou[0]] if iou else None
        quality = [k for k in s if k.lower().startswith(("kid", "fid", "quality"))]
        out["quality_metric"] = quality[0] if quality else None
        out["quality_kid"] = s.get(quality[0]) if quality else None
        out["eval_generation_s"] = mean_std([r.get("generation_seconds") for r in results])[0]
        out["eval_summary"] = s
        out["eval_summaries"] = draws
        out["eval_draw_seeds"] = sorted(found)  # the --seed of each entry of eval_summaries

    if (run_dir / TIMES).is_file():
        out.update({f"wall_{k}": v for k, v in json.loads((run_dir / TIMES).read_text()).items()})
    return out


# --------------------------------------------------------------------------------------------
# Collection: results.csv, results.md, replica_vs_quality.png
# --------------------------------------------------------------------------------------------

# The table's columns, in order, with headers; those no run has are left out.
V6_KINDS = ("near_global", "caption_dup", "template", "moving_local")
# the replica rate of each kind a run's testbed has: whole-image kinds (goal GOAL["global"]), then
# region kinds (goal GOAL["local"]); v5 testbeds have the first of each only
GLOBAL_RATES = ("global_replica_rate", "near_global_replica_rate", "caption_dup_replica_rate")
LOCAL_RATES = ("local_replica_rate", "template_replica_rate", "moving_local_replica_rate")
TABLE_COLUMNS = [
    ("global_replica_rate", "global replica rate"),
    ("near_global_replica_rate", "near-duplicate replica rate"),
    ("caption_dup_replica_rate", "shared-caption replica rate"),
    ("local_replica_rate", "local replica rate"),
    ("template_replica_rate", "template (card) replica rate"),
    ("moving_local_replica_rate", "moving-stamp replica rate"),
    ("moving_local_anywhere_rate", "moving stamp at any of its places"),
    ("clean_replica_rate", "clean replica rate"),
    ("localization_iou", "localization IoU"),
    ("quality_kid", "KID (quality, lower better)"),
    ("heldout_loss", "held-out loss"),
    ("clean_own_rank", "clean own-image rank (prompt fidelity, lower better)"),
    ("unprompted_global_rate", "global copies, empty prompt"),
    ("unprompted_stamp_rate", "stamps, empty prompt"),
    ("det_auc_global", "det. AUC global"),
    ("det_tpr1fpr_global", "TPR@1%FPR global"),
    ("det_auc_local", "det. AUC local"),
    ("det_tpr1fpr_local", "TPR@1%FPR local"),
    *((f"det_auc_{kind}", f"det. AUC {kind}") for kind in V6_KINDS),
    ("train_loss", "final train loss"),
    ("samples_per_s", "samples/s"),
    ("wall_train_s", "train wall s"),
]
GOAL = {"global": 0.90, "local": 0.80, "quality": 0.05}


def _spec(value: float) -> str:
    a = abs(value)
    return ".0f" if a >= 100 else ".1f" if a >= 10 else ".3f" if a >= 0.01 or a == 0 else ".2e"


def _fmt(value: Any, like: Optional[float] = None) -> str:
    """A table cell; ``like``: format as that number is (a std as its mean)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return format(value, _spec(value if like is None else like))
    return str(value)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def mean_std(values: list[Any]) -> tuple[Optional[float], Optional[float], int]:
    nums = [v for v in (_number(x) for x in values) if v is not None]
    if not nums:
        return None, None, 0
    return statistics.fmean(nums), (statistics.stdev(nums) if len(nums) > 1 else None), len(nums)


def load_summaries(grid: Grid) -> list[dict]:
    out = []
    for run in grid.runs:
        path = run.dir / SUMMARY
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out


def collect(grid: Grid) -> dict[str, Path]:
    """results.csv, results.md and (with matplotlib) replica_vs_quality.png from every summary.json."""
    grid.out.mkdir(parents=True, exist_ok=True)
    summaries = load_summaries(grid)
    written = {"csv": write_csv(summaries, grid.out / "results.csv"),
               "md": write_markdown(grid, summaries, grid.out / "results.md")}
    plot = write_plot(grid, summaries, grid.out / "replica_vs_quality.png")
    if plot is not None:
        written["png"] = plot
    log.info("results of %d/%d runs: %s", len(summaries), len(grid.runs), ", ".join(str(p) for p in written.values()))
    return written


def write_csv(summaries: list[dict], path: Path) -> Path:
    first = ["variant", "seed"] + [k for k, _ in TABLE_COLUMNS]
    keys = [k for k in first if any(k in s for s in summaries)]
    keys += sorted({k for s in summaries for k, v in s.items()
                    if k not in keys and not isinstance(v, (dict, list))})
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys or ["variant", "seed"], extrasaction="ignore")
            writer.writeheader()
            for s in summaries:
                writer.writerow({k: ("" if s.get(k) is None else s.get(k)) for k in keys})

    write_atomic(path, write)
    return path


def variant_stats(grid: Grid, summaries: list[dict]) -> dict[str, dict[str, tuple]]:
    """{variant: {column: (mean, std, n)}} in grid order, variants with at least one summary."""
    by_variant: dict[str, list[dict]] = {}
    for s in summaries:
        by_variant.setdefault(s["variant"], []).append(s)
    return {v: {k: mean_std([s.get(k) for s in by_variant[v]]) for k, _ in TABLE_COLUMNS} | {"_n": len(by_variant[v])}
            for v in grid.variants if v in by_variant}


def _relative(value: Optional[float], ref: Optional[float]) -> Optional[float]:
    if value is None or ref is None or ref == 0:
        return None
    return (value - ref) / ref


def quality_by_draw(summaries: list[dict]) -> dict[int, float]:
    """{draw seed: the quality metric averaged over these runs (training seeds)} for one variant."""
    per_draw: dict[int, list[float]] = {}
    for s in summaries:
        metric = s.get("quality_metric")
        draws = s.get("eval_summaries") or []
        for seed, draw in zip(s.get("eval_draw_seeds") or range(len(draws)), draws):
            if metric and _number(draw.get(metric)) is not None:
                per_draw.setdefault(int(seed), []).append(float(draw[metric]))
    return {k: statistics.fmean(v) for k, v in sorted(per_draw.items())}


def paired_quality_change(runs: list[dict], ref_runs: list[dict]) -> Optional[float]:
    """Relative change of the quality metric against the reference on the draws both were scored on.

    Draw k uses the same prompts and sampler seeds for every model, and KID moves more between
    draws of one model (up to 35% on the v5 testbed) than between many mitigations, so a variant scored on 4 draws
    is compared with the reference's mean over those 4, not over whatever draws it has."""
    mine, ref = quality_by_draw(runs), quality_by_draw(ref_runs)
    shared = [k for k in mine if k in ref]
    if not shared:
        return None
    return _relative(statistics.fmean(mine[k] for k in shared), statistics.fmean(ref[k] for k in shared))


def write_markdown(grid: Grid, summaries: list[dict], path: Path) -> Path:
    stats = variant_stats(grid, summaries)
    runs_of = {v: [s for s in summaries if s["variant"] == v] for v in stats}
    columns = [(k, h) for k, h in TABLE_COLUMNS if any(st[k][2] for st in stats.values())]
    ref = stats.get(grid.reference) if grid.reference else None
    compare = ref is not None and any(ref[k][0] is not None for k in ("global_replica_rate", "local_replica_rate"))
    header = ["variant", "seeds"] + [h for _, h in columns]
    rates = [k for k in GLOBAL_RATES + LOCAL_RATES if ref is not None and ref[k][0] is not None]
    if compare:
        names = {"global_replica_rate": "global", "local_replica_rate": "local"}
        header += [f"{names.get(k, k[:-len('_replica_rate')])} vs ref" for k in rates]
        header += ["KID vs ref", "held-out loss vs ref", "meets goal"]
    lines = [f"# Ablation `{grid.name}`", "",
             f"Grid: `{_rel(grid.path)}`; {len(summaries)} of {len(grid.runs)} runs finished; "
             "mean ± std over seeds" + (f"; reference: `{grid.reference}`" if grid.reference else "") + ".", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, st in stats.items():
        cells = [f"`{variant}`", str(st["_n"])]
        for key, _ in columns:
            mean, std, n = st[key]
            cells.append(_fmt(mean) if std is None else f"{_fmt(mean)} ± {_fmt(std, like=mean)}")
        if compare:
            cuts = {k: _relative(st[k][0], ref[k][0]) for k in rates}
            quality = paired_quality_change(runs_of[variant], runs_of[grid.reference])
            q = quality if quality is not None else _relative(st["quality_kid"][0], ref["quality_kid"][0])
            loss = _relative(st["heldout_loss"][0], ref["heldout_loss"][0])
            cells += ["—" if d is None else f"{100 * d:+.0f}%" for d in [*cuts.values(), q]]
            cells.append("—" if loss is None else f"{100 * loss:+.1f}%")
            if variant == grid.reference or None in cuts.values():
                cells.append("—")
            else:  # every whole-image kind cut by GOAL["global"], every region kind by GOAL["local"]; better KID is fine
                ok = (all(d <= -GOAL["global" if k in GLOBAL_RATES else "local"] for k, d in cuts.items())
                      and (q is None or q <= GOAL["quality"]))
                # fewer prompted copies bought with more copies from the empty prompt is no mitigation
                unasked, ref_unasked = st["unprompted_global_rate"][0], ref["unprompted_global_rate"][0]
                if ok and None not in (unasked, ref_unasked) and unasked > ref_unasked:
                    cells.append("no: more copies unprompted")
                else:
                    cells.append("yes" if ok else "no")
        lines.append("| " + " | ".join(cells) + " |")
    walls = [sum(s.get(k) or 0.0 for k in ("wall_train_s", "wall_eval_s")) for s in summaries]
    if any(walls):
        lines += ["", f"Wall time, training + evaluation, as run by this script: {sum(walls) / 3600:.2f} h in all "
                  f"({statistics.median(walls) / 60:.1f} min per run, median)."]
    missing = [v for v in grid.variants if v not in stats]
    if missing:
        lines += ["", "Not finished yet: " + ", ".join(f"`{v}`" for v in missing) + "."]
    if compare:
        lines += ["", f"vs ref: relative change of the mean against `{grid.reference}` (KID: on the evaluation draws "
                  "both were scored on, whose prompts and sampler seeds are the same for every model). Goal: global replica rate "
                  f"-{GOAL['global']:.0%} or better, local -{GOAL['local']:.0%} or better, KID at most "
                  f"+{GOAL['quality']:.0%} (lower KID is better), and no more global copies from the empty "
                  "prompt than the reference (when the evaluation generated unprompted)."]
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def write_plot(grid: Grid, summaries: list[dict], path: Path) -> Optional[Path]:
    """Replica rates (global, local, clean) vs KID, one point per variant, seed std as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipping %s (pip install matplotlib to get it)", path.name)
        return None
    stats = variant_stats(grid, summaries)
    panels = [(k, t) for k, t in (("global_replica_rate", "global replica rate"),
                                  ("local_replica_rate", "local replica rate"),
                                  ("clean_replica_rate", "clean replica rate"))  # copies of unduplicated rows
              if any(st[k][0] is not None and st["quality_kid"][0] is not None for st in stats.values())]
    if not panels:
        log.info("no run has replica rates and a quality metric yet: skipping %s", path.name)
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for variant, st in stats.items():
            (x, xerr, _), (y, yerr, _) = st["quality_kid"], st[key]
            if x is None or y is None:
                continue
            ax.errorbar(x, y, xerr=xerr or 0, yerr=yerr or 0, fmt="o", capsize=3,
                        color="black" if variant == grid.reference else None)
            ax.annotate(variant, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ref = stats.get(grid.reference) if grid.reference else None
        kind = key.split("_")[0]
        if kind in GOAL and ref is not None and ref["quality_kid"][0] is not None and ref[key][0] is not None:
            goal = GOAL[kind]
            ax.axvline(ref["quality_kid"][0] * (1 + GOAL["quality"]), ls="--", lw=0.8, color="grey")
            ax.axhline(ref[key][0] * (1 - goal), ls="--", lw=0.8, color="grey")  # goal: lower left of both
        ax.set_xlabel("KID of clean-prompt generations vs held-out (lower = better)")
        ax.set_ylabel(title)
        ax.set_title(f"{grid.name}: {title} vs quality")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Commands for a cluster
# --------------------------------------------------------------------------------------------


def _rel(path: Path | str) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run_command(run: Run, grid: Grid, argv_tail: list[str]) -> str:
    """One shell line: the trainer launch (resuming if requeued), then this script for the run alone."""
    args = [a for f in run.files for a in ("--config", _rel(resolve_file(f)))] + list(run.overrides)
    if not run.cfg.model.init_from:  # a requeued job resumes; init_from and resume cannot be combined
        args.append("train.resume=latest")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in run.env.items())
    train_cmd = " ".join(shlex.quote(a) for a in shlex.split(grid.launch) + ["train/finetune.py"] + args)
    finish = ["python", "launch/ablate.py", _rel(grid.path), "--out", str(grid.out), "--only", run.variant,
              "--seeds", str(run.seed), *argv_tail, "--no-collect"]
    return f"{env + ' ' if env else ''}{train_cmd} && {shlex.join(finish)}"


def write_commands(grid: Grid, runs: list[Run], argv_tail: list[str]) -> tuple[Path, Path, list[str]]:
    todo = [r for r in runs if status(r, grid) != "done"]
    if todo:  # the array's tasks read the folder: it exists before the first one starts
        build_data(grid)
    lines = [run_command(r, grid, argv_tail) for r in todo]
    grid.out.mkdir(parents=True, exist_ok=True)
    commands = grid.out / "commands.txt"
    commands.write_text("".join(line + "\n" for line in lines))
    sbatch = grid.out / "slurm_array.sbatch"
    collect_cmd = shlex.join(["python", "launch/ablate.py", _rel(grid.path), "--out", str(grid.out), "--collect-only"])
    sbatch.write_text(f"""#!/bin/bash
# Ablation grid {grid.name}: one array task per line of {commands.name} ({len(lines)} runs).
# Add the resources your cluster needs (e.g. #SBATCH --gres=gpu:1 --cpus-per-task=8 --time=24:00:00),
# then:  sbatch {_rel(sbatch)}
# and when every task is done:  {collect_cmd}
#SBATCH --job-name=ablate-{grid.name}
#SBATCH --array=0-{max(len(lines) - 1, 0)}
#SBATCH --output={grid.out}/slurm-%A_%a.out
#SBATCH --requeue
set -euo pipefail
cd {shlex.quote(str(REPO))}
export PATH="{REPO}/.venv/bin:$PATH"   # the project's venv, if there is one
LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(commands))})
echo "$LINE"
eval "$LINE"
""")
    return commands, sbatch, lines


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python launch/ablate.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Grid format and outputs: see the top of launch/ablate.py.")
    p.add_argument("grid", help="configs/ablation/<grid>.yaml")
    p.add_argument("--out", help="output folder (default: runs/ablation/<grid name>)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these variants (names or shell patterns)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="K", help="only these of the grid's seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run, after the grid's own (repeatable)")
    p.add_argument("--launch", help="launcher prefix instead of the grid's, e.g. 'accelerate launch "
                   "--config_file launch/single_gpu.yaml' or python")
    p.add_argument("--mode", choices=("subprocess", "inprocess"), default="subprocess",
                   help="subprocess: the grid's launcher per run (default); inprocess: train/evaluate in this "
                        "process, one after the other (no launcher: a single process)")
    p.add_argument("--dry-run", action="store_true", help="expand, validate and show what would run")
    p.add_argument("--print-commands", action="store_true",
                   help="write <out>/commands.txt and <out>/slurm_array.sbatch instead of running")
    p.add_argument("--collect-only", action="store_true", help="only (re)build results.csv/.md/.png")
    p.add_argument("--no-collect", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        grid = load_grid(a.grid, a.out, a.set)
        runs = select(grid, a.only, a.seeds)
        if a.launch:
            grid.launch = a.launch
    except GridError as exc:
        print(f"ablate: {exc}", file=sys.stderr)
        return 2
    log.info("grid %s: %d variants x %d seeds = %d runs (%d selected) in %s", grid.name, len(grid.variants),
             len(grid.seeds), len(grid.runs), len(runs), grid.out)
    if a.collect_only:
        collect(grid)
        return 0
    if a.dry_run:
        for run in runs:
            print(f"{status(run, grid):9s} {run.name:32s} {run.dir}")
        return 0
    if a.print_commands:
        tail = [x for s in a.set for x in ("--set", s)] + (["--launch", a.launch] if a.launch else [])
        commands, sbatch, lines = write_commands(grid, runs, tail)
        print("\n".join(lines))
        log.info("%d commands in %s; Slurm array script %s", len(lines), commands, sbatch)
        return 0
    outcome = run_grid(grid, runs, a.mode, a.stop_on_error, collect_results=not a.no_collect)
    failed = [n for n, o in outcome.items() if o.startswith("failed")]
    if failed:
        log.error("%d run(s) failed: %s", len(failed), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
