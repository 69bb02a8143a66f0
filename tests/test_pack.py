"""GPTQ / AWQ packed layouts: round trips, and an independent decoder written from the published layout."""

import random

import pytest
import torch

from llmq.formats.pack import (
    AWQ_ORDER,
    can_pack,
    pack_awq,
    pack_cols,
    pack_gptq,
    pack_rows,
    unpack_awq,
    unpack_cols,
    unpack_gptq,
    unpack_rows,
)

BITS = [2, 3, 4, 8]
KS = [32, 64, 96, 128, 256]
NS = [32, 64, 96, 160]


def _u32(word: int) -> int:
    return word & 0xFFFFFFFF  # int32 (possibly negative) -> its unsigned bit pattern


def _ref_get(column_words: list[int], i: int, bits: int) -> int:
    """Value ``i`` of a column of packed words, read straight off the layout: it starts at bit ``i*bits``
    of the little-endian stream formed by the words, possibly spanning into the next word."""
    word, off = divmod(i * bits, 32)
    stream = _u32(column_words[word])
    if off + bits > 32:
        stream |= _u32(column_words[word + 1]) << 32
    return (stream >> off) & ((1 << bits) - 1)


def _random_layer(n, k, bits, group_size, zero_min, gen, all_max=False):
    maxq = 2**bits - 1
    g = k // group_size
    codes = torch.full((n, k), maxq, dtype=torch.uint8) if all_max else \
        torch.randint(0, maxq + 1, (n, k), generator=gen).to(torch.uint8)
    zeros = torch.randint(zero_min, maxq + 1, (n, g), generator=gen).to(torch.uint8)
    if zero_min == 0:
        zeros[0, 0] = 0
    zeros[-1, -1] = maxq
    scales = (torch.rand(n, g, generator=gen) * 0.1 + 1e-3).half().float()
    g_idx = torch.randperm(k, generator=gen).to(torch.int32) // group_size  # act-order style g_idx
    return codes, scales, zeros, g_idx


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_round_trip_is_bit_exact(bits, fmt):
    gen = torch.Generator().manual_seed(bits)
    for k in KS:
        for n in NS:
            for all_max in (False, True):
                codes, scales, zeros, g_idx = _random_layer(n, k, bits, 32, 1 if fmt == "gptq" else 0, gen,
                                                            all_max)
                t = pack_gptq(codes, scales, zeros, g_idx, bits, fmt)
                assert t["qweight"].shape == (k * bits // 32, n) and t["qweight"].dtype == torch.int32
                assert t["qzeros"].shape == (k // 32, n * bits // 32) and t["qzeros"].dtype == torch.int32
                assert t["scales"].shape == (k // 32, n) and t["scales"].dtype == torch.float16
                assert t["g_idx"].shape == (k,) and t["g_idx"].dtype == torch.int32
                c2, s2, z2, g2 = unpack_gptq(t, bits, fmt, n, k)
                assert c2.dtype == z2.dtype == torch.uint8 and s2.dtype == torch.float32
                assert torch.equal(c2, codes) and torch.equal(s2, scales)
                assert torch.equal(z2, zeros) and torch.equal(g2, g_idx)
                if all_max and bits != 3:  # every word is all ones: int32 -1 (top bit set)
                    assert bool((t["qweight"] == -1).all())


@pytest.mark.parametrize("bits", BITS)
def test_sign_bit_words_are_negative_int32_and_decode(bits):
    codes = torch.full((32, 4), 2**bits - 1, dtype=torch.uint8)
    codes[:, 1] = 0
    codes[-1, 2] = 2**bits - 1  # only the last value of the block set: the top bit(s) of the last word
    codes[:-1, 2] = 0
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32
    assert bool((packed[:, 0] == -1).all()) and bool((packed[:, 1] == 0).all())
    assert int(packed[-1, 2]) < 0
    assert torch.equal(unpack_rows(packed, bits, 32), codes)


def test_hand_computed_4bit_word():
    codes = torch.arange(1, 9, dtype=torch.uint8).reshape(8, 1)
    packed = pack_rows(codes, 4)
    assert packed.shape == (1, 1) and _u32(int(packed[0, 0])) == 0x87654321
    assert int(packed[0, 0]) == 0x87654321 - 2**32  # stored as a negative int32
    assert torch.equal(pack_cols(codes.t(), 4), packed.t())
    assert torch.equal(unpack_rows(torch.tensor([[0x87654321 - 2**32]], dtype=torch.int32), 4, 8), codes)


def test_hand_computed_3bit_words_match_autogptq():
    # AutoGPTQ's 3-bit pack: values 0-9 at bits 3j of word 0, value 10 split (bits 30-31 | word 1 bit 0),
    # values 11-20 at 3j+1 of word 1, value 21 split (bit 31 | word 2 bits 0-1), values 22-31 at 3j+2.
    v = [0] * 32
    v[10] = 0b110  # low two bits 0b10 -> word0 bits 30-31, high bit 1 -> word1 bit 0
    v[21] = 0b101  # low bit 1 -> word1 bit 31, high bits 0b10 -> word2 bits 0-1
    v[22] = 0b111  # word2 bits 2-4
    words = [_u32(int(w)) for w in pack_rows(torch.tensor(v).reshape(32, 1), 3)[:, 0]]
    assert words == [0b10 << 30, (1 << 31) | 1, (0b111 << 2) | 0b10]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_independent_decoder_agrees(bits, fmt):
    rng = random.Random(bits * 7 + len(fmt))
    gen = torch.Generator().manual_seed(bits + 100)
    for n, k in [(32, 32), (64, 96), (96, 64)]:
        codes, scales, zeros, g_idx = _random_layer(n, k, bits, 32, 1 if fmt == "gptq" else 0, gen)
        t = pack_gptq(codes, scales, zeros, g_idx, bits, fmt)
        qweight, qzeros = t["qweight"].tolist(), t["qzeros"].tolist()
        ref_codes = [[_ref_get([row[c] for row in qweight], kk, bits) for kk in range(k)] for c in range(n)]
        shift = 1 if fmt == "gptq" else 0  # v1 stores zero - 1
        ref_zeros = [[_ref_get(qzeros[g], c, bits) + shift for g in range(len(qzeros))] for c in range(n)]
        c2, s2, z2, _ = unpack_gptq(t, bits, fmt, n, k)
        assert ref_codes == codes.tolist() == c2.tolist()
        assert ref_zeros == zeros.tolist() == z2.tolist()
        assert torch.equal(t["scales"], scales.t().half())
        # spot-check dequantized weights from the reference decode
        for _ in range(20):
            nn_, kk = rng.randrange(n), rng.randrange(k)
            g = int(g_idx[kk])
            w_ref = float(t["scales"][g, nn_]) * (ref_codes[nn_][kk] - ref_zeros[nn_][g])
            assert w_ref == float(scales[nn_, g]) * (int(codes[nn_, kk]) - int(zeros[nn_, g]))


@pytest.mark.parametrize("bits", BITS)
def test_rows_and_cols_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randint(0, 2**bits, (96, 160), generator=gen, dtype=torch.int64)
    assert torch.equal(unpack_rows(pack_rows(x, bits), bits, 96), x.to(torch.uint8))
    assert torch.equal(unpack_cols(pack_cols(x, bits), bits, 160), x.to(torch.uint8))
    assert pack_cols(x, bits).shape == (96, 160 * bits // 32)


def test_v1_rejects_zero_point_zero():
    gen = torch.Generator().manual_seed(0)
    codes, scales, zeros, g_idx = _random_layer(32, 64, 4, 32, 0, gen)
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_gptq(codes, scales, zeros, g_idx, 4, "gptq")
    pack_gptq(codes, scales, zeros, g_idx, 4, "gptq_v2")


def test_pack_rejects_bad_shapes_and_values():
    gen = torch.Generator().manual_seed(0)
    codes, scales, zeros, g_idx = _random_layer(32, 64, 4, 32, 0, gen)
    with pytest.raises(ValueError, match=r"\(32, 48\)"):
        pack_gptq(codes[:, :48], scales, zeros, g_idx[:48] % 2, 4)
    with pytest.raises(ValueError, match=r"\(16, 64\)"):
        pack_gptq(codes[:16], scales[:16], zeros[:16], g_idx, 4)
    with pytest.raises(ValueError, match="bits"):
        pack_gptq(codes, scales, zeros, g_idx, 5)
    with pytest.raises(ValueError, match="codes"):
        pack_gptq(codes.clone().fill_(16), scales, zeros, g_idx, 4)
    with pytest.raises(ValueError, match="float16"):
        pack_gptq(codes, scales + 1e-5, zeros, g_idx, 4)
    with pytest.raises(ValueError, match="format"):
        pack_gptq(codes, scales, zeros, g_idx, 4, "awq")
    assert can_pack(64, 32, 3) and can_pack(32, 4096, 8)
    assert not can_pack(48, 32, 4) and not can_pack(64, 40, 4) and not can_pack(64, 32, 5)


def test_unpack_refuses_misshapen_tensors():
    gen = torch.Generator().manual_seed(0)
    codes, scales, zeros, g_idx = _random_layer(64, 128, 4, 32, 0, gen)
    t = pack_gptq(codes, scales, zeros, g_idx, 4)
    bad = {
        "qweight": t["qweight"][:-1],
        "qzeros": t["qzeros"][:, :-1],
        "scales": t["scales"][:, :-1],
        "g_idx": t["g_idx"][:-1],
    }
    for name, tensor in bad.items():
        with pytest.raises(ValueError, match=rf"'{name}'.*\(.*\).*expected"):
            unpack_gptq({**t, name: tensor}, 4, "gptq_v2", 64, 128)
    with pytest.raises(ValueError, match="'qweight'"):
        unpack_gptq({**t, "qweight": t["qweight"].float()}, 4, "gptq_v2", 64, 128)
    with pytest.raises(ValueError, match="'qzeros'"):
        unpack_gptq({k: v for k, v in t.items() if k != "qzeros"}, 4, "gptq_v2", 64, 128)
    with pytest.raises(ValueError, match="'g_idx'"):
        unpack_gptq({**t, "g_idx": t["g_idx"] + 4}, 4, "gptq_v2", 64, 128)
    with pytest.raises(ValueError, match="'qzeros'"):
        unpack_gptq(t, 4, "gptq_v2", 64, 128, n_groups=5)
    with pytest.raises(ValueError, match="'qweight'"):
        unpack_gptq(t, 4, "gptq_v2", 64, 256)  # wrong in_features for these tensors


def test_v1_unpack_refuses_unrepresentable_zero():
    t = pack_gptq(*_random_layer(32, 32, 4, 32, 1, torch.Generator().manual_seed(0)), 4, "gptq_v2")
    t["qzeros"] = torch.full_like(t["qzeros"], -1)  # stored 15 -> v1 zero point 16
    with pytest.raises(ValueError, match="qzeros"):
        unpack_gptq(t, 4, "gptq", 32, 32)


def test_awq_round_trip_and_independent_decoder():
    gen = torch.Generator().manual_seed(1)
    for n, k, gs in [(8, 32, 32), (64, 96, 32), (160, 128, 64)]:
        codes, scales, zeros, _ = _random_layer(n, k, 4, gs, 0, gen)
        codes[0, :] = 15  # sign bit
        t = pack_awq(codes, zeros, scales)
        assert t["qweight"].shape == (k, n // 8) and t["qzeros"].shape == (k // gs, n // 8)
        assert t["scales"].shape == (k // gs, n) and t["scales"].dtype == torch.float16
        for packed, ref in ((t["qweight"], codes.t()), (t["qzeros"], zeros.t())):
            for r, row in enumerate(packed.tolist()):
                for c, word in enumerate(row):
                    for i in range(8):  # nibble i of word c holds column 8c + AWQ_ORDER[i]
                        assert (_u32(word) >> (4 * i)) & 0xF == int(ref[r, 8 * c + AWQ_ORDER[i]])
        c2, s2, z2 = unpack_awq(t, n, k)
        assert torch.equal(c2, codes) and torch.equal(s2, scales) and torch.equal(z2, zeros)
    # hand example: columns 0..7 = 1..8 -> nibbles in order 1,3,5,7,2,4,6,8
    ones = torch.ones(8, 1, dtype=torch.uint8)
    t = pack_awq(torch.arange(1, 9, dtype=torch.uint8).reshape(8, 1).repeat(1, 32), ones, ones.float())
    assert _u32(int(t["qweight"][0, 0])) == 0x86427531
    with pytest.raises(ValueError, match="4-bit"):
        pack_awq(codes, zeros, scales, bits=3)
    with pytest.raises(ValueError, match="'qweight'"):
        unpack_awq({**t, "qweight": t["qweight"][:-1]}, 8, 32)
