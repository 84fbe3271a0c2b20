"""Mitigations while training: each is one component (train/mitigate/base.py) built from its own
``mitigate.<name>`` config section; the loop calls the active ones in the order listed here.

Order matters where two act on the same thing: de-duplication by caption reuses the loop's
caption-dropout draw, so it runs before caption perturbation (which leaves empty captions alone).
"""

from train.mitigate.agc import AntiGradientControl
from train.mitigate.base import BuildContext, Mitigation, Mitigations, MitigationStep
from train.mitigate.captions import CaptionPerturbation
from train.mitigate.dedup import Dedup
from train.mitigate.flags import FlagWeights
from train.mitigate.regularize import AttentionRegularizer

REGISTRY: dict[str, type[Mitigation]] = {
    "dedup": Dedup,
    "captions": CaptionPerturbation,
    "weights": FlagWeights,
    "agc": AntiGradientControl,
    "regularize": AttentionRegularizer,
}


def build_mitigations(cfg, ctx: BuildContext) -> Mitigations:
    """The active mitigations of the ``mitigate`` config section, in registry order."""
    return Mitigations([cls(cfg[name], ctx) for name, cls in REGISTRY.items() if cls.active(cfg[name])])


__all__ = ["REGISTRY", "BuildContext", "Mitigation", "Mitigations", "MitigationStep", "build_mitigations"]
