"""Token positions the memorization signals need.

The Bright Ending signal reads the cross-attention paid to the *first* end-of-text token right
after the prompt. With SD1.x tokenizers the pad token *is* the end token, and with SD2.x it is "!",
so searching the padded ids for the pad id gives the wrong answer in one convention or the other
(and "!" can also occur inside a prompt). We therefore tokenize without padding and count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# transformers uses a huge sentinel when a tokenizer has no real context length.
_NO_CONTEXT_LIMIT = 100_000


def _context_length(tokenizer, max_length: int | None) -> int:
    length = tokenizer.model_max_length if max_length is None else max_length
    if length is None or length > _NO_CONTEXT_LIMIT:
        raise ValueError(
            "the tokenizer has no usable model_max_length (got "
            f"{tokenizer.model_max_length!r}); pass max_length= (77 for CLIP / Stable Diffusion)"
        )
    return int(length)


def _unpadded_ids(tokenizer, prompts: Sequence[str], max_length: int | None, truncate: bool):
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    kwargs = {"padding": False}
    if truncate:
        kwargs.update(truncation=True, max_length=_context_length(tokenizer, max_length))
    return tokenizer(list(prompts), **kwargs).input_ids


def end_token_index(
    tokenizer, prompts: Sequence[str], max_length: int | None = None
) -> torch.LongTensor:
    """Position of the first end-of-text token after each prompt, shape [B].

    Equals ``len(tokenizer(prompt, truncation=True).input_ids) - 1``: the tokenizer puts BOS
    first and EOS right after the (possibly truncated) prompt. Prompts that fill or exceed the
    context are truncated so that EOS sits at ``max_length - 1`` (76 for CLIP); we clamp to that
    too in case a tokenizer truncates differently. Correct for both pad conventions because no
    padded ids are ever looked at.
    """
    context = _context_length(tokenizer, max_length)
    eos = tokenizer.eos_token_id
    positions = []
    for prompt, ids in zip(prompts, _unpadded_ids(tokenizer, prompts, max_length, truncate=True)):
        # Guard against tokenizers configured not to append EOS: the index would then point
        # at a prompt token and the BE signal would silently read the wrong column.
        if eos is not None and ids[-1] != eos:
            raise ValueError(f"tokenizer did not end {prompt!r} with the end-of-text token")
        positions.append(min(len(ids) - 1, context - 1))
    return torch.tensor(positions, dtype=torch.long)


def prompt_length(
    tokenizer, prompts: Sequence[str], max_length: int | None = None, truncate: bool = True
) -> torch.LongTensor:
    """Number of real prompt tokens (BOS/EOS excluded) per prompt, shape [B].

    Used to bin attention signals by length: entropy and end-token attention both depend on how
    many tokens a caption has, which otherwise confounds memorization scores. With
    ``truncate=True`` the count is what the text encoder actually sees (at most 75 for CLIP);
    ``truncate=False`` gives the full length of over-long captions.
    """
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    ids = _unpadded_ids(tokenizer, prompts, max_length, truncate=truncate)
    return torch.tensor([max(len(x) - specials, 0) for x in ids], dtype=torch.long)
