"""Exceptions that name the problem and the fix. All derive from ``LlmqError`` (a ``ValueError``)."""


class LlmqError(ValueError):
    """Base class for every error llmq raises on bad input."""


class ConfigError(LlmqError):
    """Bad quantization settings or recipe (bits, group size, unknown keys, ...)."""


class UnsupportedArchitectureError(LlmqError):
    """The model's ``model_type`` has no entry in ``llmq.arch``."""


class CalibrationError(LlmqError):
    """Calibration or evaluation text is missing or too short."""


class WeightError(LlmqError):
    """A weight to quantize contains NaN or Inf."""


class CheckpointError(LlmqError):
    """A model path or checkpoint is missing, corrupt, or disagrees with its config."""
