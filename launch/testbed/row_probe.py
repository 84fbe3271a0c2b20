"""Which per-row statistics of a trained testbed model tell planted rows from clean ones?

``python -m launch.testbed.row_probe --model RUN/final [--testbed DIR] [--t 20 100 300 600 900] [--reference BASE/final] [--out FILE.md]``

The ledger averages each signal over a whole run, most of it before anything was memorized. This
asks the question at the end instead, with nothing averaged away: every training row once, at each
``--t``, with noise fixed per row, through the trained model with the caption and with the empty
prompt. Per row and timestep it records the monitor's own signals (:mod:`train.monitor.signals`:
bright-ending and token statistics, the log loss, the text-conditional magnitudes) and two that
compare the captioned and the empty-prompt predictions cell by cell: ``rel_gain`` (1 - loss with
the caption / loss without it: how much the caption explains) and ``gain_topk`` (the mean of that
gain over the top 10% of latent cells, over the empty-prompt loss: whether the caption explains one
region). With ``--reference`` (the model the fine-tune started from) the monitor's ``ref_gain`` and
``ref_gain_topk`` compare the fine-tune's loss with the reference's on the same noisy latents
(:func:`train.monitor.signals.reference_signals`). The table gives each statistic's AUC per planted
kind against the clean rows, unoriented: above 0.5 the kind scores higher, below 0.5 lower (1 - AUC
separates as well the other way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from launch.testbed.evaluate import GROUP_ORDER, _torch_generator, testbed_of_run
from launch.testbed.reading import emit_table, load_image, read_rows


def row_statistics(model: str | Path, root: str | Path, timesteps: list[int], batch: int = 64,
                   reference: str | Path | None = None) -> tuple[list[str], dict]:
    """(each distinct training row's group, {"stat@t": [rows] values})."""
    import torch
    from diffusers import DDPMScheduler

    from launch.testbed.evaluate import load_pipeline
    from train.models import encode_text
    from train.monitor.capture import AttentionCapture
    from train.monitor.signals import (be_signals, cell_error, loss_signal, magnitude_signals, reference_signals,
                                       token_signals)
    from train.monitor.tokens import end_token_index

    pipe = load_pipeline(model)
    unet, vae, tokenizer = pipe.unet, pipe.vae, pipe.tokenizer
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    rows = list({r["sample_id"]: r for r in read_rows(root, split="train")}.values())

    def encode(texts: list[str], pipeline=pipe):
        return encode_text(pipeline.tokenizer, pipeline.text_encoder, texts, "cpu")

    # the reference reads the same latents (its VAE is the fine-tune's: fine-tuning leaves it frozen)
    # with its own text encoder and tokenizer, which fine-tuning may have changed
    ref = load_pipeline(reference) if reference else None
    capture = AttentionCapture(unet, layers=["down_blocks", "mid_block"], be_layers="default").install()
    values: dict[str, list] = {}
    with torch.no_grad():
        empty = encode([""])
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            pixels = torch.from_numpy(np.stack([load_image(root, r["file_name"]) for r in chunk])).permute(0, 3, 1, 2)
            latents = vae.encode(pixels * 2 - 1).latent_dist.mean * vae.config.scaling_factor
            texts = [r["text"] for r in chunk]
            cond = encode(texts)
            noise = torch.stack([torch.randn(latents.shape[1:], generator=_torch_generator(r["sample_id"]))
                                 for r in chunk])  # fixed per row, whatever the batch
            for t in timesteps:
                steps = torch.full((len(chunk),), t, dtype=torch.long)
                noisy = scheduler.add_noise(latents, noise, steps)
                target = (scheduler.get_velocity(latents, noise, steps)
                          if scheduler.config.prediction_type == "v_prediction" else noise)
                capture.reset()
                capture.set_end_token_index(end_token_index(tokenizer, texts))
                with capture.recording(True):
                    pred = unet(noisy, steps, cond).sample
                be, tokens = capture.be_map(), capture.token_distribution()
                with capture.recording(False):
                    pred_empty = unet(noisy, steps, empty.expand(len(chunk), -1, -1)).sample
                err, err_empty = cell_error(pred, target).flatten(1), cell_error(pred_empty, target).flatten(1)
                gain = err_empty - err
                k = max(1, gain.shape[1] // 10)
                stats = {**be_signals(be), **token_signals(tokens), **loss_signal(err.mean(1)),
                         **magnitude_signals(pred, pred_empty, be),
                         "rel_gain": 1 - err.mean(1) / err_empty.mean(1).clamp_min(1e-12),
                         "gain_topk": gain.topk(k, dim=1).values.mean(1) / err_empty.mean(1).clamp_min(1e-12)}
                if ref is not None:  # the monitor's ref_gain signals, at the probe's top 10%
                    stats |= reference_signals(pred, ref.unet(noisy, steps, encode(texts, ref)).sample, target, 0.1)
                for name, value in stats.items():
                    values.setdefault(f"{name}@{t}", []).append(value.float().numpy())
    capture.remove()
    return [r["group"] for r in rows], {k: np.concatenate(v) for k, v in values.items()}


def auc_table(groups: list[str], values: dict[str, np.ndarray]) -> list[str]:
    from sklearn.metrics import roc_auc_score

    groups = np.asarray(groups)
    kinds = [k for k in GROUP_ORDER if k != "clean" and k in set(groups)]
    if "clean" not in set(groups) or not kinds:
        raise ValueError(f"row_probe: needs clean rows and planted rows to compare; the testbed's groups are "
                         f"{sorted(set(groups))}")
    lines = ["| statistic @ t | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, value in values.items():
        aucs = []
        for kind in kinds:
            rows = (groups == kind) | (groups == "clean")
            aucs.append(roc_auc_score(groups[rows] == kind, np.nan_to_num(value[rows])))
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in aucs) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.testbed.row_probe", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a trained pipeline folder, e.g. RUN/final")
    p.add_argument("--testbed", default=None, help="the testbed folder (default: the one the run trained on)")
    p.add_argument("--t", type=int, nargs="+", default=[20, 100, 300, 600, 900], help="training timesteps to probe at")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reference", help="the pipeline the fine-tune started from (adds the ref_gain statistics)")
    p.add_argument("--out", help="also write the table here")
    a = p.parse_args(argv)
    root = Path(a.testbed) if a.testbed else testbed_of_run(a.model)
    groups, values = row_statistics(a.model, root, a.t, a.batch, a.reference)
    emit_table(auc_table(groups, values), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
