"""Tests for train/monitor: cross-attention capture and end-token positions.

Everything runs on tiny, randomly initialised diffusers UNets and an in-memory byte-level CLIP
tokenizer, so the suite is offline and takes seconds on CPU.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTokenizer

from train.monitor import (
    AttentionCapture,
    CaptureAttnProcessor,
    cfg_end_token_index,
    cond_half,
    cross_attention_layers,
    default_be_layers,
    end_token_index,
    prompt_length,
    uncond_half,
)

CONTEXT = 77
EMBED = 32

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def make_unet(cross_attention_first: bool = True, heads: int = 4, seed: int = 0):
    """Tiny SD-shaped UNet; cross-attention either at full latent resolution or only at half."""
    torch.manual_seed(seed)
    if cross_attention_first:  # SD-like: the highest-resolution block has cross-attention
        down, up = ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")
    else:  # cheap tiny preset: cross-attention only at half resolution (and mid)
        down, up = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=EMBED,
        attention_head_dim=heads,  # the head count, in diffusers' naming
    )
    # Random init leaves attention nearly uniform; sharpen the attn2 projections so that
    # probabilities differ clearly between tokens and a wrong reduction cannot pass by chance.
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(6.0)
                module.to_k.weight.mul_(6.0)
    return unet.eval()


def make_inputs(batch: int = 4, size=(16, 16), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, *size, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, CONTEXT, EMBED, generator=g)
    return latents, timesteps, context


def byte_level_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """CLIP tokenizer with a 514-entry byte-level vocab: one token per character, never unknown.

    pad_token=None keeps the SD1.x convention (pad = "<|endoftext|>"); "!" gives SD2.x's.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for byte in range(256):  # GPT-2's reversible byte -> printable character table
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    kwargs = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CONTEXT, **kwargs)


# --------------------------------------------------------------------------------------------
# (a) capture does not change the model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_grad", [False, True], ids=["probe", "explicit"])
@pytest.mark.parametrize("cross_attention_first,heads", [(True, 2), (True, 8), (False, 4)])
def test_output_unchanged_by_capture(cross_attention_first, heads, with_grad):
    """Both capture paths (fused output + no-grad probe; explicit output) match the model."""
    unet = make_unet(cross_attention_first, heads)
    latents, timesteps, context = make_inputs(batch=2)
    # A real padding mask exercises the attention_mask path (UNet turns it into a bias).
    mask = torch.ones(latents.shape[0], CONTEXT)
    mask[:, 20:] = 0
    # with_grad only takes the explicit path when autograd is on, as in training.
    with torch.set_grad_enabled(with_grad):
        reference = unet(latents, timesteps, context).sample
        reference_masked = unet(latents, timesteps, context, encoder_attention_mask=mask).sample
        with AttentionCapture(unet, with_grad=with_grad) as capture:
            capture.set_end_token_index(torch.tensor([5, 30]))
            captured = unet(latents, timesteps, context).sample
            assert capture.has_records()
            assert capture.be_map().requires_grad == with_grad
            captured_masked = unet(latents, timesteps, context, encoder_attention_mask=mask).sample
            # Masked tokens must receive no attention at all.
            assert capture.token_distribution()[:, 20:].abs().max() < 1e-6
            with capture.recording(False):
                capture.reset()
                disabled = unet(latents, timesteps, context).sample
                assert not capture.has_records()
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured_masked, reference_masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(disabled, reference, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(reference, reference_masked, atol=1e-3)  # the mask mattered


# --------------------------------------------------------------------------------------------
# (b) recorded reductions equal a hand computation from the layer's own q/k inputs
# --------------------------------------------------------------------------------------------


def _hand_probabilities(attn, hidden_states, context):
    """softmax(Q K^T / sqrt(d)) per head, written independently of the processor: [B, H, N, T]."""
    q, k = attn.to_q(hidden_states), attn.to_k(context)
    d = q.shape[-1] // attn.heads
    per_head = []
    for h in range(attn.heads):
        qh, kh = q[..., h * d : (h + 1) * d], k[..., h * d : (h + 1) * d]
        per_head.append(torch.softmax(torch.einsum("bnd,btd->bnt", qh, kh) / d**0.5, dim=-1))
    return torch.stack(per_head, dim=1)


@pytest.mark.parametrize("with_grad", [False, True], ids=["probe", "explicit"])
@pytest.mark.parametrize("cross_attention_first", [True, False])
def test_records_match_hand_computed_softmax(cross_attention_first, with_grad):
    unet = make_unet(cross_attention_first, heads=4)
    latents, timesteps, context = make_inputs()
    end_index = torch.tensor([1, 7, 76, 33])

    # Record what each attn2 layer feeds to its q and k projections.
    inputs, handles = {}, []
    for name in cross_attention_layers(unet):
        attn = unet.get_submodule(name)
        for proj in ("to_q", "to_k"):

            def hook(module, args, name=name, proj=proj):
                inputs.setdefault(name, {})[proj] = args[0]

            handles.append(getattr(attn, proj).register_forward_pre_hook(hook))

    with torch.set_grad_enabled(with_grad), AttentionCapture(unet, with_grad=with_grad) as capture:
        capture.set_end_token_index(end_index)
        unet(latents, timesteps, context)
        for handle in handles:
            handle.remove()

        rows = torch.arange(len(end_index))
        hand_tokens, hand_be = [], []
        for name in cross_attention_layers(unet):
            attn = unet.get_submodule(name)
            probs = _hand_probabilities(attn, inputs[name]["to_q"], inputs[name]["to_k"])
            tokens = probs.mean(dim=(1, 2))
            record = capture.per_layer[name]
            torch.testing.assert_close(record.tokens, tokens, atol=1e-6, rtol=1e-5)
            hand_tokens.append(tokens)
            if name in capture.be_layers:
                be = probs.mean(dim=1)[rows, :, end_index]  # heads averaged, then per-row token
                torch.testing.assert_close(record.be, be, atol=1e-6, rtol=1e-5)
                hand_be.append(be)
            else:
                assert record.be is None

        # Layer averages, and the BE map reshaped to the layer's grid.
        torch.testing.assert_close(capture.token_distribution(), torch.stack(hand_tokens).mean(0))
        side = 16 if cross_attention_first else 8
        expected_be = torch.stack(hand_be).mean(0).reshape(-1, side, side)
        torch.testing.assert_close(capture.be_map(), expected_be)


def test_records_keep_only_reductions():
    unet = make_unet()
    latents, timesteps, context = make_inputs(batch=3)
    with torch.no_grad(), AttentionCapture(unet) as capture:
        capture.set_end_token_index(2)
        unet(latents, timesteps, context)
        for name, record in capture.per_layer.items():
            assert record.tokens.shape == (3, CONTEXT)
            if record.be is not None:
                assert record.be.shape == (3, record.size[0] * record.size[1])
        assert capture.be_map().shape == (3, 16, 16)
        torch.testing.assert_close(capture.token_distribution().sum(-1), torch.ones(3))


# --------------------------------------------------------------------------------------------
# (c) only attn2 processors are replaced, and remove() restores them
# --------------------------------------------------------------------------------------------


def test_only_cross_attention_processors_replaced_and_restored():
    unet = make_unet()
    before = dict(unet.attn_processors)
    capture = AttentionCapture(unet).install()
    during = dict(unet.attn_processors)
    assert during.keys() == before.keys()
    replaced = {name for name in during if during[name] is not before[name]}
    assert replaced == {name + ".processor" for name in cross_attention_layers(unet)}
    assert all(name.endswith("attn2.processor") for name in replaced)
    assert all(isinstance(during[name], CaptureAttnProcessor) for name in replaced)
    for name in during.keys() - replaced:  # self-attention untouched: the very same objects
        assert during[name] is before[name] and "attn1" in name
    capture.remove()
    after = dict(unet.attn_processors)
    assert all(after[name] is before[name] for name in before)


def test_layer_selection_by_prefix_and_default_be_layers():
    unet = make_unet(cross_attention_first=True)
    assert default_be_layers(unet) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    tiny = make_unet(cross_attention_first=False)
    assert default_be_layers(tiny) == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2"]

    capture = AttentionCapture(unet, layers=["mid_block"], be_layers=None).install()
    try:
        processors = unet.attn_processors
        replaced = [n for n, p in processors.items() if isinstance(p, CaptureAttnProcessor)]
        assert replaced == ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
        latents, timesteps, context = make_inputs(batch=1)
        with torch.no_grad():
            unet(latents, timesteps, context)
        assert list(capture.per_layer) == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
        with pytest.raises(RuntimeError, match="no BE map"):
            capture.be_map()
    finally:
        capture.remove()
    with pytest.raises(ValueError, match="matches no cross-attention"):
        AttentionCapture(unet, layers=["down_blocks.0.attentions.0.transformer_blocks.0.attn1"])


def test_non_square_latents_give_correct_grid():
    unet = make_unet(cross_attention_first=False)
    # Odd sides: diffusers' stride-2 downsampler rounds up (15 x 11 -> 8 x 6).
    latents, timesteps, context = make_inputs(batch=2, size=(15, 11))
    with torch.no_grad(), AttentionCapture(unet) as capture:
        capture.set_end_token_index(4)
        unet(latents, timesteps, context)
        assert capture.be_map().shape == (2, 8, 6)


# --------------------------------------------------------------------------------------------
# (d) gradients through the records
# --------------------------------------------------------------------------------------------


def _be_attn(unet):
    return unet.get_submodule(default_be_layers(unet)[0])


def test_with_grad_backpropagates_to_attention_weights():
    unet = make_unet().train()
    latents, timesteps, context = make_inputs(batch=2)
    with AttentionCapture(unet, with_grad=True) as capture:
        capture.set_end_token_index(torch.tensor([1, 9]))
        unet(latents, timesteps, context)
        loss = capture.be_map().square().mean() + capture.token_distribution()[:, 0].mean()
        loss.backward()
    attn = _be_attn(unet)
    assert attn.to_k.weight.grad is not None and attn.to_k.weight.grad.abs().sum() > 0
    assert attn.to_q.weight.grad is not None and attn.to_q.weight.grad.abs().sum() > 0


def test_without_grad_records_are_detached():
    unet = make_unet().train()
    latents, timesteps, context = make_inputs(batch=2)
    with AttentionCapture(unet, with_grad=False) as capture:
        capture.set_end_token_index(3)
        out = unet(latents, timesteps, context).sample
        assert out.requires_grad  # the model itself still trains
        assert not capture.be_map().requires_grad
        assert not capture.token_distribution().requires_grad
        assert all(not r.tokens.requires_grad for r in capture.per_layer.values())


@pytest.mark.parametrize("with_grad", [False, True], ids=["probe", "explicit"])
def test_gradient_checkpointing_with_capture(with_grad):
    """Recomputation in backward must take the same path and must not re-record."""
    plain = make_unet().train()
    latents, timesteps, context = make_inputs(batch=2)
    plain(latents, timesteps, context).sample.square().mean().backward()

    unet = make_unet().train()
    unet.enable_gradient_checkpointing()
    with AttentionCapture(unet, with_grad=with_grad, enabled=False) as capture:
        capture.set_end_token_index(3)
        with capture.recording(True):
            out = unet(latents, timesteps, context).sample
        records = dict(capture.per_layer)
        # Recording is off by the time backward recomputes the blocks: must not break it.
        out.square().mean().backward(retain_graph=True)
        assert all(capture.per_layer[name] is record for name, record in records.items())
        for (name, p), p_plain in zip(unet.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, p_plain.grad, atol=1e-6, rtol=1e-4, msg=name)
        if with_grad:  # the records' graph survives checkpointing
            unet.zero_grad()
            capture.be_map().mean().backward()
            assert _be_attn(unet).to_k.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# (e) end-token index under both pad conventions
# --------------------------------------------------------------------------------------------

PROMPTS = [
    "",  # BOS, EOS -> end index 1
    "a cat",  # a</w> c a t</w> -> 4 tokens -> 5
    "hello!",  # contains "!", SD2's pad token, inside the prompt -> 6 tokens -> 7
    "x " * 74,  # 74 tokens -> 75
    "y " * 75,  # exactly fills the 75 content slots -> 76
    "z " * 120,  # too long: truncated, clamps to 76
]
EXPECTED_END = [1, 5, 7, 75, 76, 76]
EXPECTED_LEN = [0, 4, 6, 74, 75, 75]


@pytest.mark.parametrize("pad_token", [None, "!"], ids=["sd1-pad-is-eos", "sd2-pad-is-bang"])
def test_end_token_index(pad_token):
    tokenizer = byte_level_tokenizer(pad_token)
    index = end_token_index(tokenizer, PROMPTS)
    assert index.dtype == torch.long and index.tolist() == EXPECTED_END

    # Hand check against the padded ids the text encoder actually sees.
    padded = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=CONTEXT).input_ids
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    for ids, i in zip(padded, index.tolist()):
        assert len(ids) == CONTEXT and ids[0] == bos
        assert ids[i] == eos  # the end token sits at the index ...
        assert eos not in ids[1:i]  # ... and is the first one after BOS
    # Why not search for the pad id: with SD2's "!" it finds the "!" inside "hello!".
    if pad_token == "!":
        assert padded[2].index(tokenizer.pad_token_id) != EXPECTED_END[2]


@pytest.mark.parametrize("pad_token", [None, "!"])
def test_prompt_length(pad_token):
    tokenizer = byte_level_tokenizer(pad_token)
    assert prompt_length(tokenizer, PROMPTS).tolist() == EXPECTED_LEN
    assert prompt_length(tokenizer, PROMPTS, truncate=False).tolist()[-1] == 120


def test_end_token_index_needs_a_context_length():
    tokenizer = byte_level_tokenizer()
    tokenizer.model_max_length = int(1e30)  # what transformers sets when it knows none
    with pytest.raises(ValueError, match="max_length"):
        end_token_index(tokenizer, ["a cat"])
    assert end_token_index(tokenizer, ["a cat"], max_length=CONTEXT).tolist() == [5]


def test_end_index_drives_be_map():
    """The BE map reads exactly the tokenizer's end position (wired end to end)."""
    tokenizer = byte_level_tokenizer("!")
    unet = make_unet()
    latents, timesteps, context = make_inputs(batch=len(PROMPTS))
    index = end_token_index(tokenizer, PROMPTS)
    with torch.no_grad(), AttentionCapture(unet) as capture:
        capture.set_end_token_index(index)
        unet(latents, timesteps, context)
        at_end = capture.be_map()
        # Moving the index by one token changes every row's map: the index is actually used.
        capture.set_end_token_index(index - 1)
        unet(latents, timesteps, context)
        before_end = capture.be_map()
    for row in range(len(PROMPTS)):
        assert not torch.allclose(at_end[row], before_end[row], atol=1e-4)


# --------------------------------------------------------------------------------------------
# (f) classifier-free guidance batches
# --------------------------------------------------------------------------------------------


def test_cfg_batch_and_half_selection():
    unet = make_unet()
    latents, timesteps, context = make_inputs(batch=3)
    uncond_context = torch.randn(1, CONTEXT, EMBED).expand(3, -1, -1)
    cond_index = torch.tensor([4, 9, 20])

    with torch.no_grad(), AttentionCapture(unet) as capture:
        # Conditional rows on their own.
        capture.set_end_token_index(cond_index)
        unet(latents, timesteps, context)
        cond_be, cond_tokens = capture.be_map(), capture.token_distribution()

        # The pipeline's CFG layout: [uncond, cond] rows in one batch.
        capture.set_end_token_index(cfg_end_token_index(cond_index, 1))
        unet(
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            torch.cat([uncond_context, context]),
        )
        be, tokens = capture.be_map(), capture.token_distribution()
        assert be.shape[0] == 6 and tokens.shape[0] == 6  # all rows kept
        torch.testing.assert_close(cond_half(be), cond_be, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cond_half(tokens), cond_tokens, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(uncond_half(be), cond_be, atol=1e-3)

        # One index per prompt for a doubled batch is a mistake worth a clear message.
        capture.set_end_token_index(cond_index)
        with pytest.raises(ValueError, match="cfg_end_token_index"):
            unet(
                torch.cat([latents, latents]),
                torch.cat([timesteps, timesteps]),
                torch.cat([context, context]),
            )

    assert cfg_end_token_index(cond_index, torch.tensor([2, 3, 4])).tolist() == [2, 3, 4, 4, 9, 20]
    with pytest.raises(ValueError):
        cond_half(torch.zeros(3, 2))
