"""Every fast path of a packed linear equals the reference: ``x @ dequantized_weight().T``."""

import contextlib
import logging

import pytest
import torch

from llmq.errors import ConfigError
from llmq.formats.pack import pack_awq, pack_gptq
from llmq.runtime.kernels import KERNELS, choose, prepare
from llmq.runtime.kernels import cpu as cpu_kernels
from llmq.runtime.qlinear import AwqQuantLinear, QuantLinear

N, K = 96, 256  # 96 rows: one 64-row block of the int4 layout and its 32-row tail


def packed_layer(bits, group_size, sym=False, fmt="gptq_v2", act_order=False, n=N, k=K, seed=0, bias=True):
    """A QuantLinear holding random codes, fp16 scales and zero points in the GPTQ layout."""
    g = torch.Generator().manual_seed(seed * 1000 + bits * 100 + max(group_size, 0))
    gs = k if group_size == -1 else group_size
    n_groups = -(-k // gs)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    if sym:
        zeros = torch.full((n, n_groups), 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(1 if fmt == "gptq" else 0, 2**bits, (n, n_groups), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, n_groups, generator=g) * 0.02 + 1e-3).half().float()
    g_idx = torch.arange(k) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    g_idx = g_idx.int()
    layer = QuantLinear(k, n, bits, n_groups, bias=bias, zero_offset=1 if fmt == "gptq" else 0, dtype=torch.float32)
    for name, t in pack_gptq(codes, scales, zeros, g_idx, bits, fmt).items():
        getattr(layer, name).copy_(t)
    if bias:
        layer.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return layer


def reference(layer, x):
    return torch.nn.functional.linear(x.float(), layer.dequantized_weight(), None if layer.bias is None
                                      else layer.bias.float())


def rel_err(got, want):
    return ((got.float() - want).abs().max() / want.abs().max()).item()


# bf16 activations: the reference takes bf16 x and rounds nothing else; a path rounds its weights (or
# scale/zero pairs) and its output to bf16, ~2^-8 relative each.
TOL = {torch.float32: 2e-6, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
SHAPES = [(1, K), (3, K), (2, 5, K), (200, K)]  # decode, a few rows, a batch, above DEQUANT_ABOVE_ROWS


def check(module, layer, dtype, shapes=SHAPES, tol=None):
    g = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.randn(*shape, generator=g).to(dtype)
        got = module(x)
        assert got.shape == (*shape[:-1], layer.out_features) and got.dtype == dtype
        err = rel_err(got, reference(layer, x))
        assert err < (tol or TOL[dtype]), (module.kernel if hasattr(module, "kernel") else "pure", shape, err)


CASES = [(bits, gs, sym, fmt, act) for bits in (2, 3, 4, 8) for gs in (32, 64, 128, -1) for sym in (False, True)
         for fmt in ("gptq", "gptq_v2") for act in (False, True) if not (act and gs == -1)]


@pytest.mark.parametrize("bits,gs,sym,fmt,act", CASES)
def test_every_path_equals_the_reference(bits, gs, sym, fmt, act):
    layer = packed_layer(bits, gs, sym, fmt, act)
    check(layer, layer, torch.float32, tol=2e-6)  # the pure forward
    check(KERNELS["dequant"](layer, torch.float32), layer, torch.float32)
    check(KERNELS["dequant"](layer, torch.bfloat16), layer, torch.bfloat16)
    cpu = torch.device("cpu")
    assert choose(layer, cpu, torch.bfloat16).kernel == ("int8_cpu" if bits == 8 and gs == -1 else "int4_cpu")
    check(KERNELS["int4_cpu"](layer, torch.bfloat16), layer, torch.bfloat16)
    if bits == 8 and gs == -1:
        check(KERNELS["int8_cpu"](layer, torch.bfloat16), layer, torch.bfloat16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int4_folding_is_exact_in_float32(bits):
    """Built for float32 activations, the int4 path's scale/zero pairs round nothing: the fold
    (8 - z) s (and the two 8-bit planes) equals the reference to float32 summation error."""
    for gs, act in ((32, True), (128, False), (-1, False)):
        layer = packed_layer(bits, gs, act_order=act)
        module = KERNELS["int4_cpu"](layer, torch.float32)
        check(module, layer, torch.float32, shapes=[(3, K), (200, K)], tol=2e-6)


@pytest.mark.parametrize("native", [False, True], ids=["float32-gemm", "bf16-gemm"])
def test_prefill_multiplies_bf16_activations_in_float32_only_where_bf16_matmuls_are_not_native(monkeypatch, native):
    """Prefill rows (above DEQUANT_ABOVE_ROWS) of bf16 activations: without native bf16 matmuls the dequantized
    GEMM runs in float32 (a fifth of the time on AVX2), so the only roundings are the output's to bf16 and the
    kernel's bf16 scale/zero pairs' (2^-9 relative each); with them it stays bf16. Both equal the reference."""
    from llmq.utils import device

    monkeypatch.setattr(device, "_native_bf16_at", lambda d: native)
    assert device.gemm_dtype(torch.bfloat16, torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert device.gemm_dtype(torch.float16, torch.device("cpu")) == torch.float16
    x = torch.randn(200, K, generator=torch.Generator().manual_seed(4)).bfloat16()
    for bits, gs, act, name in ((4, 128, False, "int4_cpu"), (8, 128, True, "int4_cpu"), (3, 64, True, "int4_cpu"),
                                (8, -1, False, "int8_cpu"), (3, 32, True, "dequant")):
        layer = packed_layer(bits, gs, act_order=act)
        got = KERNELS[name](layer, torch.bfloat16)(x)
        assert got.dtype == torch.bfloat16
        err = rel_err(got, reference(layer, x))
        if native:
            assert err < TOL[torch.bfloat16], (name, bits, err)
        else:  # the float32 product rounded to bf16 once, and the bf16 scale/zero pairs: 2 x 2^-9 and summation
            assert err < 6e-3, (name, bits, err)


def test_prefill_scratch_buffers_never_reach_a_graph_autograd_keeps():
    """Prefill rows dequantize into per-thread scratch buffers that the next layer overwrites. With
    gradients on, the weight is fresh, so a backward through two layers gets the reference's gradients;
    under no_grad two layers in a row still give each its own output."""
    a_layer, b_layer = packed_layer(4, 64, seed=1, n=K), packed_layer(8, 128, seed=2, n=K)  # 1 and 2 planes
    a, b = KERNELS["int4_cpu"](a_layer, torch.float32), KERNELS["int4_cpu"](b_layer, torch.float32)
    x = torch.randn(200, K, generator=torch.Generator().manual_seed(3), requires_grad=True)
    b(a(x)).square().sum().backward()
    want_x = x.detach().clone().requires_grad_(True)
    reference(b_layer, reference(a_layer, want_x)).square().sum().backward()
    assert rel_err(x.grad, want_x.grad) < 1e-5
    with torch.no_grad():
        ya, yb = a(x), b(x)
        assert rel_err(ya, reference(a_layer, x)) < 2e-6 and rel_err(yb, reference(b_layer, x)) < 2e-6


@pytest.mark.parametrize("layout", ["read", "unknown"])
def test_a_backward_through_an_int4_cpu_linear_gets_the_references_gradients_at_any_row_count(monkeypatch, layout):
    """The int4 kernel has no backward: with gradients on, decode-sized inputs too take the dequantized weight,
    and under a kernel layout llmq cannot read, W^T comes from the kernel itself (x = I)."""
    if layout == "unknown":
        monkeypatch.setattr(cpu_kernels, "_int4pack_block", lambda: None)
    layer = packed_layer(4, 64, act_order=True, seed=4)
    module = KERNELS["int4_cpu"](layer, torch.float32)
    for rows in (3, 200):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows), requires_grad=True)
        y = module(x)
        y.square().sum().backward()
        want_x = x.detach().clone().requires_grad_(True)
        want = reference(layer, want_x)
        want.square().sum().backward()
        assert rel_err(y.detach(), want.detach()) < 2e-6 and rel_err(x.grad, want_x.grad) < 1e-5, rows


def test_int8_offsets_are_exact_in_float32():
    for sym in (False, True):
        layer = packed_layer(8, -1, sym=sym)
        module = KERNELS["int8_cpu"](layer, torch.float32)
        assert (module.offset is None) == sym
        check(module, layer, torch.float32, shapes=[(3, K), (200, K)], tol=2e-6)


def test_awq_layout_runs_on_the_same_paths():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (N, K // 64), generator=g, dtype=torch.uint8)
    scales = (torch.rand(N, K // 64, generator=g) * 0.02 + 1e-3).half().float()
    layer = AwqQuantLinear(K, N, 64, bias=False, dtype=torch.float32)
    for name, t in pack_awq(codes, zeros, scales).items():
        getattr(layer, name).copy_(t)
    assert choose(layer, torch.device("cpu"), torch.bfloat16).kernel == "int4_cpu"
    check(KERNELS["int4_cpu"](layer, torch.bfloat16), layer, torch.bfloat16)
    check(KERNELS["dequant"](layer, torch.float32), layer, torch.float32)


def test_the_int4_layout_decoder_reads_this_torch():
    """On this CPU's layout (blocks of 64 rows under AVX512, of 32 under AVX2), for every row count."""
    assert cpu_kernels._int4pack_block() in cpu_kernels.INT4PACK_BLOCKS
    for n in (32, 64, 96, 160, 256):
        codes = torch.randint(0, 16, (n, 128), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        assert torch.equal(cpu_kernels._int4pack_codes_t(packed, n, 128, torch.int32), codes.T), n


def test_fallbacks_say_why():
    cpu = torch.device("cpu")
    odd_groups = packed_layer(4, 16)  # groups of 16: no 32-column block lies in one group
    choice = choose(odd_groups, cpu, torch.bfloat16)
    assert choice.kernel == "dequant" and "not int4_cpu: groups of 16 input columns" in choice.reason
    fp32 = choose(packed_layer(4, 128), cpu, torch.float32)
    assert fp32.kernel == "dequant" and "float32 activations" in fp32.reason and "bfloat16" in fp32.reason
    grouped8 = choose(packed_layer(8, 128), cpu, torch.bfloat16)
    assert grouped8.kernel == "int4_cpu" and "not int8_cpu: 2 groups per row" in grouped8.reason
    with pytest.raises(ConfigError, match="kernel 'int4_cpu' cannot run this layer: groups of 16"):
        choose(odd_groups, cpu, torch.bfloat16, kernel="int4_cpu")
    with pytest.raises(ConfigError, match="kernel 'int8_cpu' cannot run this layer: bits=4"):
        choose(odd_groups, cpu, torch.bfloat16, kernel="int8_cpu")
    with pytest.raises(ConfigError, match="not one of auto, pure"):
        choose(odd_groups, cpu, torch.bfloat16, kernel="fast")
    assert choose(odd_groups, torch.device("cuda"), torch.float16).kernel in ("triton", "dequant")
    check(KERNELS["dequant"](odd_groups, torch.bfloat16), odd_groups, torch.bfloat16)


def test_prepare_swaps_modules_and_logs_the_fallbacks(caplog):
    model = torch.nn.Sequential(packed_layer(4, 128), packed_layer(4, 16, seed=1), packed_layer(3, 64))
    x = torch.randn(2, K).bfloat16()
    with caplog.at_level(logging.INFO, logger="llmq.runtime.kernels"):
        choices = prepare(model, torch.bfloat16)
    assert {k: c.kernel for k, c in choices.items()} == {"0": "int4_cpu", "1": "dequant", "2": "int4_cpu"}
    assert [type(m).kernel for m in model] == ["int4_cpu", "dequant", "int4_cpu"]
    assert "2 x int4_cpu, 1 x dequant" in caplog.text
    assert ("1 linear(s) run on dequant (not int4_avx2: out_features 96 is not a multiple of 64; not int4_cpu: "
            "groups of 16") in caplog.text
    pure = torch.nn.Sequential(packed_layer(4, 128))
    assert prepare(pure, torch.bfloat16, kernel="pure")["0"].kernel == "pure"
    assert isinstance(pure[0], QuantLinear)
    assert all(m(x).dtype == torch.bfloat16 for m in model)


def test_an_int4_cpu_linear_refuses_to_move_off_the_cpu():
    module = KERNELS["int4_cpu"](packed_layer(4, 128), torch.bfloat16)
    with pytest.raises(RuntimeError, match="cannot move to meta"):
        module.to("meta")


def test_groups_of_96_with_a_partial_last_group():
    """Groups of 96 columns over 256 inputs (96, 96, 64): the int4 kernel runs them as 32-column groups."""
    for bits in (3, 4, 8):
        layer = packed_layer(bits, 96, act_order=bits == 4)
        assert layer.scales.shape[0] == 3
        assert choose(layer, torch.device("cpu"), torch.bfloat16).kernel == "int4_cpu"
        module = KERNELS["int4_cpu"](layer, torch.float32)
        assert module.group == 32
        check(module, layer, torch.float32, shapes=[(3, K), (200, K)], tol=2e-6)
        check(KERNELS["dequant"](layer, torch.float32), layer, torch.float32)


# --- int4_avx2: llmq's C kernel (built once per machine with the system compiler) ---------------------------

from llmq.runtime.kernels import avx2, native  # noqa: E402

AVX2_CASES = [(bits, gs, sym, fmt, act) for bits in (2, 3, 4) for gs in (32, 64, 128, -1) for sym in (False, True)
              for fmt in ("gptq", "gptq_v2") for act in (False, True) if not (act and gs == -1)]
# decode, a few rows, a batch, the GEMV's last row count, and the dequantize + GEMM branch above it
AVX2_SHAPES = [(1, K), (3, K), (2, 5, K), (avx2.GEMV_ROWS, K), (avx2.GEMV_ROWS + 1, K), (200, K)]


@contextlib.contextmanager
def native_bf16_gemm():
    """:func:`llmq.utils.device.gemm_dtype` as on a CPU with native bf16 matmuls (AVX512-BF16, AMX), whatever this
    one is."""
    from llmq.utils import device

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(device, "_native_bf16_at", lambda d: True)
        yield


@pytest.fixture(scope="module")
def avx2_built():
    """The C kernel must build wherever it can run: a machine with AVX2 and no working compiler fails here."""
    if not native.cpu_has_avx2():
        pytest.skip("int4_avx2 runs on x86 CPUs with AVX2")
    why = native.unavailable()
    assert why is None, f"the int4_avx2 kernel did not build: {why}"


@pytest.mark.parametrize("bits,gs,sym,fmt,act", AVX2_CASES)
def test_the_avx2_kernel_equals_the_reference(avx2_built, bits, gs, sym, fmt, act):
    """In float32 to summation error, on the GEMV and on the dequantize branch; its dequantized W^T is the
    reference's bit for bit (the same (q - z) s in float32); auto picks it for 2-4-bit layers."""
    layer = packed_layer(bits, gs, sym, fmt, act, n=128)  # two 64-row blocks
    module = KERNELS["int4_avx2"](layer, torch.float32)
    check(module, layer, torch.float32, shapes=AVX2_SHAPES, tol=2e-6)
    check(module, layer, torch.bfloat16, shapes=AVX2_SHAPES)
    w_t = module.dequantized_t()
    if module.perm is not None:
        w_t = w_t[torch.argsort(module.perm)]
    assert torch.equal(w_t, layer.dequantized_weight().T)
    w_t16 = module.dequantized_t(dtype=torch.bfloat16)  # what a native-bf16 CPU's prefill GEMM reads
    if module.perm is not None:
        w_t16 = w_t16[torch.argsort(module.perm)]
    assert w_t16.dtype == torch.bfloat16 and torch.equal(w_t16, layer.dequantized_weight().T.bfloat16())
    x = torch.randn(avx2.GEMV_ROWS + 3, K, generator=torch.Generator().manual_seed(1)).bfloat16()
    order = module.perm if module.perm is not None else torch.arange(K)  # the GEMM sums in the kernel's order
    want = x[:, order] @ layer.dequantized_weight().T[order].bfloat16() + layer.bias.bfloat16()
    with native_bf16_gemm():  # prefill on a CPU with native bf16 matmuls: one bf16 GEMM on that W^T
        assert torch.equal(module(x), want)
    assert choose(layer, torch.device("cpu"), torch.bfloat16).kernel == "int4_avx2"
    assert choose(layer, torch.device("cpu"), torch.float32).kernel == "int4_avx2"


def test_the_avx2_kernel_takes_the_awq_layout_and_keeps_its_float16_scales_through_a_dtype_cast(avx2_built):
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (128, K), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (128, K // 64), generator=g, dtype=torch.uint8)
    scales = (torch.rand(128, K // 64, generator=g) * 0.02 + 1e-3).half().float()
    layer = AwqQuantLinear(K, 128, 64, bias=False, dtype=torch.float32)
    for name, t in pack_awq(codes, zeros, scales).items():
        getattr(layer, name).copy_(t)
    module = KERNELS["int4_avx2"](layer, torch.bfloat16).to(torch.bfloat16)
    assert module.scales.dtype == module.zeros.dtype == torch.float16
    check(module, layer, torch.float32, shapes=AVX2_SHAPES, tol=2e-6)
    with pytest.raises(RuntimeError, match="cannot move to meta"):
        module.to("meta")


def test_a_backward_through_an_avx2_linear_gets_the_references_gradients(avx2_built):
    """The C kernel has no backward: with gradients on, every row count takes the dequantized weight (a fresh
    tensor, not the scratch buffer the next layer overwrites); under no_grad two layers in a row each keep
    their own output."""
    a_layer, b_layer = packed_layer(4, 64, act_order=True, seed=4, n=K), packed_layer(3, 128, seed=5, n=K)
    a, b = KERNELS["int4_avx2"](a_layer, torch.float32), KERNELS["int4_avx2"](b_layer, torch.float32)
    for rows in (3, 200):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows), requires_grad=True)
        y = b(a(x))
        y.square().sum().backward()
        want_x = x.detach().clone().requires_grad_(True)
        want = reference(b_layer, reference(a_layer, want_x))
        want.square().sum().backward()
        assert rel_err(y.detach(), want.detach()) < 1e-5 and rel_err(x.grad, want_x.grad) < 1e-5, rows
        with torch.no_grad():
            ya, yb = a(x), b(x)
            assert rel_err(ya, reference(a_layer, x)) < 2e-6 and rel_err(yb, reference(b_layer, x)) < 2e-6


def test_without_the_avx2_kernel_auto_falls_back_and_says_why(monkeypatch, tmp_path, caplog):
    """A compiler that fails names itself and its error; auto then runs int4_cpu and logs the reason. Layers
    the kernel cannot take (96 outputs, unequal groups) say so too."""
    monkeypatch.setattr(native, "compiler", lambda: "false")  # `false`: a compiler that always fails
    monkeypatch.setenv("LLMQ_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "cpu_has_avx2", lambda: True)
    with pytest.raises(native.NativeUnavailable, match="false could not build int4_avx2.c"):
        native._build_and_load()
    monkeypatch.setattr(native, "_load", lambda: (None, "no C compiler (cc, gcc or clang) on PATH"))
    model = torch.nn.Sequential(packed_layer(4, 128, n=128))
    with caplog.at_level(logging.INFO, logger="llmq.runtime.kernels"):
        choices = prepare(model, torch.bfloat16)
    assert choices["0"].kernel == "int4_cpu" and "not int4_avx2: no C compiler" in choices["0"].reason
    assert "1 linear(s) run on int4_cpu (not int4_avx2: no C compiler" in caplog.text
    monkeypatch.undo()
    cpu = torch.device("cpu")
    assert "not int4_avx2: out_features 96 is not a multiple of 64" in choose(packed_layer(4, 128), cpu,
                                                                               torch.bfloat16).reason
    assert "not int4_avx2: groups of unequal sizes" in choose(packed_layer(4, 96, n=128), cpu, torch.bfloat16).reason
