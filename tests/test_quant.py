import pytest
import torch
from helpers import shared_path

from llmq.algorithms.quant import dequantize, natural_g_idx, quantize, row_qparams, rtn_quantize
from llmq.config import QuantConfig
from llmq.errors import ConfigError

SHAPES = [(8, 64), (16, 172), (3, 33), (32, 256)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_codes_dequantize_exactly_and_error_is_half_a_step(bits, group_size, sym):
    for rows, cols in SHAPES:
        w = torch.randn(rows, cols) * 0.05
        qw = rtn_quantize(w, QuantConfig(method="rtn", bits=bits, group_size=group_size, sym=sym))
        gs = group_size if group_size > 0 else cols
        n_groups = -(-cols // gs)
        assert qw.codes.shape == (rows, cols) and qw.codes.dtype == torch.uint8
        assert qw.scales.shape == qw.zeros.shape == (rows, n_groups)
        assert int(qw.codes.max()) <= 2**bits - 1
        assert torch.equal(qw.g_idx, torch.arange(cols, dtype=torch.int32) // gs)
        # scales are float16 values, so a packed checkpoint decodes to the very same weights
        assert torch.equal(qw.scales, qw.scales.half().float())
        # dequantize inverts codes exactly: re-quantizing the dequantized weight gives the same codes
        deq = qw.dequantize()
        g = qw.g_idx.long()
        assert torch.equal(quantize(deq, qw.scales[:, g], qw.zeros[:, g].float(), 2**bits - 1), qw.codes.float())
        # asymmetric ranges cover [min, max]: error at most half a step (plus fp slack)
        if not sym:
            assert ((w - deq).abs() <= qw.scales[:, g] / 2 + 1e-6).all()
        else:
            assert (qw.zeros == 2 ** (bits - 1)).all()


def test_partial_last_group_matches_quantizing_it_alone():
    w = torch.randn(4, 172)
    cfg = QuantConfig(method="rtn", bits=4, group_size=32)
    qw = rtn_quantize(w, cfg)
    assert qw.scales.shape == (4, 6)  # 5 full groups of 32 and one of 12
    alone = rtn_quantize(w[:, 160:], QuantConfig(method="rtn", bits=4, group_size=-1))
    assert torch.equal(qw.codes[:, 160:], alone.codes)
    assert torch.equal(qw.scales[:, 5:], alone.scales)


def test_mse_clipping_never_worse_than_minmax():
    w = torch.randn(64, 128)
    w[:, 0] *= 20  # outliers make shrinking the range pay off
    for sym in (False, True):
        s0, z0 = row_qparams(w, 3, sym)
        s1, z1 = row_qparams(w, 3, sym, mse=True)

        def err(s, z):
            q = quantize(w, s[:, None], z[:, None], 7)
            return ((s[:, None] * (q - z[:, None]) - w).abs() ** 2.4).sum(1)

        assert (err(s1, z1) <= err(s0, z0) + 1e-6).all()
        assert (err(s1, z1) < err(s0, z0)).any()


def test_all_zero_and_constant_groups_are_exact():
    w = torch.zeros(2, 64)
    w[1] = 0.25
    qw = rtn_quantize(w, QuantConfig(method="rtn", bits=4, group_size=32, sym=False))
    assert torch.allclose(qw.dequantize(), w, atol=1e-3)
    # symmetric: zero stays exact, and a group with no negative weight still gets its whole range
    qw = rtn_quantize(w, QuantConfig(method="rtn", bits=4, group_size=32, sym=True))
    step = qw.scales[1, 0].item()
    assert torch.equal(qw.dequantize()[0], w[0]) and step == pytest.approx(2 * 0.25 / 15, rel=1e-3)
    assert (qw.dequantize()[1] - w[1]).abs().max() <= step / 2 + 1e-6


def test_dequantize_follows_g_idx():
    codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    scales = torch.tensor([[1.0, 10.0]])
    zeros = torch.tensor([[1, 2]], dtype=torch.uint8)
    g_idx = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    assert torch.equal(dequantize(codes, scales, zeros, g_idx), torch.tensor([[-20.0, 0.0, 0.0, 2.0]]))
    assert torch.equal(natural_g_idx(5, 2), torch.tensor([0, 0, 1, 1, 2], dtype=torch.int32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=5), "bits=5 is not supported"),
        (dict(group_size=0), "group_size=0 is invalid"),
        (dict(group_size=-7), "group_size=-7 is invalid"),
        (dict(method="foo"), "unknown method 'foo'"),
        (dict(damp_percent=0), "damp_percent=0"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kwargs)


def mse_search_reference(w, bits, sym, grid=100, maxshrink=0.8, norm=2.4):
    """The reference GPTQ code's search, one shrink factor at a time (the slow, obvious version)."""
    from llmq.algorithms.quant import _minmax_qparams, quantize

    maxq = 2**bits - 1
    zeros = torch.zeros(w.shape[0])
    xmin, xmax = torch.minimum(w.min(dim=1).values, zeros), torch.maximum(w.max(dim=1).values, zeros)
    scale, zero = _minmax_qparams(xmin, xmax, maxq, sym)
    best = torch.full_like(scale, float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        s, z = _minmax_qparams(p * xmin, p * xmax, maxq, sym)
        q = s[:, None] * (quantize(w, s[:, None], z[:, None], maxq) - z[:, None])
        err = (q - w).abs_().pow_(norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


@pytest.mark.parametrize("shape", [(4096, 128), (11008, 128), (300, 32), (7, 5), (3000, 1000)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_batched_mse_search_equals_the_one_at_a_time_reference(shape, bits, sym):
    w = torch.randn(shape) * 0.02
    w[0] = 0
    w[1] = w[1].abs()  # a row with no negative weight (zero point at 0)
    scale, zero = row_qparams(w, bits, sym, mse=True, search="full")
    ref_scale, ref_zero = mse_search_reference(w, bits, sym)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)


def _shrunk_error(row, lo, hi, i, bits, sym, grid=100, norm=2.4):
    """``sum |row - Q(row)|^norm`` of one row, its range shrunk by ``1 - i/grid``; and that range's scale, zero."""
    from llmq.algorithms.quant import _minmax_qparams, quantize

    maxq, p = 2**bits - 1, 1 - i / grid
    s, z = _minmax_qparams((p * lo)[None], (p * hi)[None], maxq, sym)
    return (s * (quantize(row, s, z, maxq) - z) - row).abs_().pow_(norm).sum().item(), s, z


def coarse_to_fine_reference(w, bits, sym, step=4, grid=100, maxshrink=0.8):
    """Issue 16's search row by row: every ``step``-th shrink factor, then the ones within ``step`` of the best."""
    n = int(maxshrink * grid)
    scales, zeros = [], []
    for row in w:
        lo, hi = torch.minimum(row.min(), torch.zeros(())), torch.maximum(row.max(), torch.zeros(()))
        errs = {i: _shrunk_error(row[None], lo, hi, i, bits, sym, grid)[0] for i in range(0, n, step)}
        best = min(errs, key=lambda i: (errs[i], i))
        fine = {i: _shrunk_error(row[None], lo, hi, i, bits, sym, grid)[0]
                for i in range(max(0, best - step + 1), min(n, best + step))}
        chosen = min(fine, key=lambda i: (fine[i], i))
        _, s, z = _shrunk_error(row[None], lo, hi, chosen, bits, sym, grid)
        scales.append(s[0])
        zeros.append(z[0])
    return torch.stack(scales), torch.stack(zeros)


@pytest.mark.parametrize("shape", [(40, 32), (7, 5), (16, 128)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_coarse_to_fine_search_equals_its_row_by_row_reference(shape, bits, sym):
    w = torch.randn(shape) * 0.02
    w[0] = 0
    w[1] = w[1].abs()
    scale, zero = row_qparams(w, bits, sym, mse=True, search="coarse_to_fine")
    ref_scale, ref_zero = coarse_to_fine_reference(w, bits, sym)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)


def test_coarse_to_fine_search_keeps_the_full_searchs_choice_on_real_weights():
    """On llmq-tiny-llama's linears at W3 g128 the coarse-to-fine search picks the full search's range on almost
    every row, and its summed error is within 0.05% of the full search's (and never below it: full is optimal)."""
    from safetensors.torch import load_file

    weights = load_file(shared_path("assets", "llmq-tiny-llama", "model.safetensors"))
    same = rows = 0
    err = {"full": 0.0, "coarse_to_fine": 0.0}
    for name, W in weights.items():
        if W.dim() != 2 or "layers.1." not in name:  # one layer: every kind of linear
            continue
        for g in range(0, W.shape[1], 128):
            w = W[:, g : g + 128].float()
            chosen = {}
            for search in err:
                s, z = row_qparams(w, 3, False, mse=True, search=search)
                chosen[search] = (s, z)
                q = (torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 7) - z[:, None]) * s[:, None]
                err[search] += (q - w).abs().pow(2.4).sum().item()
            (sf, zf), (sc, zc) = chosen["full"], chosen["coarse_to_fine"]
            same += ((sf == sc) & (zf == zc)).sum().item()
            rows += w.shape[0]
    assert rows > 0
    assert same / rows > 0.97
    assert err["full"] <= err["coarse_to_fine"] <= 1.0005 * err["full"]
