"""Activation-aware weight quantization: scale search, exact folding, clip search.

AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024): input channels with large activations matter most, so scale them up before rounding
(``W diag(s)``) and fold ``1/s`` into the module that produces the linears' input. The functions
here are pure tensor/module operations; which modules form a group is the caller's (``arch.ScaleGroup``).
The grids and normalisations follow the reference implementation as packaged in AutoAWQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from llmq.algorithms.quant import _minmax_qparams, quantize, rtn_quantize
from llmq.config import QuantConfig


def _is_weight_norm(prev: nn.Module) -> bool:
    """A norm with a 1-D ``weight`` (+ bias) multiplying its normed input: nn.LayerNorm or a ``*RMSNorm`` /
    ``*LayerNorm``; whether it multiplies by ``weight`` or by ``1 + weight`` is the caller's to say."""
    return isinstance(prev, nn.LayerNorm) or type(prev).__name__.endswith(("RMSNorm", "LayerNorm"))


def _prev_channels(prev: nn.Module, rows: tuple[int, int] | None = None) -> int:
    if isinstance(prev, nn.Linear):
        return prev.out_features if rows is None else rows[1] - rows[0]
    if _is_weight_norm(prev) and rows is None:
        weight = getattr(prev, "weight", None)
        if weight is None or weight.dim() != 1:
            raise ValueError(f"{type(prev).__name__} has no 1-D weight to fold a scale into")
        return weight.shape[0]
    raise ValueError(
        f"cannot fold a scale into {type(prev).__name__}{' rows' if rows else ''}: supported are nn.Linear "
        "(or a row slice of one), nn.LayerNorm and norms with a 1-D weight (*RMSNorm, *LayerNorm)"
    )


def can_fold(prev: nn.Module, linears: list[nn.Linear], also: list[nn.Module] = (),
             rows: tuple[int, int] | None = None) -> bool:
    """Whether ``fold_scales`` applies: a supported ``prev`` whose out-channels (``rows`` of them, for a slice of
    a fused linear) equal every linear's in_features (and every ``also`` module's 2-D weight's columns).

    False e.g. for ``v_proj -> o_proj`` under grouped-query attention (v has fewer rows than o has inputs).
    """
    try:
        channels = _prev_channels(prev, rows)
    except ValueError:
        return False
    return (bool(linears) and all(isinstance(fc, nn.Linear) and fc.in_features == channels for fc in linears)
            and all(getattr(m, "weight", None) is not None and m.weight.dim() == 2 and m.weight.shape[1] == channels
                    for m in also))


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], scales: torch.Tensor, also: list[nn.Module] = (),
                rows: tuple[int, int] | None = None, norm_offset: float = 0.0) -> None:
    """Fold AWQ scales exactly: ``W[:, j] *= s_j`` in each linear, ``prev``'s output channel ``j`` ``/= s_j``.

    ``prev`` is an nn.Linear (rows of weight and bias; with ``rows = (start, stop)`` only that slice of a fused
    linear), nn.LayerNorm or a norm with a 1-D weight (weight and bias). A norm computing
    ``(norm_offset + weight) * x`` (Gemma's ``1 + w``) gets ``w' = (offset + w) / s - offset``.
    ``also`` are full-precision modules reading the same input (a MoE router): their weight columns are
    scaled as the linears', so they compute what they did. Arithmetic is in float32, cast back to each
    parameter's dtype.
    """
    if not can_fold(prev, linears, also, rows):
        raise ValueError(
            f"cannot fold scales of {type(prev).__name__} into {[type(fc).__name__ for fc in linears]}: "
            "prev must be a Linear/LayerNorm/RMSNorm whose out-channels equal every linear's in_features"
        )
    s = scales.detach().float().flatten()
    if s.numel() != linears[0].in_features:
        raise ValueError(f"{s.numel()} scales for {linears[0].in_features} input channels")
    for fc in [*linears, *also]:
        w = fc.weight
        w.copy_((w.float() * s.to(w.device)[None, :]).to(w.dtype))
    start, stop = rows or (0, s.numel())
    if isinstance(prev, nn.Linear):
        w = prev.weight[start:stop]
        w.copy_((w.float() / s.to(w.device)[:, None]).to(w.dtype))
    else:
        w = prev.weight
        w.copy_(((w.float() + norm_offset) / s.to(w.device) - norm_offset).to(w.dtype))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        b = bias[start:stop]
        b.copy_((b.float() / s.to(bias.device)).to(bias.dtype))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _weight_mean(linears: list[nn.Linear], group_size: int) -> torch.Tensor:
    """Per input channel mean of ``|W|`` normalised by its group's max (AutoAWQ's ``w_mean``, duo scaling)."""
    w = torch.cat([fc.weight.detach().float() for fc in linears], dim=0).abs()
    cols = w.shape[1]
    gs = group_size if group_size > 0 and cols % group_size == 0 else cols
    g = w.view(w.shape[0], cols // gs, gs)
    g = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
    return g.view(w.shape[0], cols).mean(0)


def _row_chunks(x: torch.Tensor, tokens: int) -> list[slice]:
    """Slices of ``x``'s first dimension holding about ``tokens`` tokens each (a row is ``x[0].numel() / in``)."""
    per_row = max(1, x[:1].numel() // x.shape[-1])
    step = max(1, tokens // per_row)
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def mean_abs(x: torch.Tensor, tokens: int = 4096) -> torch.Tensor:
    """Per input channel ``mean |x|`` in float32, a chunk of tokens at a time (no float32 copy of ``x``)."""
    total = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    for rows in _row_chunks(x, tokens):
        total += x[rows].reshape(-1, x.shape[-1]).float().abs().sum(0)  # .float() of float32 is x itself: no abs_
    return total / max(1, x.numel() // x.shape[-1])


def _grid_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """One grid point's ``s = mean|x|^alpha`` (duo: ``/ w_mean^(1-alpha)``), normalised by ``sqrt(max * min)``."""
    if w_mean is not None:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _best_grid_point(losses: dict[int, float]) -> int | None:
    """The grid point of least finite loss, the lowest on a tie (what a loop keeping strict improvements picks);
    None when no loss is finite."""
    finite = [(loss, i) for i, loss in losses.items() if math.isfinite(loss)]
    return min(finite)[1] if finite else None


@torch.no_grad()
def search_scale(
    x: torch.Tensor,
    linears: list[nn.Linear],
    inspect: Callable[[torch.Tensor], torch.Tensor],
    cfg: QuantConfig,
    n_grid: int = 20,
    duo: bool = False,
    quantize_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_tokens: int = 4096,
    candidates: Iterable[int] | None = None,
    gather: Callable[[dict[int, float]], dict[int, float]] | None = None,
) -> tuple[torch.Tensor, float]:
    """AWQ's grid search (Lin et al. 2024, Sec. 3.2): ``s = mean|x|^alpha``, alpha in ``0, 1/n, ..., (n-1)/n``.

    ``x`` is the linears' input (``[tokens, in]`` or ``[batch, seq, in]``), ``inspect`` maps a slice of it
    (whole rows, about ``batch_tokens`` tokens) to the compared output (the one linear, or a closure over
    an attention/MLP block; a tuple output compares its first element). For each candidate every linear
    temporarily holds ``Q(W diag(s)) diag(s)^-1`` (RTN under ``cfg``), so ``prev`` is untouched; the MSE
    against the full-precision output picks the best. With ``duo``, ``s = mean|x|^alpha / w_mean^(1-alpha)``.
    Scales are normalised by ``sqrt(max * min)``, as AutoAWQ. Original weights are restored. Returns
    ``(scales [in] float32, best loss)``; alpha=0 is plain RTN. ``quantize_fn(W diag(s), s)`` replaces RTN
    by the rounding that will really follow (e.g. GPTQ), so the scales are chosen for it: candidates good
    for RTN can be bad for GPTQ, which compensates errors. Memory beyond ``x``: the float32 reference
    output and one slice's candidate output.

    Sharing the grid out: each caller evaluates its ``candidates`` (default: every point) and ``gather`` maps its
    losses to every caller's; each point's loss is computed alone, so all callers pick the point one caller
    evaluating the whole grid would.
    """
    x_mean = mean_abs(x, batch_tokens)
    w_mean = _weight_mean(linears, cfg.group_size) if duo else None
    originals = [fc.weight.detach().clone() for fc in linears]
    chunks = _row_chunks(x, batch_tokens)
    fp_out = [_first(inspect(x[rows])).float() for rows in chunks]
    n_out = sum(o.numel() for o in fp_out)
    losses = {}
    try:
        for i in range(n_grid) if candidates is None else candidates:
            s = _grid_scales(x_mean, w_mean, i / n_grid)
            for fc, w in zip(linears, originals, strict=True):
                sv = s.to(w.device)[None, :]
                ws = w.float() * sv
                wq = quantize_fn(ws, s) if quantize_fn is not None else rtn_quantize(ws, cfg).dequantize()
                del ws
                fc.weight.data = wq.div_(sv).to(w.dtype)
                del wq
            losses[i] = sum((ref - _first(inspect(x[rows])).float()).pow_(2).sum().item()
                            for rows, ref in zip(chunks, fp_out, strict=True)) / n_out
    finally:
        for fc, w in zip(linears, originals, strict=True):
            fc.weight.data = w
    if gather is not None:
        losses = gather(losses)
    best = _best_grid_point(losses)
    if best is None:
        raise ValueError("AWQ scale search found no finite loss (non-finite activations or weights?)")
    return _grid_scales(x_mean, w_mean, best / n_grid).cpu(), losses[best]


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    cfg: QuantConfig,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
) -> torch.Tensor:
    """AWQ clip search (AutoAWQ ``_compute_best_clip`` / ``_apply_clip``): the clipped weight ``[out, in]``.

    Per (output row, group) shrink ``max|w|`` by ``1 - i/n_grid`` for ``i < max_shrink * n_grid`` and keep the
    one minimising the group's partial-output error ``sum_t ((Q(clip(w)) - w) x_t)^2`` over ``n_tokens`` tokens
    sampled evenly from ``x``; ``w`` is clamped to ``[-max, max]``. Quantization is RTN min-max under ``cfg``.
    The reference skips q/k projections (their output error says little about attention scores); that policy
    belongs to the caller.
    """
    out_f, cols = w.shape
    gs = cfg.group_size if cfg.group_size > 0 else cols
    n_groups = -(-cols // gs)
    pad = n_groups * gs - cols  # zero columns change neither a group's range (which holds 0) nor outputs
    wf = torch.nn.functional.pad(w.detach().float(), (0, pad)).view(out_f, n_groups, gs)
    xs = x.detach().reshape(-1, x.shape[-1])
    xs = xs[:: max(1, xs.shape[0] // n_tokens)][:n_tokens].float().to(w.device)  # subsampled, then float32
    tokens = xs.shape[0]
    xs = torch.nn.functional.pad(xs, (0, pad)).view(tokens, n_groups, gs).transpose(0, 1).contiguous()  # [G, T, gs]

    def partial_outputs(wg: torch.Tensor) -> torch.Tensor:
        """``[rows, G, gs]`` weights -> ``[rows, T, G]``: each group's share of each output, one batched
        matmul over the groups (the same sums as ``(x * w).sum(-1)`` broadcast over rows and tokens)."""
        return torch.bmm(xs, wg.permute(1, 2, 0)).permute(2, 1, 0)

    best_max = torch.empty(out_f, n_groups, 1, device=w.device)
    batch = max(1, (1 << 22) // max(1, tokens * n_groups))  # rows at a time: [rows, T, G] stays ~16 MB
    for r in range(0, out_f, batch):
        wb = wf[r : r + batch]
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # [rows, G, 1]
        best = org_max.clone()
        min_err = torch.full_like(org_max, math.inf)
        org_out = partial_outputs(wb)
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(wb, -max_val, max_val)
            xmin = cur.amin(dim=-1, keepdim=True).clamp(max=0)
            xmax = cur.amax(dim=-1, keepdim=True).clamp(min=0)
            scale, zero = _minmax_qparams(xmin, xmax, cfg.maxq, cfg.sym)
            q = scale * (quantize(cur, scale, zero, cfg.maxq) - zero)
            err = (partial_outputs(q) - org_out).pow_(2).mean(dim=1)[..., None]  # [rows, G, 1]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, max_val, best)
        best_max[r : r + batch] = best
    clipped = torch.clamp(wf, -best_max, best_max).view(out_f, n_groups * gs)[:, :cols]
    return clipped.to(w.dtype)
