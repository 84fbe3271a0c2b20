"""Caption perturbations (Somepalli et al. 2023), drawn per (seed, micro-step, sample_id).

Seeding by sample and micro-step, never by a shared RNG, means a resumed run perturbs exactly as
the uninterrupted one, and ranks never have to agree on an RNG state.

- multiple captions (MC): one of the sample's alternates, uniformly
- random caption replacement (RC): with p, the caption becomes ``replace_tokens`` random words
- random token addition (RT): with p, ``add_tokens`` random words inserted at random positions
- caption word repetition (CWR): with p, ``repeat_words`` of the caption's own words re-inserted
- word dropout / shuffle: each word dropped with p; the word order shuffled with p
- Gaussian noise (GN): ``embedding_noise * N(0, I)`` added to the text embedding
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from omegaconf import DictConfig

from train.mitigate.base import BuildContext, Mitigation, MitigationStep, targets
from train.util import bounded, choice, seed_of

_WORD = re.compile(r"^[a-z]{3,12}$")


def random_vocabulary(tokenizer, size: int = 5000) -> list[str]:
    """Whole words from the tokenizer's vocabulary (what "random tokens" means for a caption);
    a byte-level vocabulary has no words, so random letter strings stand in."""
    words = sorted({t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and _WORD.match(t[:-4])})
    if len(words) >= 100:
        return words[:size] if len(words) <= size else random.Random(0).sample(words, size)
    rng = random.Random(0)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(size)]


@dataclass
class CaptionsConfig:
    """Caption perturbations (Somepalli et al. 2023); the papers' values are in configs/mitigation/."""

    target: str = choice("all", "flagged")
    start_step: int = bounded(0, ge=0)
    multiple_captions: bool = False  # MC: one of the row's alternate captions
    replace_p: float = bounded(0.0, ge=0.0, le=1.0)  # RC (paper: 0.1)
    replace_tokens: int = bounded(4, ge=1)
    add_token_p: float = bounded(0.0, ge=0.0, le=1.0)  # RT (paper: 0.1)
    add_tokens: int = bounded(2, ge=1)
    repeat_word_p: float = bounded(0.0, ge=0.0, le=1.0)  # CWR (paper: 0.1)
    repeat_words: int = bounded(2, ge=1)
    drop_word_p: float = bounded(0.0, ge=0.0, le=1.0)
    shuffle_p: float = bounded(0.0, ge=0.0, le=1.0)
    embedding_noise: float = bounded(0.0, ge=0.0)  # GN: lambda of N(0, I) on the text embedding (paper: 0.1)


def _changes_text(c) -> bool:
    return bool(c.multiple_captions or c.replace_p or c.add_token_p or c.repeat_word_p or c.drop_word_p or c.shuffle_p)


class CaptionPerturbation(Mitigation):
    name = "captions"
    Config = CaptionsConfig

    @classmethod
    def active(cls, cfg: DictConfig) -> bool:
        return _changes_text(cfg) or bool(cfg.embedding_noise)

    @classmethod
    def needs_monitor(cls, cfg: DictConfig) -> bool:
        return cfg.target == "flagged"

    def __init__(self, cfg: DictConfig, ctx: BuildContext):
        super().__init__(cfg, ctx)
        self.seed = ctx.seed
        self.vocabulary = random_vocabulary(ctx.tokenizer)
        self.changes_text = _changes_text(cfg)
        self._perturbed, self._seen = 0, 0

    def captions(self, step: MitigationStep, captions: list[str]) -> list[str]:
        mask = targets(self.cfg, step)
        self._perturbed += int(mask.sum())
        self._seen += len(mask)
        return self(captions, step.batch["captions"], step.batch["sample_id"], step.micro_step, mask)

    def text_embedding(self, step: MitigationStep, text_emb: torch.Tensor) -> torch.Tensor:
        return self.embedding_noise(text_emb, step.batch["sample_id"], step.micro_step, targets(self.cfg, step))

    def metrics(self) -> dict[str, tuple[float, float]]:
        out = {"mitig/perturbed_share": (self._perturbed, self._seen)}
        self._perturbed, self._seen = 0, 0
        return out

    def perturb_one(self, caption: str, alternates: Sequence[str], rng: random.Random) -> str:
        c = self.cfg
        if c.multiple_captions and len(alternates) > 1:
            caption = rng.choice(list(alternates))
        if c.replace_p and rng.random() < c.replace_p:
            return " ".join(rng.choice(self.vocabulary) for _ in range(c.replace_tokens))
        words = caption.split()
        if c.add_token_p and rng.random() < c.add_token_p:
            for _ in range(c.add_tokens):
                words.insert(rng.randint(0, len(words)), rng.choice(self.vocabulary))
        if c.repeat_word_p and words and rng.random() < c.repeat_word_p:
            chosen = [rng.choice(words) for _ in range(c.repeat_words)]
            for word in chosen:
                words.insert(rng.randint(0, len(words)), word)
        if c.drop_word_p:
            kept = [w for w in words if rng.random() >= c.drop_word_p]
            words = kept or words[:1]  # never an empty caption: that is the CFG null prompt
        if c.shuffle_p and rng.random() < c.shuffle_p:
            rng.shuffle(words)
        return " ".join(words)

    def __call__(self, captions: list[str], alternates: list[Sequence[str]], sample_ids: list[str],
                 step: int, mask: torch.Tensor) -> list[str]:
        if not self.changes_text:
            return captions
        out = []
        for caption, alts, sid, on in zip(captions, alternates, sample_ids, mask.tolist()):
            # an empty caption was dropped for classifier-free guidance on purpose: leave it
            if on and caption:
                caption = self.perturb_one(caption, alts, random.Random(seed_of(self.seed, "caption", step, sid)))
            out.append(caption)
        return out

    def embedding_noise(self, text_emb: torch.Tensor, sample_ids: list[str], step: int,
                        mask: torch.Tensor) -> torch.Tensor:
        """GN: per-sample Gaussian noise of scale ``embedding_noise`` on the masked samples."""
        scale = self.cfg.embedding_noise
        if not scale or not bool(mask.any()):
            return text_emb
        noise = torch.stack([
            torch.randn(text_emb.shape[1:], generator=torch.Generator().manual_seed(seed_of(self.seed, "gn", step, sid)))
            for sid in sample_ids]).to(text_emb.device, text_emb.dtype)
        return text_emb + scale * noise * mask.to(text_emb.device, text_emb.dtype)[:, None, None]

