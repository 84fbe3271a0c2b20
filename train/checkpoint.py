"""Checkpoints that survive a kill, and the train state that makes resume exact.

A checkpoint is written into ``checkpoints/.tmp-checkpoint-<step>`` by every rank (DeepSpeed saves
shards on each), flushed to disk, and only then renamed to ``checkpoint-<step>`` by the main
process; ``checkpoints/latest`` is replaced atomically afterwards and old checkpoints are pruned
last. So ``latest`` only ever names a complete checkpoint, and a run killed mid-save resumes from
the previous one. The output directory must be on a file system every node sees.

What accelerate does not save, we write as JSON + safetensors (never pickles): the step counters,
the data position, the LR scheduler's counters, the EMA weights and each rank's noise RNG.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from data.datasets import DataPosition
from train.util import fsync_dir, fsync_tree, write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message says why and what to do."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    micro_step: int = 0  # batches consumed by each rank
    samples_seen: int = 0  # over all ranks
    data: DataPosition = field(default_factory=DataPosition)
    world_size: int = 1
    batch_size: int = 1
    num_workers: int = 0
    model: dict = field(default_factory=dict)  # fingerprint of the UNet it belongs to
    lr_scheduler: dict = field(default_factory=dict)
    ema: Optional[dict] = None  # EMA scalars; the weights are in ema.safetensors
    extra: dict = field(default_factory=dict)  # state other components keep (e.g. the ledger's)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        raw = json.loads(text)
        raw["data"] = DataPosition(**raw.get("data", {}))
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a temporary folder is never one of them)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: Path, spec: Optional[str]) -> Optional[Path]:
    """``latest`` -> the newest complete checkpoint (None when the run has none yet); a path -> it."""
    if not spec:
        return None
    if spec == "latest":
        pointer = checkpoints_dir(output_dir) / "latest"
        if pointer.is_file():
            named = checkpoints_dir(output_dir) / pointer.read_text().strip()
            if (named / STATE_FILE).is_file():
                return named
            log.warning("checkpoints/latest names %s, which is incomplete; using the newest complete one", named)
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"train.resume={spec}: no such checkpoint folder")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"train.resume={spec} is not a copyguard checkpoint ({STATE_FILE} is missing); "
                              "to start new training from a model's weights use model.init_from")
    return path


def save_checkpoint(accelerator, output_dir: Path, state: TrainState, rng: torch.Generator,
                    ema=None, total_limit: Optional[int] = None, extra_files: Optional[dict] = None) -> Path:
    """Write checkpoint-<step> atomically on all ranks; return its final path.

    ``extra_files``: {file name: callable(path)} run on the main process inside the temporary
    folder (e.g. the ledger), so they are published together with the weights.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-checkpoint-*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(tmp), safe_serialization=True)
    save_file({"state": rng.get_state()}, str(tmp / f"rng_rank{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        if ema is not None:
            ema_state = ema.state_dict()
            save_file({f"p{i}": t.detach().contiguous().cpu() for i, t in enumerate(ema_state.pop("shadow_params"))},
                      str(tmp / "ema.safetensors"))
            state.ema = {k: v for k, v in ema_state.items() if isinstance(v, (int, float, bool, type(None)))}
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        (tmp / STATE_FILE).write_text(state.to_json())  # last: its presence marks a complete checkpoint
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        fsync_tree(tmp)
        stale = root / f".old-checkpoint-{state.step}"
        if final.exists():  # the same step saved before (a resume re-reached it): move it aside
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)  # until the new one is in place, so a kill here loses nothing
        os.replace(tmp, final)
        write_atomic(root / "latest", final.name, durable=True)
        shutil.rmtree(stale, ignore_errors=True)
        fsync_dir(root)
        if total_limit:
            for old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, rng: torch.Generator, ema=None,
                    model_fingerprint: Optional[dict] = None) -> TrainState:
    """Restore model/optimizer (accelerate), RNG, EMA; return the train state."""
    try:
        state = TrainState.from_json((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({STATE_FILE}: {exc}); "
                              "resume from an earlier checkpoint or start again") from exc
    if model_fingerprint is not None and state.model and state.model != model_fingerprint:
        diff = sorted(k for k in set(state.model) | set(model_fingerprint)
                      if state.model.get(k) != model_fingerprint.get(k))
        raise CheckpointError(f"checkpoint {path} was trained with a different model (differs in "
                              f"{', '.join(diff)}); resume with the same model.* settings, or start a "
                              "new run from its weights with model.init_from")
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # torch/safetensors/deepspeed raise many kinds for a damaged file
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}. "
                              "It may be corrupt: resume from an earlier checkpoint") from exc
    rng_file = path / f"rng_rank{accelerator.process_index}.safetensors"
    if rng_file.is_file() and state.world_size == accelerator.num_processes:
        rng.set_state(load_file(str(rng_file))["state"])
    else:
        log.warning("checkpoint %s was written by %d process(es), now %d: noise RNG re-seeded, resume "
                    "is not bit-exact", path, state.world_size, accelerator.num_processes)
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file() or state.ema is None:
            raise CheckpointError(f"train.use_ema=true but checkpoint {path} has no EMA weights")
        tensors = load_file(str(ema_file))
        ema.load_state_dict({**state.ema, "shadow_params": [tensors[f"p{i}"] for i in range(len(tensors))]})
    return state


def map_data_position(state: TrainState, world_size: int, batch_size: int, num_workers: int,
                      streaming: bool) -> DataPosition:
    """The saved data position in this run's terms, or a clear error when it has none."""
    old_global, new_global = state.world_size * state.batch_size, world_size * batch_size
    if streaming:
        if (state.world_size, state.batch_size, state.num_workers) != (world_size, batch_size, num_workers):
            raise CheckpointError(
                "a webdataset stream resumes exactly only with the same processes x batch size x workers "
                f"(checkpoint: {state.world_size} x {state.batch_size} x {state.num_workers}, now "
                f"{world_size} x {batch_size} x {num_workers})")
        return state.data
    if old_global == new_global:
        return state.data
    offset = state.data.batch * old_global  # samples consumed in the current epoch
    if offset % new_global:
        raise CheckpointError(
            f"the checkpoint stopped {offset} samples into epoch {state.data.epoch}, which is not a whole "
            f"number of global batches of {world_size} x {batch_size}; resume with a world size and batch size "
            f"whose product divides {offset}, or with the original {state.world_size} x {state.batch_size}")
    return DataPosition(state.data.epoch, offset // new_global, state.data.batches_consumed)



@torch.no_grad()
def weights_divergence(accelerator, model: torch.nn.Module) -> float:
    """How far the ranks' copies of ``model`` are apart (0.0 when they are in step).

    Each rank reduces its weights to a float64 (sum, sum of squares) pair; the pairs are gathered
    and compared with rank 0's. Cheap enough for every checkpoint; meaningless under ZeRO-3.
    """
    params = [p for p in model.parameters()]
    local = torch.stack([sum(p.double().sum() for p in params), sum(p.double().pow(2).sum() for p in params)])
    everyone = accelerator.gather(local[None].to(accelerator.device))
    return float((everyone - everyone[0]).abs().max())
