"""LoRA fine-tuning (train.lora): only the adapters train; the monitor, EMA and exact resume work
with them; final/ holds the adapters in the format diffusers' load_lora_weights reads, and the
merged pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_overrides, losses_by_step, read_metrics

LORA = {"train.lora.rank": 4, "train.lr": 1e-2, "train.lr_scheduler": "constant"}


def unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 4, 4, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), text).sample


def test_lora_trains_adapters_only_and_saves_what_load_lora_weights_reads(tmp_path, cache_dir):
    from diffusers import StableDiffusionPipeline

    from train.config import load_config
    from train.finetune import main
    from train.models import ensure_tiny

    overrides = fast_overrides(cache_dir, tmp_path / "lora", **LORA, **{"train.use_ema": "true",
                                                                       "train.ema_decay": 0.5})
    run = main(overrides)
    assert (run / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    cfg = load_config(overrides=overrides)
    base = StableDiffusionPipeline.from_pretrained(ensure_tiny(cfg.model.tiny, cfg.data.resolution, cfg.model.cache_dir))
    merged = StableDiffusionPipeline.from_pretrained(run / "final")
    before = unet_out(base.unet)
    base.load_lora_weights(run / "final" / "lora")
    with_lora = unet_out(base.unet)
    assert not torch.allclose(before, with_lora, atol=1e-5)  # the adapters learned something
    assert torch.allclose(with_lora, unet_out(merged.unet), atol=1e-4)  # merged = base + adapters
    # the monitor read every batch through the adapted attention
    assert read_metrics(run)[-1]["memo/observed"] == 6 * 4  # steps x batch


def test_lora_resume_is_exact(tmp_path, cache_dir):
    from train.finetune import main

    straight = main(fast_overrides(cache_dir, tmp_path / "a", **LORA))
    main(fast_overrides(cache_dir, tmp_path / "b", **LORA, **{"train.max_steps": 3}))
    resumed = main(fast_overrides(cache_dir, tmp_path / "b", **LORA, **{"train.resume": "latest"}))
    a, b = losses_by_step(straight), losses_by_step(resumed)
    assert list(a) == list(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7) for k in a)


def test_a_full_checkpoint_does_not_resume_into_a_lora_run(tmp_path, cache_dir):
    from train.finetune import main

    main(fast_overrides(cache_dir, tmp_path / "full", **{"train.max_steps": 3}))
    with pytest.raises(SystemExit, match="(?i)lora|model"):
        main(fast_overrides(cache_dir, tmp_path / "full", **LORA, **{"train.resume": "latest"}))
