"""Inference speed and memory of packed checkpoints against the bf16 model; prints one JSON line of figures.

    python scripts/bench_decode.py                          # TinyLlama-1.1B shapes, random bf16 weights
    python scripts/bench_decode.py --model DIR_OR_HUB_ID    # any bf16 LLaMA-layout model instead
    python scripts/bench_decode.py --kernels                # the int4 kernel against dequantize + GEMM by rows

The first run writes a random-weight bf16 checkpoint with TinyLlama-1.1B's shapes (hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 key/value heads, vocab 32000; ``bench_scale.py``'s
generator) under ``--cache-dir``, and packed checkpoints of it: W4 g128 symmetric and asymmetric
(RTN), the same with act-order (GPTQ, which is what writes act-order ``g_idx``), W8 g128 and W8
per-row (RTN) and W3 g128 (RTN). The method does not change the kernels' work; the weights are
random, so no quality figure is taken here (the perplexity tables are in the README).

Each model is then measured in its own process, in bf16 on ``--device`` (default cpu), after one warm-up
generation of the same prompt: a 512-token prompt through ``model.generate`` (prefill tokens/s: prompt
tokens over the time to the first new token), ``--decode-tokens`` more tokens at batch 1 (decode
tokens/s), and resident memory (VmRSS, less VmRSS after the imports and the model class's own module):
after the load (``rss_load_mb``; transformers maps a bf16 checkpoint lazily, so for it this counts only
the pages read so far) and after the generations (``rss_after_mb``: activations, KV cache, logits and
allocator slack added), beside the checkpoint's tensor bytes (``tensor_mb``: the packed size plus the
unquantized tensors).
The W4 checkpoint is also run on the reference ``kernel="pure"`` path (4 new tokens: it is slow), and, when torchao is
installed, torchao's int4 weight-only CPU path on the bf16 model (``PrototypeInt4WeightOnlyConfig``,
group 128) as the peer. ``--llmq-attention`` adds the bf16 model with the attention ``llmq.from_pretrained``
gives its models (:mod:`llmq.runtime.kernels.attention`: float32 on the CPU), which separates what the packed
linears gain from what the attention does. ``--rounds`` (2) measures every model that many times,
interleaved (each process generating twice), and keeps the best rates. The line ends with each model's
decode and prefill ratio to bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmq.runtime.qlinear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import SHARED, dir_bytes, make_checkpoint  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
# name -> recipe keys (method defaults to RTN; act-order needs GPTQ)
VARIANTS = {
    "w4_sym": dict(bits=4, sym=True),
    "w4_asym": dict(bits=4, sym=False),
    "w4_sym_act": dict(bits=4, sym=True, method="gptq", act_order=True),
    "w4_asym_act": dict(bits=4, sym=False, method="gptq", act_order=True),
    "w8": dict(bits=8, sym=True),
    "w8_row": dict(bits=8, sym=True, group_size=-1),
    "w3": dict(bits=3, sym=False),
}


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(kind: str, path: str, device: str, prompt_tokens: int, decode_tokens: int) -> dict:
    """One model's figures (runs in a child process, so its memory is its own)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import llmq
    from llmq.runtime.generate import generate

    MODEL_FOR_CAUSAL_LM_MAPPING[type(transformers.AutoConfig.from_pretrained(path))]  # import its modeling code
    before = status_bytes("VmRSS")  # so that what follows is the model's memory, not the library's
    t = time.perf_counter()
    if kind in ("bf16", "bf16_llmq_attention", "torchao"):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        if kind == "bf16_llmq_attention":  # the attention llmq.from_pretrained gives its models, on the bf16 model
            from llmq.runtime.kernels.attention import use_float32_attention

            use_float32_attention(model, torch.bfloat16, torch.device(device))
        if kind == "torchao":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
            from torchao.quantization import quantize_

            quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=128))
        kernels = {}
    else:
        model = llmq.from_pretrained(path, device=device, torch_dtype=torch.bfloat16,
                                     kernel="pure" if kind == "pure" else "auto")
        kernels = {}
        for c in model.llmq_kernels.values():
            kernels[c.kernel] = kernels.get(c.kernel, 0) + 1
    load_s = time.perf_counter() - t
    loaded = status_bytes("VmRSS")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompt = (SHARED / "assets" / "tinystories-text" / "tinystories_sample.cs336.txt").read_text()
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0, :prompt_tokens]
    text = tokenizer.decode(ids)
    fixed = dict(min_new_tokens=decode_tokens, eos_token_id=None)  # random weights: never stop early
    # warm-up at the prompt's full length: what is made once per shape (oneDNN's primitives, the packed paths'
    # dequantization scratch) is made here, not inside the first timed prefill of one model and not another's
    generate(model, tokenizer, text, max_new_tokens=2, min_new_tokens=2, eos_token_id=None)
    runs = [generate(model, tokenizer, text, max_new_tokens=decode_tokens, **fixed)
            for _ in range(2 if kind != "pure" else 1)]
    prefill = max(g.prefill_tokens_per_s for g in runs)  # each rate's best, as over the rounds
    decode = max(g.decode_tokens_per_s for g in runs)
    return {"load_s": round(load_s, 2), "prompt_tokens": runs[0].prompt_tokens, "new_tokens": runs[0].new_tokens,
            "prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 3),
            "rss_load_mb": round((loaded - before) / 2**20),
            "rss_after_mb": round((status_bytes("VmRSS") - before) / 2**20), "kernels": kernels}


def tensor_mb(folder: Path) -> float:
    from llmq.formats.info import checkpoint_info

    return round(checkpoint_info(folder)["tensor_bytes"] / 2**20)


def prepare(args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    from llmq.config import Recipe
    from llmq.job.runner import quantize_to_disk

    cache = Path(args.cache_dir)
    if args.model:
        base = Path(args.model)
    else:
        base = cache / f"tinyllama-shape-{args.layers}l-bf16"
        if not base.is_dir():
            print(f"writing a random bf16 checkpoint to {base}", file=sys.stderr)
            make_checkpoint(base, args.layers, TINYLLAMA)
    calib = SHARED / "assets" / "tinystories-text" / "tinystories_sample.cs336.txt"
    packed = {}
    for name in args.variants:
        out = cache / f"{base.name}-{name}"
        if not (out / "config.json").is_file():
            print(f"quantizing {name} to {out}", file=sys.stderr)
            keys = dict(method="rtn", group_size=128, calib=str(calib), nsamples=8, seqlen=256, mse=False)
            keys.update(VARIANTS[name])
            quantize_to_disk(Recipe.from_dict(dict(model=str(base), out=str(out), **keys)), overwrite=True)
        packed[name] = out
    return base, packed


def child(kind: str, path: Path, args: argparse.Namespace, decode_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, str(path), "--device", args.device,
           "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(decode_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        raise SystemExit(f"{kind} {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def random_w4_layer(n: int, k: int, generator: torch.Generator | None = None) -> QuantLinear:
    """A packed W4 g128 ``k -> n`` linear of random codes (scale 2^-7, zero 8): the kernels' work does not depend
    on the values."""
    from llmq.formats.pack import pack_gptq
    from llmq.runtime.qlinear import QuantLinear

    g = k // 128
    layer = QuantLinear(k, n, 4, g, bias=False, zero_offset=0)
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    for key, t in pack_gptq(codes, torch.full((n, g), 2.0**-7), torch.full((n, g), 8, dtype=torch.uint8),
                            torch.arange(k) // 128, 4, "gptq_v2").items():
        getattr(layer, key).copy_(t)
    return layer


def kernel_rows(args: argparse.Namespace) -> dict:
    """Per linear shape and row count (ms): bf16 and float32 GEMM, torch's int4 kernel, dequantize + GEMM in the
    dtype the prefill path multiplies in (:func:`llmq.utils.device.gemm_dtype`: float32 on CPUs without native bf16
    matmuls), the int4_cpu linear's own forward (the kernel up to 128 rows, dequantize + GEMM above), and where
    it builds, llmq's AVX2 kernel (``avx2_gemv``), its dequantize + GEMM and its linear's forward. One weight per
    shape, so the codes sit in cache: decoding a whole model reads them from memory (the model runs above)."""
    import torch.nn.functional as F

    from llmq.runtime.kernels import native
    from llmq.runtime.kernels.avx2 import Int4Avx2Linear
    from llmq.runtime.kernels.cpu import Int4CpuLinear
    from llmq.utils.device import gemm_dtype

    def timed(fn, n=10):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return round((time.perf_counter() - t) / n * 1e3, 3)

    rows = {}
    for n, k in ((2048, 2048), (5632, 2048), (2048, 5632)):
        layer = random_w4_layer(n, k)
        m = Int4CpuLinear(layer, torch.bfloat16)
        avx2 = None if native.unavailable() else Int4Avx2Linear(layer, torch.bfloat16)
        w = torch.randn(n, k, dtype=torch.bfloat16)
        w32 = w.float()
        sz = m.scales_and_zeros[0]
        dtype = gemm_dtype(torch.bfloat16, torch.device("cpu"))
        for rows_ in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
            x = torch.randn(rows_, k, dtype=torch.bfloat16)
            rows[f"{n}x{k}@{rows_}"] = row = {
                "bf16": timed(lambda: F.linear(x, w)),  # noqa: B023
                "fp32": timed(lambda: F.linear(x.float(), w32)),  # noqa: B023
                "int4": timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, m.weight[0], 128, sz)),  # noqa: B023
                "dequant_gemm": timed(lambda: x.to(dtype) @ m.dequantized_t(dtype=dtype)),  # noqa: B023
                "int4_cpu_linear": timed(lambda: m(x)),  # noqa: B023
            }
            if avx2 is not None:
                row["avx2_gemv"] = timed(lambda: avx2._gemv(x))  # noqa: B023
                row["avx2_dequant_gemm"] = timed(lambda: x.to(dtype) @ avx2.dequantized_t(True, dtype).to(dtype))  # noqa: B023
                row["int4_avx2_linear"] = timed(lambda: avx2(x))  # noqa: B023
    return {"gemm_dtype": str(dtype).removeprefix("torch."), **rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a bf16 LLaMA-layout model folder instead of the random TinyLlama shape")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "llmq-bench"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--no-pure", action="store_true", help="skip the reference path (minutes at this size)")
    p.add_argument("--rounds", type=int, default=2, help="measure every model this many times, interleaved")
    p.add_argument("--kernels", action="store_true", help="time the int4 kernel against dequantize + GEMM")
    p.add_argument("--llmq-attention", action="store_true",
                   help="also the bf16 model with the attention llmq.from_pretrained gives (float32 on the CPU), "
                        "to split the packed model's gain into its linears' and attention's")
    p.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.device, args.prompt_tokens, args.decode_tokens)))
        return
    if args.kernels:
        print(json.dumps({"threads": torch.get_num_threads(), "ms": kernel_rows(args)}))
        return
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    base, packed = prepare(args)
    runs = {"bf16": ("bf16", base, args.decode_tokens)}
    if args.llmq_attention:
        runs["bf16_llmq_attention"] = ("bf16_llmq_attention", base, args.decode_tokens)
    runs.update({name: ("auto", folder, args.decode_tokens) for name, folder in packed.items()})
    if "w4_sym" in packed and not args.no_pure:
        runs["w4_sym_pure"] = ("pure", packed["w4_sym"], 4)
    try:
        import torchao  # noqa: F401

        runs["peer_torchao_int4"] = ("torchao", base, args.decode_tokens)
    except ImportError:
        pass
    figures = {"model": str(base), "device": args.device, "threads": torch.get_num_threads(), "rounds": args.rounds}
    # Rounds interleave the models, so a slow minute of a shared machine does not land on one model only;
    # each model keeps its best prefill and decode rate over the rounds.
    for r in range(args.rounds):
        for name, (kind, folder, tokens) in runs.items():
            if r and kind == "pure":
                continue
            f = child(kind, folder, args, tokens)
            if name in figures:
                for key in ("prefill_tok_s", "decode_tok_s"):
                    f[key] = max(f[key], figures[name][key])
            figures[name] = f
    figures["bf16"]["tensor_mb"] = round(dir_bytes(base) / 2**20)
    for name, folder in packed.items():
        figures[name]["tensor_mb"] = tensor_mb(folder)
    if "peer_torchao_int4" not in figures:
        figures["peer_torchao_int4"] = "torchao not installed"
    ref = figures["bf16"]
    figures["ratio_to_bf16"] = {
        name: {"decode": round(f["decode_tok_s"] / ref["decode_tok_s"], 2),
               "prefill": round(f["prefill_tok_s"] / ref["prefill_tok_s"], 2),
               **({"rss_load_vs_tensors": round(f["rss_load_mb"] / f["tensor_mb"], 3)} if "tensor_mb" in f else {})}
        for name, f in figures.items() if isinstance(f, dict) and "decode_tok_s" in f and name != "bf16"}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
