"""GPTQ onto llama.cpp's own grids: each GGUF block's scales (and mins, and the K-quants' sub-block scale codes)
are searched against the Hessian-weighted error, then GPTQ's column pass rounds the weights under them.

llama.cpp's ``llama-quantize`` rounds every block to nearest under a weighted scale search, weighted by an
importance matrix when one is given: the mean square of each input column's activations, the diagonal of the
Hessian GPTQ uses in full. Here the search (:func:`llmq.algorithms.ggml.search_scales`) gets that diagonal, and
GPTQ (:func:`llmq.algorithms.gptq.gptq_pass`) then spreads each column's rounding error over the columns not yet
rounded. A block's parameters are fitted when the pass reaches its first column, from the weights as GPTQ has
updated them so far (with act-order, all blocks are fitted up front from the original weights, as GPTQ's static
groups are, since a block's columns are then rounded out of order). What is returned is the grid llama.cpp
stores, so the bytes written are exactly the weights evaluated.
"""

from __future__ import annotations

import torch

from llmq.algorithms.ggml import GgmlGrid, GgmlType, ggml_spec, grid_scales, nearest_codes, search_scales
from llmq.algorithms.gptq import GPTQResult, gptq_pass


def _join(grids: list[GgmlGrid]) -> GgmlGrid:
    """Grids of consecutive column blocks as one grid."""
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(g, name) for g in grids]
        return None if parts[0] is None else torch.cat(parts, dim=1)
    return GgmlGrid(grids[0].type, cat("codes"), cat("d"), cat("dmin"), cat("sc"), cat("mc"))


class GgmlRounder:
    """GPTQ's columns onto one GGUF type's grid (see the module docstring)."""

    def __init__(self, W: torch.Tensor, ggml_type: GgmlType, importance: torch.Tensor | None,
                 perm: torch.Tensor | None):
        self.spec = ggml_spec(ggml_type)
        rows, cols = W.shape
        self.importance = importance
        self.blocks: dict[int, GgmlGrid] = {}  # first column -> the fitted grid of that block
        self.scale = torch.zeros(rows, cols // self.spec.sub, device=W.device)
        self.mins = torch.zeros_like(self.scale)
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
        self.levels = self.spec.levels.by_code.to(W.device)
        self.order = perm.tolist() if perm is not None else None
        self.fit_every = self.align = self.spec.block
        if perm is not None:  # rounded out of order: every block fitted from the original weights, up front
            self.fit_every = None
            for c in range(0, cols, self.spec.block):
                self.fit(c, W[:, c : c + self.spec.block])

    def fit(self, col: int, src: torch.Tensor) -> None:
        block = self.spec.block
        imp = self.importance[col : col + block] if self.importance is not None else None
        grid = search_scales(src, self.spec, imp)
        self.blocks[col] = grid
        scale, mins = grid_scales(grid)
        s0 = col // self.spec.sub
        self.scale[:, s0 : s0 + scale.shape[1]] = scale
        self.mins[:, s0 : s0 + scale.shape[1]] = mins

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor:
        c = self.order[col] if self.order is not None else col  # the column's place in the stored tensor
        s = c // self.spec.sub
        scale, mins = self.scale[:, s], self.mins[:, s]
        code = nearest_codes(w, scale, mins, self.spec)
        self.codes[:, c] = code
        # formed as ggml's dequantizers form them (scale * level, then the min), so bit-exact with the file
        out = scale * self.levels[code.long()]
        return out - mins if self.spec.min != "none" else out

    def result(self, invperm: torch.Tensor | None) -> GgmlGrid:
        grid = _join([self.blocks[c] for c in sorted(self.blocks)])
        grid.codes = self.codes  # already in stored order
        return grid


def gptq_ggml(W: torch.Tensor, H: torch.Tensor, ggml_type: GgmlType, act_order: bool = False,
              damp_percent: float = 0.01, block_size: int = 128) -> GPTQResult:
    """GPTQ of ``W [out, in]`` given ``H [in, in]`` onto GGUF type ``ggml_type``; ``.weight`` is the
    :class:`~llmq.algorithms.ggml.GgmlGrid` (encode it with :func:`llmq.algorithms.ggml.encode`)."""
    spec = ggml_spec(ggml_type)
    importance = torch.diag(H).float().clamp_min(0)
    return gptq_pass(W, H, act_order, damp_percent, max(block_size, spec.block),
                     lambda W, perm: GgmlRounder(W, spec, importance, perm),
                     fallback=lambda W: search_scales(W, spec, importance))


def rtn_ggml(W: torch.Tensor, ggml_type: GgmlType, importance: torch.Tensor | None = None) -> GgmlGrid:
    """Round to nearest on a GGUF grid: llama.cpp's weighted scale search (``importance`` per input column, e.g.
    an importance matrix; None: llama.cpp's default weighting)."""
    return search_scales(W, ggml_type, importance)
