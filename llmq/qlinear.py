"""QuantLinear: a linear layer that keeps its weight packed in the GPTQ layout.

The forward unpacks and dequantizes this one layer's weight, multiplies, and lets the temporary
go: resident memory stays at the packed size. This pure-PyTorch path runs on any device; it is
also the reference a fused kernel must match.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pack import unpack_cols, unpack_rows


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as GPTQ-layout ``qweight/qzeros/scales/g_idx`` buffers."""

    def __init__(self, in_features: int, out_features: int, bits: int, n_groups: int, bias: bool,
                 zero_offset: int, dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.zero_offset = zero_offset  # 1 for the "gptq" (v1) convention, which stores zero - 1
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.empty(n_groups, out_features * bits // 32, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.empty(n_groups, out_features, dtype=dtype, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out, in]`` weight the codes stand for (computed in float32, returned in ``dtype``)."""
        codes = unpack_rows(self.qweight, self.bits, self.in_features)  # [in, out]
        zeros = unpack_cols(self.qzeros, self.bits, self.out_features).float() + self.zero_offset  # [groups, out]
        g = self.g_idx.long()
        w = (codes.float() - zeros[g]) * self.scales.float()[g]  # [in, out]
        return w.T.to(dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"
