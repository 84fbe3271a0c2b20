"""The eval hook the training loop calls every ``eval.every`` steps.

Wiring (in ``train/finetune.py``, step 8 of the loop)::

    if cfg.eval.every and state.step % cfg.eval.every == 0:
        metrics = run_eval_hook(cfg.eval, accelerator, parts, unet, text_encoder, data.table, state.step,
                                out, tracker, None, data_cfg=data_cfg, ema=ema, dtype=dtype,
                                flagged_ids=ledger.top_ids(...))  # or pass probe_prompts yourself

Every rank must call it (it is collective). It writes ``<out>/eval/step-<N>/eval.json`` and the
worst cases' panels (generation | nearest training image | BE heatmap), logs the ``eval/`` metrics
and the panels through the tracker, and returns the metrics on every rank.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from train.evaluate.core import EvalResult, Judge, evaluate_probes, summarize
from train.evaluate.onset import ONSET_FILE, OnsetTable
from train.evaluate.report import build_report, write_report
from train.evaluate.sampling import sampling_pipeline
from train.evaluate.truth import TruthAnnotator, has_truth, score_against_truth
from train.evaluate.trainset import Probe, TrainingSet, select_probes, training_set
from train.models import trainable_parameters
from train.util import jsonable

log = logging.getLogger(__name__)


@contextmanager
def _ema_weights(model, ema):
    """Evaluate the EMA weights when EMA is on, then put the trained ones back."""
    if ema is None:
        yield
        return
    params = trainable_parameters(model)  # what the EMA averages (a LoRA's adapters, or everything)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


class EvalHook:
    """Per-run state kept between evals: the distinct training images and the judge (backend
    + cached training features), built on the first call."""

    def __init__(self, cfg_eval, data_cfg, train_table, out_dir: str | Path, resolution: int | None = None):
        self.cfg = cfg_eval
        self.out_dir = Path(out_dir)
        self.resolution = int(resolution or data_cfg.resolution)
        self.trainset: TrainingSet | None = (training_set(train_table, data_cfg, self.resolution)
                                             if train_table is not None else None)
        self.judge: Judge | None = None
        self.annotate: TruthAnnotator | None = None
        self.data_name = str(data_cfg.path)
        self.onset = OnsetTable(self.out_dir / ONSET_FILE) if getattr(cfg_eval, "onset", False) else None

    def cache_dir(self) -> Path:
        return Path(self.cfg.feature_cache).expanduser() if self.cfg.feature_cache else self.out_dir / "eval" / "cache"

    def probes(self, flagged_ids: Sequence[str] = (), heldout_prompts: Sequence[str] = ()) -> list[Probe]:
        # onset tracking compares evals sample by sample: the same probes every time, not the flags
        return select_probes(self.cfg, self.trainset, () if self.onset is not None else flagged_ids, heldout_prompts)

    @torch.no_grad()
    def __call__(self, accelerator, parts, unet, text_encoder, step: int, tracker,
                 probes: Sequence[Probe | str] | None = None, ema=None, dtype: torch.dtype | None = None,
                 flagged_ids: Sequence[str] = ()) -> dict:
        probes = [p if isinstance(p, Probe) else Probe(str(p)) for p in (probes or self.probes(flagged_ids))]
        if not probes:
            raise ValueError("eval hook: no probe prompts (no training captions and no eval.heldout_prompts)")
        if self.judge is None and self.trainset is not None:
            self.judge = Judge(self.cfg, self.trainset, self.cache_dir(), accelerator, accelerator.device)
        model = accelerator.unwrap_model(unet)
        pipe = sampling_pipeline(parts.vae, accelerator.unwrap_model(text_encoder), parts.tokenizer, model,
                                 parts.noise_scheduler)
        wants_truth = self.cfg.report or self.onset is not None
        if self.annotate is None and wants_truth and self.trainset is not None and has_truth(self.trainset):
            self.annotate = TruthAnnotator(self.trainset)  # ground-truth columns: mark the planted copies
        annotate = self.annotate
        with _ema_weights(model, ema):
            result = evaluate_probes(self.cfg, pipe, probes, height=self.resolution, width=self.resolution,
                                     judge=self.judge, accelerator=accelerator, autocast_dtype=dtype,
                                     annotate=annotate)
        metrics = summarize(result)
        if accelerator.is_main_process:
            truth = score_against_truth(result.records) if annotate is not None else None  # marks records' truth
            if self.onset is not None and truth is not None:
                self.onset.update(step, result.records)
                self.onset.write()
            self._write(result, metrics, step, tracker)
            if self.cfg.report:
                summary = {"num_prompts": len(probes), **{k.removeprefix("eval/"): v for k, v in metrics.items()}}
                report, panels = build_report(result, self.cfg, summary, checkpoint=f"{self.out_dir} at step {step}",
                                              model="the model being trained" + (" (EMA weights)" if ema else ""),
                                              data=self.data_name,
                                              resolution=self.resolution,
                                              threshold=self.judge.threshold if self.judge else None, truth=truth)
                write_report(self.out_dir / "eval" / f"step-{step}", report, panels)
        return metrics

    def _write(self, result: EvalResult, metrics: dict, step: int, tracker) -> None:
        folder = self.out_dir / "eval" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        panels = []
        by_job = {r["job"]: r for r in result.records}
        for job, png in result.panels.items():
            record = by_job[job]
            path = folder / f"panel-{job:04d}.png"
            path.write_bytes(png)
            verdict = "REPLICA" if record.get("replica") else "local replica" if record.get("local_replica") else "-"
            panels.append((path, f"[{record['kind']}] {record['prompt']} (seed {record['seed']}): {verdict}"))
        (folder / "eval.json").write_text(json.dumps(jsonable({"step": step, "metrics": metrics,
                                                               "records": result.records}), indent=1))
        if tracker is not None:
            tracker.log(metrics, step)
            tracker.log_images("eval/panels", panels, step)


_HOOKS: dict[tuple, EvalHook] = {}


def run_eval_hook(cfg_eval, accelerator, pipeline_parts, unet, text_encoder, train_table, step: int,
                  out_dir: str | Path, tracker, probe_prompts: Sequence[Probe | str] | None = None, *,
                  data_cfg, ema=None, dtype: torch.dtype | None = None, flagged_ids: Sequence[str] = ()) -> dict:
    """Run one evaluation (collective: call on every rank) and return its ``eval/`` metrics.

    ``probe_prompts``: :class:`Probe` objects (see :func:`select_probes`) or plain strings;
    None draws ``cfg_eval.num_prompts`` probes: the ``flagged_ids`` first (sample ids, most
    suspicious first, e.g. the ledger's top scores), then held-out prompts, then random captions. ``data_cfg`` is the
    resolved data config (image column, folder) of ``train_table``. The hook's state (distinct
    training images, backend, features) is kept between calls of the same run.
    """
    key = (str(out_dir), id(train_table))
    hook = _HOOKS.get(key)
    if hook is None:
        hook = _HOOKS[key] = EvalHook(cfg_eval, data_cfg, train_table, out_dir)
    return hook(accelerator, pipeline_parts, unet, text_encoder, step, tracker, probe_prompts, ema=ema, dtype=dtype,
                flagged_ids=flagged_ids)
