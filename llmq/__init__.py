"""llmq: layer-by-layer low-bit weight quantization of open LLMs."""

__version__ = "0.1.0"

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


def from_pretrained(*args, **kwargs):
    """Load a packed GPTQ-layout checkpoint; see :func:`llmq.loader.from_pretrained`."""
    from .loader import from_pretrained as _from_pretrained

    return _from_pretrained(*args, **kwargs)

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
    "from_pretrained",
]
