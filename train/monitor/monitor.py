"""The memorization monitor as the training loop calls it: before and after the UNet forward.

    flagged, scores = monitor.flags(batch)             # the ledger as it stands, for mitigations
    monitor.before_forward(captions)                   # end-token index, prompt lengths, capture on
    pred = unet(noisy, t, text_emb)
    monitor.after_forward(accelerator, StepRecord(...))  # signals -> gather -> normalize -> ledger

Whatever else needs the captured attention (the attention regularizers, the eval hook) asks the
monitor (``be_map``, ``token_distribution``, ``capture_with_grad``, ``pause``), never its capture.

Signals come from the training forward (attention over tokens, the loss, and the bright ending
when ``be_mode=drawn`` and the drawn t is small) and from cheap no-grad extra passes: a probe at a
fixed small t (``be_mode=probe``), every ``magnitude_every`` steps the empty-prompt pass for the
noise magnitude, and every ``reference_every`` steps the starting model's pass for ``ref_gain``.
Every rank gathers every rank's values and applies the same update, so the ledger is identical
everywhere without a broadcast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from train.models import encode_text
from train.monitor.capture import AttentionCapture
from train.monitor.detection import detection_by_kind
from train.monitor.detector import heads_file, load_heads
from train.monitor.ledger import FlagPolicy, Ledger
from train.monitor.neighbours import embed, make_index, neighbour_signal
from train.monitor.signals import (MAGNITUDE_SIGNALS, ORIENTATION, REFERENCE_SIGNALS, be_signals, loss_signal,
                                   magnitude_signals, reference_signals, stack, token_signals)
from train.monitor.stats import BinnedStats
from train.monitor.tokens import end_token_index, prompt_length

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.safetensors"


@dataclass
class StepRecord:
    """One micro-batch's training forward, as the monitor reads it (tensors are per sample)."""

    batch: dict  # the data's batch (sample_id, index, ...)
    step: int  # optimizer steps done so far
    loss: torch.Tensor  # [B] the plain per-sample loss (before any mitigation weights)
    pred: torch.Tensor  # the UNet's prediction
    latents: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor  # [B]
    text_emb: torch.Tensor
    latent_mean: Optional[torch.Tensor] = None  # the VAE posterior mean (the neighbours signal embeds it)


class Monitor:
    def __init__(self, cfg: DictConfig, unet, tokenizer, text_encoder, noise_scheduler, *, num_samples: Optional[int],
                 table=None, id_column: str = "sample_id", caption_column: str = "text", reference=None):
        self.cfg, self.unet, self.tokenizer, self.text_encoder = cfg, unet, tokenizer, text_encoder
        self.reference = reference  # train/monitor/reference.py: the ref_gain signals' pass
        if reference is None and cfg.reference_every and any(s in REFERENCE_SIGNALS for s in cfg.signals):
            raise ValueError("monitor.reference_every is set: pass the starting model (train/monitor/reference.py)")
        self.scheduler = noise_scheduler
        self.signals = tuple(cfg.signals)
        self.orientation = torch.tensor([ORIENTATION[s] for s in self.signals])
        self.capture = AttentionCapture(unet, layers=list(cfg.token_layers) if cfg.token_layers else "all",
                                        be_layers=list(cfg.be_layers) if cfg.be_layers else "default")
        self.capture.install()
        self.stats = BinnedStats(len(self.signals), noise_scheduler.config.num_train_timesteps, cfg.t_bins,
                                 list(cfg.length_edges), cfg.stats_horizon, cfg.stats_warmup)
        streaming = num_samples is None
        weights = [float(cfg.signal_weights.get(s, 1.0)) for s in self.signals]
        kinds, heads = (load_heads(self.signals, heads_file(cfg.heads)) if cfg.get("detector", "heads") == "heads"
                        else (None, None))
        self.ledger = Ledger(num_samples or 1024, self.signals, weights, FlagPolicy(**cfg.flag), streaming=streaming,
                             heads=heads, head_names=kinds)
        self.table, self.id_column, self.caption_column = table, id_column, caption_column
        self.labels = None
        if cfg.label_column:  # ground truth only where the user names it
            if table is None or cfg.label_column not in table.column_names:
                log.warning("monitor.label_column=%s: the data has no such column; no detection metrics",
                            cfg.label_column)
            else:
                self.labels = np.asarray(table[cfg.label_column], dtype=object)
        self.neighbours, self.sscd = make_index(cfg, unet.config.in_channels, unet.device)
        self._log_lines = 0
        self.window_sum = np.zeros(len(self.signals))
        self.window_count = np.zeros(len(self.signals))
        self._empty_emb: Optional[torch.Tensor] = None
        self._lengths: Optional[torch.Tensor] = None
        self._captions: list[str] = []

    # ------------------------------------------------------------------ per batch

    def before_forward(self, captions: list[str]) -> None:
        self.capture.reset()
        self.capture.set_end_token_index(end_token_index(self.tokenizer, captions))
        self._lengths = prompt_length(self.tokenizer, captions)
        self._captions = list(captions)
        self.capture.enabled = True

    # what others may ask of the capture of the forward that just ran
    def be_map(self) -> torch.Tensor:
        return self.capture.be_map()

    def token_distribution(self) -> torch.Tensor:
        return self.capture.token_distribution()

    def capture_with_grad(self) -> None:
        """Keep the captured attention in the autograd graph (attention regularizers need it)."""
        self.capture.with_grad = True

    def pause(self) -> None:
        """Stop recording until the next ``before_forward`` (sampling installs its own capture)."""
        self.capture.enabled = False

    @torch.no_grad()
    def after_forward(self, accelerator, rec: StepRecord) -> None:
        batch, step, loss_vec, pred, timesteps = rec.batch, rec.step, rec.loss, rec.pred, rec.timesteps
        latents, noise, noisy, text_emb = rec.latents, rec.noise, rec.noisy, rec.text_emb
        cfg, device, B = self.cfg, loss_vec.device, loss_vec.shape[0]
        values: dict[str, torch.Tensor] = {**loss_signal(loss_vec), **token_signals(self.capture.token_distribution())}
        t_of = {name: timesteps for name in self.signals}
        be_map = self.capture.be_map() if self.capture.be_layers else None
        if be_map is not None and cfg.be_mode == "drawn":
            drawn = be_signals(be_map, cfg.topk_frac)
            low = timesteps < cfg.be_max_t  # the bright ending is a low-noise phenomenon
            values.update({k: torch.where(low, v, torch.full_like(v, float("nan"))) for k, v in drawn.items()})
        self.capture.enabled = False  # extra passes must not overwrite what was read

        if be_map is not None and cfg.be_mode == "probe" and step % cfg.probe_every == 0:
            m = min(cfg.probe_samples or B, B)
            t_probe = torch.full((m,), cfg.probe_t, device=device, dtype=timesteps.dtype)
            self.capture.reset()
            with self.capture.recording(True):
                self.unet(self.scheduler.add_noise(latents[:m], noise[:m], t_probe), t_probe, text_emb[:m])
                probe_map = self.capture.be_map()
            for name, v in be_signals(probe_map, cfg.topk_frac).items():
                values[name] = _pad(v, B)
                t_of[name] = torch.full_like(timesteps, cfg.probe_t)

        if cfg.magnitude_every and step % cfg.magnitude_every == 0 and any(s in MAGNITUDE_SIGNALS for s in self.signals):
            m = min(cfg.magnitude_samples or B, B)
            eps_uncond = self.unet(noisy[:m], timesteps[:m], self._empty(m, text_emb)).sample
            mags = magnitude_signals(pred[:m].detach(), eps_uncond, be_map[:m] if be_map is not None else None)
            values.update({k: _pad(v, B) for k, v in mags.items()})

        if self.reference is not None and cfg.reference_every and step % cfg.reference_every == 0:
            m = min(cfg.reference_samples or B, B)
            pred_ref = self.reference(noisy[:m], timesteps[:m], text_emb[:m], self._captions[:m])
            target = (self.scheduler.get_velocity(latents[:m], noise[:m], timesteps[:m])
                      if self.scheduler.config.prediction_type == "v_prediction" else noise[:m])
            gains = reference_signals(pred[:m].detach(), pred_ref, target, cfg.topk_frac)
            values.update({k: _pad(v, B) for k, v in gains.items()})

        raw = stack(values, self.signals, B, device)
        bins = torch.stack([self.stats.bin_of(t_of[s].cpu(), self._lengths) for s in self.signals], 1)
        slots = self._slots(batch)
        parts = [raw.double(), bins.to(device).double(), slots.to(device).double()[:, None]]
        if self.neighbours is not None:  # each rank's embeddings travel with its signals
            parts.append(self._embeddings(rec, slots).to(device).double())
        everyone = accelerator.gather(torch.cat(parts, 1)).cpu()
        S = len(self.signals)
        g_raw, g_bins, g_slots = everyone[:, :S], everyone[:, S:2 * S].long(), everyone[:, 2 * S].long()
        slots_np = g_slots.numpy()
        if self.ledger.streaming:  # hashes -> slots, in the same order on every rank
            slots_np = self.ledger.slots_for(None, slots_np)
        if self.neighbours is not None:  # every rank adds the same gathered rows in the same order
            counts = self.neighbours.add(slots_np, everyone[:, 2 * S + 1:].float().numpy())
            g_raw[:, self.signals.index("neighbours")] = neighbour_signal(counts)
        # against the population before this batch; |z| > 20 carries no more information and would
        # overflow the ledger's half-precision arrays
        z = (self.stats.normalize(g_raw, g_bins) * self.orientation).clamp(-20, 20)
        self.stats.update(g_raw, g_bins)
        seen = ~torch.isnan(g_raw)
        self.window_sum += torch.nan_to_num(g_raw).sum(0).numpy()
        self.window_count += seen.sum(0).numpy()
        self.ledger.update(slots_np, z.numpy(), step)
        if self.neighbours is not None:
            self.neighbours.mark_flagged(slots_np[self.ledger.flagged[slots_np]])

    def _embeddings(self, rec: StepRecord, slots: torch.Tensor) -> torch.Tensor:
        """The rows' near-duplicate embeddings: pooled latents, or SSCD descriptors of the images
        for rows not yet in the index (a streamed row's slot is not known before the gather)."""
        if self.sscd is None:
            return embed(rec.latent_mean if rec.latent_mean is not None else rec.latents, self.cfg.neighbours.side)
        stored = np.zeros(len(slots), bool)
        if not self.ledger.streaming:
            local = slots.cpu().numpy()
            inside = local < len(self.neighbours.stored)
            stored[inside] = self.neighbours.stored[local[inside]]
        return self.sscd(rec.batch["pixel_values"], stored)

    def _slots(self, batch: dict) -> torch.Tensor:
        if not self.ledger.streaming:
            return batch["index"]
        from train.util import seed_of

        # 52-bit hashes survive the float64 packing of the gather exactly
        return torch.tensor([seed_of("ledger", sid) >> 11 for sid in batch["sample_id"]], dtype=torch.long)

    def _empty(self, m: int, text_emb: torch.Tensor) -> torch.Tensor:
        if self._empty_emb is None or self.text_encoder.training:
            self._empty_emb = encode_text(self.tokenizer, self.text_encoder, [""], text_emb.device).to(text_emb.dtype)
        return self._empty_emb.expand(m, -1, -1)

    def _batch_slots(self, batch: dict) -> np.ndarray:
        """The ledger slots of the batch's samples (-1 for a stream's unseen ones)."""
        if self.ledger.streaming:
            return np.array([self.ledger.slots.get(int(h), -1) for h in self._slots(batch).tolist()], np.int64)
        return batch["index"].numpy()

    def _lookup(self, batch: dict, array: np.ndarray, missing) -> torch.Tensor:
        """``array``'s entries for the batch's samples (``missing`` for a stream's unseen ones)."""
        slots = self._batch_slots(batch)
        return torch.from_numpy(np.where(slots >= 0, array[np.maximum(slots, 0)], missing))

    def flags(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(flagged [B] bool, score [B]) of the batch's samples as the ledger stands before this step."""
        return self._lookup(batch, self.ledger.flagged, False), self._lookup(batch, self.ledger.score, float("nan"))

    def group_weights(self, batch: dict) -> torch.Tensor:
        """[B] 1 / (rows in the sample's look-alike group) where the group holds a flagged row, else 1
        (train/monitor/neighbours.py; needs the ``neighbours`` signal)."""
        return torch.from_numpy(self.neighbours.group_weights(self._batch_slots(batch)))

    def signal_mean(self, batch: dict, name: str) -> torch.Tensor:
        """[B] running mean of signal ``name``'s oriented z for the batch's samples (NaN: never seen)."""
        j = self.signals.index(name)
        means = np.where(self.ledger.sig_count[:, j] > 0, self.ledger.sig_mean[:, j].astype(np.float32), np.nan)
        return self._lookup(batch, means, float("nan"))

    # ------------------------------------------------------------------ reporting

    def metrics(self) -> dict[str, float]:
        """``memo/`` scalars for the log line; resets the window of signal means."""
        out = {f"memo/{k}": v for k, v in self.ledger.summary().items()}
        on, off = self.ledger.thresholds()
        out.update({"memo/threshold_on": float(on), "memo/threshold_off": float(off)})
        for j, name in enumerate(self.signals):
            if self.window_count[j]:
                out[f"memo/{name}"] = float(self.window_sum[j] / self.window_count[j])
        self.window_sum[:] = 0
        self.window_count[:] = 0
        # every detection_every-th log line: a full AUC pass sorts the whole ledger
        if self._log_lines % self.cfg.detection_every == 0:
            out.update(self.detection())
        self._log_lines += 1
        return out

    def detection(self) -> dict[str, float]:
        """Running AUC and TPR@1%FPR per memorization kind, when the data carries ground truth."""
        if self.labels is None:
            return {}
        out, negative = {}, self.cfg.negative_label
        for kind, values in detection_by_kind(self.ledger.score, self.labels, negative).items():
            out.update({f"memo/{key}/{kind}": value for key, value in values.items()})
        for j, name in enumerate(self.signals):
            observed = self.ledger.sig_count[:, j] > 0
            scores = np.where(observed, self.ledger.sig_mean[:, j].astype(np.float32), np.nan)
            for kind, values in detection_by_kind(scores, self.labels, negative).items():
                out[f"memo/auc/{kind}/{name}"] = values["auc"]
        return out

    def run_summary(self, k: int = 10) -> list[str]:
        """Lines for the end of a run: how many rows the ledger flags, the top ``k`` with their
        captions, and, when the user named a ground-truth column, how many of each kind are flagged."""
        lines = [f"the ledger flags {int(self.ledger.flagged.sum())} of {int((self.ledger.obs > 0).sum())} observed rows"]
        if self.labels is not None:
            flagged = self.ledger.flagged[: len(self.labels)]
            for kind in sorted(set(self.labels.tolist())):
                rows = self.labels == kind
                lines.append(f"  {self.cfg.label_column}={kind}: {int(flagged[rows].sum())} of {int(rows.sum())} flagged")
        top: dict[str, list] = {}  # caption -> [its best row, rows flagged]; repeats share a caption
        for row in self.top_flagged(50 * k):  # enough rows to find k distinct captions among repeats
            caption = row.get("caption") or row.get("sample_id") or f"row {row['slot']}"
            if caption in top:
                top[caption][1] += 1
            elif len(top) < k:
                top[caption] = [row, 1]
        if top:
            lines.append(f"top {len(top)} flagged captions (score, first flagged at step, rows, caption):")
            for caption, (row, count) in top.items():
                label = f" [{self.labels[row['slot']]}]" if self.labels is not None else ""
                lines.append(f"  {row['score']:5.2f}  step {row['first_flagged_step']:>6}  {count:>3}x  {caption}{label}")
        return lines

    def histograms(self) -> dict[str, np.ndarray]:
        out = {}
        for j, name in enumerate(self.signals):
            observed = self.ledger.sig_count[:, j] > 0
            out[f"memo/hist/{name}"] = self.ledger.sig_mean[observed, j].astype(np.float32)
        out["memo/hist/score"] = self.ledger.score[~np.isnan(self.ledger.score)]
        return out

    def top_flagged(self, k: int) -> list[dict[str, Any]]:
        """The k highest-scoring flagged samples, with image and caption where the data is a table."""
        flagged = np.flatnonzero(self.ledger.flagged)
        top = flagged[np.argsort(-self.ledger.score[flagged])][:k]
        kinds = None
        if self.ledger.heads is not None:  # the head each score comes from
            kinds = dict(zip(top.tolist(), self.ledger.top_heads(self.ledger.head_values(top))))
        rows = []
        for slot in top.tolist():
            row = {"slot": slot, "score": float(self.ledger.score[slot]), "head": kinds[slot] if kinds else None,
                   "first_flagged_step": int(self.ledger.first_flagged_step[slot]),
                   **{name: float(self.ledger.sig_mean[slot, j]) for j, name in enumerate(self.signals)}}
            if self.table is not None and not self.ledger.streaming:
                record = self.table[slot]
                row["caption"] = record.get(self.caption_column)
                row["sample_id"] = record.get(self.id_column, str(slot))
                row["image"] = record.get("image")
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ persistence

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"ledger.{k}": v for k, v in self.ledger.state_tensors().items()},
                **{f"stats.{k}": v for k, v in self.stats.state_dict().items()},
                **{f"neighbours.{k}": v for k, v in (self.neighbours.state_tensors() if self.neighbours else {}).items()}}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.state_tensors(), str(path))

    def load(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        file = checkpoint / LEDGER_FILE
        if not file.is_file():
            log.warning("checkpoint %s has no ledger (monitor was off): the ledger starts empty", checkpoint)
            return
        tensors = load_file(str(file))
        self.ledger.load_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("ledger.")})
        self.stats.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("stats.")})
        if self.neighbours is not None:
            index = {k[11:]: v for k, v in tensors.items() if k.startswith("neighbours.")}
            if not index:
                raise ValueError(f"checkpoint {checkpoint} has no neighbour index (the run did not compute "
                                 "monitor signal 'neighbours'): resume with the same monitor.signals")
            self.neighbours.load_tensors(index)

    def write_parquet(self, path: Path) -> None:
        kwargs: dict[str, Any] = {}
        if self.table is not None and not self.ledger.streaming:
            cols = self.table.column_names
            if self.id_column in cols:
                kwargs["sample_ids"] = self.table[self.id_column]
            if self.caption_column in cols:
                kwargs["captions"] = self.table[self.caption_column]
            if self.labels is not None:
                kwargs["extra"] = {self.cfg.label_column: self.labels.tolist()}
        if self.neighbours is not None and not self.ledger.streaming:
            counts = np.zeros(self.ledger.capacity, np.int64)
            n = min(len(self.neighbours.count), len(counts))
            counts[:n] = self.neighbours.count[:n]
            groups = np.arange(self.ledger.capacity, dtype=np.int64)  # a row's group: its root row
            groups[:n] = self.neighbours.roots()[:n]
            kwargs["extra"] = {**kwargs.get("extra", {}), "neighbour_count": counts.tolist(),
                               "neighbour_group": groups.tolist()}
        self.ledger.write_parquet(path, **kwargs)

    def remove(self) -> None:
        self.capture.remove()


def _pad(values: torch.Tensor, length: int) -> torch.Tensor:
    """A subset's values in front, NaN (not observed) for the rest of the batch."""
    out = torch.full((length,), float("nan"), device=values.device)
    out[: len(values)] = values.float()
    return out
