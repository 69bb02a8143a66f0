"""Fast forwards for packed linears, chosen per layer when a checkpoint is loaded.

Every path computes what :meth:`llmq.runtime.qlinear.QuantLinear.dequantized_weight` (the slow reference)
says, and the tests hold each one to it. ``kernel="auto"`` takes, per layer, the first path in the
device's order of preference that accepts its width, groups, shapes and the activation dtype, and
records why each faster one did not (:func:`prepare` returns and logs it; ``llmq info --load`` prints
it). A path declines a layer it cannot compute (``unsupported``) and, under ``"auto"`` only, one it
would compute slowly (``slow``: torch's CPU kernels outside bfloat16). Naming a path forces it (an
error names what it cannot take); ``"pure"`` keeps the reference :class:`QuantLinear` forward, for
debugging and for the tests.

=========  ======  ==============================================================================
path       device  what it runs
=========  ======  ==============================================================================
int8_cpu   cpu     ``torch._weight_int8pack_mm``: 8 bits, one group per row, bfloat16
int4_avx2  cpu     llmq's C kernel (built once per machine with the system compiler): 2/3/4 bits, any
                   equal groups, act-order by a column permutation; x86 with AVX2; any dtype
int4_cpu   cpu     ``_weight_int4pack_mm_for_cpu``: 2/3/4 bits (codes widened to 4), 8 bits as two
                   4-bit planes; groups of whole 32-256 column blocks; act-order by a column
                   permutation made once; bfloat16
triton     cuda    fused Triton dequantize-matmul for 1-16 rows, dequantize + cuBLAS above
dequant    any     closed-form unpack at the stored width, then matmul (any dtype, any layout)
pure       any     :class:`QuantLinear`'s own forward (the reference)
=========  ======  ==============================================================================
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llmq.errors import ConfigError
from llmq.runtime.kernels.avx2 import Int4Avx2Linear
from llmq.runtime.kernels.cpu import Int4CpuLinear, Int8CpuLinear
from llmq.runtime.kernels.dequant import DequantLinear
from llmq.runtime.kernels.gpu import TritonLinear
from llmq.runtime.qlinear import QuantLinear
from llmq.utils.memory import malloc_trim

log = logging.getLogger(__name__)

KERNELS: dict[str, type[nn.Module]] = {k.kernel: k for k in (Int8CpuLinear, Int4Avx2Linear, Int4CpuLinear,
                                                             TritonLinear, DequantLinear)}
PREFERENCE = {"cpu": ("int8_cpu", "int4_avx2", "int4_cpu", "dequant"), "cuda": ("triton", "dequant")}
KERNEL_CHOICES = ("auto", "pure", *KERNELS)


class Choice(NamedTuple):
    kernel: str
    reason: str  # why each faster path for this width was not taken; "" when none was passed over


def choose(layer: QuantLinear, device: torch.device, dtype: torch.dtype, kernel: str = "auto") -> Choice:
    """The path ``layer`` runs on ``device`` with ``dtype`` activations (see the module docstring)."""
    if kernel == "pure":
        return Choice("pure", "forced")
    if kernel != "auto":
        if kernel not in KERNELS:
            raise ConfigError(f"kernel {kernel!r} is not one of {', '.join(KERNEL_CHOICES)}")
        cls = KERNELS[kernel]
        why = f"bits={layer.bits}" if layer.bits not in cls.BITS else cls.unsupported(layer, device, dtype)
        if why:  # a path that is only slow here may be forced (the tests run int4_cpu in float32)
            raise ConfigError(f"kernel {kernel!r} cannot run this layer: {why}; use kernel='auto'")
        return Choice(kernel, "forced")
    passed = []
    for name in PREFERENCE.get(device.type, ("dequant",)):
        cls = KERNELS[name]
        if layer.bits not in cls.BITS:
            continue
        why = cls.unsupported(layer, device, dtype) or cls.slow(layer, device, dtype)
        if why is None:
            return Choice(name, "; ".join(passed))
        passed.append(f"not {name}: {why}")
    raise AssertionError("dequant takes every layer")  # pragma: no cover


def prepare(model: nn.Module, dtype: torch.dtype, kernel: str = "auto",
            device_of: Callable[[str], torch.device] | None = None) -> dict[str, Choice]:
    """Replace each :class:`QuantLinear` in ``model`` by the module of its chosen path (in place).

    ``device_of(name)`` is where the layer will run (default: where its tensors are). Returns the
    choice per layer name, and logs a summary and every reason a faster path was passed over.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    choices = {}
    for name in tqdm(names, desc="preparing kernels", unit="linear", disable=len(names) < 64):
        layer = model.get_submodule(name)  # looked up one at a time: each replaced layer's tensors are freed
        device = device_of(name) if device_of else layer.qweight.device
        choice = choose(layer, torch.device(device), dtype, kernel)
        choices[name] = choice
        if choice.kernel != "pure":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, KERNELS[choice.kernel](layer, dtype))
        del layer
        # each build's temporaries (codes unpacked to bytes, int32 copies) go back to the OS before the next:
        # trimmed only at the end, glibc's heap kept them and a 16-layer fp16 load peaked 164-245 MB, not 142-150
        malloc_trim()
    summarize(choices)
    return choices


def summarize(choices: dict[str, Choice]) -> None:
    counts = Counter(c.kernel for c in choices.values())
    log.info("kernels: %s", ", ".join(f"{n} x {k}" for k, n in counts.most_common()) or "no quantized linears")
    for (kernel, reason), n in Counter((c.kernel, c.reason) for c in choices.values() if c.reason
                                       and c.reason != "forced").items():
        # Falling back to the portable path is worth a warning; passing over a kernel for a faster one is not.
        log.log(logging.WARNING if kernel == "dequant" else logging.INFO, "%d linear(s) run on %s (%s)", n,
                kernel, reason)
