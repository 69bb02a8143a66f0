"""Load packed checkpoints through transformers' own GPTQ integration (needs gptqmodel and optimum) and compare
with ``llmq.from_pretrained``: which quantized linear class each gets, its dequantized weights, and the logits.

    python eval/hf_gptq_load.py DIR [DIR ...]     # one JSON line per checkpoint
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM

import llmq
from llmq.runtime.qlinear import QuantLinear


def compare(folder: str, tokens: torch.Tensor) -> dict:
    ours = llmq.from_pretrained(folder, torch_dtype=torch.float32, kernel="pure")
    out: dict = {"checkpoint": folder, "model_type": ours.config.model_type}
    try:
        theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    except Exception as e:  # what fails is the figure: record it and go on to the next checkpoint
        return {**out, "loaded": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    modules = dict(theirs.named_modules())
    kinds = sorted({type(modules[n]).__name__ for n in mine if n in modules})
    missing = [n for n in mine if n not in modules or not hasattr(modules[n], "qweight")]
    worst = 0.0
    for name, m in mine.items():
        if name in missing:
            continue
        theirs_w = modules[name].dequantize_weight().T.float() if hasattr(modules[name], "dequantize_weight") else None
        if theirs_w is not None:
            worst = max(worst, float((theirs_w - m.dequantized_weight()).abs().max()))
    with torch.no_grad():
        want = ours(tokens).logits
        got = theirs(tokens).logits.float()
    return {**out, "loaded": True, "linear_classes": kinds, "quantized_linears": len(mine),
            "not_quantized_there": missing[:5], "n_not_quantized_there": len(missing), "dtype": str(
                next(theirs.parameters()).dtype), "weight_max_diff": worst,
            "logits_max_diff": float((got - want).abs().max()), "logits_max": float(want.abs().max()),
            "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--vocab", type=int, default=512)
    args = p.parse_args()
    tokens = torch.randint(0, args.vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    for folder in args.checkpoints:
        print(json.dumps(compare(folder, tokens)), flush=True)


if __name__ == "__main__":
    main()
