"""Where block-wise reconstruction's held-out loss sits on llmq-tiny-llama (issue 14's goal), as in README *Results*.

    python eval/tune_diagnosis.py seeds --bits 3 --tune-seeds 0,1000     # the whole model under each seed of the draws
    python eval/tune_diagnosis.py layers --method gptq --layers 0,1,2    # one layer quantized, the others FP
    python eval/tune_diagnosis.py oracle --steps 1000                    # layer 0 fitted to the held-out text itself
    python eval/tune_diagnosis.py oracle --text calibration              # the same objective on the calibration text
    python eval/tune_diagnosis.py oracle --text calibration --all-layers --wikitext --steps 500   # every layer so

Protocol of eval/ppl_table.py (calibration 128 x 256 tokens of C4 records 0-899, asymmetric g128, held-out C4
records 900-999 and WikiText-2 test). ``oracle`` is a diagnostic, not a method: it tunes layer 0's grid (the
same :class:`llmq.algorithms.tune.TunableWeight` as ``tune``) against the FP model's output distribution (KL) on the
evaluation windows themselves, so it shows how close to FP layer 0 at this width gets when the calibration text
and the objective are the evaluation's own; ``--text calibration`` fits the same objective on the calibration
windows instead, which separates the objective's share from the text's; ``--all-layers`` fits every layer's grid
at once (end-to-end training of the grid, what ``--method rtn --e2e-steps`` runs: the whole model in memory, a
forward and backward through it per step). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import ppl_table
import torch
import torch.nn.functional as F
from ppl_table import SHARED, _c4_data
from transformers import AutoModelForCausalLM

from llmq.algorithms.tune import tune_end_to_end
from llmq.config import QuantConfig
from llmq.eval.ppl import perplexity
from llmq.job.pipeline import quantize_layers

MODEL = SHARED / "assets" / "llmq-tiny-llama"


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {name: round(ppl, 3) for name, ppl in metrics.items()}


def _ppl(model, evals: dict) -> dict[str, float]:
    return _rounded({name: perplexity(model, w, batch_size=8, progress=False)["ppl"] for name, w in evals.items()})


def _quantized(calib, cfg: QuantConfig, layer: int | None = None):
    """The model with every layer (or only ``layer``) quantized by ``cfg``, and its quantized weights."""
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    keep_fp = None if layer is None else (lambda name, mod: not name.startswith(f"model.layers.{layer}."))
    return model, quantize_layers(model, calib, cfg, device="cpu", keep_fp=keep_fp)


def seeds(args, calib, evals) -> dict:
    out = {}
    for seed in args.tune_seeds:
        cfg = QuantConfig(method="tune", bits=args.bits, group_size=128, sym=False, tune_seed=seed)
        t = time.time()
        metrics = ppl_table._ppl(MODEL, calib, cfg, evals)["metrics"]  # one table cell, in memory
        out[f"W{args.bits} tune, tune_seed {seed}"] = {**_rounded(metrics), "seconds": round(time.time() - t)}
    return out


def layers(args, calib, evals) -> dict:
    cfg = QuantConfig(method=args.method, bits=args.bits, group_size=128, sym=False)
    return {f"W{args.bits} {args.method}, layer {i} only": _ppl(_quantized(calib, cfg, i)[0], evals)
            for i in args.layers}


def oracle(args, calib, evals) -> dict:
    """Layer 0 (or every layer) from RTN (searched ranges), tuned by :func:`llmq.algorithms.tune.tune_end_to_end` (the
    end-to-end phase's loop: Adam through the straight-through grid) against ``KL(FP || quantized)`` of the whole
    model's next-token distributions on the held-out C4 windows (or on the calibration windows, where every layer at
    once is ``--method rtn --e2e-steps``)."""
    text = evals["C4 900-999"] if args.text == "heldout" else calib
    fp = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    cfg = QuantConfig(method="rtn", bits=args.bits, group_size=128, sym=False, mse=True, e2e_steps=args.steps,
                      e2e_batch=args.batch)
    model, start = _quantized(calib, cfg, None if args.all_layers else 0)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        teacher = torch.cat([F.log_softmax(fp(text[i : i + 16]).logits.float(), -1) for i in range(0, len(text), 16)])

    def student(weights, idx):
        logits = torch.func.functional_call(model, {n + ".weight": w for n, w in weights.items()}, (text[idx],)).logits
        return F.log_softmax(logits.float(), -1)

    fp_weights = {name: fp.get_submodule(name).weight.data for name in start}
    res = tune_end_to_end(student, lambda idx: teacher[idx], len(text), start, fp_weights, cfg)
    with torch.no_grad():
        for name, qw in res.weights.items():
            model.get_submodule(name).weight.data = qw.dequantize().to(model.dtype)
    fitted = "C4 900-999" if args.text == "heldout" else "the calibration windows"
    which = "every layer" if args.all_layers else "layer 0"
    return {f"W{args.bits} {which} fitted to {fitted} ({args.steps} steps of {args.batch})": _ppl(model, evals),
            "KL before / after": [round(res.loss_before, 5), round(res.loss_after, 5)]}


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["seeds", "layers", "oracle"])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--tune-seeds", type=ints, default=[0, 1000])
    ap.add_argument("--method", default="tune")
    ap.add_argument("--layers", type=ints, default=list(range(6)))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text", choices=["heldout", "calibration"], default="heldout", help="oracle: the text it fits")
    ap.add_argument("--all-layers", action="store_true", help="oracle: fit every layer's grid, not layer 0's")
    ap.add_argument("--wikitext", action="store_true", help="evaluate WikiText-2 too")
    args = ap.parse_args()
    datasets = ("C4 900-999", "WikiText-2") if args.wikitext else ("C4 900-999",)
    calib, evals = _c4_data(MODEL, SHARED, datasets)
    fn = {"seeds": seeds, "layers": layers, "oracle": oracle}[args.what]
    fp = _rounded(ppl_table._ppl(MODEL, calib, None, evals)["metrics"])
    print(json.dumps({"FP": fp, **fn(args, calib, evals)}))


if __name__ == "__main__":
    main()
