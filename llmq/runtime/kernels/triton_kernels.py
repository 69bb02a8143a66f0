"""Triton kernels on the GPTQ layout: a fused dequantize-matmul for small batches, and a dequantizer.

Imported only when used (Triton is optional). Set ``TRITON_INTERPRET=1`` before this module is first
imported to run the kernels on CPU tensors through Triton's interpreter (how the tests check them).
Codes are read straight from ``qweight`` ``[K * bits / 32, N]``: input row ``k`` is bit ``k * bits`` of
its column's little-endian word stream, so at 3 bits a row may take its high bits from the next word.
Groups come from ``g_idx``, so act-order checkpoints need no reordering. The dot runs on float32 operands
(TF32 on the GPU for half-precision activations): the interpreter's half-precision dot is wrong for bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _codes(qweight_ptr, rk, rn, mask, N, BITS: tl.constexpr):
    """Codes ``[len(rk), len(rn)]`` (int32) of input rows ``rk`` and output columns ``rn``."""
    bit = rk * BITS
    word, shift = bit // 32, (bit % 32).to(tl.uint32)
    lo = tl.load(qweight_ptr + word[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    q = lo >> shift[:, None]
    if BITS == 3:  # rows 10 and 21 of each 32 straddle two words
        straddle = (bit % 32) + BITS > 32
        hi = tl.load(qweight_ptr + (word + 1)[:, None] * N + rn[None, :], mask=mask & straddle[:, None],
                     other=0).to(tl.uint32, bitcast=True)
        q = q | (hi << tl.where(straddle, 32 - (bit % 32), 0).to(tl.uint32)[:, None])
    return (q & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dequant_matmul_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr, M, N, K, stride_xm,
                           stride_om, BITS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & (rn[None, :] < N)
        q = _codes(qweight_ptr, rk, rn, wmask, N, BITS)
        g = tl.load(g_idx_ptr + rk, mask=kmask, other=0)
        s = tl.load(scales_ptr + g[:, None] * N + rn[None, :], mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + g[:, None] * N + rn[None, :], mask=wmask, other=0.0)
        w = (q.to(tl.float32) - z) * s  # float32 arithmetic, as the reference
        # fp16 and bf16 activations are exact in TF32 and the weight keeps more bits than a half-precision
        # dot would; float32 activations get the full-precision dot.
        if IEEE:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x.to(tl.float32), w, input_precision="tf32")
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dequant_kernel(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr, N, K, BITS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rk[:, None] < K) & (rn[None, :] < N)
    q = _codes(qweight_ptr, rk, rn, mask, N, BITS)
    g = tl.load(g_idx_ptr + rk, mask=rk < K, other=0)
    s = tl.load(scales_ptr + g[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zeros_ptr + g[:, None] * N + rn[None, :], mask=mask, other=0.0)
    w = (q.to(tl.float32) - z) * s
    tl.store(out_ptr + rk[:, None] * N + rn[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """``x [M, K] @ W^T`` -> ``[M, N]`` in ``x``'s dtype; ``W`` from GPTQ-layout ``qweight``, ``scales [G, N]``,
    float32 ``zeros [G, N]`` and int32 ``g_idx [K]``."""
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16  # tl.dot's smallest tile; the kernel is meant for batches of 1 to 16
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _dequant_matmul_kernel[grid](x, qweight, scales, zeros, g_idx, out, m, n, k, x.stride(0), out.stride(0),
                                 BITS=bits, IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                                 BLOCK_K=block_k)
    return out


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
               dtype: torch.dtype, block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """``W^T`` ``[K, N]`` in ``dtype``."""
    k, n = g_idx.numel(), qweight.shape[1]
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](qweight, scales, zeros, g_idx, out, n, k, BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
