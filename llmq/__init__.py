"""llmq: low-bit weight quantization of open LLMs.

The one-call API (:mod:`llmq.api`)::

    import llmq

    out = llmq.quantize("Qwen/Qwen2.5-0.5B", "qwen-w4", method="gptq", bits=4, group_size=128)
    model = llmq.from_pretrained(out)
    print(llmq.perplexity(out, "wikitext2", seqlen=2048)["ppl"])

``quantize``, ``perplexity`` and ``from_pretrained`` are imported on first use, so ``import llmq`` stays light;
the recipe objects (:class:`Recipe`, :class:`QuantConfig`, :class:`CalibConfig`) and the errors are here too.
"""

from typing import TYPE_CHECKING, Any

from llmq._version import __version__
from llmq.config import CalibConfig, QuantConfig, Recipe
from llmq.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    LlmqError,
    UnsupportedArchitectureError,
    WeightError,
)

if TYPE_CHECKING:
    from llmq.algorithms.quant import QuantizedWeight
    from llmq.api import from_pretrained, perplexity, quantize

_LAZY = {"quantize": "llmq.api", "perplexity": "llmq.api", "from_pretrained": "llmq.runtime.loader",
         "QuantizedWeight": "llmq.algorithms.quant"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmq' has no attribute {name!r}")


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
    "__version__",
    "from_pretrained",
    "perplexity",
    "quantize",
]
