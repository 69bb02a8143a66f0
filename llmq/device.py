"""Device and dtype policy: where a run computes, in what dtype, and how much memory it may keep.

- The compute device is CUDA when present, else the CPU, unless one is named.
- Layer forwards run in the checkpoint's dtype when that is bfloat16 (real checkpoints are; no fp32
  copy of the model is made), and in float32 otherwise: float16 activations overflow on some models
  (Gemma's reach 1e5), and bfloat16 would round an fp16 checkpoint's weights before they are solved.
- Hessians and the GPTQ solver are float32 with TF32 off (as the reference GPTQ code): TF32 keeps
  10 mantissa bits, too few for a Cholesky factorisation of ``H``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the non-auto values of config.COMPUTE_DTYPES


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(stored: torch.dtype, requested: str = "auto") -> torch.dtype:
    """The dtype layer forwards run in for a checkpoint stored in ``stored`` (see the module docstring);
    ``requested`` is a recipe's ``compute_dtype``, which the recipe has validated."""
    if requested != "auto":
        return _NAMED[requested]
    return torch.bfloat16 if stored == torch.bfloat16 else torch.float32


def activation_budget(device: torch.device) -> int:
    """Bytes of activations kept in memory before they go to disk: half of what is free now."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    meminfo = Path("/proc/meminfo")
    for line in meminfo.read_text().splitlines() if meminfo.exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


@contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls in full precision inside the block (TF32 off on CUDA; restored afterwards)."""
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
