"""Experiment drivers above the product: the ablation grid (``python launch/ablate.py``) and the
testbed's recipe steps and analyses (``python -m launch.testbed.<driver>``). Run from the repo root;
this package is not installed with copyguard and nothing in ``train/`` or ``data/`` imports it."""
