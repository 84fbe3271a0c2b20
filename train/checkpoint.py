"""Checkpoints that survive a kill, and the train state that makes resume exact.

A checkpoint is written into ``checkpoints/.tmp-checkpoint-<step>`` by every rank (DeepSpeed saves
shards on each), flushed to disk, and only then renamed to ``checkpoint-<step>`` by the main
process; ``checkpoints/latest`` is replaced atomically afterwards and old checkpoints are pruned
last. So ``latest`` only ever names a complete checkpoint, and a run killed mid-save resumes from
the previous one. The output directory must be on a file system every node sees.

A file can still be damaged after the save (a disk fault, a copy cut short), so a checkpoint is
checked before it is resumed: ``train_state.json`` lists every file's size, and safetensors
headers, zip (torch) directories and parquet footers must read back. ``train.resume=latest``
passes over a damaged checkpoint to the newest intact one, with a warning.

What accelerate does not save, we write as JSON + safetensors (never pickles): the step counters,
the data position, the LR scheduler's counters, the EMA weights and each rank's noise RNG.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
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
    files: dict = field(default_factory=dict)  # {path in the checkpoint: bytes}, checked before a resume

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


def numbered_checkpoints(output_dir: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder, finished or not, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def file_problem(file: Path) -> Optional[str]:
    """What is wrong with one checkpoint file, judged from its size and its ends (cheap: the
    tensors themselves are not read), or None."""
    try:
        size = file.stat().st_size
        if file.suffix == ".safetensors":  # u64 header length, JSON header, then the tensor bytes
            with open(file, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return f"truncated ({size} bytes)"
                (length,) = struct.unpack("<Q", head)
                if length > size - 8:
                    return f"truncated ({size} bytes, the header alone needs {length + 8})"
                header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + length + end != size:
                return f"{size} bytes, its header describes {8 + length + end} (truncated?)"
        elif file.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(file)  # the footer, at the end of the file
        elif file.suffix == ".json":
            json.loads(file.read_text())
        else:  # torch.save's zip (optimizer.bin, accelerate's random_states_*.pkl): the directory at the end must read
            with open(file, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
            if zipped:
                zipfile.ZipFile(file).close()
            elif file.suffix == ".pkl":  # a plain pickle ends with STOP (".")
                with open(file, "rb") as f:
                    f.seek(max(size - 1, 0))
                    if size == 0 or f.read(1) != b".":
                        return "truncated (does not end like a pickle)"
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, zipfile.BadZipFile) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be resumed (missing, truncated or unreadable files),
    or None when it looks intact."""
    try:
        state = TrainState.from_json((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"{STATE_FILE} is missing (the save did not finish)"
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        return f"{STATE_FILE}: {type(exc).__name__}: {exc}"
    for name, size in state.files.items():  # written with the checkpoint (older ones have none)
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written"
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name != STATE_FILE and (problem := file_problem(file)):
            return f"{file.relative_to(path)}: {problem}"
    return None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished and intact checkpoints, oldest first (a temporary folder is never one of them)."""
    return [p for p in numbered_checkpoints(output_dir) if checkpoint_problem(p) is None]


def find_checkpoint(output_dir: Path, spec: Optional[str]) -> Optional[Path]:
    """``latest`` -> the newest intact checkpoint (None when the run has none yet; a damaged one is
    passed over with a warning, and an error when none is intact); a path -> it, if intact."""
    if not spec:
        return None
    if spec == "latest":
        root = checkpoints_dir(output_dir)
        pointer = root / "latest"
        named, damaged = None, []
        if pointer.is_file():
            named = root / pointer.read_text().strip()
            problem = checkpoint_problem(named) if named.is_dir() else "it does not exist"
            if problem is None:
                return named
            log.warning("checkpoints/latest names %s, which is incomplete or damaged (%s); using the newest "
                        "intact one", named, problem)
            if (named / STATE_FILE).is_file():
                damaged.append(f"{named.name}: {problem}")
        for path in reversed(numbered_checkpoints(output_dir)):
            if path == named:
                continue
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if (path / STATE_FILE).is_file():  # finished once, damaged since (else: an unfinished leftover)
                log.warning("passing over damaged checkpoint %s: %s", path, problem)
                damaged.append(f"{path.name}: {problem}")
        if damaged:
            raise CheckpointError(f"train.resume=latest: no intact checkpoint in {root} ({'; '.join(damaged)}); "
                                  f"restore one from a backup, or move {root} away to start again from step 0")
        return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"train.resume={spec}: no such checkpoint folder")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"train.resume={spec} is not a copyguard checkpoint ({STATE_FILE} is missing); "
                              "to start new training from a model's weights use model.init_from")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete ({problem}); resume from an earlier "
                              "checkpoint (train.resume=latest takes the newest intact one)")
    return path


def save_failure(final: Path, exc: BaseException) -> str:
    """One line for a failed save: torch's writer says "[enforce fail at inline_container.cc:672]
    . unexpected pos ..." when the disk fills, which names neither the file nor the cause."""
    text = str(exc).strip()
    reason = text.splitlines()[0][:200] if text else type(exc).__name__
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "unexpected pos" in text \
        or "No space left" in text
    cause = "the disk is full" if full else "the write failed"
    return (f"cannot write checkpoint {final}: {cause} ({type(exc).__name__}: {reason}); free space in "
            f"{final.parent} (fewer checkpoints: train.checkpoints_total_limit), then run again with "
            "train.resume=latest to continue from the last complete checkpoint")


def remove_checkpoint(path: Path) -> None:
    """Rename first, then delete: a kill while deleting leaves a hidden folder (cleaned up by the
    next save), never a half-deleted ``checkpoint-<step>`` that looks like one."""
    doomed = path.with_name(f".pruned-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
        for stale in [*root.glob(".tmp-checkpoint-*"), *root.glob(".pruned-*")] if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving or pruning
        for leftover in numbered_checkpoints(output_dir):
            # a published checkpoint always has its state file: one without is what an older
            # version's pruning left when killed (an empty or half-deleted folder)
            if not (leftover / STATE_FILE).is_file():
                log.warning("removing %s: an unfinished checkpoint folder (left by a killed run)", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    # A full disk surfaces as OSError (ENOSPC), or from torch's writer as a RuntimeError that names
    # neither file nor cause: either way one line that names the checkpoint and says what to do.
    # (The partial folder is removed at once, so it does not hold on to the space.)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        save_file({"state": rng.get_state()}, str(tmp / f"rng_rank{accelerator.process_index}.safetensors"))
        if accelerator.is_main_process:
            if ema is not None:
                ema_state = ema.state_dict()
                save_file({f"p{i}": t.detach().contiguous().cpu()
                           for i, t in enumerate(ema_state.pop("shadow_params"))}, str(tmp / "ema.safetensors"))
                state.ema = {k: v for k, v in ema_state.items() if isinstance(v, (int, float, bool, type(None)))}
            for name, write in (extra_files or {}).items():
                write(tmp / name)
    except (OSError, RuntimeError, SafetensorError) as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(save_failure(final, exc)) from exc
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        try:
            # last, once every rank has written: its presence marks a complete checkpoint, and
            # its list of file sizes lets a resume tell a file damaged since
            state.files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                           if p.is_file()}
            (tmp / STATE_FILE).write_text(state.to_json())
            fsync_tree(tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(save_failure(final, exc)) from exc
        stale = root / f".old-checkpoint-{state.step}"
        if final.exists():  # the same step saved before (a resume re-reached it): move it aside
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)  # until the new one is in place, so a kill here loses nothing
        os.replace(tmp, final)
        write_atomic(root / "latest", final.name, durable=True)
        shutil.rmtree(stale, ignore_errors=True)
        fsync_dir(root)
        if total_limit:
            kept = complete_checkpoints(output_dir)[-total_limit:]
            oldest = int(CHECKPOINT_RE.match(kept[0].name).group(1)) if kept else state.step
            for old in numbered_checkpoints(output_dir):  # older than the kept ones, damaged or not
                if int(CHECKPOINT_RE.match(old.name).group(1)) < oldest:
                    remove_checkpoint(old)
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
        rng.set_state(_load(rng_file)["state"])
    else:
        log.warning("checkpoint %s was written by %d process(es), now %d: noise RNG re-seeded, resume "
                    "is not bit-exact", path, state.world_size, accelerator.num_processes)
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file() or state.ema is None:
            raise CheckpointError(f"train.use_ema=true but checkpoint {path} has no EMA weights")
        tensors = _load(ema_file)
        ema.load_state_dict({**state.ema, "shadow_params": [tensors[f"p{i}"] for i in range(len(tensors))]})
    return state


def _load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot load {file}: {exc}. It may be corrupt: resume from an earlier "
                              "checkpoint") from exc


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
