"""llmq: layer-by-layer low-bit weight quantization of open LLMs."""

from .config import CalibConfig, QuantConfig, Recipe
from .errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    LlmqError,
    UnsupportedArchitectureError,
    WeightError,
)
from .quant import QuantizedWeight

__version__ = "0.1.0"

__all__ = [
    "CalibConfig",
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "LlmqError",
    "QuantConfig",
    "QuantizedWeight",
    "Recipe",
    "UnsupportedArchitectureError",
    "WeightError",
]
