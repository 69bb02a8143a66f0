"""PyTorch's weight-only integer matmul kernels for the CPU, the ones gpt-fast and GPTQModel's torch backend use.

``_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`` computes ``x @ W^T`` with
``W[n, k] = (q[n, k] - 8) * scale[k // group, n] + zero[k // group, n]`` from 4-bit codes in the kernel's
own blocked layout (``_convert_weight_to_int4pack_for_cpu``), groups of 32/64/128/256 columns, and is
fast for bfloat16 activations. llmq's ``W = (q - z) * s`` maps onto it exactly in algebra:

- 2, 3 and 4-bit codes (all below 16), moved by ``8 - m`` (``m = 2^(bits-1)``) to centre them on the
  kernel's 8: ``zero = (m - z) * s``, no larger than the weights (0 for symmetric codes).
- 8-bit codes as two 4-bit planes, ``q = 16 hi + lo``: ``16 s (hi - 8) + s (lo - 8) + (136 - z) s``, two
  kernel calls over the same 8 bits per weight.
- Act-order ``g_idx``: input columns permuted once at build so groups are contiguous; each call gathers
  ``x``'s columns in that order.
- Any group size that is a multiple of 32 (-1 included): groups of up to 256 columns repeat a scale.

The only rounding besides the reference's own is that of the scale/zero pairs to the activation dtype
(bf16: about as much as rounding the dequantized weight to bf16, which the reference does too).
``_weight_int8pack_mm(x, w, scale)`` runs 8-bit codes with one scale per row (group size -1); zero
points other than 128 add ``sum(x) * (128 - z) * s``.
Above ``DEQUANT_ABOVE_ROWS`` rows of activations (prefill, perplexity) these kernels are slower than
bf16 GEMM, so the weight is dequantized once per call and multiplied by the dense kernel instead, in
bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX) and in float32 elsewhere: on AVX2
a bf16 GEMM runs at about a fifth of float32's rate (``scripts/bench_forward_dtype.py``), and a float32
product rounds less than the reference's bf16 weight does (the result is rounded to bf16 once). That
dequantization is the only cost prefill adds to bf16's (about 0.6 ns per weight on this project's 2-core
machine: ``bench_decode.py --kernels``): four passes (nibbles to bytes, ``- 8`` on bytes, bytes to bf16, one
``addcmul``) into scratch buffers kept per thread, since fresh tensors of a weight's size cost page faults
on every call.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmq.runtime.qlinear import QuantLinear
from llmq.utils.device import gemm_dtype

log = logging.getLogger(__name__)

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu takes, largest first
# scripts/bench_decode.py --kernels: the int4 kernel beats dequantize + bf16 GEMM at 64 rows and loses at
# 128 (2048 x 2048, 5632 x 2048) or 256 (2048 x 5632)
DEQUANT_ABOVE_ROWS = 128


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def _kernel_groups(g_sorted: torch.Tensor) -> int | None:
    """The largest kernel group size whose blocks of sorted input columns each lie in one llmq group."""
    k = g_sorted.numel()
    for size in INT4_GROUPS:
        if k % size == 0:
            blocks = g_sorted.view(-1, size)
            if bool((blocks == blocks[:, :1]).all()):
                return size
    return None


def _group_order(layer: QuantLinear) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The column permutation that makes groups contiguous (None when they already are), and the sorted groups."""
    g = layer.group_index()
    order = torch.argsort(g, stable=True)
    if torch.equal(order, torch.arange(g.numel(), device=g.device)):
        return None, g
    return order, g[order]


class GroupedCodes(NamedTuple):
    """A layer's codes with its groups made contiguous, and each kernel group's scale and zero."""

    order: torch.Tensor | None  # the input-column permutation applied (None: groups were already contiguous)
    group: int  # columns per kernel group
    codes: torch.Tensor  # [N, K] in that order
    scales: torch.Tensor  # [K / group, N] float32
    zeros: torch.Tensor


def grouped_codes(layer: QuantLinear, group_of: Callable[[torch.Tensor], int | None]) -> GroupedCodes:
    """:class:`GroupedCodes` of ``layer``, in kernel groups of ``group_of(sorted group index)`` columns."""
    order, g_sorted = _group_order(layer)
    group = group_of(g_sorted)
    u = layer.unpacked()
    first = g_sorted[::group]  # llmq group of each kernel group
    return GroupedCodes(order, group, u.codes if order is None else u.codes[:, order], u.scales[first],
                        u.zeros[first])


def refuse_to_leave_the_cpu(module: nn.Module, kernel: str) -> None:
    """For a module whose buffers hold a CPU kernel's layout (call after ``nn.Module._apply``)."""
    device = next(module.buffers()).device
    if device.type != "cpu":
        raise RuntimeError(f"an {kernel} linear holds a CPU kernel's layout and cannot move to {device}: load the "
                           "checkpoint on that device instead")


def _bf16_only(dtype: torch.dtype, name: str) -> str | None:
    if dtype != torch.bfloat16:
        return (f"{str(dtype).removeprefix('torch.')} activations ({name} is fast in bfloat16 only: load with "
                "torch_dtype=torch.bfloat16)")
    return None


INT4PACK_BLOCKS = (64, 32)  # rows per block of the CPU kernel's layout: 64 where torch's kernel uses AVX512, 32 on AVX2


@functools.cache
def _int4pack_block() -> int | None:
    """The row block of this torch's (and CPU's) int4 pack layout that :func:`_int4pack_codes_t` reads, found
    once on a probe; None when neither is it."""
    codes = torch.randint(0, 16, (96, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    except (RuntimeError, ValueError):
        return None
    return next((b for b in INT4PACK_BLOCKS
                 if torch.equal(_int4pack_codes_t(packed, 96, 64, torch.int32, block=b), codes.T)), None)


def _int4pack_codes_t(packed: torch.Tensor, n: int, k: int, dtype: torch.dtype,
                      out: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """``[k, n]`` codes (as ``dtype``, into ``out`` if given) from the CPU kernel's layout: rows in blocks of
    ``block`` (default: this CPU's) stored ``[k, block / 2]`` bytes, row ``j`` in the low nibble and row
    ``block / 2 + j`` in the high one; a last block of 32 rows after blocks of 64 stores ``[k, 16]`` bytes, rows
    ``2j`` low and ``2j + 1`` high (aten/src/ATen/native/cpu/int4mm_kernel.cpp; AVX512 builds use blocks of 64,
    AVX2 ones of 32)."""
    block = block or _int4pack_block()
    half = block // 2
    blocks, tail = divmod(n, block)
    flat = packed.reshape(-1)
    out = torch.empty(k, n, dtype=dtype, device=packed.device) if out is None else out.view(k, n)
    if blocks:
        full = flat[: blocks * k * half].view(blocks, k, half).permute(1, 0, 2)  # [k, blocks, half]
        o = out[:, : blocks * block].view(k, blocks, 2, half)
        o[:, :, 0] = full & 15
        o[:, :, 1] = full >> 4
    if tail:
        rest = flat[blocks * k * half :].view(k, tail // 2)
        o = out[:, blocks * block :].view(k, tail // 2, 2)
        o[:, :, 0] = rest & 15
        o[:, :, 1] = rest >> 4
    return out


class _Scratch(threading.local):
    """Flat buffers reused by every layer's prefill dequantization on this thread (they grow to the largest)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def get(self, slot: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get((slot, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffers[slot, dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


_SCRATCH = _Scratch()


class Int4CpuLinear(nn.Module):
    """A packed linear on ``_weight_int4pack_mm_for_cpu`` (one plane for 2-4 bits, two for 8 bits)."""

    kernel = "int4_cpu"
    BITS = (2, 3, 4, 8)

    def __init__(self, layer: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        order, self.group, codes, s, z = grouped_codes(layer, _kernel_groups)
        if self.bits <= 4:  # codes centred on the kernel's 8, so the zero term is no larger than the weights
            mid = 2 ** (self.bits - 1)
            planes = [(codes + (8 - mid), s, (mid - z) * s)]
        else:
            planes = [(codes >> 4, 16 * s, torch.zeros_like(s)), (codes & 15, s, (136 - z) * s)]
        self.register_buffer("weight", torch.stack([
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2) for q, _, _ in planes
        ]))  # [planes, N, K / 2] uint8, the kernel's layout
        self.register_buffer("scales_and_zeros", torch.stack([
            torch.stack([sc, zc], dim=-1) for _, sc, zc in planes]).to(dtype))  # [planes, K / group, N, 2]
        self.register_buffer("perm", order)
        self.register_buffer("bias", layer.bias)

    @classmethod
    def unsupported(cls, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"runs on the CPU, not {device.type}"
        if not (_has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")):
            return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu (torch >= 2.6 has)"
        if layer.out_features % 32:
            return f"out_features {layer.out_features} is not a multiple of 32"
        _, g_sorted = _group_order(layer)
        if _kernel_groups(g_sorted) is None:
            sizes = sorted(set(torch.bincount(g_sorted).tolist()) - {0})
            return (f"groups of {', '.join(map(str, sizes[:4]))} input columns (the kernel needs every group made of "
                    f"whole blocks of 32, 64, 128 or 256 columns)")
        return None

    @classmethod
    def slow(cls, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        return _bf16_only(dtype, cls.kernel)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (torch's signature)
        super()._apply(fn, recurse)
        refuse_to_leave_the_cpu(self, self.kernel)
        return self

    def dequantized_t(self, scratch: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W^T`` ``[in, out]`` in ``dtype`` (default: the activation dtype), from the kernel's layout (in this
        thread's scratch buffers when ``scratch``: valid until the next call, so only for a result no graph keeps)."""
        k, n = self.in_features, self.out_features
        dtype = dtype or self.scales_and_zeros.dtype

        def buffer(slot: int, dtype: torch.dtype) -> torch.Tensor:
            return _SCRATCH.get(slot, k * n, dtype) if scratch else torch.empty(k * n, dtype=dtype)

        w = None
        for plane, (packed, sz) in enumerate(zip(self.weight, self.scales_and_zeros, strict=True)):
            codes = _int4pack_codes_t(packed, n, k, torch.uint8, out=buffer(0, torch.uint8))
            q = codes.view(torch.int8).sub_(8)  # exact on bytes: codes are below 16
            part = buffer(1 + min(plane, 1), dtype).view(-1, self.group, n)
            part.copy_(q.view(-1, self.group, n))
            # (q - 8) s + z in float, rounded once to bf16 (q s + (z - 8 s) would round z - 8 s, up to 8 s,
            # and lose 2-bit weights' precision). Scale and zero as contiguous [groups, 1, N]: broadcasting a
            # strided view is several times slower.
            scale, zero = (sz[:, None, :, i].to(dtype).contiguous() for i in (0, 1))
            torch.addcmul(zero, part, scale, out=part)
            w = part if w is None else w.add_(part)
        return w.view(k, n)

    def _kernel_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W^T`` through ``_weight_int4pack_mm_for_cpu``, a call per plane (no autograd)."""
        y = None
        for packed, sz in zip(self.weight, self.scales_and_zeros, strict=True):
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group, sz)
            y = part if y is None else y.add_(part)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        grad = torch.is_grad_enabled() and x2.requires_grad  # the int4 kernel has no backward
        if (x2.shape[0] > DEQUANT_ABOVE_ROWS or grad) and _int4pack_block() is not None:
            # scratch only when autograd will not keep the weight for a backward pass
            dtype = gemm_dtype(x2.dtype, x2.device)
            y = x2.to(dtype) @ self.dequantized_t(not grad, dtype)
        elif grad:  # a layout llmq cannot read: W^T from the kernel itself (x = I), then a product autograd knows
            y = x2 @ self._kernel_mm(torch.eye(self.in_features, dtype=x2.dtype))
        else:
            y = self._kernel_mm(x2.contiguous())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"kernel=int4_cpu, group={self.group}, planes={self.weight.shape[0]}, "
                f"act_order={self.perm is not None}")


class Int8CpuLinear(nn.Module):
    """An 8-bit linear with one group per row on ``_weight_int8pack_mm``."""

    kernel = "int8_cpu"
    BITS = (8,)

    def __init__(self, layer: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        u = layer.unpacked()
        s, z = u.scales[0], u.zeros[0]  # [N]
        self.register_buffer("weight", (u.codes.to(torch.int16) - 128).to(torch.int8))  # [N, K]
        self.register_buffer("scale", s.to(dtype))
        # sum_k x_k (128 - z) s: the zero point's share, absent for symmetric codes (z = 128)
        self.register_buffer("offset", None if bool((z == 128).all()) else ((128 - z) * s).to(dtype))
        self.register_buffer("bias", layer.bias)

    @classmethod
    def unsupported(cls, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"runs on the CPU, not {device.type}"
        if not hasattr(torch, "_weight_int8pack_mm"):
            return f"torch {torch.__version__} has no _weight_int8pack_mm"
        if layer.scales.shape[0] != 1:
            return f"{layer.scales.shape[0]} groups per row (the int8 kernel takes one scale per row: group size -1)"
        return None

    @classmethod
    def slow(cls, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        return _bf16_only(dtype, cls.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)
        if x2.shape[0] > DEQUANT_ABOVE_ROWS:
            dtype = gemm_dtype(x2.dtype, x2.device)
            w = self.weight.to(dtype).mul_(self.scale[:, None])
            if self.offset is not None:
                w.add_(self.offset[:, None])
            y = F.linear(x2.to(dtype), w)
        else:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale)
            if self.offset is not None:
                y = y + x2.sum(-1, keepdim=True, dtype=torch.float32).to(y.dtype) * self.offset
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=8, kernel=int8_cpu, "
                f"sym={self.offset is None}")
