"""GPTQ (Frantar et al., ICLR 2023): Hessian-based rounding of one linear layer at a time.

Minimises ``||W X - Q X||^2 = tr((W - Q) H (W - Q)^T) / 2`` over quantized ``Q`` column by column,
spreading each column's rounding error over the not-yet-quantized columns with the inverse
Hessian (Algorithm 1). Pure tensors in, codes and quantization parameters out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from llmq.algorithms.quant import QuantizedWeight, group_qparams, natural_g_idx, quantize, row_qparams, rtn_quantize
from llmq.config import QuantConfig

log = logging.getLogger(__name__)

SUB_BLOCK = 16  # columns per rank-1-updated sub-block inside a lazy block
MAX_DAMP_RETRIES = 4  # damping x10 each time: 1%, 10%, 100%, 1000% of mean(diag H)


class HessianAccumulator:
    """Running ``H = 2/n * sum_t x_t x_t^T`` over all calibration tokens, in float32.

    ``exact=True`` adds each batch's float32 ``x^T x`` into a float64 sum (twice the memory). Float64 holds the
    sum of a few dozen float32 numbers of similar magnitude without rounding, so the sum no longer depends on
    the order the batches are added in: ranks that each sum their own batches, then add their sums, get one
    process's H bit for bit (llmq.job.distributed). A difference needs a batch's part 2^25 times smaller than
    another's and a float64 sum within one float64 step of a float32 rounding boundary.
    """

    PART_ELEMENTS = 1 << 24  # float32 elements of one row block of x^T x in the exact sum (64 MB)

    def __init__(self, n_in: int, device: torch.device | str = "cpu", exact: bool = False):
        self.exact = exact
        self.sum = torch.zeros(n_in, n_in, dtype=torch.float64 if exact else torch.float32, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)  # [tokens, in]
        if self.exact:  # the float32 part row block by row block, so no second n_in x n_in matrix is held
            step = max(1, self.PART_ELEMENTS // x.shape[1])
            for r in range(0, x.shape[1], step):
                self.sum[r : r + step] += x[:, r : r + step].T @ x
        else:
            self.sum.addmm_(x.T, x)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``H`` in float32, computed in place: the accumulator is spent (a 11008-wide H is 485 MB; no second
        float32 copy)."""
        if self.n_tokens == 0:
            raise RuntimeError("no calibration tokens reached this module: its forward hook never ran")
        if self.sum is None:
            raise RuntimeError("hessian() was already taken from this accumulator")
        H, self.sum = self.sum.mul_(2.0 / self.n_tokens), None
        return H.to(torch.float32)


class Rounder(Protocol):
    """What :func:`gptq_pass` rounds columns with: a grid whose parameters are fitted block by block."""

    fit_every: int | None  # columns per fitted block (None: every parameter fitted before the pass)
    align: int | None  # lazy blocks are a multiple of this many columns (None: any size)

    def fit(self, col: int, src: torch.Tensor) -> None: ...

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor: ...

    def result(self, invperm: torch.Tensor | None) -> Any: ...


@dataclass
class GPTQResult:
    weight: Any  # a QuantizedWeight, or what the rounder gives (llmq.algorithms.ggml_gptq: a GGUF grid)
    loss: float  # sum over columns of (w - q)^2 / [H^-1]_jj^2 / 2, the paper's objective increase
    damp: float  # the damping actually added to diag(H)
    fell_back_to_rtn: bool = False


def inverse_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising damp until it factorises.

    Returns ``(None, damp)`` when even the largest damping fails (then the caller rounds to nearest).
    """
    mean_diag = torch.mean(torch.diag(H)).item()
    damp = damp_percent * mean_diag
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    for _ in range(MAX_DAMP_RETRIES):
        # one working matrix, factorised and inverted in place (LAPACK potrf/potri): for an
        # 11008-wide input that is 485 MB beside H instead of three copies
        A = H.clone()
        A.diagonal().add_(damp)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info == 0 and torch.isfinite(A.sum()):  # a sum is NaN/Inf if any entry is
                return A.triu_(), damp
        del A
        log.info("Cholesky failed with damp %.3g; retrying with 10x damping", damp)
        damp *= 10
    return None, damp


def _block_size(block_size: int, group_size: int, n_groups: int) -> int:
    """Align lazy blocks with groups so every group's parameters are taken from fully updated weights."""
    if n_groups == 1:
        return block_size
    if group_size <= block_size:
        return block_size - block_size % group_size
    return group_size


class UniformRounder:
    """GPTQ's columns onto the integer grid of :class:`~llmq.algorithms.quant.QuantizedWeight`: per group a scale
    and zero point, ``w ~ scale * (code - zero)``, fitted from the updated weights when the pass reaches the group's
    first column (or from the original weights up front, ``static_groups``)."""

    def __init__(self, W: torch.Tensor, cfg: QuantConfig, perm: torch.Tensor | None):
        rows, cols = W.shape
        self.cfg, self.gs = cfg, cfg.group_size if cfg.group_size > 0 else cols
        n_groups = -(-cols // self.gs)
        if cfg.static_groups:
            self.scales, self.zeros = group_qparams(W, cfg)
            self.g_idx = natural_g_idx(cols, self.gs, W.device)
            self.col_group = (self.g_idx[perm] if perm is not None else self.g_idx).tolist()
        else:
            self.scales = torch.zeros(rows, n_groups, device=W.device)
            self.zeros = torch.zeros(rows, n_groups, device=W.device)
            self.col_group = [c // self.gs for c in range(cols)]  # groups follow the quantization order
            g_idx = torch.tensor(self.col_group, dtype=torch.int32, device=W.device)
            self.g_idx = g_idx[torch.argsort(perm)] if perm is not None else g_idx
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
        self.fit_every = None if cfg.static_groups else self.gs
        self.align = None if n_groups == 1 else self.gs
        self.g_prev = -1

    def fit(self, col: int, src: torch.Tensor) -> None:
        """The group starting at (quantization-order) column ``col`` takes its parameters from ``src``."""
        g = col // self.gs
        self.scales[:, g], self.zeros[:, g] = row_qparams(src, self.cfg.bits, self.cfg.sym, self.cfg.mse,
                                                          search=self.cfg.range_search)
        self.g_prev = -1

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor:
        """Round column ``col`` (quantization order), keep its codes, return its dequantized values."""
        g = self.col_group[col]
        if g != self.g_prev:
            self.scale, self.zero, self.g_prev = self.scales[:, g].contiguous(), self.zeros[:, g].contiguous(), g
        q = quantize(w, self.scale, self.zero, self.cfg.maxq)
        self.codes[:, col] = q
        return q.sub_(self.zero).mul_(self.scale)

    def result(self, invperm: torch.Tensor | None) -> QuantizedWeight:
        cfg = self.cfg
        codes = self.codes[:, invperm] if invperm is not None else self.codes
        return QuantizedWeight(codes, self.scales, self.zeros.to(torch.uint8), self.g_idx, cfg.bits, cfg.group_size,
                               cfg.sym)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> GPTQResult:
    """Quantize ``W [out, in]`` given ``H [in, in] = 2 X X^T`` of its calibration inputs.

    Lazy block updates (block ``cfg.block_size``), optional act-order (columns in descending
    ``diag H``) and static groups (group parameters from the original weights, natural ``g_idx``,
    so act-order needs no reordering at inference).
    """
    return gptq_pass(W, H, cfg.act_order, cfg.damp_percent, cfg.block_size,
                     lambda W, perm: UniformRounder(W, cfg, perm), fallback=lambda W: rtn_quantize(W, cfg))


def gptq_pass(W: torch.Tensor, H: torch.Tensor, act_order: bool, damp_percent: float, block_size: int,
              rounder_for: Callable[[torch.Tensor, torch.Tensor | None], Rounder],
              fallback: Callable[[torch.Tensor], Any]) -> GPTQResult:
    """GPTQ's column pass (Algorithm 1) onto any grid: ``rounder_for(W, perm)`` gives the rounder, which fits a
    group's (or GGUF block's) parameters when the pass reaches its first column (every ``rounder.fit_every``
    columns; None: all fitted up front) and rounds each column. ``fallback(W)`` quantizes without H (RTN) when
    even the largest damping leaves H singular."""
    W = W.float() if W.dtype != torch.float32 else W.clone()
    rows, cols = W.shape

    dead = torch.diag(H) == 0  # inputs that were always zero: any value is free, use 0
    if dead.any():
        H = H.float().clone()
        H[dead, dead] = 1
        W[:, dead] = 0

    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        Hinv, damp = inverse_cholesky(H[perm[:, None], perm], damp_percent)
    else:
        perm = None
        Hinv, damp = inverse_cholesky(H.float(), damp_percent)
    del H  # frees it when the caller passed its only reference (a 485 MB matrix for an 11008-wide input)
    if Hinv is None:
        log.warning(
            "GPTQ: H is not positive definite even with damp %.3g; this module falls back to RTN "
            "(more or more varied calibration text usually fixes this)", damp,
        )
        return GPTQResult(fallback(W), float("nan"), damp, fell_back_to_rtn=True)
    invperm = torch.argsort(perm) if perm is not None else None

    rounder = rounder_for(W, perm)
    if perm is not None:
        W = W[:, perm]
    loss = torch.zeros((), device=W.device)
    every = rounder.fit_every
    bs = _block_size(block_size, rounder.align or cols, 1 if rounder.align is None else 2)
    # group starts must fall on sub-block boundaries, so their columns are fully updated when read
    sub = SUB_BLOCK if every is None or rounder.align is None or every % SUB_BLOCK == 0 else 1
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d_all = torch.diag(Hinv1).tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if every is not None and col % every == 0:
                end = min(col + every, cols)  # groups never straddle a block, unless they start one
                rounder.fit(col, W1[:, i : end - i1] if end <= i2 else W[:, col:end])
            w = W1[:, i]
            err = w.sub(rounder.round(col, w)).div_(d_all[i])  # (w - dequantized) / [H^-1]_jj
            # rank-1 updates stay inside a sub-block of `sub` columns; the rest of the block gets the
            # sub-block's errors as one matmul (the lazy-batch idea of Sec. 3, applied twice)
            j2 = min((i // sub + 1) * sub, i2 - i1)
            W1[:, i:j2].addr_(err, Hinv1[i, i:j2], alpha=-1)
            Err1[:, i] = err
            if i + 1 == j2 and j2 < i2 - i1:
                j1 = j2 - sub
                W1[:, j2:].addmm_(Err1[:, j1:j2], Hinv1[j1:j2, j2:], alpha=-1)
        loss += Err1.pow(2).sum() / 2  # (w - q)^2 / [H^-1]_jj^2 / 2, summed per block
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    return GPTQResult(rounder.result(invperm), loss.item(), damp)
