"""Stable Diffusion components: load them from a diffusers folder or hub id, or build the tiny preset.

The tiny preset is written to disk as an ordinary diffusers pipeline and then loaded through the
same ``from_pretrained`` path as a real SD checkpoint, so CPU runs and tests exercise the code
users rely on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from train.util import bounded, build_once, choice

log = logging.getLogger(__name__)

SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


@dataclass
class TinyModelConfig:
    """A small SD-architecture model built offline (CPU runs, tests, the memorization testbed)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    down_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    )
    layers_per_block: int = 1
    attention_heads: int = 4
    cross_attention_dim: int = 32
    text_layers: int = 2
    text_intermediate_size: int = 64
    text_heads: int = 2
    vae_channels: list[int] = field(default_factory=lambda: [32, 64])
    beta_schedule: str = choice("scaled_linear", "linear", "squaredcos_cap_v2")
    prediction_type: str = choice("epsilon", "v_prediction")
    init_seed: int = 0


@dataclass
class ModelConfig:
    pretrained: Optional[str] = None  # a diffusers folder or a hub id
    preset: Optional[str] = choice(None, "tiny")  # "tiny": build a small model offline
    revision: Optional[str] = None
    variant: Optional[str] = None
    init_from: Optional[str] = None  # start NEW training from a checkpoint's / final's UNet weights
    cache_dir: str = "~/.cache/copyguard"  # built presets and generated data sets live here
    prediction_type: Optional[str] = choice(None, "epsilon", "v_prediction")  # override the scheduler's
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)



class ModelError(ValueError):
    """A model source that cannot be used; the message says what is wrong."""


@dataclass
class Components:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    source: str  # the folder or hub id they came from


# --------------------------------------------------------------------------------------------
# Tiny preset
# --------------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """One printable unicode symbol per byte, as byte-level BPE vocabularies spell them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:  # bytes without a printable glyph are moved above 255
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _byte_vocab() -> dict[str, int]:
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    return vocab


def _with_specials(vocab: dict[str, int]) -> dict[str, int]:
    vocab = dict(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def byte_level_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 bytes (+ word-end forms) and no merges.

    Every string tokenizes (nothing is unknown), one character per token, with SD1.x's conventions
    (BOS 49406-style start token, pad = end-of-text) and a 77-token context.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_with_specials(_byte_vocab()), merges=[], model_max_length=77)


def learn_bpe_merges(words: Counter, merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on word counts (each word a tuple of symbols): the most frequent adjacent pair
    first, ties broken by the pair itself, so the result depends on the counts alone.

    Written here because the `tokenizers` trainer breaks ties by hash order: two runs on the same
    captions give different vocabularies, and a base model kept in the repo must be rebuildable.
    """
    words = dict(words)
    learned = []
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break  # every word is a single symbol already
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        learned.append(best)
        joined = best[0] + best[1]
        merged = {}
        for word, count in words.items():
            if best[0] in word:  # cheap pre-check; most words do not contain the pair
                out, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                        out.append(joined)
                        i += 2
                    else:
                        out.append(word[i])
                        i += 1
                word = tuple(out)
            merged[word] = merged.get(word, 0) + count
        words = merged
    return learned


def caption_bpe_tokenizer(texts: list[str], merges: int):
    """A CLIP tokenizer with ``merges`` byte-level BPE merges learned on ``texts``.

    Why: with the byte-level tokenizer a tiny 2-layer text encoder must first assemble words out
    of characters (a caption of a dozen words fills most of the 77 tokens) and barely tells
    prompts apart; with merges learned on the captions most words are one token, as in CLIP's
    49k vocabulary. Same conventions as :func:`byte_level_tokenizer` (byte alphabet first, so
    nothing is unknown; word-end ``</w>`` forms; BOS/EOS last). Words are split exactly as the
    returned ``CLIPTokenizer`` splits them (its own normalizer and pre-tokenizer); deterministic.
    """
    if merges < 1:
        raise ValueError(f"merges must be >= 1 (got {merges}); use byte_level_tokenizer() for none")
    if not texts:
        raise ValueError("caption_bpe_tokenizer needs at least one caption to learn merges from")
    splitter = byte_level_tokenizer().backend_tokenizer
    words: Counter = Counter()
    for text in texts:
        for piece, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1
    learned = learn_bpe_merges(words, merges)
    vocab = _byte_vocab()
    for left, right in learned:
        vocab.setdefault(left + right, len(vocab))
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_with_specials(vocab), merges=learned, model_max_length=77)


def tiny_text_encoder(tiny: DictConfig, tokenizer):
    """The tiny preset's CLIP text encoder, sized for ``tokenizer`` (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=tiny.cross_attention_dim,
        intermediate_size=tiny.text_intermediate_size, num_hidden_layers=tiny.text_layers,
        num_attention_heads=tiny.text_heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def tiny_pipeline(tiny: DictConfig, resolution: int):
    """Build a randomly initialised SD-architecture pipeline (deterministic for tiny.init_seed)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(tiny.init_seed)
    tokenizer = byte_level_tokenizer()
    text_encoder = tiny_text_encoder(tiny, tokenizer)
    vae_channels = list(tiny.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        layers_per_block=1, norm_num_groups=min(32, vae_channels[0]), sample_size=resolution,
    )
    latent_size = resolution // 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4,
        block_out_channels=list(tiny.block_out_channels), layers_per_block=tiny.layers_per_block,
        down_block_types=list(tiny.down_block_types), up_block_types=list(tiny.up_block_types),
        cross_attention_dim=tiny.cross_attention_dim, attention_head_dim=tiny.attention_heads,
        norm_num_groups=min(32, tiny.block_out_channels[0]),
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=tiny.beta_schedule,
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False,
                              prediction_type=tiny.prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def ensure_tiny(tiny: DictConfig, resolution: int, cache_dir: str) -> Path:
    """Build the tiny preset into the cache once (atomically) and return its folder."""
    spec = json.dumps({"tiny": OmegaConf.to_container(tiny), "resolution": resolution, "v": 1},
                      sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    target = Path(cache_dir).expanduser() / "presets" / f"tiny-{key}"
    def build(tmp: Path) -> None:
        tiny_pipeline(tiny, resolution).save_pretrained(tmp)
        (tmp / "copyguard_preset.json").write_text(spec)

    return build_once(target, "model_index.json", build)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def check_diffusers_folder(path: Path) -> None:
    """Fail early, in plain words, when a local folder is not a Stable Diffusion pipeline."""
    if not path.is_dir():
        raise ModelError(f"model folder not found: {path}")
    if not (path / "model_index.json").is_file():
        hint = ""
        if (path / "train_state.json").is_file():
            hint = " (it is a copyguard training checkpoint: use train.resume or model.init_from)"
        elif (path / "model.safetensors").is_file() or any(path.glob("*.ckpt")):
            hint = " (it looks like a single model or a raw checkpoint, not a diffusers pipeline)"
        raise ModelError(f"{path} is not a diffusers model folder: model_index.json is missing{hint}")
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise ModelError(f"{path} is not a Stable Diffusion pipeline: missing {', '.join(missing)}")


def load_components(model_cfg: DictConfig, resolution: int) -> Components:
    """Tokenizer, text encoder, VAE, UNet and training noise scheduler, via ``from_pretrained``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if model_cfg.preset == "tiny":
        source = str(ensure_tiny(model_cfg.tiny, resolution, model_cfg.cache_dir))
    else:
        source = model_cfg.pretrained
        local = Path(source).expanduser()
        if local.exists() or source.startswith((".", "/", "~")):
            check_diffusers_folder(local)
            source = str(local)
    kw = dict(revision=model_cfg.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder",
                                                     variant=model_cfg.variant, **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=model_cfg.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet",
                                                    variant=model_cfg.variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    except OSError as exc:
        raise ModelError(f"cannot load a Stable Diffusion model from {source!r}: {exc}") from exc
    if model_cfg.prediction_type:
        noise_scheduler.register_to_config(prediction_type=model_cfg.prediction_type)
    if model_cfg.init_from:
        init_unet_from(unet, model_cfg.init_from)
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, source)


def init_unet_from(unet, path: str) -> None:
    """Load UNet weights for NEW training from a final/ pipeline or a training checkpoint."""
    from safetensors.torch import load_file

    root = Path(path).expanduser()
    candidates = [root / "unet" / "diffusion_pytorch_model.safetensors",  # final/ pipeline
                  root / "model.safetensors"]  # accelerate checkpoint of the UNet
    for file in candidates:
        if file.is_file():
            state = load_file(file)
            missing, unexpected = unet.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ModelError(f"model.init_from={path}: weights do not fit this UNet "
                                 f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                                 f"{(missing or unexpected)[0]}); was it trained from another model?")
            log.info("initialised UNet from %s", file)
            return
    raise ModelError(f"model.init_from={path}: no UNet weights found (looked for "
                     f"{', '.join(str(c.relative_to(root)) for c in candidates)})")


def save_pipeline(components: Components, unet, text_encoder, out_dir: str | os.PathLike) -> None:
    """Write a diffusers pipeline that ``StableDiffusionPipeline.from_pretrained`` loads unchanged."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=components.noise_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)


def unet_fingerprint(unet) -> dict:
    """What must match for a checkpoint to resume into this model (LoRA adapters included)."""
    config = dict(unet.config)
    keep = ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim",
            "in_channels", "out_channels", "layers_per_block", "sample_size", "attention_head_dim")
    out = {k: (list(config[k]) if isinstance(config[k], (list, tuple)) else config[k]) for k in keep if k in config}
    peft = getattr(unet, "peft_config", None)
    if peft:
        lora = peft["default"]
        out["lora"] = {"rank": lora.r, "alpha": lora.lora_alpha, "targets": sorted(lora.target_modules)}
    return out


# --------------------------------------------------------------------------------------------
# LoRA: low-rank adapters on the UNet's attention projections (peft, as diffusers' examples)
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    rank: int = bounded(0, ge=0)  # 0 = full fine-tuning; r > 0 trains rank-r adapters only
    alpha: Optional[float] = bounded(None, gt=0.0)  # the adapters' scale is alpha / rank; None = rank
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = bounded(0.0, ge=0.0, lt=1.0)
    # final/ is also a whole pipeline with the adapters merged (what the audit and from_pretrained
    # load); false: only final/lora/ (the adapters, for load_lora_weights on the base model)
    save_merged: bool = True


def add_lora(unet, cfg: DictConfig, seed: int) -> None:
    """Freeze the UNet and add trainable LoRA adapters to the ``cfg.targets`` layers. Their random
    init is drawn from ``seed`` alone (peft draws from the global generator, whose state depends
    on whatever ran before), so every rank and every rerun starts from the same adapters."""
    from peft import LoraConfig as PeftLoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                                        init_lora_weights="gaussian", target_modules=list(cfg.targets)))


def encode_text(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    """The text encoder's hidden states for ``captions``, padded and truncated as in training."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    return text_encoder(ids, return_dict=False)[0]


def trainable_parameters(model) -> list:
    """The parameters that train (all of a full fine-tune, the adapters of a LoRA one): what the
    optimizer, EMA and gradient clipping see."""
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(unet, out_dir: str | os.PathLike) -> None:
    """The adapters in the format ``StableDiffusionPipeline.load_lora_weights`` reads."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)


def merged_unet(unet):
    """A plain UNet (no adapter modules) whose weights include the adapters: a copy, so the
    model being trained keeps its adapters."""
    import copy

    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def freeze(module: torch.nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()
