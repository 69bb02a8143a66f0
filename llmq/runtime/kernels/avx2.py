"""llmq's own int4 matmul for x86 CPUs with AVX2 (C, ``int4_avx2.c``), the CPU path for 2-4-bit layers.

Torch's ``_weight_int4pack_mm_for_cpu`` is bound by compute on AVX2: at one row it reads a 5632 x 2048
weight's codes at 5-6 GB/s, a bf16 GEMV of the same weight at 15-17 GB/s, so W4 decoded only 1.2x faster
than bf16 there. This kernel unpacks 64 codes per 32-byte load with shifts and masks alone (layout in
``int4_avx2.c``) and reaches the memory bandwidth with two threads (``scripts/bench_decode.py
--kernels``). Up to ``GEMV_ROWS`` rows of activations (decoding) it multiplies from the codes; above
(prefill, perplexity) it dequantizes ``W^T`` once per call, in C, and makes one dense product in
:func:`llmq.utils.device.gemm_dtype`. It takes any group size that divides the input width (act-order by a
column permutation made once, as ``int4_cpu``), float32 and bf16 activations alike (it computes in float32).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmq.runtime.kernels import native
from llmq.runtime.kernels.cpu import _SCRATCH, _group_order, grouped_codes, refuse_to_leave_the_cpu
from llmq.runtime.qlinear import QuantLinear
from llmq.utils.device import gemm_dtype

BLOCK = 64  # output rows per block of the layout
GEMV_ROWS = 64  # scripts/bench_decode.py --kernels: from 64 to 128 rows dequantize + GEMM overtakes the GEMV


def _uniform_group(g_sorted: torch.Tensor) -> int | None:
    """The size of every group of the sorted group index, when they are all one size; else None."""
    sizes = torch.bincount(g_sorted)
    sizes = sizes[sizes > 0]
    return int(sizes[0]) if bool((sizes == sizes[0]).all()) else None


def pack(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes below 16 -> ``[N / 64, K, 8]`` int32 words, nibble ``i`` of word ``l`` = row ``8 i + l``."""
    n, k = codes.shape
    by_nibble = codes.view(n // BLOCK, 8, 8, k).permute(0, 3, 2, 1)  # [blocks, K, l, i], still bytes
    words = torch.zeros(n // BLOCK, k, 8, dtype=torch.int32)
    for i in range(8):  # one eighth of the codes widened at a time: a whole int32 copy would be 4 bytes a weight
        words |= by_nibble[..., i].to(torch.int32) << (4 * i)
    return words


class Int4Avx2Linear(nn.Module):
    """A 2-4-bit packed linear on llmq's AVX2 kernel."""

    kernel = "int4_avx2"
    BITS = (2, 3, 4)

    def __init__(self, layer: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        order, self.group, codes, scales, zeros = grouped_codes(layer, _uniform_group)
        self.register_buffer("weight", pack(codes))
        self.register_buffer("scales", scales.to(torch.float16).contiguous())  # [K / group, N]
        self.register_buffer("zeros", zeros.to(torch.float16).contiguous())
        self.register_buffer("perm", order)
        self.register_buffer("bias", layer.bias)

    @classmethod
    def unsupported(cls, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return f"runs on the CPU, not {device.type}"
        if layer.out_features % BLOCK:
            return f"out_features {layer.out_features} is not a multiple of {BLOCK}"
        _, g_sorted = _group_order(layer)
        if _uniform_group(g_sorted) is None:
            return "groups of unequal sizes"
        # zero points are integer codes below 2^bits (+1 for GPTQ v1), always exact in float16; scales are
        # float16 in GPTQ checkpoints, but the loader also takes bf16 and float32 ones
        if not torch.equal(layer.scales.to(torch.float16).float(), layer.scales.float()):
            return "scales not exact in float16"
        return native.unavailable()

    @classmethod
    def slow(cls, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (torch's signature)
        scales, zeros = self.scales, self.zeros  # a dtype cast of the model must not touch the kernel's float16
        super()._apply(fn, recurse)
        refuse_to_leave_the_cpu(self, self.kernel)
        self.scales, self.zeros = scales, zeros
        return self

    def _layer(self) -> native.Layer:
        """The C kernel's description of this layer (made again only when a buffer moved)."""
        ptrs = (self.weight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr())
        if getattr(self, "_described", (None,))[0] != ptrs:
            self._described = ptrs, native.Layer(*ptrs, self.in_features, self.out_features, self.group)
        return self._described[1]

    def dequantized_t(self, scratch: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W^T`` ``[in, out]`` (in permuted input order under act-order): ``(q - z) s`` in float32, stored in
        float32 or rounded to bfloat16 (``dtype``) as ``.to(torch.bfloat16)`` would; in this thread's scratch
        buffer when ``scratch`` (valid until the next call: a fresh tensor of a weight's size costs a page fault
        per 4 KB, 30 ms for a 5632 x 2048 weight, more than the dequantization)."""
        if dtype not in native.DTYPES:
            raise ValueError(f"int4_avx2 dequantizes to {', '.join(map(str, native.DTYPES))}, not {dtype}")
        k, n = self.in_features, self.out_features
        out = (_SCRATCH.get(0, k * n, dtype) if scratch else torch.empty(k * n, dtype=dtype)).view(k, n)
        native.library().llmq_int4_dequant_t(self._layer(), out.data_ptr(), native.DTYPES[dtype],
                                             torch.get_num_threads())
        return out

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W^T`` by the C kernel, read and written in ``x2``'s dtype (float32 or bf16; others go by float32)."""
        if x2.dtype not in native.DTYPES:
            x2 = x2.float()
        x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype)
        native.library().llmq_int4_mm(self._layer(), x2.data_ptr(), x2.shape[0], native.DTYPES[x2.dtype],
                                      y.data_ptr(), torch.get_num_threads())
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        grad = x2.requires_grad and torch.is_grad_enabled()  # the C kernel has no backward
        if x2.shape[0] > GEMV_ROWS or grad:
            dtype = gemm_dtype(x.dtype, x.device)
            w_t = self.dequantized_t(not grad, dtype if dtype in native.DTYPES else torch.float32)
            y = x2.to(dtype) @ w_t.to(dtype)
        else:
            y = self._gemv(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"kernel=int4_avx2, group={self.group}, act_order={self.perm is not None}")
