"""Quantization primitives: per-group parameters, quantize, dequantize. RTN is these alone.

Conventions (those of the reference GPTQ code and of the GPTQ checkpoint layout):
codes are integers in [0, 2**bits - 1]; a weight is ``scale * (code - zero)`` with an integer
zero point per (output row, group); column ``j`` belongs to group ``g_idx[j]``.
Scales are rounded to float16 when they are chosen, because that is how checkpoints store them:
the weights llmq computes with are exactly the weights a packed checkpoint decodes to.
"""

from __future__ import annotations

import copy

import torch

from llmq.config import RANGE_SEARCHES, QuantConfig


class QuantizedWeight:
    """A quantized ``[out, in]`` weight: ``W[:, j] = scales[:, g] * (codes[:, j] - zeros[:, g])``, ``g = g_idx[j]``.

    The codes are held ``codes_per_byte(bits)`` to a byte (2 for 3- and 4-bit codes), since a layer's finished
    codes are kept until the layer is written (a Qwen3-30B-A3B layer's are 604 MB as one byte each);
    :attr:`codes` unpacks them.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, group_size: int, sym: bool):
        self.in_features = codes.shape[1]
        self.code_bytes = pack_bytes(codes, codes_per_byte(bits))  # [out, ceil(in / per byte)] uint8
        self.scales = scales  # [out, n_groups] float32 holding float16 values
        self.zeros = zeros  # [out, n_groups] uint8 integer zero points
        self.g_idx = g_idx  # [in] int32
        self.bits = bits
        self.group_size = group_size  # -1: one group per row
        self.sym = sym

    @property
    def codes(self) -> torch.Tensor:
        """``[out, in]`` uint8 codes (unpacked on each access)."""
        return unpack_bytes(self.code_bytes, codes_per_byte(self.bits), self.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.g_idx)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        moved = copy.copy(self)
        for name in ("code_bytes", "scales", "zeros", "g_idx"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def row_slice(self, start: int, stop: int) -> QuantizedWeight:
        """Rows ``start:stop`` (a copy: the rest can be freed)."""
        part = copy.copy(self)
        for name in ("code_bytes", "scales", "zeros"):
            setattr(part, name, getattr(self, name)[start:stop].clone())
        return part

    def __repr__(self) -> str:
        return (f"QuantizedWeight(out={self.code_bytes.shape[0]}, in={self.in_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym})")


def codes_per_byte(bits: int) -> int:
    """How many ``bits``-bit codes one byte holds at a power-of-two width (1 for 5 to 8 bits)."""
    return 8 // (1 << (bits - 1).bit_length())


def pack_bytes(codes: torch.Tensor, per_byte: int) -> torch.Tensor:
    """``[rows, cols]`` uint8 codes to ``[rows, ceil(cols / per_byte)]`` bytes, code ``i`` of a byte in bits
    ``i * 8 / per_byte`` up (the last byte padded with zeros)."""
    if per_byte == 1:
        return codes.contiguous()
    width, pad = 8 // per_byte, -codes.shape[1] % per_byte
    slots = torch.nn.functional.pad(codes, (0, pad)).view(codes.shape[0], -1, per_byte)
    out = slots[..., 0].clone()
    for i in range(1, per_byte):
        out |= slots[..., i] << (width * i)
    return out


def unpack_bytes(packed: torch.Tensor, per_byte: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_bytes`: ``[rows, cols]`` uint8 codes."""
    if per_byte == 1:
        return packed
    width = 8 // per_byte
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return codes.view(packed.shape[0], -1)[:, :cols].contiguous()


def _fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """Round scales up to float16 (the stored dtype): rounding up keeps the range covered."""
    s16 = scale.clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16)
    # for a positive float16 the next value up has the next bit pattern (no nextafter kernel needed on any device)
    up = (s16.view(torch.int16) + 1).view(torch.float16)
    return torch.where(s16.float() < scale, up, s16).float()


def _minmax_qparams(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    """Scale and zero point covering ``[xmin, xmax]`` (which always contains 0, as the reference)."""
    if sym:
        # a symmetric range is [-max|w|, max|w|] even when a group has no negative weight (the reference
        # keeps xmin = 0 there, which with the zero point fixed mid-range leaves half the codes unused)
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -1.0, xmin)
    xmax = torch.where(both_zero, 1.0, xmax)
    scale = _fp16_exact((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) for ``w`` given broadcastable ``scale`` and ``zero``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


_MSE_CHUNK = 1 << 18  # elements per step of the MSE range search
COARSE_STEP = 4  # coarse_to_fine: every 4th shrink factor, then the 3 on each side of each row's best


def row_qparams(
    w: torch.Tensor, bits: int, sym: bool, mse: bool = False, grid: int = 100, maxshrink: float = 0.8,
    norm: float = 2.4, search: str = "coarse_to_fine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[rows]`` for each row of ``w`` ``[rows, cols]``.

    With ``mse``, shrink the range by ``1 - i/grid`` for ``i < maxshrink*grid`` and keep, per row,
    the one that minimises ``sum |w - Q(w)|^norm`` (the reference GPTQ code's ``mse`` option). ``search="full"``
    tries every shrink factor, as the reference does; ``"coarse_to_fine"`` tries every :data:`COARSE_STEP`-th,
    then the ones between each row's best and its coarse neighbours: 26 of 80 evaluations, the reference's
    choice on most rows and a perplexity no worse on the shared models (tests/test_quant.py,
    tests/test_perplexity_tables.py).
    """
    maxq = 2**bits - 1
    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    scale, zero = _minmax_qparams(xmin, xmax, maxq, sym)
    if not mse:
        return scale, zero
    if search not in RANGE_SEARCHES:
        raise ValueError(f"range search {search!r} is unknown: choose one of {', '.join(RANGE_SEARCHES)}")
    n = int(maxshrink * grid)
    # 1 - i/grid in float32, as the reference computes each factor (a Python float, then float32)
    shrink = torch.tensor([1 - i / grid for i in range(n)], dtype=torch.float32, device=w.device)
    step = COARSE_STEP if search == "coarse_to_fine" else 1
    idx = torch.arange(0, n, step, device=w.device)[:, None].expand(-1, w.shape[0])  # [candidates, rows]
    err = _range_errors(w, xmin, xmax, shrink[idx], maxq, sym, norm)
    if step > 1:  # the shrink factors on both sides of each row's coarse best, up to its coarse neighbours
        best = idx.gather(0, err.argmin(dim=0, keepdim=True))  # [1, rows]
        offsets = torch.tensor([d for d in range(1 - step, step) if d], device=w.device)[:, None]
        fine = (best + offsets).clamp_(0, n - 1)
        idx, err = torch.cat([idx, fine]), torch.cat([err, _range_errors(w, xmin, xmax, shrink[fine], maxq, sym, norm)])
    # the least error, and of equal errors the least shrink (the reference loop's strict <)
    tied = torch.where(err == err.min(dim=0, keepdim=True).values, idx, n)
    chosen = shrink[tied.min(dim=0).values]
    return _minmax_qparams(chosen * xmin, chosen * xmax, maxq, sym)


def _range_errors(w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, shrink: torch.Tensor, maxq: int,
                  sym: bool, norm: float) -> torch.Tensor:
    """``sum |w - Q(w)|^norm`` per row ``[candidates, rows]`` with each row's range shrunk by ``shrink``
    ``[candidates, rows]``.

    All candidates at once, in chunks of ~256K elements (candidates x rows): the same arithmetic per element as one
    candidate at a time (tests compare with that loop), without rounds of small kernels. The chunks stay
    cache-sized and under the 4 MB mmap threshold the streaming run sets: a whole 11008-row group per candidate
    (5.6 MB) got fresh pages from the kernel each time and doubled the solve's time at 7B width.
    """
    s_all, z_all = _minmax_qparams(shrink * xmin, shrink * xmax, maxq, sym)  # [candidates, rows]
    err = torch.empty_like(s_all)
    rows, cols = w.shape
    row_step = max(1, min(rows, _MSE_CHUNK // max(1, cols)))  # at least 1, so a 0-row weight loops 0 times
    step = max(1, _MSE_CHUNK // (row_step * max(1, cols)))
    for r in range(0, rows, row_step):
        w_rows = w[r : r + row_step]
        for i in range(0, s_all.shape[0], step):
            s, z = s_all[i : i + step, r : r + row_step, None], z_all[i : i + step, r : r + row_step, None]
            q = quantize(w_rows, s, z, maxq).sub_(z).mul_(s)
            err[i : i + step, r : r + row_step] = q.sub_(w_rows).abs_().pow_(norm).sum(dim=2)
    return err


def group_qparams(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros ``[out, n_groups]`` of consecutive column groups (the last may be partial)."""
    cols = w.shape[1]
    gs = cfg.group_size if cfg.group_size > 0 else cols
    pairs = [row_qparams(w[:, i : i + gs], cfg.bits, cfg.sym, cfg.mse, search=cfg.range_search)
             for i in range(0, cols, gs)]
    return torch.stack([s for s, _ in pairs], dim=1), torch.stack([z for _, z in pairs], dim=1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``[out, in]`` from codes ``[out, in]`` and per-group scales/zeros ``[out, n_groups]``."""
    g = g_idx.long()
    return scales[:, g] * (codes.float() - zeros[:, g].float())


def natural_g_idx(cols: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    gs = group_size if group_size > 0 else cols
    return (torch.arange(cols, device=device) // gs).to(torch.int32)


def rtn_quantize(w: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest: each weight to its nearest grid point, groups' ranges from min/max (or MSE)."""
    w = w.float()
    scales, zeros = group_qparams(w, cfg)
    g_idx = natural_g_idx(w.shape[1], cfg.group_size, w.device)
    g = g_idx.long()
    codes = quantize(w, scales[:, g], zeros[:, g], cfg.maxq)
    return QuantizedWeight(
        codes.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, cfg.bits, cfg.group_size, cfg.sym
    )
