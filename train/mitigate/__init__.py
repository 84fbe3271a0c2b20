"""Mitigations while training: caption perturbation, per-sample loss weights, attention regularizers.

Each acts per sample and can target every sample or only those the monitor flags, from a given step.
"""
