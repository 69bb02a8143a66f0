"""CUDA: the Triton dequantize-matmul for batches of up to 16 rows; dequantize then cuBLAS above that."""

from __future__ import annotations

import importlib.util
import os

import torch

from llmq.runtime.kernels.dequant import DequantLinear
from llmq.runtime.qlinear import QuantLinear

TRITON_MAX_ROWS = 16  # batch 1-16: decoding is bound by reading the weight, which the fused kernel reads packed


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonLinear(DequantLinear):
    """:class:`DequantLinear`'s buffers (GPTQ layout, float32 zero points, ``g_idx``), multiplied by Triton."""

    kernel = "triton"

    def __init__(self, layer: QuantLinear, dtype: torch.dtype):
        super().__init__(layer, dtype)
        self.register_buffer("g_idx32", self.g_idx.to(torch.int32))

    @classmethod
    def unsupported(cls, layer: QuantLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda" and not _interpreting():
            return f"runs on CUDA, not {device.type}"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.is_cuda or _interpreting()):
            return super().forward(x)
        from llmq.runtime.kernels.triton_kernels import dequant_matmul, dequantize

        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= TRITON_MAX_ROWS:
            y = dequant_matmul(x2.contiguous(), self.qweight, self.scales, self.zeros, self.g_idx32, self.bits)
        else:
            y = x2 @ dequantize(self.qweight, self.scales, self.zeros, self.g_idx32, self.bits, x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("kernel=dequant", "kernel=triton")
