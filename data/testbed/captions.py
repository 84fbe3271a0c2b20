"""Captions whose length says nothing about the group they belong to.

A pilot showed why this matters: planted captions a few tokens longer than clean ones let
caption length alone separate the groups (AUC 0.98), and every attention-based signal simply
followed the length. Here every caption is

    core  +  ", "  +  filler words

The core is the templated name, plus the group's shared phrase for local copies. Each caption
without a phrase gets a *stand-in*: as many extra filler words as one of the local phrases has
tokens, so the phrase is replaced, not removed. Then:

* tokens: the filler count is ``stand-in + min_filler_words + offset``, where the offsets are
  spread identically in every group (:func:`balanced_offsets`) and a per-group correction of a
  fraction of a token evens out what remains (mostly from names of different lengths);
* characters: each caption aims at ``round(chars_per_token * tokens) + jitter``, one rule for all
  groups, and the filler words' lengths are chosen to hit it.

Token counts use :func:`caption_token_count`, CLIP's pre-tokenizer split (words, single digits,
runs of punctuation). Real CLIP BPE splits rare words into several pieces, so it gives equal or
larger counts; the filler words are common English words that BPE keeps whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np

# CLIP's pre-tokenizer pattern, with Python's `re` spelling of \p{L} (letters) and \p{N} (digits).
_TOKEN_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\w\s]|_)+", re.IGNORECASE)


def caption_tokens(text: str) -> list[str]:
    """Split a caption the way CLIP's tokenizer does before BPE (lower-cased)."""
    return _TOKEN_RE.findall(text.lower())


def caption_token_count(text: str) -> int:
    """Number of pre-BPE tokens in ``text``: a lower bound on CLIP BPE tokens, without BOS/EOS."""
    return len(caption_tokens(text))


# Neutral descriptor words for padding, grouped by length so a run of them can hit a character
# target. They describe nothing specific to any image, stamp or group.
FILLER_WORDS: dict[int, tuple[str, ...]] = {
    3: ("new", "fun", "big", "top"),
    4: ("bold", "neat", "soft", "pure", "fine", "calm"),
    5: ("clean", "plain", "crisp", "sharp", "vivid", "basic", "solid", "glyph"),
    6: ("simple", "bright", "smooth", "modern", "lively", "gentle", "cheery"),
    7: ("graphic", "digital", "outline", "classic", "artwork", "colored", "precise"),
    8: ("centered", "detailed", "colorful", "friendly", "balanced", "rendered", "stylized"),
    9: ("graphical", "rendering", "character", "pictorial", "symmetric", "cheerful"),
    10: ("decorative", "expressive", "minimalist", "foreground", "vectorized", "harmonious"),
    11: ("illustrated", "traditional", "descriptive", "symmetrical", "distinctive"),
}


def filler_bank(exclude: Iterable[str] = ()) -> dict[int, tuple[str, ...]]:
    """The filler words minus any word in ``exclude`` (template words, local phrases).

    A filler word that also occurred in a local phrase would leak the phrase into clean captions.
    """
    banned = {w for text in exclude for w in caption_tokens(text)}
    bank = {n: tuple(w for w in words if w not in banned) for n, words in FILLER_WORDS.items()}
    empty = [n for n, words in bank.items() if not words]
    if empty:
        raise ValueError(f"no filler word of length {empty} left after excluding {sorted(banned)}")
    return bank


def balanced_offsets(n: int, levels: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` integer offsets in ``[0, levels)``, spread evenly and in shuffled order.

    Offset j is the rounded ``(j + 0.5) / n`` quantile of a uniform spread over the levels. The
    positions are symmetric about the centre and round-half-to-even keeps that symmetry, so the
    mean is exactly ``(levels - 1) / 2`` for odd ``levels`` and every n: a group of two gets the
    same mean as a group of four hundred.
    """
    if levels < 1 or levels % 2 == 0:
        raise ValueError(f"levels must be a positive odd number, got {levels}")
    # position_j = ((2j + 1) * levels - n) / (2n), rounded exactly (Fraction rounds half to even)
    offsets = np.array([round(Fraction((2 * j + 1) * levels - n, 2 * n)) for j in range(n)], dtype=int)
    return rng.permutation(offsets)


def balanced_draw(values: Sequence[int], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` values cycling through ``values`` in a shuffled order, so each appears n/len times (±1)."""
    if not values:
        return [0] * n
    cycle = [values[i] for i in rng.permutation(len(values))]
    return [cycle[j % len(cycle)] for j in rng.permutation(n)]


# --------------------------------------------------------------------------------------------
# Planning and padding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionPlan:
    """How to pad every caption of one image: the filler word count and each caption's
    character target (same order as the image's cores)."""

    filler_words: int
    char_targets: tuple[int, ...]


def plan_captions(cores: Sequence[Sequence[str]], groups: Sequence[str], phrases: Sequence[str | None],
                  stand_ins: Sequence[str], bank: dict[int, Sequence[str]], rng: np.random.Generator, *,
                  min_filler_words: int = 1, token_levels: int = 3, char_levels: int = 5) -> list[CaptionPlan]:
    """Filler counts and character targets for every image, matched across groups.

    ``cores[i]`` are image i's caption cores (primary first; a local image's include its phrase),
    ``phrases[i]`` its local phrase or None, ``stand_ins`` the phrases whose lengths phrase-less
    captions borrow (the local phrases; empty when there are none).
    """
    n = len(cores)
    # Filler before correction: a stand-in phrase's tokens for phrase-less images, then the
    # minimum, then a balanced offset. Stand-ins and offsets are dealt per group.
    filler = np.zeros(n, dtype=int)
    stand_in_tokens = {s: caption_token_count(s) for s in stand_ins}
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        offsets = balanced_offsets(len(members), token_levels, rng)
        borrowed = balanced_draw(list(range(len(stand_ins))), len(members), rng)
        for i, offset, s in zip(members, offsets, borrowed):
            extra = stand_in_tokens[stand_ins[s]] if phrases[i] is None and stand_ins else 0
            filler[i] = extra + min_filler_words + offset

    # Per-group correction: add whole filler words to some members so every group's mean
    # primary-caption length reaches the longest group mean (to within 1/(2 * group size)).
    primary = np.array([caption_token_count(c[0] + ",") for c in cores]) + filler
    group_means = {g: primary[[i for i in range(n) if groups[i] == g]].mean() for g in set(groups)}
    target_mean = max(group_means.values())
    for group in sorted(group_means):
        members = np.array([i for i in range(n) if groups[i] == group])
        missing = int(round(len(members) * (target_mean - group_means[group])))
        extra = np.full(len(members), missing // len(members))
        extra[rng.permutation(len(members))[: missing % len(members)]] += 1
        filler[members] += extra

    # Characters: one chars-per-token rule for everyone, fitted so that fillers of middling
    # word length would meet it on average; jitter is balanced per group and centred on zero.
    mid_word = (min(bank) + max(bank)) / 2
    tokens, natural = [], []
    for i, image_cores in enumerate(cores):
        for core in image_cores:
            t = caption_token_count(core + ",") + int(filler[i])
            tokens.append(t)
            natural.append(len(core) + 1 + int(filler[i]) * (1 + mid_word))
    chars_per_token = float(np.sum(natural) / np.sum(tokens))
    plans: list[CaptionPlan | None] = [None] * n
    for group in sorted(set(groups)):
        members = [i for i in range(n) if groups[i] == group]
        jitter = balanced_offsets(len(members), char_levels, rng) - (char_levels - 1) // 2
        for i, j in zip(members, jitter):
            targets = tuple(int(round(chars_per_token * (caption_token_count(core + ",") + int(filler[i])))) + int(j)
                            for core in cores[i])
            plans[i] = CaptionPlan(int(filler[i]), targets)
    return plans  # type: ignore[return-value]


def _split_chars(total: int, k: int, lo: int, hi: int, rng: np.random.Generator) -> list[int]:
    """k word lengths in [lo, hi] summing to ``total`` (clamped to what is reachable), varied."""
    total = min(max(total, k * lo), k * hi)
    lengths = [total // k + (1 if i < total % k else 0) for i in range(k)]
    # Move characters between random pairs so captions do not all use same-length words.
    for _ in range(2 * k):
        i, j = rng.integers(0, k, size=2)
        step = int(rng.integers(1, 3))
        if i != j and lengths[i] - step >= lo and lengths[j] + step <= hi:
            lengths[i] -= step
            lengths[j] += step
    return [lengths[i] for i in rng.permutation(k)]


def pad_caption(core: str, filler_words: int, char_target: int, bank: dict[int, Sequence[str]],
                rng: np.random.Generator) -> str:
    """``core + ", " + filler``: exactly ``filler_words`` more tokens, close to ``char_target`` chars.

    The character count is exact unless the needed word lengths fall outside the bank's range.
    """
    if filler_words < 1:
        raise ValueError("pad_caption: at least one filler word is needed")
    lo, hi = min(bank), max(bank)
    base = core + ","
    # chars = len(base) + one space before each word + the words themselves
    lengths = _split_chars(char_target - len(base) - filler_words, filler_words, lo, hi, rng)
    # Draw each length's words without replacement (cycling if a caption needs more than exist),
    # so a caption rarely repeats a filler word.
    decks = {n: [bank[n][i] for i in rng.permutation(len(bank[n]))] for n in sorted(set(lengths))}
    used = dict.fromkeys(decks, 0)
    words = []
    for n in lengths:
        words.append(decks[n][used[n] % len(decks[n])])
        used[n] += 1
    caption = base + " " + " ".join(words)
    if caption_token_count(caption) != caption_token_count(base) + filler_words:
        raise AssertionError(f"filler changed the core's tokens: {caption!r}")  # alphabetic words cannot
    return caption
