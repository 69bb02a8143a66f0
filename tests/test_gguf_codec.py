"""llmq.algorithms.ggml: llama.cpp's GGUF weight types, checked against llama.cpp's own Python package (gguf).

Bytes: decode -> encode gives back any block bit for bit, and llmq's dequantization equals gguf's, float32 bit for
bit, on bytes from llmq, from gguf's quantizers and on random blocks. Search: never worse than round-to-nearest,
than gguf's quantizers, nor than ignoring a given importance; rounding onto a grid is nearest and idempotent.
"""

import numpy as np
import pytest
import torch

from llmq.algorithms import ggml
from llmq.errors import ConfigError

try:
    import gguf
    import gguf.quants
except ImportError:  # gguf is llama.cpp's package, not one of llmq's dependencies
    gguf = None

needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package")

TYPES = list(ggml.GGML_TYPES)
GGUF_QUANTIZES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # the types gguf.quants can quantize, not only decode
COLS = 512  # two K-quant super-blocks, sixteen 32-weight blocks


def make_weights(rows: int = 16, cols: int = COLS, seed: int = 0) -> torch.Tensor:
    """Gaussian rows, heavy-tailed (Student t, 3 dof) rows, 1% outliers 8x larger, an all-zero and a constant
    block: the cases where a scale search differs from round-to-nearest."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    chi2 = torch.randn(rows // 2, cols, 3, generator=gen).pow(2).mean(-1)
    w[: rows // 2] = torch.randn(rows // 2, cols, generator=gen) / chi2.sqrt()
    outliers = torch.randperm(w.numel(), generator=gen)[: w.numel() // 100]
    w.view(-1)[outliers] *= 8
    w[0, :256] = 0
    w[1, :256] = 0.5
    return w * 0.02


def make_importance(cols: int = COLS, seed: int = 1) -> torch.Tensor:
    """A non-uniform per-column importance, like an activation's mean square: a few columns dominate."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(cols, generator=gen).pow(4) * 10 + 0.01


def gguf_type(name: str):
    return gguf.GGMLQuantizationType(ggml.GGML_TYPES[name].type_id)


def row_error(w: torch.Tensor, deq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The weighted squared error of each row."""
    return ((deq - w) ** 2 * weight).sum(1)


@needs_gguf
@pytest.mark.parametrize("name", TYPES)
def test_specs_match_gguf(name):
    spec = ggml.GGML_TYPES[name]
    assert gguf_type(name).name == name
    assert gguf.GGML_QUANT_SIZES[gguf_type(name)] == (spec.block, spec.type_size)
    assert ggml.ggml_spec(gguf_type(name)) is spec and ggml.ggml_spec(name.lower()) is spec
    assert spec.bits_per_weight == spec.type_size * 8 / spec.block


def random_blocks(name: str, rows: int, seed: int = 0) -> np.ndarray:
    """Random block bytes whose fp16 fields hold ordinary numbers (random bits there could be NaN or Inf)."""
    spec = ggml.GGML_TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, COLS // spec.block, spec.type_size), dtype=np.uint8)
    for f, at, size in spec.fields():
        if size == 2 and getattr(f, "name", None) in ("d", "dmin"):
            raw[..., at:at + 2] = rng.standard_normal(raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(
                *raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name", TYPES)
def test_decode_encode_round_trips_any_bytes(name):
    spec = ggml.GGML_TYPES[name]
    raw = np.random.default_rng(0).integers(0, 256, (4, COLS // spec.block * spec.type_size), dtype=np.uint8)
    assert np.array_equal(ggml.encode(ggml.decode_codes(raw, name, (4, COLS))), raw)  # NaN payloads too
    assert np.array_equal(ggml.encode(ggml.decode_codes(raw.tobytes(), name, (4, COLS))), raw)


@pytest.mark.parametrize("name", TYPES)
def test_encode_decode_round_trips_a_grid(name):
    grid = ggml.search_scales(make_weights(), name, make_importance())
    back = ggml.decode_codes(ggml.encode(grid), name, grid.shape)
    for field in ("codes", "d", "dmin", "sc", "mc"):
        a, b = getattr(grid, field), getattr(back, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), field
    assert back.type == name and grid.codes.dtype == torch.uint8 and grid.d.dtype == torch.float16


@needs_gguf
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_is_gguf_bit_for_bit(name):
    w = make_weights()
    for data in (ggml.quantize(w, name), ggml.quantize(w, name, make_importance()), random_blocks(name, 8)):
        shape = (data.shape[0], COLS)
        ours = ggml.dequantize(data, name, shape)
        theirs = torch.from_numpy(gguf.quants.dequantize(data, gguf_type(name)))
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
        assert torch.equal(ggml.dequantize_grid(ggml.decode_codes(data, name, shape)), ours)
        assert data.shape == (shape[0], ggml.row_bytes(name, COLS))


@needs_gguf
@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_bytes_from_gguf_quantize(name):
    """Bytes llama.cpp's reference quantizers wrote (gguf.quants ports them bit-exactly) decode as gguf decodes
    them and re-encode to the same bytes."""
    data = gguf.quants.quantize(make_weights().numpy(), gguf_type(name))
    ours = ggml.dequantize(data, name, (16, COLS))
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(data, gguf_type(name))))
    assert np.array_equal(ggml.encode(ggml.decode_codes(data, name, (16, COLS))), data)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("weighting", ["uniform", "importance", "default"])
def test_search_beats_round_to_nearest(name, weighting):
    """Every row's weighted error is at most that of plain round-to-nearest with max-abs (min/max) scales,
    under the weights the search was given (llama.cpp's default ones when it was given none)."""
    w = make_weights(seed=2)
    importance = {"uniform": torch.ones(COLS), "importance": make_importance(), "default": None}[weighting]
    weight = ggml.search_weights(w, name, importance)
    searched = row_error(w, ggml.dequantize(ggml.quantize(w, name, importance), name, w.shape), weight)
    rtn = row_error(w, ggml.dequantize_grid(ggml.rtn_grid(w, name)), weight)
    assert (searched <= rtn).all()
    assert searched.sum() < 0.99 * rtn.sum()


@needs_gguf
@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_search_beats_gguf_quantize(name, report):
    """llama.cpp's reference quantizers (ported bit-exactly in gguf.quants) round to nearest from max-abs or
    min/max scales; the search does better under plain squared error and under an importance."""
    w = make_weights(seed=3)
    theirs = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf_type(name)),
                                                     gguf_type(name)))
    lines = []
    for label, importance in (("MSE", torch.ones(COLS)), ("importance-weighted", make_importance())):
        ours = ggml.dequantize(ggml.quantize(w, name, importance), name, w.shape)
        e_ours, e_theirs = row_error(w, ours, importance), row_error(w, theirs, importance)
        assert (e_ours <= e_theirs).all()
        lines.append(f"{label} {e_ours.sum() / e_theirs.sum():.3f}")
    report(f"{name}: llmq's weighted error / gguf.quants.quantize's: " + ", ".join(lines))


@pytest.mark.parametrize("name", TYPES)
def test_importance_is_used(name):
    """Measured under a non-uniform importance, searching with it beats searching without it."""
    w, importance = make_weights(seed=4), make_importance(seed=5)
    with_it = row_error(w, ggml.dequantize(ggml.quantize(w, name, importance), name, w.shape), importance)
    without = row_error(w, ggml.dequantize(ggml.quantize(w, name), name, w.shape), importance)
    assert with_it.mean() < 0.97 * without.mean()
    assert (with_it <= without).float().mean() >= 0.75


@pytest.mark.parametrize("name", TYPES)
def test_round_to_grid_is_idempotent(name):
    spec = ggml.GGML_TYPES[name]
    data = ggml.quantize(make_weights(seed=6), name, make_importance())
    grid = ggml.decode_codes(data, name, (16, COLS))
    deq = ggml.dequantize_grid(grid)
    assert torch.equal(ggml.round_to_grid(deq, grid), grid.codes)
    # a column at a time, as GPTQ rounds
    start = COLS - spec.block - 3
    cols = slice(start, start + 5)
    assert torch.equal(ggml.round_to_grid(deq[:, cols], grid, col_start=start), grid.codes[:, cols])


@pytest.mark.parametrize("name", TYPES)
def test_round_to_grid_is_nearest(name):
    """Other weights (GPTQ's updated columns) round to the grid's nearest value, found here by trying every code."""
    spec = ggml.GGML_TYPES[name]
    grid = ggml.search_scales(make_weights(rows=4, seed=7), name)
    other = make_weights(rows=4, seed=8) * 1.3
    codes = ggml.round_to_grid(other, grid)
    scale, mins = (t.repeat_interleave(spec.sub, 1) for t in ggml.grid_scales(grid))
    every = scale[..., None] * ggml.code_levels(name) - mins[..., None]  # [rows, cols, codes]: each value a weight has
    best = (every - other[..., None]).abs().min(-1).values
    chosen = (ggml.dequantize_grid(ggml.GgmlGrid(name, codes, grid.d, grid.dmin, grid.sc, grid.mc)) - other).abs()
    assert torch.equal(chosen, best)


@pytest.mark.parametrize("name", TYPES)
def test_zero_and_constant_rows(name):
    zeros = torch.zeros(2, COLS)
    assert torch.equal(ggml.dequantize(ggml.quantize(zeros, name), name, zeros.shape), zeros)
    const = torch.full((2, COLS), -0.25)
    deq = ggml.dequantize(ggml.quantize(const, name), name, const.shape)
    assert (deq - const).abs().max() <= 0.25 * 2e-2  # within what fp16 and a 4-bit sub-scale can say


@pytest.mark.parametrize("name", TYPES)
def test_columns_not_a_multiple_of_the_block_size(name):
    block = ggml.GGML_TYPES[name].block
    w = torch.randn(4, block + 16)
    for call in (lambda: ggml.quantize(w, name), lambda: ggml.search_scales(w, name), lambda: ggml.rtn_grid(w, name),
                 lambda: ggml.decode_codes(b"", name, w.shape), lambda: ggml.dequantize(b"", name, w.shape)):
        with pytest.raises(ConfigError, match=f"block size {block}"):
            call()


def test_code_levels():
    assert ggml.code_levels("Q4_0").tolist() == list(range(-8, 8))
    assert ggml.code_levels("Q8_0")[[0, 127, 128, 255]].tolist() == [0, 127, -128, -1]  # the int8 byte
    assert ggml.code_levels("IQ4_NL").tolist()[:3] == [-127, -104, -83]
    assert ggml.code_levels("Q4_K").tolist() == list(range(16))


def test_bad_input():
    with pytest.raises(ConfigError, match="Q4_K"):
        ggml.ggml_spec("Q7_Z")
    with pytest.raises(ConfigError, match="bytes"):
        ggml.dequantize(np.zeros(10, np.uint8), "Q4_0", (1, 32))
    with pytest.raises(ConfigError, match="importance"):
        ggml.quantize(torch.randn(2, 32), "Q4_0", torch.ones(31))
    from llmq.errors import WeightError
    with pytest.raises(WeightError):
        ggml.quantize(torch.full((2, 32), float("nan")), "Q4_0")
