"""Cross-attention capture for memorization signals.

Two signals read the UNet's cross-attention (``attn2``) probabilities:

* Bright Ending (Chen et al., ICLR 2025): the attention that each latent pixel pays to the first
  end-of-text token, at the highest-resolution cross-attention (``down_blocks.0`` in SD1.x/2.x),
  heads and layers averaged -> one [h, w] map per sample.
* Attention concentration (Ren et al., ECCV 2024): the pixel-averaged distribution over the 77
  tokens, heads and all ``attn2`` layers averaged -> one [T] vector per sample (its entropy is
  the signal).

The fused SDPA kernel never materializes the probabilities, so for the configured ``attn2`` layers
we install a processor that also computes softmax(Q K^T * scale) and keeps only those two
reductions per sample. Records are detached by default: the output then still comes from the fused
kernel and the probabilities are a no-grad side computation. With ``with_grad=True`` the output is
computed from the explicit probabilities so that a regularizer on the records trains the attention.
Self-attention (``attn1``) is left on the default fused processor: its N x N maps are large,
replacing it costs 2-3x, and no signal needs it. Cross-attention maps are only N x 77.

Typical use in a training step::

    capture = AttentionCapture(unet, layers="all", be_layers="default")
    capture.install()
    ...
    with capture.recording(step % k == 0):
        capture.reset()
        capture.set_end_token_index(end_token_index(tokenizer, captions))
        pred = unet(noisy_latents, t, text_embeddings).sample
        if capture.has_records():
            be = capture.be_map()              # [B, h, w]
            dist = capture.token_distribution()  # [B, T]

Each forward overwrites the previous record of a layer: a second UNet call while recording (for
example an empty-prompt pass) replaces the first one's records, so run such passes with recording
off, or read the records in between.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_PROCESSOR_SUFFIX = ".processor"

# Processors whose computation is plain scaled-dot-product attention, so recomputing it
# explicitly gives the same layer. Anything else (IP-Adapter, custom diffusion with its own
# weights, fused QKV projections, ...) does more than attention, and silently replacing it would
# change the model; we refuse instead.
_PLAIN_ATTENTION_PROCESSORS = {
    "AttnProcessor",
    "AttnProcessor2_0",
    "AttnProcessorNPU",
    "XFormersAttnProcessor",
    "SlicedAttnProcessor",
}


# --------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------


def _layer_name(processor_name: str) -> str:
    """'a.b.attn2.processor' -> 'a.b.attn2' (users may pass either form)."""
    if processor_name.endswith(_PROCESSOR_SUFFIX):
        return processor_name[: -len(_PROCESSOR_SUFFIX)]
    return processor_name


def cross_attention_layers(unet) -> list[str]:
    """Names of all cross-attention (``attn2``) modules, in the UNet's own order."""
    names = []
    for processor_name in unet.attn_processors:
        layer = _layer_name(processor_name)
        if layer.rsplit(".", 1)[-1] == "attn2":
            names.append(layer)
    return names


def default_be_layers(unet) -> list[str]:
    """Cross-attention layers of the highest-resolution block that has cross-attention.

    Resolution halves after every down block, so the first down block with any ``attn2`` is the
    highest resolution one (``down_blocks.0`` for SD1.x/2.x, 64x64 at 512 px). A model whose only
    cross-attention sits in the decoder falls back to the up block nearest the output, then to the
    mid block. For a tiny UNet with ``("DownBlock2D", "CrossAttnDownBlock2D")`` this returns the
    ``down_blocks.1`` layers (half the latent resolution): the best the model offers.
    """
    xattn = cross_attention_layers(unet)
    if not xattn:
        raise ValueError("this UNet has no cross-attention (attn2) layers")

    def under(prefix: str) -> list[str]:
        return [name for name in xattn if name.startswith(prefix + ".")]

    for i in range(len(getattr(unet, "down_blocks", []))):
        if found := under(f"down_blocks.{i}"):
            return found
    for j in reversed(range(len(getattr(unet, "up_blocks", [])))):
        if found := under(f"up_blocks.{j}"):
            return found
    if found := under("mid_block"):
        return found
    raise ValueError(f"cannot locate the highest-resolution cross-attention among {xattn}")


def _select(
    available: Sequence[str], selectors: str | Iterable[str] | None, what: str
) -> list[str]:
    """Resolve 'all' / None / a list of names or dotted prefixes to attn2 layer names.

    A selector matches a layer exactly or as a dotted prefix, so ``"down_blocks.0"`` selects every
    attn2 layer of that block. A selector that matches no attn2 layer is an error: a typo would
    otherwise silently produce empty signals.
    """
    if selectors is None:
        return []
    if isinstance(selectors, str):
        if selectors == "all":
            return list(available)
        selectors = [selectors]
    chosen: list[str] = []
    for selector in selectors:
        selector = _layer_name(selector)
        hits = [n for n in available if n == selector or n.startswith(selector + ".")]
        if not hits:
            raise ValueError(f"{what}: {selector!r} matches no cross-attention (attn2) layer")
        chosen.extend(h for h in hits if h not in chosen)
    # Keep the UNet's order, independent of the order selectors were given in.
    return [n for n in available if n in chosen]


# --------------------------------------------------------------------------------------------
# CFG helpers
# --------------------------------------------------------------------------------------------


def _split_cfg(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.shape[0]
    if rows % 2:
        raise ValueError(f"a CFG batch has an even number of rows (uncond then cond), got {rows}")
    return x[: rows // 2], x[rows // 2 :]


def cond_half(x: torch.Tensor) -> torch.Tensor:
    """Conditional rows of a CFG batch (diffusers concatenates [uncond, cond])."""
    return _split_cfg(x)[1]


def uncond_half(x: torch.Tensor) -> torch.Tensor:
    """Unconditional rows of a CFG batch."""
    return _split_cfg(x)[0]


def cfg_end_token_index(
    cond_index: torch.Tensor, uncond_index: torch.Tensor | int
) -> torch.LongTensor:
    """End-token indices for a CFG batch, in the pipeline's [uncond, cond] row order.

    ``uncond_index`` is the end index of the negative prompt(s): ``1`` for the empty prompt with
    CLIP (BOS, EOS), or a tensor from ``end_token_index(tokenizer, negative_prompts)``.
    """
    cond_index = torch.as_tensor(cond_index, dtype=torch.long).reshape(-1)
    if isinstance(uncond_index, int):
        uncond = torch.full_like(cond_index, uncond_index)
    else:
        uncond = torch.as_tensor(uncond_index, dtype=torch.long, device=cond_index.device)
        uncond = uncond.reshape(-1)
        if uncond.numel() == 1:
            uncond = uncond.expand_as(cond_index)
    if uncond.shape != cond_index.shape:
        raise ValueError(
            f"uncond_index {tuple(uncond.shape)} vs cond_index {tuple(cond_index.shape)}"
        )
    return torch.cat([uncond, cond_index])


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class LayerRecord:
    """What one attn2 layer kept from its last forward.

    tokens: [B, T] pixel- and head-averaged attention over tokens (None if not a token layer).
    be:     [B, N] head-averaged attention to the end token per query pixel (None if not a BE
            layer or no end index was set).
    size:   (h, w) of the layer's query grid when known, so ``be`` can be shown as a map.
    """

    tokens: torch.Tensor | None = None
    be: torch.Tensor | None = None
    size: tuple[int, int] | None = None


def _in_backward() -> bool:
    """True while autograd executes a backward pass.

    With (non-reentrant) gradient checkpointing, the blocks run their forward a second time
    during backward; that recomputation must not overwrite the records with tensors holding
    recomputed activations. The check uses a private torch hook; if it disappears we simply
    record again and replay the recording flag as it is now, which is right unless the flag
    changed between forward and backward.
    """
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    try:
        return graph_task_id is not None and graph_task_id() != -1
    except Exception:  # pragma: no cover - defensive against torch internals changing
        return False


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _grid_size(n: int, latent_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """(h, w) of an n-pixel attention grid inside a UNet fed latents of size latent_hw.

    Each diffusers downsampler (3x3 conv, stride 2, padding 1) maps a side s to ceil(s / 2),
    so the grid of a block is ceil(H / 2^k) x ceil(W / 2^k) for some k. Without the latent size
    we can only recognise square grids.
    """
    if latent_hw is not None:
        height, width = latent_hw
        while True:
            if height * width == n:
                return height, width
            if height * width < n or (height == 1 and width == 1):
                break
            height, width = math.ceil(height / 2), math.ceil(width / 2)
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


# --------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------


class CaptureAttnProcessor:
    """attn2 processor that hands the layer's attention probabilities to its capture.

    Computes the same function as diffusers' ``AttnProcessor`` / ``AttnProcessor2_0`` (spatial
    and group norm, cross norm, q/k norm, mask, residual, output rescale) in one of three modes:

    * ``ORIGINAL``: capture disabled (or the layer called as self-attention): defer to the
      processor we replaced, so a disabled capture costs nothing and changes nothing.
    * ``PROBE`` (records detached): the output comes from the fused SDPA kernel as before, and
      the probabilities softmax(Q K^T * scale) are recomputed from the same Q, K under
      ``no_grad`` for the records. Only a forward matmul + softmax is added; no backward.
    * ``EXPLICIT`` (``with_grad`` and grad enabled): the output is computed from the explicit
      probabilities, so the records share the graph of the output and a regularizer on them
      backpropagates into the attention weights. About 2x the attention cost on CPU.
    """

    ORIGINAL, PROBE, EXPLICIT = "original", "probe", "explicit"

    def __init__(self, capture: "AttentionCapture", name: str, original, tokens: bool, be: bool):
        self.capture = capture
        self.name = name
        self.original = original
        self.record_tokens = tokens
        self.record_be = be
        # Attention.forward filters kwargs by the *current* processor's signature; ours takes
        # **kwargs, so we filter for the original ourselves before delegating to it.
        params = inspect.signature(original.__call__).parameters
        self._original_takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._original_params = set(params)
        self._last_grad_mode = self.ORIGINAL

    def _mode(self, encoder_hidden_states, in_backward: bool) -> str:
        """Pick the computation for this call (see the class docstring).

        During backward, gradient checkpointing re-runs the forward; it must take the same path
        as the original forward did (checkpoint checks that the recomputed saved tensors match),
        even if recording was switched off in between, so we replay the mode of the last
        grad-enabled forward.
        """
        if encoder_hidden_states is None:
            return self.ORIGINAL
        if in_backward:
            return self._last_grad_mode
        capture = self.capture
        grad = torch.is_grad_enabled()
        if not capture.enabled:
            mode = self.ORIGINAL
        elif capture.with_grad and grad:
            mode = self.EXPLICIT
        else:
            mode = self.PROBE
        if grad:
            self._last_grad_mode = mode
        return mode

    def _call_original(self, attn, hidden_states, encoder_hidden_states, attention_mask, kwargs):
        if not self._original_takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self._original_params}
        return self.original(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )

    @staticmethod
    def _probabilities(attn, query, key, mask) -> torch.Tensor:
        """softmax(Q K^T * scale + mask) in float32: [B, heads, N, T]."""
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        # Scaling the query ([.., N, head_dim]) is cheaper than scaling the scores ([.., N, 77]).
        scores = torch.matmul(query * attn.scale, key.transpose(-1, -2))
        if mask is not None:
            if mask.dtype == torch.bool:  # SDPA semantics: True = attend
                scores = scores.masked_fill(~mask, float("-inf"))
            else:  # additive bias, as the UNet builds from encoder_attention_mask
                scores = scores + mask
        # Float32 softmax whatever the model dtype: the records are probabilities compared
        # across samples, and fused kernels accumulate in float32 as well.
        return torch.softmax(scores, dim=-1, dtype=torch.float32)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        in_backward = _in_backward()
        mode = self._mode(encoder_hidden_states, in_backward)
        if mode == self.ORIGINAL:
            return self._call_original(
                attn, hidden_states, encoder_hidden_states, attention_mask, kwargs
            )
        record = not in_backward  # a checkpoint recomputation must not overwrite the records

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, kwargs.get("temb"))

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # [B, heads, N or T, head_dim]
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = None
        if attention_mask is not None:
            # [B*heads, 1 or N, T] -> [B, heads, 1 or N, T]
            mask = attn.prepare_attention_mask(attention_mask, key.shape[-2], batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])

        if mode == self.EXPLICIT:
            probs = self._probabilities(attn, query, key, mask)
            if record:
                self.capture._record(self, probs)
            hidden_states = torch.matmul(probs.to(value.dtype), value)
        else:  # PROBE
            # attn.scale is dim_head ** -0.5 (SDPA's default) unless the model set scale_qk=False;
            # passing it keeps the output and the recorded probabilities consistent.
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )
            if record:
                with torch.no_grad():
                    self.capture._record(self, self._probabilities(attn, query, key, mask))

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


class AttentionCapture:
    """Installs capture processors on a UNet's attn2 layers and holds their per-sample records.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (unwrapped: pass ``accelerator.unwrap_model``).
        layers: attn2 layers whose token distribution is recorded: ``"all"``, ``None`` (none),
            or names / dotted prefixes (``"down_blocks.0"``, ``"mid_block"``, full names with or
            without ``.processor``).
        be_layers: attn2 layers for the Bright Ending map: ``"default"``
            (``default_be_layers(unet)``), ``None``, or names / prefixes like ``layers``.
        with_grad: keep the autograd graph on the records so a regularizer can backprop through
            them; otherwise records are detached and cost no graph memory. Can be changed
            between steps.
        enabled: start recording right away (see ``recording`` to toggle per step).

    Memory: per layer only [B, T] and [B, h*w] are kept. The [B, heads, h*w, T] probabilities
    exist only inside the layer's forward; with ``with_grad`` autograd also saves them for the
    backward of the explicit attention (float32, one such tensor per hooked layer).
    """

    def __init__(
        self,
        unet,
        layers: str | Iterable[str] | None = "all",
        be_layers: str | Iterable[str] | None = "default",
        with_grad: bool = False,
        enabled: bool = True,
    ):
        self.unet = unet
        available = cross_attention_layers(unet)
        self.token_layers = _select(available, layers, "layers")
        if isinstance(be_layers, str) and be_layers == "default":
            be_layers = default_be_layers(unet)
        self.be_layers = _select(available, be_layers, "be_layers")
        hooked = set(self.token_layers) | set(self.be_layers)
        self.hooked_layers = [n for n in available if n in hooked]
        if not self.hooked_layers:
            raise ValueError("nothing to capture: both layers and be_layers are empty")

        self.with_grad = with_grad
        self.enabled = enabled
        self.per_layer: dict[str, LayerRecord] = {}
        self._end_index: torch.Tensor | int | None = None
        self._end_index_range: tuple[int, int] | None = None
        self._latent_hw: tuple[int, int] | None = None
        self._originals: dict[str, object] = {}
        self._hook_handle = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        return self._hook_handle is not None

    def install(self) -> "AttentionCapture":
        """Swap in capture processors for the hooked attn2 layers; all others stay as they are."""
        if self.installed:
            raise RuntimeError("capture is already installed")
        current = dict(self.unet.attn_processors)
        new = dict(current)
        originals = {}
        for layer in self.hooked_layers:
            key = layer + _PROCESSOR_SUFFIX
            original = current[key]
            kind = type(original).__name__
            if kind not in _PLAIN_ATTENTION_PROCESSORS:
                raise TypeError(
                    f"{layer} uses {kind}, which does more than plain attention; capturing it "
                    "would change the model. Exclude the layer or restore the default processor."
                )
            originals[layer] = original
            new[key] = CaptureAttnProcessor(
                self, layer, original, tokens=layer in self.token_layers, be=layer in self.be_layers
            )
        # set_attn_processor pops from the dict it receives and requires one entry per layer.
        self.unet.set_attn_processor(new)
        self._originals = originals
        self._hook_handle = self.unet.register_forward_pre_hook(
            self._remember_latent_size, with_kwargs=True
        )
        return self

    def remove(self) -> None:
        """Put the replaced processors back and drop all records."""
        if not self.installed:
            return
        current = dict(self.unet.attn_processors)
        for layer, original in self._originals.items():
            key = layer + _PROCESSOR_SUFFIX
            # Only undo our own replacement: if someone swapped processors since, keep theirs.
            if isinstance(current.get(key), CaptureAttnProcessor) and current[key].capture is self:
                current[key] = original
        self.unet.set_attn_processor(current)
        self._hook_handle.remove()
        self._hook_handle = None
        self._originals = {}
        self.reset()

    def __enter__(self) -> "AttentionCapture":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextmanager
    def recording(self, enabled: bool = True) -> Iterator["AttentionCapture"]:
        """Temporarily turn recording on or off (off = the original fused processors run)."""
        previous, self.enabled = self.enabled, enabled
        try:
            yield self
        finally:
            self.enabled = previous

    def _remember_latent_size(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self._latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    # ---- inputs ----------------------------------------------------------------------------

    def set_end_token_index(self, index: torch.Tensor | Sequence[int] | int | None) -> None:
        """End-token position per batch row (from ``end_token_index``), or one int for all rows.

        For CFG batches pass one index per row in [uncond, cond] order (``cfg_end_token_index``).
        The index persists across ``reset`` until set again.
        """
        if index is None or isinstance(index, int):
            self._end_index = index
            self._end_index_range = None if index is None else (index, index)
        else:
            index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
            self._end_index = index
            # Range checked once here, on the host, so the forward never syncs with the GPU.
            empty = index.numel() == 0
            self._end_index_range = (0, 0) if empty else (int(index.min()), int(index.max()))

    def _end_index_for(self, rows: int, device: torch.device) -> torch.Tensor | None:
        index = self._end_index
        if index is None:
            return None
        if isinstance(index, int):
            return torch.full((rows,), index, dtype=torch.long, device=device)
        if index.numel() != rows:
            hint = " (CFG batch? use cfg_end_token_index)" if index.numel() * 2 == rows else ""
            raise ValueError(
                f"end-token index has {index.numel()} entries for {rows} batch rows{hint}"
            )
        if index.device != device:
            index = self._end_index = index.to(device)
        return index

    # ---- recording -------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop the records (and any graph they hold). Keeps the end-token index."""
        self.per_layer = {}

    def _record(self, processor: CaptureAttnProcessor, probs: torch.Tensor) -> None:
        """Reduce [B, heads, N, T] probabilities to what the signals need and store them."""
        if self.with_grad and probs.requires_grad:
            # Under gradient checkpointing, tensors saved for backward inside a checkpointed
            # block are counted and must be reproduced by the recomputation, which does not
            # record. The reductions' own saved tensors (the gather indices) are therefore kept
            # outside the checkpoint's bookkeeping with a pass-through pair of hooks.
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                self._reduce(processor, probs)
        else:
            self._reduce(processor, probs.detach())

    def _reduce(self, processor: CaptureAttnProcessor, source: torch.Tensor) -> None:
        batch, _, n_query, n_tokens = source.shape
        record = LayerRecord(size=_grid_size(n_query, self._latent_hw))
        if processor.record_tokens:
            record.tokens = source.mean(dim=(1, 2))  # over heads and pixels -> [B, T]
        if processor.record_be:
            index = self._end_index_for(batch, source.device)
            if index is not None:
                low, high = self._end_index_range
                if low < 0 or high >= n_tokens:
                    raise ValueError(
                        f"end-token index [{low}, {high}] out of range for {n_tokens} tokens"
                    )
                rows = torch.arange(batch, device=source.device)
                # source[b, :, :, index[b]] for every b -> [B, heads, N], then heads averaged
                record.be = source[rows, :, :, index].mean(dim=1)
        self.per_layer[processor.name] = record

    # ---- outputs ---------------------------------------------------------------------------

    def has_records(self) -> bool:
        return bool(self.per_layer)

    def token_distribution(self) -> torch.Tensor:
        """[B, T]: attention over tokens, averaged over pixels, heads and the token layers."""
        rows = [r.tokens for r in self.per_layer.values() if r.tokens is not None]
        if not rows:
            raise RuntimeError(
                "no token distribution recorded: run a UNet forward with capture installed and "
                "enabled, and with `layers` not empty"
            )
        return torch.stack(rows).mean(dim=0)

    def be_maps(self) -> dict[tuple[int, ...], torch.Tensor]:
        """BE maps grouped by resolution: {(h, w): [B, h, w]} ((N,): [B, N] if not a grid)."""
        groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for record in self.per_layer.values():
            if record.be is None:
                continue
            key = record.size if record.size is not None else (record.be.shape[-1],)
            groups.setdefault(key, []).append(record.be)
        return {
            key: torch.stack(maps).mean(dim=0).reshape(maps[0].shape[0], *key)
            for key, maps in groups.items()
        }

    def be_map(self) -> torch.Tensor:
        """[B, h, w]: end-token attention of the BE layers, heads and layers averaged.

        If the BE layers span several resolutions, the highest one is returned (``be_maps``
        has all of them); layers of different sizes are never averaged together.
        """
        maps = self.be_maps()
        if not maps:
            raise RuntimeError(
                "no BE map recorded: call set_end_token_index(...) before a UNet forward with "
                "capture installed and enabled, and with `be_layers` not empty"
            )
        return maps[max(maps, key=math.prod)]
