"""``llmq demo``: the whole job offline on an embedded default.

Trains (once, then cached in the working folder) a small byte-level LLaMA on text the code generates, for a
fixed number of steps (so the model, and the table, are the same on any machine), then
for RTN, GPTQ and GPTQ act-order at W4, W3 and W2 g128: quantize -> pack -> load the packed checkpoint ->
evaluate, and prints the held-out perplexity table with each checkpoint's bits per weight (``llmq table``'s
cells and outputs, the plot included).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmq.config import QuantConfig
from llmq.eval.demo_model import DEMO_STEPS, DEMO_TEXTS_FILE, make_demo_model
from llmq.eval.ppl import perplexity
from llmq.eval.table import Cell, grid, markdown, run_cells, write_outputs
from llmq.formats.export import save_packed
from llmq.formats.info import checkpoint_info
from llmq.io.data import calibration_windows, eval_windows
from llmq.job.pipeline import quantize_layers
from llmq.runtime.loader import from_pretrained

DEMO_METHODS = "rtn,gptq,gptq:act_order=true"
DEMO_BITS = "4,3,2"
EVAL = "held-out stories"


def _saved_texts(model_dir: Path) -> dict | None:
    """The saved demo model's texts and training info (``demo_texts.json``), or None when there is no model."""
    texts = model_dir / DEMO_TEXTS_FILE
    if not (model_dir / "config.json").is_file() or not texts.is_file():
        return None
    return json.loads(texts.read_text(encoding="utf-8"))


def run_demo(out: str | Path, train_steps: int = DEMO_STEPS, seed: int = 0) -> dict[str, float]:
    """Returns ``{cell name: held-out perplexity}``, prints the table and writes ``table.md``, ``table.csv`` and
    ``plot.png`` (llmq table's outputs) beside the checkpoints. The model is trained once and kept in
    ``out/model``; a cached model of other steps or seed is trained afresh (and the table's cells with it)."""
    out = Path(out)
    model_dir = out / "model"
    texts = _saved_texts(model_dir)
    if texts is None or (texts["info"]["steps"], texts["info"]["seed"]) != (train_steps, seed):
        print(f"training the demo model for {train_steps} steps (cached in {model_dir}) ...", flush=True)
        make_demo_model(model_dir, seed=seed, max_steps=train_steps)
        texts = _saved_texts(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = calibration_windows(texts["calibration"], tokenizer, nsamples=128, seqlen=128, seed=seed,
                                per_document=False)
    evals = eval_windows([texts["evaluation"]], tokenizer, 128)

    def measure(cell: Cell) -> dict:
        """Quantize -> pack -> load the packed checkpoint -> evaluate (the FP row: the model itself)."""
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        bits = 16.0
        if not cell.is_fp:
            cfg = QuantConfig(**cell.recipe_keys())
            results = quantize_layers(model, calib, cfg, device="cpu")
            ckpt = out / cell.slug
            save_packed(model, tokenizer, results, ckpt, cfg, overwrite=True)
            model = from_pretrained(str(ckpt), torch_dtype=torch.float32)
            bits = checkpoint_info(ckpt)["effective_bits_per_weight"]
        ppl = perplexity(model, evals, batch_size=8, progress=False)["ppl"]
        return {"bits_per_weight": bits, "metrics": {EVAL: ppl}}

    records = run_cells(grid(DEMO_METHODS, DEMO_BITS, "128"), measure,
                        settings={"seed": seed, "train_steps": train_steps}, desc="demo")
    write_outputs(records, out, title="llmq demo: a byte-level LLaMA trained on synthetic stories")
    print(f"\nheld-out perplexity of the demo LLaMA, packed checkpoints reloaded "
          f"({evals.shape[0]} windows of {evals.shape[1]} tokens)\n")
    print(markdown(records))
    written = [name for name in ("table.md", "table.csv", "plot.png") if (out / name).is_file()]
    print(f"\ncheckpoints, {', '.join(written)} in {out}")
    return {r["name"]: r["metrics"][EVAL] for r in records}
