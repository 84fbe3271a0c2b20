"""Drivers for the memorization testbed, run from the repo root as ``python -m launch.testbed.X``:

* ``fit_vae``: stage 1 of the recipe, the tiny preset's autoencoder (and BPE tokenizer) fitted on
  the testbed's clean images;
* ``evaluate``: replica rates, KID and held-out loss of a trained model on a built testbed folder;
* ``detection``, ``unprompted``, ``by_weight``, ``kid_blocks``: the analyses behind docs/testbed.md
  and docs/ablation.md;
* ``reading``: the folder's conventions (rows, images, masks), read back for all of them.

The testbed folder itself is built by ``python -m data.testbed`` (:mod:`data.testbed`).
"""
