"""llama.cpp's GGUF weight types as grids: byte-exact encode / decode, and an importance-weighted scale search.

The grid view
-------------
Every type here (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K .. Q6_K) decodes a weight the same way::

    w = scale[s] * level(code) - min[s]

``s`` is the weight's sub-block: the whole 32-weight block for the legacy types and IQ4_NL, 16 or 32 weights of a
256-weight super-block for the K-quants. ``level`` maps a code (the unsigned bit field stored for the weight) to an
integer: ``code - 8`` for Q4_0, the int8 byte for Q8_0, the fixed non-uniform table ``kvalues_iq4nl`` for IQ4_NL,
``code`` itself for the types with a min. ``scale`` and ``min`` come from what the block stores:

* legacy types and IQ4_NL: ``scale = d`` (fp16); Q4_1/Q5_1 also store ``m``, which is added (``min = -m``);
* K-quants: ``scale = d * sc_level(sc[s])`` and ``min = dmin * mc[s]``, with the sub-block codes ``sc``/``mc``
  (4 bits for Q2_K, 6 bits for Q3_K/Q4_K/Q5_K, int8 for Q6_K) under the fp16 super-block ``d``/``dmin``.

A :class:`GgmlGrid` holds exactly those stored integers and fp16 numbers, so :func:`encode` is pure bit packing,
:func:`grid_scales` gives the float ``scale``/``min`` per sub-block (computed in the same float32 order as
llama.cpp's and gguf-py's dequantizers, so :func:`dequantize` is bit-exact) and :func:`round_to_grid` rounds any
other weights (e.g. GPTQ's error-compensated columns) onto the same grid.

The search (:func:`search_scales`) follows ggml-quants.c's reference quantizers, vectorised over all blocks:
a scan of candidate inverse scales around the one that maps the largest weight onto an extreme level, each
refitted by weighted least squares (``make_qx_quants``, ``quantize_row_iq4_nl_impl``; for the asymmetric types
``make_qkx3_quants``), then the K-quants' sub-block scales (and mins) quantized under the fp16 super-block scale
the same way plus a coordinate descent on single codes (``make_qp_quants``, ``quantize_row_q*_K_impl``).
Beyond llama.cpp, the K-quants get two rounds of exact block coordinate descent on the stored numbers: refit
each sub-block's integer scale (and min) code, refit ``d``/``dmin`` by least squares, re-round the codes, and
keep each change only where the block's weighted error drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from llmq.errors import ConfigError, WeightError

QK_K = 256
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a group whose largest |x| is below this is all zero
FP16_MAX = 65504.0
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class _Levels:
    """The integers a bit field stands for: ``values[code]``; finds the nearest level of any real number."""

    def __init__(self, values: Sequence[int], rtn: int | None = None):
        self.by_code = torch.tensor(values, dtype=torch.float32)
        order = torch.argsort(self.by_code, stable=True)
        self.sorted = self.by_code[order]
        self.code_of_rank = order.to(torch.uint8)
        self.lo, self.hi = int(self.sorted[0]), int(self.sorted[-1])
        self.linear = bool((self.sorted.diff() == 1).all())
        self.midpoints = (self.sorted[1:] + self.sorted[:-1]) / 2
        self._cache: dict[torch.device, tuple[Tensor, ...]] = {}
        # The level the largest |x| maps onto in a plain round-to-nearest (ggml's *_ref: Q4_0's d = max / -8).
        self.rtn = rtn if rtn is not None else (self.lo if self.lo < 0 else self.hi)
        self.extremes = tuple(e for e in (self.lo, self.hi) if e != 0)
        self.zero_rank = int(self.rank(torch.zeros(1)).item())  # the code a zero scale gets: the level nearest 0

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(by_code, sorted, code_of_rank, midpoints) on ``device``."""
        if device not in self._cache:
            self._cache[device] = tuple(t.to(device) for t in
                                        (self.by_code, self.sorted, self.code_of_rank, self.midpoints))
        return self._cache[device]

    def rank(self, t: Tensor) -> Tensor:
        """Index into ``sorted`` of the level nearest each ``t`` (ties up, as ``best_index_int8``)."""
        if self.linear:
            return (t.round().clamp(self.lo, self.hi) - self.lo).long()
        return torch.bucketize(t, self.tables(t.device)[3], right=True)

    def nearest(self, t: Tensor) -> Tensor:
        """The level nearest each ``t``, as float32."""
        if self.linear:
            return t.round().clamp_(self.lo, self.hi)
        return self.value(self.rank(t))

    def value(self, rank: Tensor) -> Tensor:
        return self.tables(rank.device)[1][rank]

    def code(self, rank: Tensor) -> Tensor:
        return self.tables(rank.device)[2][rank]

    def of_code(self, code: Tensor) -> Tensor:
        return self.tables(code.device)[0][code.long()]


# ----------------------------------------------------------------------------------------- block byte layouts
# A type's block struct is a sequence of fields; each packs some of the grid's per-block arrays into bytes.
# The arrays: "codes" [N, block], "sc" / "mc" [N, n_sub] (uint8, the stored bit fields), "d" / "dmin" [N] fp16.


@dataclass(frozen=True)
class _F16:
    """An fp16 field (``d``, ``dmin``, or Q4_1/Q5_1's ``m``), little endian."""

    name: str

    def nbytes(self, spec: GgmlSpec) -> int:
        return 2

    def pack(self, parts: dict[str, Tensor]) -> Tensor:
        return parts[self.name].reshape(-1, 1).contiguous().view(torch.uint8)

    def unpack(self, raw: Tensor, parts: dict[str, Tensor]) -> None:
        parts[self.name] = raw.contiguous().view(torch.float16).reshape(-1)


@dataclass(frozen=True)
class _Bits:
    """``width`` bits from ``shift`` up of the source arrays' values (concatenated), packed ``8 // width`` to a
    byte. Within each ``chunk`` of values, byte i holds values i, i + m, i + 2m, ... (m = chunk * width / 8) from
    its low bits up: the strided order ggml uses everywhere (Q4_0's ``qs[j] = x[j] | x[j + 16] << 4``, the
    K-quants' 2-bit planes over 128 weights, Q3_K's hmask over 256). ``chunk = 8 // width`` is plain little-endian
    bit order (Q5_0's ``qh``, a uint32 whose bit j is weight j's fifth bit)."""

    src: tuple[str, ...]
    shift: int
    width: int
    chunk: int

    def _n(self, spec: GgmlSpec) -> int:
        return sum(spec.block if s == "codes" else spec.n_sub for s in self.src)

    def nbytes(self, spec: GgmlSpec) -> int:
        return self._n(spec) * self.width // 8

    def pack(self, parts: dict[str, Tensor]) -> Tensor:
        v = torch.cat([parts[s] for s in self.src], 1).to(torch.int32)
        v = (v >> self.shift) & ((1 << self.width) - 1)
        per_byte = 8 // self.width
        v = v.reshape(v.shape[0], -1, per_byte, self.chunk // per_byte)
        shifts = torch.arange(0, 8, self.width, dtype=torch.int32, device=v.device).view(1, 1, -1, 1)
        return (v << shifts).sum(2).to(torch.uint8).reshape(v.shape[0], -1)

    def unpack(self, raw: Tensor, parts: dict[str, Tensor]) -> None:
        per_byte = 8 // self.width
        r = raw.to(torch.int32).reshape(raw.shape[0], -1, 1, self.chunk // per_byte)
        shifts = torch.arange(0, 8, self.width, dtype=torch.int32, device=raw.device).view(1, 1, -1, 1)
        v = ((r >> shifts) & ((1 << self.width) - 1)).reshape(raw.shape[0], -1) << self.shift
        for s, piece in zip(self.src, v.split([parts[s].shape[1] for s in self.src], 1), strict=True):
            parts[s] = parts[s] | piece.to(torch.uint8)


@dataclass(frozen=True)
class _ScalesK4:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins (``get_scale_min_k4``): bytes 0-3 and 4-7 hold the
    low six bits of scales / mins 0-3 and in their top two bits the high bits of 4-7; bytes 8-11 hold the low
    nibbles of scales 4-7 and, above them, of mins 4-7."""

    def nbytes(self, spec: GgmlSpec) -> int:
        return 12

    def pack(self, parts: dict[str, Tensor]) -> Tensor:
        sc, mc = parts["sc"].to(torch.int32), parts["mc"].to(torch.int32)
        b0 = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
        b1 = (mc[:, :4] & 63) | ((mc[:, 4:] >> 4) << 6)
        b2 = (sc[:, 4:] & 15) | ((mc[:, 4:] & 15) << 4)
        return torch.cat([b0, b1, b2], 1).to(torch.uint8)

    def unpack(self, raw: Tensor, parts: dict[str, Tensor]) -> None:
        r = raw.to(torch.int32)
        b0, b1, b2 = r[:, :4], r[:, 4:8], r[:, 8:]
        parts["sc"] = torch.cat([b0 & 63, (b2 & 15) | ((b0 >> 6) << 4)], 1).to(torch.uint8)
        parts["mc"] = torch.cat([b1 & 63, (b2 >> 4) | ((b1 >> 6) << 4)], 1).to(torch.uint8)


_Field = _F16 | _Bits | _ScalesK4


# ---------------------------------------------------------------------------------------------------- the types


@dataclass(frozen=True)
class GgmlSpec:
    """One llama.cpp weight type: its block struct and how llama.cpp searches its scales."""

    name: str
    type_id: int  # ggml_type, which is also gguf.GGMLQuantizationType's value
    block: int  # weights per block
    type_size: int  # bytes per block
    sub: int  # weights per sub-block sharing one scale (= block for the legacy types)
    levels: _Levels  # code -> integer level
    layout: tuple[_Field, ...]  # the block struct's fields, in byte order
    min: str = "none"  # "none"; "added": Q4_1/Q5_1's fp16 m; "sub": the K-quants' dmin * mc
    sc_levels: _Levels | None = None  # K-quants: sub-block scale (and min) code -> multiplier of d (dmin)
    weights: str = "x2"  # llama.cpp's weighting when no importance is given (see search_weights)
    offsets: tuple[float, ...] = tuple(0.1 * i for i in range(-9, 10))  # make_qx_quants' candidates, in levels
    affine: tuple[float, float, int] = (-0.9, 0.05, 36)  # make_qkx3_quants' rmin, rdelta, nstep
    sc_offsets: tuple[float, ...] = tuple(0.1 * i for i in range(-4, 5))  # make_qp_quants' candidates

    @property
    def n_sub(self) -> int:
        return self.block // self.sub

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block

    def fields(self) -> list[tuple[_Field, int, int]]:
        """(field, first byte, byte count) in block order."""
        out, at = [], 0
        for f in self.layout:
            n = f.nbytes(self)
            out.append((f, at, n))
            at += n
        assert at == self.type_size, (self.name, at)
        return out


def _lin(lo: int, n: int) -> list[int]:
    return list(range(lo, lo + n))


_INT8 = [b - 256 if b > 127 else b for b in range(256)]  # a byte read as int8
_D, _DMIN = _F16("d"), _F16("dmin")

GGML_TYPES: dict[str, GgmlSpec] = {s.name: s for s in (
    # Q8_0's plain reference maps the largest |x| onto 127 (d = amax / 127); its codes are the int8 bytes.
    GgmlSpec("Q8_0", 8, 32, 34, 32, _Levels(_INT8, rtn=-127), (_D, _Bits(("codes",), 0, 8, 32)), weights="ones"),
    GgmlSpec("Q4_0", 2, 32, 18, 32, _Levels(_lin(-8, 16)), (_D, _Bits(("codes",), 0, 4, 32)), weights="sigma"),
    GgmlSpec("Q4_1", 3, 32, 20, 32, _Levels(_lin(0, 16)), (_D, _DMIN, _Bits(("codes",), 0, 4, 32)),
             min="added", weights="sigma"),
    GgmlSpec("Q5_0", 6, 32, 22, 32, _Levels(_lin(-16, 32)),
             (_D, _Bits(("codes",), 4, 1, 8), _Bits(("codes",), 0, 4, 32)), weights="sigma"),
    GgmlSpec("Q5_1", 7, 32, 24, 32, _Levels(_lin(0, 32)),
             (_D, _DMIN, _Bits(("codes",), 4, 1, 8), _Bits(("codes",), 0, 4, 32)), min="added", weights="sigma"),
    # quantize_row_iq4_nl_impl scans 15 integer offsets of the inverse scale around both ends of the table.
    GgmlSpec("IQ4_NL", 20, 32, 18, 32, _Levels(KVALUES_IQ4NL), (_D, _Bits(("codes",), 0, 4, 32)),
             offsets=tuple(float(i) for i in range(-7, 8))),
    # block_q2_K: scales[16] (sc | mc << 4), qs[64], d, dmin
    GgmlSpec("Q2_K", 10, QK_K, 84, 16, _Levels(_lin(0, 4)),
             (_Bits(("sc", "mc"), 0, 4, 32), _Bits(("codes",), 0, 2, 128), _D, _DMIN),
             min="sub", sc_levels=_Levels(_lin(0, 16)), weights="sigma"),
    # block_q3_K: hmask[32] (bit 2 of the code), qs[64] (bits 0-1), scales[12] (6-bit, stored + 32), d
    GgmlSpec("Q3_K", 11, QK_K, 110, 16, _Levels(_lin(-4, 8)),
             (_Bits(("codes",), 2, 1, 256), _Bits(("codes",), 0, 2, 128), _Bits(("sc",), 0, 4, 16),
              _Bits(("sc",), 4, 2, 16), _D),
             sc_levels=_Levels(_lin(-32, 64)), sc_offsets=tuple(0.1 * i for i in range(-9, 10))),
    # block_q4_K: d, dmin, scales[12] (get_scale_min_k4), qs[128]
    GgmlSpec("Q4_K", 12, QK_K, 144, 32, _Levels(_lin(0, 16)), (_D, _DMIN, _ScalesK4(), _Bits(("codes",), 0, 4, 64)),
             min="sub", sc_levels=_Levels(_lin(0, 64)), weights="rms+abs"),
    # block_q5_K: d, dmin, scales[12], qh[32] (bit 4 of the code), qs[128]
    GgmlSpec("Q5_K", 13, QK_K, 176, 32, _Levels(_lin(0, 32)),
             (_D, _DMIN, _ScalesK4(), _Bits(("codes",), 4, 1, 256), _Bits(("codes",), 0, 4, 64)),
             min="sub", sc_levels=_Levels(_lin(0, 64)), weights="rms+abs"),
    # block_q6_K: ql[128] (bits 0-3), qh[64] (bits 4-5), scales[16] (int8), d
    GgmlSpec("Q6_K", 14, QK_K, 210, 16, _Levels(_lin(-32, 64)),
             (_Bits(("codes",), 0, 4, 128), _Bits(("codes",), 4, 2, 128), _Bits(("sc",), 0, 8, 16), _D),
             sc_levels=_Levels(_INT8), sc_offsets=tuple(0.1 * i for i in range(-9, 10))),
)}

GgmlType = str | int | GgmlSpec


def ggml_spec(ggml_type: GgmlType) -> GgmlSpec:
    """The spec of a type given by name ("Q4_K", any case), ggml type id, or a ``gguf.GGMLQuantizationType``."""
    if isinstance(ggml_type, GgmlSpec):
        return ggml_type
    name = getattr(ggml_type, "name", ggml_type)  # an enum member (gguf's is an IntEnum: name first)
    if isinstance(name, str) and name.upper() in GGML_TYPES:
        return GGML_TYPES[name.upper()]
    if isinstance(ggml_type, int):
        for spec in GGML_TYPES.values():
            if spec.type_id == ggml_type:
                return spec
    raise ConfigError(f"unknown or unsupported GGML type {ggml_type!r}; supported: {', '.join(GGML_TYPES)}")


def _check_shape(shape: Sequence[int], spec: GgmlSpec) -> tuple[int, int]:
    if len(shape) != 2:
        raise ConfigError(f"{spec.name} quantizes 2-D [rows, cols] weights, got shape {tuple(shape)}")
    rows, cols = int(shape[0]), int(shape[1])
    if cols % spec.block:
        raise ConfigError(f"{spec.name} packs weights in blocks of {spec.block}: the number of columns ({cols}) "
                          f"must be a multiple of the block size {spec.block}")
    return rows, cols


# --------------------------------------------------------------------------------------------------- the grid


@dataclass(eq=False)
class GgmlGrid:
    """A quantized ``[rows, cols]`` tensor as llama.cpp stores it, unpacked.

    ``codes``: uint8 ``[rows, cols]``, each weight's stored bit field (see the module docstring for its level);
    ``d``: fp16 ``[rows, blocks]``; ``dmin``: fp16 ``[rows, blocks]``, the K-quants' dmin or Q4_1/Q5_1's ``m``
    (added to the weights), None for the symmetric types; ``sc`` / ``mc``: uint8 ``[rows, blocks, sub-blocks]``,
    the K-quants' sub-block scale / min codes as stored (Q3_K's 6 bits hold scale + 32, Q6_K's byte is an int8),
    None elsewhere (``mc`` also for Q3_K and Q6_K).
    """

    type: str
    codes: Tensor
    d: Tensor
    dmin: Tensor | None = None
    sc: Tensor | None = None
    mc: Tensor | None = None
    spec: GgmlSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.spec = ggml_spec(self.type)
        self.type = self.spec.name

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> Tensor:
        """The float32 weights (as :class:`~llmq.algorithms.quant.QuantizedWeight` gives its own)."""
        return dequantize_grid(self)

    def _map(self, fn) -> GgmlGrid:
        parts = {name: None if getattr(self, name) is None else fn(getattr(self, name))
                 for name in ("codes", "d", "dmin", "sc", "mc")}
        return GgmlGrid(self.type, **parts)

    def to(self, device: torch.device | str) -> GgmlGrid:
        return self._map(lambda t: t.to(device))

    def row_slice(self, start: int, stop: int) -> GgmlGrid:
        """Rows ``start:stop`` (a copy)."""
        return self._map(lambda t: t[start:stop].clone())


def code_levels(ggml_type: GgmlType) -> Tensor:
    """float32 ``[2^bits]``: the level each code stands for (``code - 8`` for Q4_0, ``kvalues_iq4nl`` for IQ4_NL)."""
    return ggml_spec(ggml_type).levels.by_code.clone()


def grid_scales(grid: GgmlGrid) -> tuple[Tensor, Tensor]:
    """Each sub-block's effective float32 ``scale`` and ``min``, ``[rows, cols // sub]``: weight ``j`` of a row
    is ``scale[j // sub] * level(code) - min[j // sub]``. The products are formed as ggml's dequantizers form
    them (``d * sc`` first), so they are bit-exact."""
    spec = grid.spec
    rows = grid.codes.shape[0]
    d = grid.d.float()
    if spec.sc_levels is None:
        scale = d
        mins = -grid.dmin.float() if spec.min == "added" else torch.zeros_like(d)
    else:
        scale = d[..., None] * spec.sc_levels.of_code(grid.sc)
        mins = grid.dmin.float()[..., None] * spec.sc_levels.of_code(grid.mc) if spec.min == "sub" else \
            torch.zeros_like(scale)
    return scale.reshape(rows, -1), mins.reshape(rows, -1)


def dequantize_grid(grid: GgmlGrid) -> Tensor:
    """The float32 weights a grid decodes to (bit-exact with ggml's ``dequantize_row_*``)."""
    spec = grid.spec
    rows, cols = grid.codes.shape
    scale, mins = grid_scales(grid)
    w = scale[..., None] * spec.levels.of_code(grid.codes).view(rows, -1, spec.sub)
    if spec.min != "none":
        w = w - mins[..., None]
    return w.reshape(rows, cols)


def round_to_grid(w: Tensor, grid: GgmlGrid, col_start: int = 0) -> Tensor:
    """The codes of the grid's levels nearest to ``w``, under the grid's scales and mins (its codes are ignored).

    ``w`` is ``[rows, k]``: the grid's columns ``col_start .. col_start + k`` (all of them by default), so a
    caller can round a column at a time, as GPTQ does. Where a scale is 0 every code decodes alike; those get
    the code of the level nearest 0, so that rounding a grid's own dequantized weights gives back its codes.
    """
    spec = grid.spec
    rows, cols = grid.codes.shape
    k = w.shape[-1]
    if w.dim() != 2 or w.shape[0] != rows or not 0 <= col_start <= cols - k:
        raise ConfigError(f"round_to_grid: weights of shape {tuple(w.shape)} at column {col_start} do not fit a "
                          f"{spec.name} grid of shape {(rows, cols)}")
    scale, mins = grid_scales(grid)
    sub_of_col = torch.arange(col_start, col_start + k, device=w.device) // spec.sub
    return nearest_codes(w, scale[:, sub_of_col], mins[:, sub_of_col], spec)


def nearest_codes(w: Tensor, scale: Tensor, mins: Tensor, ggml_type: GgmlType) -> Tensor:
    """The codes of the levels nearest to ``w`` under ``scale`` and ``mins`` of the same shape (a zero scale
    takes the level nearest 0): :func:`round_to_grid`'s rounding, for callers holding the scales already."""
    levels = ggml_spec(ggml_type).levels
    t = torch.where(scale != 0, (w.float() + mins) / scale, torch.zeros_like(scale))
    return levels.code(levels.rank(t))


# ------------------------------------------------------------------------------------------ encode and decode


def _block_parts(grid: GgmlGrid) -> dict[str, Tensor]:
    spec = grid.spec
    rows, cols = _check_shape(grid.codes.shape, spec)
    n = rows * cols // spec.block
    parts = {"codes": grid.codes.reshape(n, spec.block).to(torch.uint8), "d": grid.d.reshape(n)}
    for name in ("dmin", "sc", "mc"):
        value = getattr(grid, name)
        if value is not None:
            parts[name] = value.reshape(n) if name == "dmin" else value.reshape(n, spec.n_sub)
    return {k: v.detach().cpu().contiguous() for k, v in parts.items()}


def encode(grid: GgmlGrid) -> np.ndarray:
    """Pack a grid into llama.cpp's block structs: uint8 ``[rows, blocks * type_size]``, as GGUF stores it."""
    spec = grid.spec
    parts = _block_parts(grid)
    if parts["d"].dtype != torch.float16 or ("dmin" in parts and parts["dmin"].dtype != torch.float16):
        raise ConfigError(f"{spec.name}: a grid's d and dmin are float16 tensors (as stored)")
    blocks = torch.cat([f.pack(parts) for f, _, _ in spec.fields()], 1)
    return blocks.reshape(grid.codes.shape[0], -1).numpy()


def _as_blocks(data: np.ndarray | bytes | Tensor, spec: GgmlSpec, rows: int, cols: int) -> Tensor:
    if isinstance(data, Tensor):
        data = data.detach().cpu().numpy()
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else \
        np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    expected = rows * cols // spec.block * spec.type_size
    if raw.size != expected:
        raise ConfigError(f"{spec.name} data for shape {(rows, cols)} is {expected} bytes, got {raw.size}")
    return torch.from_numpy(raw.copy()).reshape(-1, spec.type_size)


def decode_codes(data: np.ndarray | bytes | Tensor, ggml_type: GgmlType, shape: Sequence[int]) -> GgmlGrid:
    """Unpack llama.cpp block structs (any array or buffer of the right byte count) into a :class:`GgmlGrid`."""
    spec = ggml_spec(ggml_type)
    rows, cols = _check_shape(shape, spec)
    raw = _as_blocks(data, spec, rows, cols)
    n, nb = raw.shape[0], cols // spec.block
    parts = {"codes": torch.zeros(n, spec.block, dtype=torch.uint8)}
    if spec.sc_levels is not None:
        parts["sc"] = torch.zeros(n, spec.n_sub, dtype=torch.uint8)
    if spec.min == "sub":
        parts["mc"] = torch.zeros(n, spec.n_sub, dtype=torch.uint8)
    for f, at, size in spec.fields():
        f.unpack(raw[:, at:at + size], parts)
    return GgmlGrid(
        spec.name, parts["codes"].reshape(rows, cols), parts["d"].reshape(rows, nb),
        parts["dmin"].reshape(rows, nb) if "dmin" in parts else None,
        parts["sc"].reshape(rows, nb, spec.n_sub) if "sc" in parts else None,
        parts["mc"].reshape(rows, nb, spec.n_sub) if "mc" in parts else None)


def dequantize(data: np.ndarray | bytes | Tensor, ggml_type: GgmlType, shape: Sequence[int]) -> Tensor:
    """Decode llama.cpp block structs to float32 ``[rows, cols]``, bit-exact with ggml / ``gguf.quants``."""
    return dequantize_grid(decode_codes(data, ggml_type, shape))


# ------------------------------------------------------------------------------------------------- the search


def _f16(t: Tensor) -> Tensor:
    return t.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def search_weights(w: Tensor, ggml_type: GgmlType, importance: Tensor | None = None) -> Tensor:
    """Per-weight weights ``[rows, cols]`` of the squared error :func:`search_scales` minimises.

    Given an importance (per column, or per weight), it is the objective itself: callers such as GPTQ pass
    the Hessian's diagonal. (llama.cpp further multiplies its imatrix by ``sqrt(sigma2 + x^2)``; the importance
    here is taken as the exact objective instead.) Without one, llama.cpp's own defaults: ``x^2`` (Q3_K, Q6_K,
    IQ4_NL: ``make_qx_quants``' rmse_type 1), ``sqrt(sigma2 + x^2)`` (the legacy types' and Q2_K's
    ``quantize_row_*_impl`` with unit importance), ``sqrt(2 sigma2) + |x|`` (Q4_K, Q5_K), with sigma2 the row's
    mean square (ggml takes it over the row or the super-block); Q8_0, plain squared error.
    """
    spec = ggml_spec(ggml_type)
    x = w.detach().float()
    if importance is not None:
        imp = importance.detach().to(device=x.device, dtype=torch.float32)
        if imp.shape not in ((x.shape[1],), tuple(x.shape)):
            raise ConfigError(f"importance of shape {tuple(imp.shape)} does not match weights {tuple(x.shape)}: "
                              f"give one per column ({x.shape[1]}) or one per weight")
        if not torch.isfinite(imp).all() or (imp < 0).any():
            raise ConfigError("importance must be finite and non-negative")
        return imp.expand_as(x)
    x2 = x * x
    if spec.weights == "ones":
        return torch.ones_like(x)
    if spec.weights == "x2":
        return x2
    sigma2 = x2.mean(1, keepdim=True)
    if spec.weights == "sigma":
        return torch.sqrt(sigma2 + x2)
    return torch.sqrt(2 * sigma2) + x.abs()  # "rms+abs"


def _fit_scale(x: Tensor, w: Tensor, levels: _Levels, offsets: Sequence[float], search: bool,
               refine: bool) -> tuple[Tensor, Tensor]:
    """Per row of ``x`` [N, n], a scale with ``x ~ scale * level``: returns (scale [N], level ranks [N, n]).

    ``make_qx_quants``' scan: candidate inverse scales map the largest |x| onto an extreme level (both ends,
    since the level sets are lopsided: Q4_0's -8..7, kvalues_iq4nl), nudged by ``offsets`` levels; each
    rounding gets its weighted least-squares scale sum(wxl)/sum(wl^2), and the one that lowers the error most
    (largest sum(wxl)^2/sum(wl^2)) wins. Without ``search``, plain round-to-nearest from the largest |x|.
    ``refine``: then ``make_qp_quants``' coordinate descent on single levels (worth it for the short rows of
    sub-block scales; on the weights themselves it gains next to nothing).
    """
    amax, at = x.abs().max(1)
    xmax = x.gather(1, at[:, None]).squeeze(1)
    zero = amax < GROUP_MAX_EPS
    xmax = torch.where(zero, torch.ones_like(xmax), xmax)
    wx = w * x

    def sums(iscale: Tensor) -> tuple[Tensor, Tensor]:
        lv = levels.nearest(x * iscale[:, None])
        return torch.einsum("ij,ij->i", wx, lv), torch.einsum("ij,ij->i", w, lv * lv)

    best_iscale = levels.rtn / xmax
    sxl, sll = sums(best_iscale)
    scale = xmax / levels.rtn
    gain = 2 * scale * sxl - scale * scale * sll  # the weighted error's drop from all-zero weights
    if search:
        for e in levels.extremes:
            for off in offsets:
                iscale = (e + off) / xmax
                sxl_c, sll_c = sums(iscale)
                gain_c = torch.where(sll_c > 0, sxl_c * sxl_c / sll_c.clamp_min(1e-30), -1.0)
                better = gain_c > gain
                best_iscale = torch.where(better, iscale, best_iscale)
                scale = torch.where(better, sxl_c / sll_c.clamp_min(1e-30), scale)
                gain = torch.where(better, gain_c, gain)
    rank = levels.rank(x * best_iscale[:, None])
    if search and refine:
        lv = levels.value(rank)
        sxl, sll = (wx * lv).sum(1), (w * lv * lv).sum(1)
        rank, sxl, sll = _refine_levels(x, w, levels, rank, lv, sxl, sll)
        scale = torch.where(sll > 0, sxl / sll.clamp_min(1e-30), scale)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    rank = torch.where(zero[:, None], torch.full_like(rank, levels.zero_rank), rank)
    return scale, rank


def _refine_levels(x: Tensor, w: Tensor, levels: _Levels, rank: Tensor, lv: Tensor, sxl: Tensor, sll: Tensor,
                   tries: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """``make_q3_quants`` / ``make_qp_quants``' coordinate descent: move one level at a time to the one best for
    the least-squares scale of the others, keeping the move where it raises sum(wxl)^2/sum(wl^2)."""
    rank, lv = rank.clone(), lv.clone()
    for _ in range(tries):
        changed = False
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], lv[:, i]
            slx, sl2 = sxl - wi * xi * li, sll - wi * li * li
            r_new = levels.rank(torch.where(slx != 0, xi * sl2 / torch.where(slx != 0, slx, 1), 0))
            l_new = levels.value(r_new)
            slx, sl2 = slx + wi * xi * l_new, sl2 + wi * l_new * l_new
            better = (l_new != li) & (sl2 > 0) & (slx * slx * sll > sxl * sxl * sl2)
            if better.any():
                changed = True
                rank[:, i] = torch.where(better, r_new, rank[:, i])
                lv[:, i] = torch.where(better, l_new, li)
                sxl, sll = torch.where(better, slx, sxl), torch.where(better, sl2, sll)
        if not changed:
            break
    return rank, sxl, sll


def _fit_affine(x: Tensor, w: Tensor, nmax: int, params: tuple[float, float, int], search: bool,
                nonneg_min: bool) -> tuple[Tensor, Tensor]:
    """Per row of ``x`` [N, n], ``x ~ scale * l + b`` with l in 0..nmax: returns (scale >= 0 [N], b [N]).

    ``make_qkx3_quants``: from round-to-nearest over [min, max], scan inverse scales (nmax + rmin + k * rdelta)
    / (max - b), each rounding refitted by weighted least squares in both scale and offset, keeping the lowest
    weighted error; b is the best offset so far. The K-quants store the offset as ``-dmin * mc`` with unsigned
    codes, so there ``b <= 0`` (``nonneg_min``); Q4_1/Q5_1 store a signed fp16 ``m`` and need no clamp.
    """
    lo, hi = x.min(1).values, x.max(1).values
    if nonneg_min:
        lo = lo.clamp(max=0)
    flat = hi <= lo
    scale = torch.where(flat, torch.zeros_like(lo), (hi - lo) / nmax)
    b = lo

    def error(s: Tensor, b: Tensor, lv: Tensor) -> Tensor:
        r = lv * s[:, None]
        r += b[:, None]
        r -= x
        return torch.einsum("ij,ij->i", w * r, r)

    lv = ((x - b[:, None]) / torch.where(flat, 1, scale)[:, None]).round_().clamp_(0, nmax)
    best = error(scale, b, lv)
    if search:
        rmin, rdelta, nstep = params
        sw, sx = w.sum(1), (w * x).sum(1)
        for k in range(nstep + 1):
            iscale = (nmax + rmin + rdelta * k) / (hi - b).clamp_min(1e-30)
            lv = (x - b[:, None]).mul_(iscale[:, None]).clamp_(0, nmax).round_()
            wl = w * lv
            sl, sll, sxl = wl.sum(1), torch.einsum("ij,ij->i", wl, lv), torch.einsum("ij,ij->i", wl, x)
            det = sw * sll - sl * sl
            ok = det > 0
            det = torch.where(ok, det, 1)
            s_c = (sw * sxl - sx * sl) / det
            b_c = (sll * sx - sl * sxl) / det
            if nonneg_min:
                clamp = b_c > 0
                b_c = torch.where(clamp, 0, b_c)
                s_c = torch.where(clamp, sxl / sll.clamp_min(1e-30), s_c)
            err = error(s_c, b_c, lv)
            better = ok & (s_c >= 0) & (err < best)
            scale, b = torch.where(better, s_c, scale), torch.where(better, b_c, b)
            best = torch.where(better, err, best)
    return scale, b


def _build_grid(x: Tensor, wt: Tensor, spec: GgmlSpec, search: bool) -> GgmlGrid:
    """Sub-block fits, then (K-quants) the sub-block scales and mins quantized under fp16 super-block ones as
    ``quantize_row_q*_K_impl`` does (``make_qp_quants`` for unsigned codes, ``make_qx_quants`` for signed),
    weighting each by its sub-block's total weight; then the codes, rounded under the stored numbers."""
    rows, cols = x.shape
    nb = cols // spec.block
    xs, ws = x.reshape(-1, spec.sub), wt.reshape(-1, spec.sub)
    if spec.min == "none":
        scale, _ = _fit_scale(xs, ws, spec.levels, spec.offsets, search, refine=False)
        offset = None
    else:
        scale, offset = _fit_affine(xs, ws, spec.levels.hi, spec.affine, search, nonneg_min=spec.min == "sub")
    sc = mc = dmin = None
    if spec.sc_levels is None:
        d = _f16(scale.view(rows, nb))
        if offset is not None:
            dmin = _f16(offset.view(rows, nb))  # Q4_1/Q5_1's m: the weight of code 0
    else:
        sw = ws.sum(1).view(-1, spec.n_sub)
        lv = spec.sc_levels

        def quantize_subs(values: Tensor) -> tuple[Tensor, Tensor]:
            s, r = _fit_scale(values.view(-1, spec.n_sub), sw, lv, spec.sc_offsets, search, refine=True)
            return _f16(s.view(rows, nb)), lv.code(r).view(rows, nb, spec.n_sub)

        d, sc = quantize_subs(scale)
        if offset is not None:
            dmin, mc = quantize_subs(-offset)
    grid = GgmlGrid(spec.name, torch.zeros(rows, cols, dtype=torch.uint8, device=x.device), d, dmin, sc, mc)
    grid.codes = round_to_grid(x, grid)
    return grid


def _block_error(x: Tensor, w: Tensor, grid: GgmlGrid) -> Tensor:
    rows, cols = x.shape
    return (w * (dequantize_grid(grid) - x) ** 2).view(rows, cols // grid.spec.block, -1).sum(-1)


def _pick(better: Tensor, new: GgmlGrid, old: GgmlGrid) -> GgmlGrid:
    """Per block, ``new`` where ``better`` [rows, blocks] else ``old``."""
    rows, cols = old.codes.shape

    def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        if a is None:
            return None
        m = better.view(*better.shape, *([1] * (a.dim() - 2)))
        return torch.where(m, a, b)

    codes = torch.where(better[..., None], new.codes.view(rows, better.shape[1], -1), old.codes.view(rows,
                        better.shape[1], -1)).view(rows, cols)
    return GgmlGrid(old.type, codes, pick(new.d, old.d), pick(new.dmin, old.dmin), pick(new.sc, old.sc),
                    pick(new.mc, old.mc))


def _refit_super(x: Tensor, w: Tensor, grid: GgmlGrid) -> GgmlGrid:
    """Given the codes (and sub-block codes), the weighted least-squares ``d`` (and ``dmin`` / ``m``) of each
    block: x ~ d * a - e * b with a = sub-block multiplier * level and b = the min code (1 for Q4_1's m)."""
    spec = grid.spec
    rows, cols = x.shape
    nb = cols // spec.block
    shape = (rows, nb, spec.n_sub, spec.sub)
    a = spec.levels.of_code(grid.codes).view(shape)
    if spec.sc_levels is not None:
        a = a * spec.sc_levels.of_code(grid.sc)[..., None]
    a, xx, ww = a.reshape(rows, nb, -1).double(), x.view(rows, nb, -1).double(), w.reshape(rows, nb, -1).double()
    saa, sax = (ww * a * a).sum(-1), (ww * a * xx).sum(-1)
    if spec.min == "none":
        d = torch.where(saa > 0, sax / saa.clamp_min(1e-300), grid.d.double())
        return replace(grid, d=_f16(d))
    if spec.min == "sub":
        bb = spec.sc_levels.of_code(grid.mc)[..., None].expand(shape).reshape(rows, nb, -1).double()
    else:
        bb = torch.ones_like(a)
    sab, sbb, sbx = (ww * a * bb).sum(-1), (ww * bb * bb).sum(-1), (ww * bb * xx).sum(-1)
    det = saa * sbb - sab * sab
    ok = det > 1e-12 * saa * sbb
    det = torch.where(ok, det, 1)
    d = (sax * sbb - sbx * sab) / det
    f = (saa * sbx - sab * sax) / det  # the coefficient of b: -dmin, or Q4_1's m
    if spec.min == "sub":
        clamp = f > 0  # dmin * mc must stay >= 0
        d = torch.where(clamp, sax / saa.clamp_min(1e-300), d)
        f = torch.where(clamp, 0, f)
        f = -f
    d = torch.where(ok, d, grid.d.double())
    f = torch.where(ok, f, grid.dmin.double())
    return replace(grid, d=_f16(d), dmin=_f16(f))


def _refit_subs(x: Tensor, w: Tensor, grid: GgmlGrid) -> GgmlGrid:
    """K-quants: given d, dmin and the codes, each sub-block's best integer scale code, then min code. Each is a
    1-D convex quadratic in its code, so the level nearest the real optimum is the best code."""
    spec = grid.spec
    rows, cols = x.shape
    nb = cols // spec.block
    shape = (rows, nb, spec.n_sub, spec.sub)
    lv, xx, ww = spec.levels.of_code(grid.codes).view(shape), x.view(shape), w.reshape(shape)
    a = grid.d.float()[..., None, None] * lv
    mins = grid_scales(grid)[1].view(rows, nb, spec.n_sub, 1)
    saa = (ww * a * a).sum(-1)
    c = (ww * a * (xx + mins)).sum(-1) / saa.clamp_min(1e-30)
    sc = torch.where(saa > 0, spec.sc_levels.code(spec.sc_levels.rank(c)), grid.sc)
    if spec.min != "sub":
        return replace(grid, sc=sc)
    scale = grid.d.float()[..., None] * spec.sc_levels.of_code(sc)
    resid = scale[..., None] * lv - xx
    dm = grid.dmin.float()[..., None]
    den = dm * ww.sum(-1)
    c = (ww * resid).sum(-1) / torch.where(den != 0, den, 1)
    mc = torch.where(den != 0, spec.sc_levels.code(spec.sc_levels.rank(c)), grid.mc)
    return replace(grid, sc=sc, mc=mc)


def _polish(x: Tensor, w: Tensor, grid: GgmlGrid, rounds: int = 2) -> GgmlGrid:
    """Block coordinate descent on the stored numbers: each step re-rounds the codes and is kept per block only
    where it lowers that block's weighted error, so the result is never worse than what it started from."""
    err = _block_error(x, w, grid)
    steps = (_refit_super,) if grid.spec.sc_levels is None else (_refit_subs, _refit_super)
    for _ in range(rounds):
        for step in steps:
            new = step(x, w, grid)
            new.codes = round_to_grid(x, new)
            new_err = _block_error(x, w, new)
            better = new_err < err
            grid, err = _pick(better, new, grid), torch.where(better, new_err, err)
    return grid


def _prepare(w: Tensor, ggml_type: GgmlType) -> tuple[Tensor, GgmlSpec]:
    spec = ggml_spec(ggml_type)
    _check_shape(w.shape, spec)
    x = w.detach().float()
    if not torch.isfinite(x).all():
        raise WeightError(f"{spec.name}: the weights to quantize contain NaN or Inf")
    return x, spec


def _by_rows(fn, x: Tensor, wt: Tensor) -> GgmlGrid:
    """``fn(x, wt) -> GgmlGrid`` over slices of rows about 2^18 weights each, concatenated. Every step of the
    search is row-local; slices that stay in cache run two to three times faster on a CPU than whole tensors."""
    step = max(1, 2**18 // x.shape[1])
    grids = [fn(x[i:i + step], wt[i:i + step]) for i in range(0, x.shape[0], step)]
    if len(grids) == 1:
        return grids[0]

    def cat(name: str) -> Tensor | None:
        parts = [getattr(g, name) for g in grids]
        return None if parts[0] is None else torch.cat(parts)

    return GgmlGrid(grids[0].type, cat("codes"), cat("d"), cat("dmin"), cat("sc"), cat("mc"))


def search_scales(w: Tensor, ggml_type: GgmlType, importance: Tensor | None = None) -> GgmlGrid:
    """Choose every block's stored numbers (and the codes) for ``w`` [rows, cols], minimising the weighted squared
    error ``sum(weight * (w - dequantized)^2)``, the weights being ``importance`` per column (or per weight) or,
    without one, llama.cpp's default (see :func:`search_weights`). Follows ggml-quants.c's ``quantize_row_*_impl``
    searches, then polishes them (see the module docstring)."""
    x, spec = _prepare(w, ggml_type)
    # A symmetric single-scale type's scan already ends in its least-squares scale: polishing gains nothing.
    polish = spec.sc_levels is not None or spec.min != "none"

    def search(x: Tensor, wt: Tensor) -> GgmlGrid:
        grid = _build_grid(x, wt, spec, search=True)
        # Per block, fall back on plain round-to-nearest where it happens to be better (it can, for a K-quant:
        # the sub-block scales' quantization weighs sub-blocks only by their total weight).
        rtn = _build_grid(x, wt, spec, search=False)
        grid = _pick(_block_error(x, wt, grid) <= _block_error(x, wt, rtn), grid, rtn)
        return _polish(x, wt, grid) if polish else grid

    return _by_rows(search, x, search_weights(x, spec, importance))


def rtn_grid(w: Tensor, ggml_type: GgmlType) -> GgmlGrid:
    """The naive baseline: plain round-to-nearest with max-abs (or min/max) scales, as ggml's ``*_ref`` quantizers
    of the legacy types do, and for the K-quants sub-block scales quantized from the largest one, no search."""
    x, spec = _prepare(w, ggml_type)
    return _by_rows(lambda x, wt: _build_grid(x, wt, spec, search=False), x, torch.ones_like(x))


def quantize(w: Tensor, ggml_type: GgmlType, importance: Tensor | None = None) -> np.ndarray:
    """Search, round and encode: llama.cpp's bytes for ``w`` [rows, cols], uint8 ``[rows, bytes per row]``."""
    return encode(search_scales(w, ggml_type, importance))


def row_bytes(ggml_type: GgmlType, cols: int) -> int:
    """Bytes of one row of ``cols`` weights."""
    spec = ggml_spec(ggml_type)
    _check_shape((1, cols), spec)
    return cols // spec.block * spec.type_size


__all__ = ["GGML_TYPES", "GgmlGrid", "GgmlSpec", "QK_K", "code_levels", "decode_codes", "dequantize",
           "dequantize_grid", "encode", "ggml_spec", "grid_scales", "quantize", "round_to_grid", "row_bytes",
           "rtn_grid", "search_scales", "search_weights"]
