"""The Triton dequantize-matmul equals the reference for every case it accepts.

Without a GPU it runs through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), which
executes the same kernel code on CPU tensors; with one, on CUDA.
"""

import pytest
import torch
from test_kernels import K, packed_layer, reference, rel_err

try:
    import triton  # noqa: F401
except ImportError:  # a test dependency: fail, do not skip
    pytest.fail("triton is not installed: pip install -e '.[test]' installs it", pytrace=False)

from llmq.runtime.kernels import KERNELS, choose
from llmq.runtime.kernels.gpu import TRITON_MAX_ROWS

pytestmark = pytest.mark.triton
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# float32 activations get the IEEE dot (the interpreter's, or CUDA's); halves a TF32 dot and a rounded output
TOL = {torch.float32: 2e-6 if DEVICE.type == "cpu" else 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
CASES = [(bits, gs, sym, fmt, act) for bits in (2, 3, 4, 8) for gs in (32, 64, 128, -1) for sym in (False, True)
         for fmt in ("gptq", "gptq_v2") for act in (False, True) if not (act and gs == -1)]


@pytest.mark.parametrize("bits,gs,sym,fmt,act", CASES)
def test_triton_equals_the_reference(bits, gs, sym, fmt, act):
    layer = packed_layer(bits, gs, sym, fmt, act)
    assert choose(layer, torch.device("cuda"), torch.float16).kernel == "triton"
    g = torch.Generator().manual_seed(2)
    # halves once per width, group size and symmetry (the zero convention and g_idx do not touch the dot)
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if fmt == "gptq_v2" and not act else (torch.float32,)
    for dtype in dtypes:
        module = KERNELS["triton"](layer, dtype).to(DEVICE)
        # 1 and 3 rows and a [2, 5] batch take the fused kernel; 20 rows the dequantize kernel, then matmul
        for shape in [(1, K), (3, K), (2, 5, K), (TRITON_MAX_ROWS + 4, K)]:
            x = torch.randn(*shape, generator=g).to(dtype)
            got = module(x.to(DEVICE)).cpu()
            assert got.shape == (*shape[:-1], layer.out_features) and got.dtype == dtype
            err = rel_err(got, reference(layer, x))
            assert err < TOL[dtype], (dtype, shape, err)


def test_the_dequantize_kernel_is_exact():
    """Dequantized by Triton, the weight is bit for bit the reference's (float32 arithmetic in both)."""
    from llmq.runtime.kernels.triton_kernels import dequantize

    for bits in (2, 3, 4, 8):
        layer = packed_layer(bits, 32, act_order=True)
        m = KERNELS["triton"](layer, torch.float32).to(DEVICE)
        w_t = dequantize(m.qweight, m.scales, m.zeros, m.g_idx32, bits, torch.float32).cpu()
        assert torch.equal(w_t, layer.dequantized_weight().T), bits
