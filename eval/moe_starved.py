"""Measure the starved-expert policies on llmq-tiny-moe; the default (``QuantConfig.expert_policy``) comes from here.

    python eval/moe_starved.py                    # markdown table, then one JSON line

Protocol of ../shared/README.md: calibration windows of 256 tokens from C4 records 0-899, perplexity
on C4 records 900-999 (and WikiText-2 test with ``--wikitext``; 256-token windows), GPTQ asymmetric
g128. An expert routed fewer tokens than its input width (256) is starved; with 128 windows experts 4 of
layers 2 and 3 get a handful, with 16 windows about a third of all experts are starved. Each policy gives
the starved experts' statistics: ``all_tokens`` (every token of the first windows pushed through the expert,
``expert_fill_tokens``: 16 windows by default, and rows with 4 windows and with every window; then its routed tokens),
``routed`` (its few tokens plus damping; RTN with none) or ``rtn``. Besides perplexity (which the few
starved experts barely move), each row gives the starved and the well-fed experts' relative output error
``||E_q(x) - E(x)||^2 / ||E(x)||^2`` on the held-out tokens (64 C4 windows) the full-precision model
routes to them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmq.arch import get_arch
from llmq.arch.experts import ExpertLinears, split_experts
from llmq.config import EXPERT_POLICIES, QuantConfig
from llmq.eval.ppl import perplexity
from llmq.io.data import calibration_windows, eval_windows
from llmq.job.pipeline import quantize_layers

# (row label, policy, expert_fill_tokens): all_tokens at its default fill (16 x 256 tokens: 16 windows), at 4 x 256,
# and with every window (a fill past any calibration set)
POLICY_ROWS = [(p, p, 0) for p in EXPERT_POLICIES] + [("all_tokens (fill 1024)", "all_tokens", 1024),
                                                      ("all_tokens (every window)", "all_tokens", 10**9)]
SHARED = Path(os.environ.get("LLMQ_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def held_out_expert_inputs(model, windows: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """``(layer, expert) -> [tokens, hidden]``: the held-out tokens the full-precision model routes to each expert."""
    split_experts(model, get_arch(model.config.model_type))
    inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        experts = next(m for m in layer.modules() if isinstance(m, ExpertLinears))

        def hook(module, args, i=i):
            hidden, index = args[0], args[1]
            for e in range(len(module)):
                inputs.setdefault((i, e), []).append(hidden[(index == e).any(dim=1)])
        handles.append(experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in windows:
            model(row[None])
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}


def expert_error(fp, quantized, inputs, experts) -> float:
    """Mean over ``experts`` of ``||E_q(x) - E(x)||^2 / ||E(x)||^2`` on their held-out routed tokens."""
    errors = []
    with torch.no_grad():
        for (i, e) in experts:
            x = inputs[(i, e)]
            if not len(x):
                continue
            want = fp.model.layers[i].mlp.experts[e](x)
            got = quantized.model.layers[i].mlp.experts[e](x)
            errors.append(((got - want).pow(2).sum() / want.pow(2).sum()).item())
    return sum(errors) / max(1, len(errors))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--bits", default="3,4")
    p.add_argument("--nsamples", default="16,128")
    p.add_argument("--method", default="gptq")
    p.add_argument("--wikitext", action="store_true", help="WikiText-2 perplexity too (slow)")
    args = p.parse_args()
    path = args.shared / "assets" / "llmq-tiny-moe"
    records = (args.shared / "assets" / "c4-sample" / "c4_train_00000_first1000.jsonl").read_text().splitlines()
    c4 = [json.loads(r)["text"] for r in records]
    tok = AutoTokenizer.from_pretrained(path)
    wiki = args.shared / "assets" / "wikitext2-raw" / "wikitext-2-raw-v1.test.rows.jsonl"
    evals = {"C4 900-999": eval_windows(c4[900:], tok, 256)}
    if args.wikitext:
        evals["WikiText-2"] = eval_windows(str(wiki), tok, 256)
    fp = AutoModelForCausalLM.from_pretrained(path).eval()
    inputs = held_out_expert_inputs(fp, evals["C4 900-999"][:64])
    rows = {}
    for n in map(int, args.nsamples.split(",")):
        calib = calibration_windows(c4[:900], tok, nsamples=n, seqlen=256, seed=0, per_document=True)
        for bits in map(int, args.bits.split(",")):
            for label, policy, fill in POLICY_ROWS:
                model = AutoModelForCausalLM.from_pretrained(path).eval()
                notes: dict = {}
                cfg = QuantConfig(method=args.method, bits=bits, group_size=128, sym=False, expert_policy=policy,
                                  expert_fill_tokens=fill)
                quantize_layers(model, calib, cfg, device="cpu", notes=notes)
                # notes: "model.layers.L.mlp.experts.E" -> {"tokens": n, "policy": p}
                starved = [(int(k.split(".")[2]), int(k.rsplit(".", 1)[1])) for k, v in notes.items()
                           if v["tokens"] < 256]
                fed = [k for k in inputs if k not in starved]
                row = {name: perplexity(model, w, batch_size=8, progress=False)["ppl"] for name, w in evals.items()}
                row["starved expert error"] = expert_error(fp, model, inputs, starved)
                row["fed expert error"] = expert_error(fp, model, inputs, fed)
                held_out = sum(len(inputs[k]) for k in starved)
                rows[f"{n} x 256, W{bits}, {label}"] = {**row, "starved experts": len(starved),
                                                        "held-out tokens of starved": held_out}
                print(f"| {n} x 256 | W{bits} | {label} | {len(starved)} | "
                      + " | ".join(f"{v:.4g}" for v in row.values()) + " |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
