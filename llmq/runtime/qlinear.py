"""QuantLinear: a linear layer that keeps its weight packed in the GPTQ layout.

The forward dequantizes the weight a slice of input rows at a time and accumulates the partial
products, so no more than a slice of one layer's weight ever exists unpacked and resident memory
stays close to the packed size. This pure-PyTorch path runs on any device; ``dequantized_weight``
is the slow, obviously correct reference it is tested against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from llmq.formats.pack import AWQ_REVERSE_ORDER, unpack_cols, unpack_rows

ROWS_PER_SLICE = 128  # a multiple of 32: slices start on packing-block boundaries for every width


class Unpacked(NamedTuple):
    """A packed linear's contents in plain tensors: what every kernel layout is built from."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 [groups, out] (the stored values, exactly)
    zeros: torch.Tensor  # float32 [groups, out] (zero points, convention offset applied)
    g_idx: torch.Tensor  # int64 [in]: the group of each input column


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as GPTQ-layout ``qweight/qzeros/scales/g_idx`` buffers."""

    layout = "gptq"  # how qweight packs the codes (pack.pack_gptq)

    def __init__(self, in_features: int, out_features: int, bits: int, n_groups: int, bias: bool,
                 zero_offset: int, dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                 scales_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.zero_offset = zero_offset  # 1 for the "gptq" (v1) convention, which stores zero - 1
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.empty(n_groups, out_features * bits // 32, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.empty(n_groups, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (torch's signature)
        # A dtype cast of the model (.half(), .to(torch.bfloat16)) must not round the stored scales: the
        # weights would no longer decode to what the quantizer produced. Only their device follows.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.qweight.device)
        return self

    def _zeros(self) -> torch.Tensor:
        """Zero points ``[groups, out]`` as float32."""
        return unpack_cols(self.qzeros, self.bits, self.out_features).float() + self.zero_offset

    def _dequantize_rows(self, start: int, stop: int, dtype: torch.dtype, zeros: torch.Tensor) -> torch.Tensor:
        """Input rows ``start:stop`` of the transposed weight, ``[stop - start, out]``, in ``dtype``."""
        words_per_row = self.bits / 32
        codes = unpack_rows(self.qweight[int(start * words_per_row) : int(stop * words_per_row)], self.bits,
                            stop - start)  # [rows, out]
        g = self.g_idx[start:stop].long()
        return ((codes.float() - zeros[g]) * self.scales.float()[g]).to(dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole ``[out, in]`` weight the codes stand for (float32 arithmetic; returned in ``dtype``, float32
        by default). The slow, obviously correct reference every fast path is tested against."""
        return self._dequantize_rows(0, self.in_features, torch.float32, self._zeros()).T.to(dtype or torch.float32)

    def group_index(self) -> torch.Tensor:
        """The group of each input column, int64 ``[in]``."""
        return self.g_idx.long()

    def unpacked(self) -> Unpacked:
        """Codes, scales, zero points and groups as plain tensors (what kernels are built from)."""
        codes = unpack_rows(self.qweight, self.bits, self.in_features).T.contiguous()
        return Unpacked(codes, self.scales.float(), self._zeros(), self.group_index())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, zeros = None, self._zeros()  # unpacked once per call, shared by every slice
        for start in range(0, self.in_features, ROWS_PER_SLICE):
            stop = min(start + ROWS_PER_SLICE, self.in_features)
            part = x[..., start:stop] @ self._dequantize_rows(start, stop, x.dtype, zeros)  # [..., out]
            out = part if out is None else out.add_(part)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class AwqQuantLinear(QuantLinear):
    """The same linear in AutoAWQ's GEMM layout: ``qweight`` int32 ``[in, out/8]`` and ``qzeros``
    int32 ``[groups, out/8]`` packed along the output dimension in the nibble order
    ``[0, 2, 4, 6, 1, 3, 5, 7]``, raw zero points, fp16 ``scales [groups, out]``, contiguous groups."""

    layout = "awq"

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                 scales_dtype: torch.dtype = torch.float16):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, 4, group_size
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(in_features, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(n_groups, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(n_groups, out_features, dtype=scales_dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def _columns(self, packed: torch.Tensor) -> torch.Tensor:
        """Unpack ``[R, out/8]`` words to ``[R, out]`` codes in column order."""
        nibbles = unpack_cols(packed, 4, self.out_features)  # [R, out], AWQ nibble order
        return nibbles.reshape(packed.shape[0], -1, 8)[:, :, AWQ_REVERSE_ORDER].reshape(packed.shape[0], -1)

    def _zeros(self) -> torch.Tensor:
        return self._columns(self.qzeros).float()  # [groups, out], raw zero points

    def group_index(self) -> torch.Tensor:
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def unpacked(self) -> Unpacked:
        return Unpacked(self._columns(self.qweight).T.contiguous(), self.scales.float(), self._zeros(),
                        self.group_index())

    def _dequantize_rows(self, start: int, stop: int, dtype: torch.dtype, zeros: torch.Tensor) -> torch.Tensor:
        codes = self._columns(self.qweight[start:stop])  # [rows, out]
        g = torch.arange(start, stop, device=codes.device) // self.group_size
        return ((codes.float() - zeros[g]) * self.scales.float()[g]).to(dtype)
