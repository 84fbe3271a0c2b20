"""The ``eval`` section of the run config lives in :mod:`train.config` with the rest of the schema;
the audit CLI builds the same dataclass from its flags, so training-time evaluation and offline
audits judge copies alike."""

from train.config import REGION_MODES, SIMILARITY_BACKENDS, EvalConfig, validate_eval

__all__ = ["EvalConfig", "REGION_MODES", "SIMILARITY_BACKENDS", "validate_eval"]
