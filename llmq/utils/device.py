"""Device and dtype policy: where a run computes, in what dtype, and how much memory it may keep.

- The compute device is CUDA when present, else the CPU, unless one is named.
- The model and the calibration activations are held in the checkpoint's dtype when that is bfloat16
  (real checkpoints are; no fp32 copy of the model is made), and in float32 otherwise: float16
  activations overflow on some models (Gemma's reach 1e5), and bfloat16 would round an fp16
  checkpoint's weights before they are solved.
- A bfloat16 model's layer forwards run in bfloat16 where the device multiplies it natively (CUDA,
  CPUs with AVX512-BF16 or AMX), and elsewhere in float32, one decoder layer cast up at a time: on an
  AVX2 CPU bfloat16 matmuls run at a fifth of float32's speed (17 against 100 GFLOP/s on a 2-core EPYC).
  For the same reason packed checkpoints' dequantized GEMMs (prefill) multiply in float32 there
  (:func:`gemm_dtype`), the product rounded to bfloat16 once.
- Hessians and the GPTQ solver are float32 with TF32 off (as the reference GPTQ code): TF32 keeps
  10 mantissa bits, too few for a Cholesky factorisation of ``H``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (on a CPU: AVX512-BF16 or AMX tiles)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return True
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


@functools.cache
def _native_bf16_at(device: torch.device) -> bool:
    return native_bf16(device)


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a dense product with ``dtype`` activations runs in on ``device``: float32 for bfloat16 ones where
    bfloat16 matmuls are not native (the device probed once), ``dtype`` otherwise."""
    return torch.float32 if dtype == torch.bfloat16 and not _native_bf16_at(device) else dtype


def forward_dtype(dtype: torch.dtype, device: torch.device, requested: str = "auto") -> torch.dtype:
    """The dtype decoder-layer forwards run in during calibration, for a model held in ``dtype`` (see the module
    docstring); a recipe's ``compute_dtype="bfloat16"`` keeps bfloat16 forwards (half the layer's memory)."""
    if requested == "auto" and dtype == torch.bfloat16 and not native_bf16(device):
        return torch.float32
    return dtype


def compute_in(layer: nn.Module, src: torch.dtype, dst: torch.dtype, leave: Iterable[nn.Module] = ()
               ) -> Callable[[], None]:
    """Make ``layer`` compute in ``dst``: its ``src`` parameters and buffers cast in place (the same objects), and
    its hidden-states input cast on entry. Returns the function that undoes it, casting the tensors back (rounding
    what was written meanwhile, e.g. dequantized weights, as a write in ``src`` would have). Tensors of other dtypes
    (a float32 router bias in a bf16 model) are left alone, and so are those of the ``leave`` modules, which cast
    their own on use (a mixture of experts' experts, one at a time: not the whole layer in ``dst`` at once)."""
    if src == dst:
        return lambda: None
    left = {id(t) for m in leave for t in (*m.parameters(), *m.buffers())}
    cast = [t for t in (*layer.parameters(), *layer.buffers()) if t.dtype == src and id(t) not in left]
    for t in cast:
        t.data = t.data.to(dst)

    def cast_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0].to(dst), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].to(dst)}
    hook = layer.register_forward_pre_hook(cast_input, with_kwargs=True)

    def restore() -> None:
        hook.remove()
        for t in cast:
            t.data = t.data.to(src)
    return restore


def cast_tensors(value: Any, src: torch.dtype, dst: torch.dtype) -> Any:
    """``value`` (a layer's keyword arguments: nested dicts, tuples, lists) with its ``src`` tensors cast to ``dst``."""
    if isinstance(value, torch.Tensor):
        return value.to(dst) if value.dtype == src else value
    if isinstance(value, dict):
        return {k: cast_tensors(v, src, dst) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(cast_tensors(v, src, dst) for v in value)
    return value


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
