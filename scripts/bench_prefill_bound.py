"""How close the dense bf16 GEMM runs to the CPU's multiply peak at prefill shapes, and so how much room a weight-only
int4 prefill has to pass it; prints one JSON line. For CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids), where the
bf16 model's prefill multiplies natively.

    python scripts/bench_prefill_bound.py

The peaks are measured, not taken from a datasheet (the best of 5 runs): a C loop (built with the system compiler,
one OpenMP thread per torch thread) of 16 independent ``vdpbf16ps`` (bf16 pairs into float32), ``vfmadd231ps``
(float32) and ``vpdpbusd`` (int8 into int32) on 512-bit registers. The GEMMs are ``F.linear`` over 512 rows at
TinyLlama-1.1B's three linear shapes, and llmq's own prefill path for a W4 g128 linear (``int4_avx2``: dequantize
``W^T`` to bf16, then the dense product). A weight-only int4 linear multiplies the same bf16 pairs as the bf16 model
and unpacks its codes on the same vector units besides, so it can pass the bf16 GEMM only by the share of the peak
that GEMM leaves unused; only int8 activations (``vpdpbusd``, twice the bf16 rate) change that bound, and change the
model's numbers with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import random_w4_layer  # noqa: E402

from llmq.utils.device import native_bf16  # noqa: E402

PEAK_HEAD = """#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#define N 40000000L
"""


def _peak_source() -> str:
    """The C program: per instruction, 16 independent accumulators per thread (enough to cover its latency),
    unrolled here (the preprocessor cannot paste loop indices)."""
    blocks = []
    for name, ctype, init, op, flops in (
        ("bf16_dot", "__m512", "_mm512_set1_ps(seed * {i})", "_mm512_dpbf16_ps(a{i}, one, one)", 64),
        ("fp32_fma", "__m512", "_mm512_set1_ps(seed * {i})", "_mm512_fmadd_ps(a{i}, x, x)", 32),
        ("int8_dot", "__m512i", "_mm512_set1_epi32({i})", "_mm512_dpbusd_epi32(a{i}, u, u)", 128),
    ):
        decl = " ".join(f"{ctype} a{i} = {init.format(i=i)};" for i in range(16))
        step = " ".join(f"a{i} = {op.format(i=i)};" for i in range(16))
        keep = " ".join(f"keep += ((float *)&a{i})[1];" for i in range(16))
        blocks.append(f"""{{
    double best = 1e30; float keep = 0;
    for (int rep = 0; rep < 5; ++rep) {{  /* the best of 5: the clock and the neighbours vary */
    double t = omp_get_wtime();
    #pragma omp parallel reduction(+ : keep)
    {{
        float seed = (float)(omp_get_thread_num() + 1) * 1e-9f;
        __m512bh one = (__m512bh)_mm512_set1_epi16(0x3f80); __m512 x = _mm512_set1_ps(seed);
        __m512i u = _mm512_set1_epi8(1); (void)one; (void)x; (void)u;
        {decl}
        for (long n = 0; n < N; ++n) {{ {step} }}
        {keep}
    }}
    t = omp_get_wtime() - t;
    if (t < best) best = t;
    }}
    printf("\\"{name}\\": %.1f, ", N * 16.0 * {flops} * omp_get_max_threads() / best / 1e9);
    fprintf(stderr, "%g\\n", keep);
}}""")
    return PEAK_HEAD + "int main(void) {\n    printf(\"{\");\n" + "\n".join(blocks) + \
        '\n    printf("\\"threads\\": %d}\\n", omp_get_max_threads());\n    return 0;\n}\n'


def peaks(threads: int) -> dict:
    """GFLOP/s (GOP/s for int8) of each instruction over ``threads`` OpenMP threads."""
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        raise SystemExit("no C compiler (cc, gcc or clang) on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(_peak_source())
        build = subprocess.run([cc, "-O2", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mavx512vnni",
                                str(src), "-o", str(exe)], capture_output=True, text=True)
        if build.returncode:
            raise SystemExit(f"{cc} could not build the peak loop: {build.stderr.strip()[-400:]}")
        run = subprocess.run([str(exe)], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(run.stdout)


def gemm_rates(rows: int = 512) -> dict:
    """GFLOP/s of the 512-row products (best of 10) at TinyLlama-1.1B's linear shapes."""
    from llmq.runtime.kernels.avx2 import Int4Avx2Linear

    def best(fn, n: int = 10) -> float:
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    out = {}
    gen = torch.Generator().manual_seed(0)
    for n, k in ((2048, 2048), (5632, 2048), (2048, 5632)):
        flop = 2 * rows * n * k
        x = torch.randn(rows, k, generator=gen).bfloat16()
        w = torch.randn(n, k, generator=gen).bfloat16()
        x32, w32 = x.float(), w.float()
        w4 = Int4Avx2Linear(random_w4_layer(n, k, gen), torch.bfloat16)
        with torch.no_grad():
            out[f"{n}x{k}"] = {
                "bf16_linear": round(flop / best(lambda: F.linear(x, w)) / 1e9, 1),  # noqa: B023
                "fp32_linear": round(flop / best(lambda: F.linear(x32, w32)) / 1e9, 1),  # noqa: B023
                "llmq_w4_prefill": round(flop / best(lambda: w4(x)) / 1e9, 1),  # noqa: B023
            }
    return out


def main() -> None:
    if not native_bf16(torch.device("cpu")):
        raise SystemExit("this CPU has no AVX512-BF16: its bf16 GEMM is emulated, and the prefill bound measured "
                         "here does not apply (llmq's W4 prefill multiplies in float32 there)")
    threads = torch.get_num_threads()
    peak = peaks(threads)
    gemms = gemm_rates()
    share = {shape: {name: round(rate / peak["bf16_dot"], 3) for name, rate in r.items()} for shape, r in gemms.items()}
    print(json.dumps({"threads": threads, "peak_gflops": peak, "gemm_gflops_512_rows": gemms,
                      "fraction_of_bf16_peak": share}))


if __name__ == "__main__":
    main()
