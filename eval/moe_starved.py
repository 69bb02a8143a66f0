"""Measure the starved-expert policies on llmq-tiny-moe; the default (``QuantConfig.expert_policy``) comes from here.

    python eval/moe_starved.py                    # markdown table, then one JSON line

Protocol of ../shared/README.md: calibration windows of 256 tokens from C4 records 0-899, perplexity on
C4 records 900-999 and WikiText-2 test (256-token windows), GPTQ asymmetric g128. An expert routed fewer
tokens than its input width (256) is starved; with 128 windows experts 4 of layers 2 and 3 get a handful,
with 16 windows about half of all experts are starved. Each policy gives the starved experts' statistics:
``all_tokens`` (every token of the layer pushed through the expert), ``routed`` (its few tokens plus
damping; RTN with none) or ``rtn``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from llmq.config import EXPERT_POLICIES, QuantConfig
from llmq.data import calibration_windows, eval_windows
from llmq.eval import perplexity
from llmq.pipeline import quantize_layers

SHARED = Path(os.environ.get("LLMQ_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--bits", default="3,4")
    p.add_argument("--nsamples", default="16,128")
    p.add_argument("--method", default="gptq")
    args = p.parse_args()
    path = args.shared / "assets" / "llmq-tiny-moe"
    records = (args.shared / "assets" / "c4-sample" / "c4_train_00000_first1000.jsonl").read_text().splitlines()
    c4 = [json.loads(r)["text"] for r in records]
    tok = AutoTokenizer.from_pretrained(path)
    wiki = args.shared / "assets" / "wikitext2-raw" / "wikitext-2-raw-v1.test.rows.jsonl"
    evals = {"WikiText-2": eval_windows(str(wiki), tok, 256), "C4 900-999": eval_windows(c4[900:], tok, 256)}
    rows = {}
    for n in map(int, args.nsamples.split(",")):
        calib = calibration_windows(c4[:900], tok, nsamples=n, seqlen=256, seed=0, per_document=True)
        for bits in map(int, args.bits.split(",")):
            for policy in EXPERT_POLICIES:
                model = AutoModelForCausalLM.from_pretrained(path).eval()
                notes: dict = {}
                cfg = QuantConfig(method=args.method, bits=bits, group_size=128, sym=False, expert_policy=policy)
                quantize_layers(model, calib, cfg, device="cpu", notes=notes)
                starved = sum(1 for v in notes.values() if v["policy"] != "routed" or v["tokens"] < 256)
                row = {name: perplexity(model, w, batch_size=8, progress=False)["ppl"] for name, w in evals.items()}
                rows[f"{n} x 256, W{bits}, {policy}"] = {**row, "starved experts": starved}
                print(f"| {n} x 256 | W{bits} | {policy} | {starved} | "
                      + " | ".join(f"{v:.3f}" for v in row.values()) + " |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
