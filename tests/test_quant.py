import pytest
import torch

from llmq.config import QuantConfig
from llmq.errors import ConfigError
from llmq.quant import dequantize, natural_g_idx, quantize, row_qparams, rtn_quantize

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
    from llmq.quant import _minmax_qparams, quantize

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
    scale, zero = row_qparams(w, bits, sym, mse=True)
    ref_scale, ref_zero = mse_search_reference(w, bits, sym)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
