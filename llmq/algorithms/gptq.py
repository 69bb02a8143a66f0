"""GPTQ (Frantar et al., ICLR 2023): Hessian-based rounding of one linear layer at a time.

Minimises ``||W X - Q X||^2 = tr((W - Q) H (W - Q)^T) / 2`` over quantized ``Q`` column by column,
spreading each column's rounding error over the not-yet-quantized columns with the inverse
Hessian (Algorithm 1). Pure tensors in, codes and quantization parameters out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


@dataclass
class GPTQResult:
    weight: QuantizedWeight
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


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> GPTQResult:
    """Quantize ``W [out, in]`` given ``H [in, in] = 2 X X^T`` of its calibration inputs.

    Lazy block updates (block ``cfg.block_size``), optional act-order (columns in descending
    ``diag H``) and static groups (group parameters from the original weights, natural ``g_idx``,
    so act-order needs no reordering at inference).
    """
    W = W.float() if W.dtype != torch.float32 else W.clone()
    rows, cols = W.shape
    gs = cfg.group_size if cfg.group_size > 0 else cols
    n_groups = -(-cols // gs)

    dead = torch.diag(H) == 0  # inputs that were always zero: any value is free, use 0
    if dead.any():
        H = H.float().clone()
        H[dead, dead] = 1
        W[:, dead] = 0

    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        Hinv, damp = inverse_cholesky(H[perm[:, None], perm], cfg.damp_percent)
    else:
        perm = None
        Hinv, damp = inverse_cholesky(H.float(), cfg.damp_percent)
    del H  # frees it when the caller passed its only reference (a 485 MB matrix for an 11008-wide input)
    if Hinv is None:
        log.warning(
            "GPTQ: H is not positive definite even with damp %.3g; this module falls back to RTN "
            "(more or more varied calibration text usually fixes this)", damp,
        )
        return GPTQResult(rtn_quantize(W, cfg), float("nan"), damp, fell_back_to_rtn=True)
    invperm = torch.argsort(perm) if perm is not None else None

    if cfg.static_groups:
        scales, zeros = group_qparams(W, cfg)
        g_idx = natural_g_idx(cols, gs, W.device)
        col_group = (g_idx[perm] if perm is not None else g_idx).tolist()  # group of each quantized column
    else:
        scales = torch.zeros(rows, n_groups, device=W.device)
        zeros = torch.zeros(rows, n_groups, device=W.device)
        col_group = [c // gs for c in range(cols)]  # groups follow the quantization order
        g_idx = torch.tensor(col_group, dtype=torch.int32, device=W.device)
        if invperm is not None:
            g_idx = g_idx[invperm]

    if perm is not None:
        W = W[:, perm]
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    loss = torch.zeros((), device=W.device)
    bs = _block_size(cfg.block_size, gs, n_groups)
    # group starts must fall on sub-block boundaries, so their columns are fully updated when read
    sub = SUB_BLOCK if cfg.static_groups or n_groups == 1 or gs % SUB_BLOCK == 0 else 1
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d_all = torch.diag(Hinv1).tolist()
        g_prev = -1
        for i in range(i2 - i1):
            col = i1 + i
            if not cfg.static_groups and col % gs == 0:
                end = min(col + gs, cols)  # groups never straddle a block, unless they start one
                src = W1[:, i : end - i1] if end <= i2 else W[:, col:end]
                scales[:, col // gs], zeros[:, col // gs] = row_qparams(src, cfg.bits, cfg.sym, cfg.mse,
                                                                        search=cfg.range_search)
                g_prev = -1
            g = col_group[col]
            if g != g_prev:
                scale, zero, g_prev = scales[:, g].contiguous(), zeros[:, g].contiguous(), g
            w = W1[:, i]
            q = quantize(w, scale, zero, cfg.maxq)
            codes[:, col] = q
            err = w.sub(q.sub_(zero).mul_(scale)).div_(d_all[i])  # (w - dequantized) / [H^-1]_jj
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

    weight = QuantizedWeight(
        codes[:, invperm] if invperm is not None else codes, scales, zeros.to(torch.uint8), g_idx, cfg.bits,
        cfg.group_size, cfg.sym,
    )
    return GPTQResult(weight, loss.item(), damp)
