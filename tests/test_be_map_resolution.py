"""The testbed's v6 model (configs/testbed/model_v6.yaml) gives a Bright Ending map at the full
latent resolution (16x16 for 32 px images), in the training monitor's capture and in the
evaluation's last-step capture, with no be_layers setting: the default picks the first down block
with cross-attention. v5 (common.yaml alone) can only give 4x4, which is why its map could not
outline a stamp (issue 22)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.config import load_config
from train.models import tiny_pipeline
from train.monitor import AttentionCapture, default_be_layers

REPO = Path(__file__).resolve().parents[1]
COMMON = str(REPO / "configs/testbed/common.yaml")
V6 = str(REPO / "configs/testbed/model_v6.yaml")


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for name, files in {"v5": [COMMON], "v6": [COMMON, V6]}.items():
        cfg = load_config(files)
        out[name] = (tiny_pipeline(cfg.model.tiny, cfg.data.resolution), cfg.data.resolution)
    return out


def _forward(unet, capture, batch=2, side=16):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, side, side, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    capture.reset()
    capture.set_end_token_index(torch.tensor([5, 9])[:batch])
    with torch.no_grad():
        unet(latents, torch.tensor([10] * batch), text)


def test_overlay_changes_only_where_cross_attention_sits():
    v5, v6 = load_config([COMMON]).model.tiny, load_config([COMMON, V6]).model.tiny
    assert list(v6.down_block_types) == ["CrossAttnDownBlock2D"] * 3
    assert list(v6.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    differs = {k for k in v5 if v5[k] != v6[k]}
    assert differs == {"down_block_types", "up_block_types"}


@pytest.mark.parametrize("name,side", [("v5", 4), ("v6", 16)])
def test_default_be_map_resolution(pipes, name, side):
    pipe, resolution = pipes[name]
    latent = resolution // 2  # the testbed VAE ([16, 32]) downsamples once
    assert latent == 16
    be = default_be_layers(pipe.unet)
    assert be == [f"down_blocks.{0 if name == 'v6' else 2}.attentions.0.transformer_blocks.0.attn2"]
    # the monitor's own capture settings (monitor.token_layers default, be_layers None = default)
    with AttentionCapture(pipe.unet, layers=["down_blocks", "mid_block"], be_layers="default") as capture:
        _forward(pipe.unet, capture)
        assert tuple(capture.be_map().shape) == (2, side, side)


def test_v6_16x16_layers_are_averaged_and_highest_resolution_wins(pipes):
    unet = pipes["v6"][0].unet
    with AttentionCapture(unet, layers=None, be_layers="all") as capture:
        _forward(unet, capture)
        maps = capture.be_maps()
        assert set(maps) == {(16, 16), (8, 8), (4, 4)}  # the last down block does not downsample: mid at 4x4
        assert torch.equal(capture.be_map(), maps[(16, 16)])
        sixteen = [r.be for n, r in capture.per_layer.items() if n.startswith("down_blocks.0.")]
        assert len(sixteen) == 1
        torch.testing.assert_close(maps[(16, 16)], torch.stack(sixteen).mean(0).reshape(2, 16, 16))


def test_v6_generation_reads_a_16x16_map_at_the_last_step(pipes):
    from train.evaluate.sampling import generate_with_capture, sampling_pipeline

    pipe, resolution = pipes["v6"]
    sampler = sampling_pipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler)
    gen = generate_with_capture(sampler, ["a red heart", "a blue star with a stamp"], [0, 1], steps=2,
                                guidance_scale=2.0, height=resolution, width=resolution)
    assert gen.be_maps.shape == (2, 16, 16)
    assert gen.images.shape == (2, resolution, resolution, 3)
