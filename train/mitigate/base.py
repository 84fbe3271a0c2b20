"""The one interface every mitigation implements, and the set of active ones the loop calls.

A mitigation is built from its own config section (``mitigate.<name>``) and may act at any of
these points of a step; each hook has a do-nothing default, so a mitigation overrides only what
it changes:

    prepare(table)          before training, from the data table -> per-row sampling weights or None
    captions(step, caps)    the captions the batch trains on (before text encoding)
    text_embedding(step, e) the encoded text
    weights(step)           a loss weight per sample [B] (0 drops it; it stays in the graph);
                            step.loss holds the micro-batch's per-sample loss by then
    loss_map(step, size)    a loss weight per latent position [B, 1, h, w]
    loss_terms(step)        extra scalar loss terms by name (added to the objective)
    metrics()               sums since the last log line: {key: (sum, count)}; reduced over ranks
    state() / load_state(s) what a mitigation keeps across steps, saved with each checkpoint (JSON)

Adding one: a file with its config dataclass and its class, and a line in ``REGISTRY``
(train/mitigate/__init__.py); docs/architecture.md walks through an example.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from omegaconf import DictConfig


@dataclass
class MitigationStep:
    """What a mitigation may read about the micro-batch being trained (all per sample, [B])."""

    batch: dict  # the data's batch: sample_id, index (table row or None when streaming), epoch, text, captions
    step: int  # optimizer steps done so far
    micro_step: int
    flagged: torch.Tensor  # bool, the ledger's flags before this step (all False without a monitor)
    scores: Optional[torch.Tensor]  # the ledger's scores (None without a monitor)
    timesteps: torch.Tensor  # the diffusion timestep drawn for each sample
    loss: Optional[torch.Tensor] = None  # the per-sample loss, once the forward has run (weights() on)
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # every rank's rows of a tensor, on every rank


@dataclass
class BuildContext:
    """What mitigations are built with, besides their own config section."""

    seed: int
    tokenizer: Any
    monitor: Any  # train.monitor.Monitor or None
    caption_dropout: float  # train.caption_dropout: the share of empty-prompt training
    data: DictConfig  # the resolved data section (columns, resolution)
    cache_dir: str
    num_train_timesteps: int = 1000  # the noise scheduler's


class Mitigation(abc.ABC):
    """Base class: subclasses set ``name`` and ``Config``, say when they are ``active`` (the one
    required method: a subclass without it cannot be instantiated), and override the hooks they need."""

    name: ClassVar[str]
    Config: ClassVar[type]

    @classmethod
    @abc.abstractmethod
    def active(cls, cfg: DictConfig) -> bool:
        """Whether ``cfg`` (this mitigation's section) turns it on; inactive ones are not built."""

    @classmethod
    def check(cls, cfg: DictConfig, run_cfg: DictConfig) -> Optional[str]:
        """A reason the whole run config cannot work with this section, or None (names the keys)."""
        return None

    @classmethod
    def needs_monitor(cls, cfg: DictConfig) -> bool:
        return False

    def __init__(self, cfg: DictConfig, ctx: BuildContext):
        self.cfg = cfg

    def prepare(self, table, root) -> Optional[torch.Tensor]:
        return None

    def captions(self, step: MitigationStep, captions: list[str]) -> list[str]:
        return captions

    def text_embedding(self, step: MitigationStep, text_emb: torch.Tensor) -> torch.Tensor:
        return text_emb

    def weights(self, step: MitigationStep) -> Optional[torch.Tensor]:
        return None

    def loss_map(self, step: MitigationStep, size: tuple[int, int]) -> Optional[torch.Tensor]:
        return None

    def loss_terms(self, step: MitigationStep) -> dict[str, torch.Tensor]:
        return {}

    def metrics(self) -> dict[str, tuple[float, float]]:
        return {}

    def state(self) -> dict:
        """What to keep in the checkpoint (JSON-serializable; the same on every rank); {} = nothing."""
        return {}

    def load_state(self, state: dict) -> None:
        pass


def targets(cfg: DictConfig, step: MitigationStep) -> torch.Tensor:
    """Which samples a ``target``/``start_step`` mitigation acts on this step: all, or the flagged ones."""
    if step.step < cfg.start_step:
        return torch.zeros_like(step.flagged)
    return step.flagged.clone() if cfg.target == "flagged" else torch.ones_like(step.flagged)


class Mitigations:
    """The active mitigations, called in registry order at each point of the step."""

    def __init__(self, active: list[Mitigation]):
        self.active = active
        self.names = [m.name for m in active]
        self._weight_sum, self._weight_count = 0.0, 0

    def prepare(self, table, root) -> Optional[torch.Tensor]:
        """Per-row sampling weights (the product of every mitigation's), or None."""
        out = None
        for m in self.active:
            w = m.prepare(table, root)
            if w is not None:
                out = w if out is None else out * w
        return out

    def captions(self, step: MitigationStep, captions: list[str]) -> list[str]:
        for m in self.active:
            captions = m.captions(step, captions)
        return captions

    def text_embedding(self, step: MitigationStep, text_emb: torch.Tensor) -> torch.Tensor:
        for m in self.active:
            text_emb = m.text_embedding(step, text_emb)
        return text_emb

    def weights_and_map(self, step: MitigationStep, size: tuple[int, int], device
                        ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight per sample [B], loss weight per latent position [B, 1, h, w] or None)."""
        weights = torch.ones(len(step.flagged), dtype=torch.float32)
        where = None
        for m in self.active:
            w = m.weights(step)
            if w is not None:
                weights = weights * w
            region = m.loss_map(step, size)
            if region is not None:
                where = region if where is None else where * region
        weights, where = weights.to(device), None if where is None else where.to(device)
        effective = weights * where.mean(dim=(1, 2, 3)) if where is not None else weights
        self._weight_sum += float(effective.sum())
        self._weight_count += len(effective)
        return weights, where

    def loss_terms(self, step: MitigationStep) -> dict[str, torch.Tensor]:
        return {name: term for m in self.active for name, term in m.loss_terms(step).items()}

    def state(self) -> dict:
        """{mitigation name: its state} for the checkpoint (TrainState.extra)."""
        return {m.name: s for m in self.active if (s := m.state())}

    def load_state(self, state: dict) -> None:
        for m in self.active:
            if m.name in state:
                m.load_state(state[m.name])

    def metrics(self, accelerator) -> dict[str, float]:
        """``mitig/`` means over the window, over every rank (a collective: call on all ranks)."""
        sums = {"mitig/mean_weight": (self._weight_sum, self._weight_count)}
        for m in self.active:
            sums.update(m.metrics())
        self._weight_sum, self._weight_count = 0.0, 0
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        return {k: float(s / c) if c else float("nan") for k, (s, c) in zip(keys, totals.tolist())}
