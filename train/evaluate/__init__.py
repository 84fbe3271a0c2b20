"""Evaluation of memorization: sampling with Bright Ending capture, similarity to the training
set (pixel / SSCD backends), local memorization inside BE regions, the training eval hook, and the
ground-truth measures (:mod:`train.evaluate.measures`: replicas, KID, IoU) that score any folder
with known copies.

``train.audit`` runs the same pieces on a saved checkpoint and writes a report.
"""

from train.evaluate.config import EvalConfig, validate_eval
from train.evaluate.core import EvalResult, Judge, evaluate_probes, summarize, worst_first
from train.evaluate.hook import EvalHook, run_eval_hook
from train.evaluate.local import be_region, heatmap_overlay, localization_iou, region_neighbours
from train.evaluate.sampling import Generation, generate_with_capture, sampling_pipeline, step_magnitudes
from train.evaluate.similarity import (OnnxSSCD, PixelBackend, SimilarityBackend, TorchScriptSSCD, build_backend,
                                       feature_bank, topk_neighbours)
from train.evaluate.trainset import Probe, TrainingSet, select_probes, training_set

__all__ = [
    "EvalConfig", "validate_eval", "EvalResult", "Judge", "evaluate_probes", "summarize", "worst_first",
    "EvalHook", "run_eval_hook", "be_region", "heatmap_overlay", "localization_iou", "region_neighbours",
    "Generation", "generate_with_capture", "sampling_pipeline", "step_magnitudes", "OnnxSSCD", "PixelBackend",
    "SimilarityBackend", "TorchScriptSSCD", "build_backend", "feature_bank", "topk_neighbours", "Probe",
    "TrainingSet", "select_probes", "training_set",
]
