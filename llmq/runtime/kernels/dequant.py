"""The portable fast path: unpack the codes in closed form and multiply, any width, device and dtype.

Nothing that can be kept is re-derived per call: zero points are unpacked once, at build, and the codes
stay packed at their own width (a W3 checkpoint stays 3 bits per weight in memory). Small batches
(decoding) dequantize a cache-sized slice of input rows at a time and accumulate; larger ones, and any
batch on a GPU, dequantize the whole weight once and make one matmul (cuBLAS on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmq.formats.pack import pack_rows, unpack_rows
from llmq.runtime.qlinear import QuantLinear
from llmq.utils.device import gemm_dtype

WHOLE_WEIGHT_ROWS = 32  # at this many rows of activations one matmul beats sliced accumulation
SLICE_VALUES = 1 << 18  # weights dequantized per slice on the CPU


class DequantLinear(nn.Module):
    """``y = x W^T + b``, ``W`` dequantized from GPTQ-layout codes in float32 arithmetic, as the reference."""

    kernel = "dequant"
    BITS = (2, 3, 4, 8)

    def __init__(self, layer: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        if layer.layout == "gptq":  # already the GPTQ layout: its packed codes are used as they are
            qweight = layer.qweight
        else:  # another layout (AutoAWQ's): repacked once
            qweight = pack_rows(layer.unpacked().codes.T.contiguous(), self.bits)
        self.register_buffer("qweight", qweight)  # [K * bits / 32, N]
        self.register_buffer("scales", layer.scales)  # [G, N], as stored
        self.register_buffer("zeros", layer._zeros())  # [G, N] float32, unpacked once
        self.register_buffer("g_idx", layer.group_index())  # [K] int64
        self.register_buffer("bias", layer.bias)

    @classmethod
    def unsupported(cls, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        return None  # takes every layer llmq can load

    @classmethod
    def slow(cls, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (torch's signature)
        scales, zeros = self.scales, self.zeros  # stay as decoded: a dtype cast must not round them
        super()._apply(fn, recurse)
        self.scales, self.zeros = scales.to(self.qweight.device), zeros.to(self.qweight.device)
        return self

    def weight_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Input rows ``start:stop`` of ``W^T``, ``[stop - start, out]``, in ``dtype``."""
        # start and stop are multiples of 32 (whole packing blocks), so they fall on word boundaries
        codes = unpack_rows(self.qweight[start * self.bits // 32 : stop * self.bits // 32], self.bits, stop - start)
        g = self.g_idx[start:stop]
        return ((codes.float() - self.zeros[g]) * self.scales.float()[g]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= WHOLE_WEIGHT_ROWS or x.device.type != "cpu":
            dtype = gemm_dtype(x.dtype, x.device)  # float32 for bf16 on a CPU without native bf16 matmuls
            y = (x2.to(dtype) @ self.weight_rows(0, self.in_features, dtype)).to(x.dtype)
        else:
            step = max(32, SLICE_VALUES // self.out_features // 32 * 32)  # slices start on packing blocks
            y = None
            for start in range(0, self.in_features, step):
                stop = min(start + step, self.in_features)
                part = x2[:, start:stop] @ self.weight_rows(start, stop, x.dtype)
                y = part if y is None else y.add_(part)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, kernel=dequant"
