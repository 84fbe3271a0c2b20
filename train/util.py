"""The ground floor every other module may use: errors, seeds, atomic writes, JSON-safe values.

Nothing here imports another copyguard module, so any layer can import it (tests/test_layers.py).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Union


class ConfigError(ValueError):
    """A config that cannot be run; the message says which key and why."""


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from any parts; stable across processes and runs (unlike ``hash``), so a
    draw keyed by (seed, purpose, step, sample_id) is the same after a resume and on any rank."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------------------------
# Atomic writes: a file or folder appears whole under its final name, or not at all
# --------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under root to disk before it is published by a rename."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def write_atomic(path: Union[str, os.PathLike], content: Union[str, bytes, Callable[[Path], None]],
                 durable: bool = False) -> Path:
    """Write ``path`` through a hidden temporary sibling and a rename. ``content`` is text, bytes,
    or a writer called with the temporary path (parquet, numpy, safetensors writers take a path).
    ``durable`` also fsyncs the file and its folder (checkpoints: survive a power loss)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)
    return path


def write_array(path: Union[str, os.PathLike], array: Any) -> Path:
    """A numpy array as ``.npy``, atomically and without pickles (np.save given a file object: a
    path would get ``.npy`` appended to the temporary name)."""
    import numpy as np

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return write_atomic(path, save)


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it with ``build(tmp_dir)`` first unless ``target/marker`` exists.
    Concurrent builders (ranks, parallel jobs) race safely: the first rename wins."""
    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / marker).exists():  # not a lost race with another process: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# JSON-safe values
# --------------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Plain JSON, recursively: tensors and numpy values become Python numbers or lists, paths
    strings, and NaN or infinities null (JSON has no such numbers; a reader sees "no value")."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy / torch, any shape
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Config fields that declare their allowed values once (train/config.py checks every layer)
# --------------------------------------------------------------------------------------------


def choice(default: Any, *allowed: Any) -> Any:
    """A dataclass field whose value must be one of ``allowed`` (``default`` is always allowed)."""
    from dataclasses import field

    return field(default=default, metadata={"choices": tuple(dict.fromkeys((default, *allowed)))})


def bounded(default: Any, ge: Any = None, gt: Any = None, le: Any = None, lt: Any = None) -> Any:
    """A numeric dataclass field with a range; ``None`` stays allowed where the default is ``None``."""
    from dataclasses import field

    return field(default=default, metadata={"range": (ge, gt, le, lt)})


def range_text(ge: Any, gt: Any, le: Any, lt: Any) -> str:
    low = f">= {ge}" if ge is not None else f"> {gt}" if gt is not None else ""
    high = f"<= {le}" if le is not None else f"< {lt}" if lt is not None else ""
    return " and ".join(p for p in (low, high) if p) or "finite"


def in_range(value: Any, ge: Any, gt: Any, le: Any, lt: Any) -> bool:
    return ((ge is None or value >= ge) and (gt is None or value > gt)
            and (le is None or value <= le) and (lt is None or value < lt))


# --------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """Library chatter that tells a copyguard user nothing (float32 casting notes, weight-loading
    bars, DeepSpeed's accelerator guess, torchvision fallbacks) is silenced; their errors and
    copyguard's own lines stay."""
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass
    # DeepSpeed logs its accelerator guess while it is imported, on a logger it configures itself:
    # a filter set on that logger beforehand survives its setup
    logging.getLogger("DeepSpeed").addFilter(lambda record: "accelerator to" not in record.getMessage())
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # a line per file of every checkpoint
