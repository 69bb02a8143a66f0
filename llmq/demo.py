"""``llmq demo``: the whole job offline on an embedded default.

Trains (once, then cached in the working folder) a small LLaMA on text the code generates, then
for RTN and GPTQ at W4 g128 and W3 g128: quantize -> pack -> load the packed checkpoint ->
evaluate, and prints the held-out perplexity table with each checkpoint's size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import QuantConfig
from .data import calibration_windows, eval_windows
from .demo_model import DEMO_TEXTS_FILE, make_demo_model
from .eval import perplexity
from .export import save_packed
from .info import checkpoint_info
from .loader import from_pretrained
from .pipeline import quantize_layers

log = logging.getLogger(__name__)

DEMO_RUNS = (
    ("RTN", dict(method="rtn")),
    ("GPTQ", dict(method="gptq")),
    ("GPTQ act-order", dict(method="gptq", act_order=True)),
)


def run_demo(out: str | Path, train_seconds: float = 60.0, seed: int = 0) -> dict[str, float]:
    """Returns ``{row label: held-out perplexity}`` and prints the table."""
    out = Path(out)
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        print(f"training the demo model for {train_seconds:.0f} s (cached in {model_dir}) ...", flush=True)
        make_demo_model(model_dir, train_seconds=train_seconds, seed=seed)
    texts = json.loads((model_dir / DEMO_TEXTS_FILE).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = calibration_windows(texts["calibration"], tokenizer, nsamples=128, seqlen=128, seed=seed,
                                per_document=False)
    evals = eval_windows([texts["evaluation"]], tokenizer, 128)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()

    rows = [("FP32", perplexity(load(), evals, batch_size=8, progress=False)["ppl"], "")]
    for bits in (4, 3):
        for label, kw in DEMO_RUNS:
            cfg = QuantConfig(bits=bits, group_size=128, **kw)
            model = load()
            results = quantize_layers(model, calib, cfg, device="cpu")
            ckpt = out / f"w{bits}-g128-{label.lower().replace(' ', '-')}"
            save_packed(model, tokenizer, results, ckpt, cfg, overwrite=True)
            packed = from_pretrained(str(ckpt), torch_dtype=torch.float32)
            info = checkpoint_info(ckpt)
            size = f"{info['effective_bits_per_weight']:.2f} bits/weight, {info['size_vs_fp16']:.0%} of FP16"
            rows.append((f"W{bits} g128 {label}", perplexity(packed, evals, batch_size=8, progress=False)["ppl"], size))
    width = max(len(label) for label, _, _ in rows)
    print(f"\nheld-out perplexity of the demo LLaMA, packed checkpoints reloaded "
          f"({evals.shape[0]} windows of {evals.shape[1]} tokens)")
    for label, ppl, size in rows:
        print(f"  {label:<{width}}  {ppl:8.4f}  {size}")
    print(f"checkpoints in {out}")
    return {label: ppl for label, ppl, _ in rows}
