"""Reproduce llmq's perplexity tables on the models in ../shared (protocol: ../shared/README.md).

    python eval/ppl_table.py                 # both tables, markdown, then one JSON line
    python eval/ppl_table.py --only stories260k

stories260K: calibration 64 windows of 128 tokens from the first third (by characters) of
TinyStories-valid.Ahmedessaa-30k.txt, evaluation on the other two thirds in 128-token windows,
asymmetric group 32, every linear quantized (fake-quantized in memory: in_features 172 cannot be
packed). llmq-tiny-llama and llmq-tiny-moe: calibration 128 x 256 tokens from C4 records 0-899, evaluation
on C4 records 900-999 and WikiText-2 test, 256-token non-overlapping windows, asymmetric group 128.
The tests in tests/test_perplexity_tables.py run these functions and assert on their results.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from llmq.arch import get_layers, layer_linears, resolve_arch
from llmq.config import QuantConfig, Width
from llmq.eval.ppl import perplexity
from llmq.eval.table import Cell, run_cells
from llmq.formats.pack import gptq_storage_bits
from llmq.io.data import calibration_windows, eval_windows
from llmq.job.e2e import quantize_model
from llmq.job.mixed import linear_shapes, make_units, widths_table
from llmq.job.pipeline import noted_widths, quantize_layers

SHARED = Path(os.environ.get("LLMQ_SHARED") or Path(__file__).resolve().parents[2] / "shared")
# The tables follow the papers' protocol: asymmetric groups, whatever llmq's per-width default.
RUNS = {
    "RTN": dict(method="rtn"),
    "GPTQ": {},
    "GPTQ full range search": dict(range_search="full"),  # issue 16: the reference search, all 80 shrink factors
    "GPTQ act-order": dict(act_order=True),
    "GPTQ min-max": dict(mse=False),
    "GPTQ act-order min-max": dict(act_order=True, mse=False),
    "AWQ": dict(method="awq"),
    "AWQ+GPTQ": dict(method="awq+gptq"),
    "AWQ+GPTQ act-order": dict(method="awq+gptq", act_order=True),
    "Tune": dict(method="tune"),
    # stories260K's tune rows: at the default 4 windows a step its W3 ratio to GPTQ's loss moves with the noise of
    # the steps (200 steps: 0.582 and 0.634 on two machines; 400 steps: 0.549, then 0.610 on the same machine once
    # only the summation order of the scales' gradients changed); 400 steps of 16 of its 64 windows: 0.477 and 0.509
    "Tune 400 x 16": dict(method="tune", tune_iters=400, tune_batch=16),
    # the end-to-end phase after block-wise tune (llmq.job.e2e): every grid against the whole model's KL to FP
    "Tune 400 x 16, e2e 200": dict(method="tune", tune_iters=400, tune_batch=16, e2e_steps=200),
    "Tune, e2e 1000": dict(method="tune", e2e_steps=1000),
    "RTN, e2e 1000": dict(method="rtn", e2e_steps=1000),  # RTN's ranges searched (mse), the start measured best here
    "RTN sym": dict(method="rtn", sym=True),
    "GPTQ sym": dict(sym=True),
    "GPTQ act-order sym": dict(act_order=True, sym=True),
}


def _ppl(path: Path, calib, cfg: QuantConfig | None, evals: dict) -> dict[str, Any]:
    """One cell, in memory: every linear fake-quantized (packable or not), then each evaluation's perplexity."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    bits, weights = 16.0, 1
    if cfg is not None:
        results = quantize_model(model, calib, cfg, device="cpu")  # the layers, then any end-to-end phase
        bits = sum(gptq_storage_bits(qw.codes.shape[1], qw.codes.shape[0], qw.bits, qw.group_size)
                   for qw in results.values())
        weights = sum(qw.codes.numel() for qw in results.values())
    return {"bits_per_weight": bits / weights,
            "metrics": {name: perplexity(model, w, batch_size=8, progress=False)["ppl"] for name, w in evals.items()}}


def _table(path: Path, calib, evals: dict, group_size: int, rows: dict[int, list[str]],
           only: dict[str, set[str]] | None = None) -> dict[str, dict]:
    """``{"FP": {eval: ppl}, "W3 GPTQ": {eval: ppl}, ...}`` for the ``rows`` (bits -> run names): the cells of
    ``llmq table`` (:func:`llmq.eval.table.run_cells`), each measured in memory. ``only`` limits an evaluation to
    some rows (``{"WikiText-2": {"FP", "W3 GPTQ"}}``); the others leave that column out."""
    only = only or {}
    names = {Cell(): "FP"}
    for bits, runs in rows.items():
        for name in runs:
            keys = {"sym": False, **RUNS[name]}
            names[Cell(keys.pop("method", "gptq"), bits, group_size, tuple(sorted(keys.items())))] = f"W{bits} {name}"

    def measure(cell: Cell) -> dict[str, Any]:
        row_evals = {n: w for n, w in evals.items() if n not in only or names[cell] in only[n]}
        return _ppl(path, calib, None if cell.is_fp else QuantConfig(**cell.recipe_keys()), row_evals)

    records = run_cells(list(names), measure, settings={"model": str(path)}, desc=path.name)
    return {names[cell]: r["metrics"] for cell, r in zip(names, records, strict=True)}


def stories260k(shared: Path = SHARED, rows: dict[int, list[str]] | None = None) -> dict[str, dict]:
    path = shared / "assets" / "stories260K"
    text = (shared / "assets" / "tinystories-text" / "TinyStories-valid.Ahmedessaa-30k.txt").read_text()
    tok = AutoTokenizer.from_pretrained(path)
    third = len(text) // 3
    calib = calibration_windows(text[:third], tok, nsamples=64, seqlen=128, seed=0, per_document=False)
    evals = {"TinyStories": eval_windows([text[third:]], tok, 128)}
    w4 = ["RTN", "GPTQ", "GPTQ act-order", "GPTQ min-max", "GPTQ act-order min-max", "AWQ"]
    # the sym rows are eval/sym_vs_asym.py's; the end-to-end phase's W3 row (6.882 after tune's 6.973, near the
    # machines' spread of tune's row) is rows={3: ["Tune 400 x 16", "Tune 400 x 16, e2e 200"]}
    w3 = [name for name in RUNS
          if name == "Tune 400 x 16" or not name.endswith(" sym") and not name.startswith(("Tune", "RTN,"))]
    return _table(path, calib, evals, 32,
                  rows or {4: w4, 3: w3, 2: ["RTN", "GPTQ", "Tune 400 x 16", "Tune 400 x 16, e2e 200"]})


def _c4_data(path: Path, shared: Path, datasets: tuple[str, ...]):
    """Calibration 128 x 256 from C4 records 0-899; 256-token windows of WikiText-2 test and C4 900-999."""
    records = (shared / "assets" / "c4-sample" / "c4_train_00000_first1000.jsonl").read_text().splitlines()
    c4 = [json.loads(r)["text"] for r in records]
    tok = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(c4[:900], tok, nsamples=128, seqlen=256, seed=0, per_document=True)
    wiki = shared / "assets" / "wikitext2-raw" / "wikitext-2-raw-v1.test.rows.jsonl"
    sources = {"WikiText-2": lambda: eval_windows(str(wiki), tok, 256),
               "C4 900-999": lambda: eval_windows(c4[900:], tok, 256)}
    return calib, {name: sources[name]() for name in datasets}


def _c4_protocol(path: Path, shared: Path, rows: dict[int, list[str]], datasets: tuple[str, ...],
                 only: dict[str, set[str]] | None = None) -> dict[str, dict]:
    calib, evals = _c4_data(path, shared, datasets)
    return _table(path, calib, evals, 128, rows, only)


def tiny_llama_mixed(shared: Path = SHARED, datasets: tuple[str, ...] = ("C4 900-999",), bits: int = 3,
                     naive_row: bool = True) -> tuple[dict[str, dict], dict[str, str]]:
    """Mixed precision (GPTQ) on llmq-tiny-llama at the effective bits per weight of uniform W{bits} g64: uniform
    W{bits} g64; uniform W{bits} g128 with the budget left over spent on the first layers' groups at W{bits+1} g128,
    in order (a naive baseline, unless ``naive_row`` is false); the automatic allocation. Each row also gives its
    effective bits per weight. Returns the table and the automatic allocation (linear -> width)."""
    path = shared / "assets" / "llmq-tiny-llama"
    calib, evals = _c4_data(path, shared, datasets)
    model = AutoModelForCausalLM.from_pretrained(path)
    spec = resolve_arch(model)
    units = make_units([linear_shapes({n: m for n, m in layer_linears(layer, spec, model.config, i).items()
                                       if n in group}, f"{spec.layers}.{i}.")
                        for i, layer in enumerate(get_layers(model, spec)) for group in spec.groups(model.config, i)],
                       (Width(bits, 64), *(Width(b, 128) for b in (2, 3, 4, 8))))
    weights = sum(u.weights for u in units)

    def bpw(choice: list[Width]) -> float:
        return sum(u.costs[w] for u, w in zip(units, choice, strict=True)) / weights

    budget = bpw([Width(bits, 64)] * len(units))
    naive = [Width(bits, 128)] * len(units)
    for i in range(len(units)):
        if bpw([*naive[:i], Width(bits + 1, 128), *naive[i + 1:]]) <= budget:
            naive[i] = Width(bits + 1, 128)
    widths = {name: w for u, w in zip(units, naive, strict=True) for name in u.linears}
    cfg = QuantConfig(bits=bits, group_size=128)
    auto = QuantConfig(bits=bits, group_size=128, bits_per_weight=budget)
    notes: dict = {}
    naive_name = f"W{bits} g128, first groups W{bits + 1} g128"
    rows = {f"W{bits} g64": (QuantConfig(bits=bits, group_size=64), None, {}),
            **({naive_name: (cfg, widths, {})} if naive_row else {}),
            f"auto at {budget:.4f} bits": (auto, None, notes)}
    out = {}
    for name, (row_cfg, row_widths, row_notes) in rows.items():
        m = AutoModelForCausalLM.from_pretrained(path).eval()
        quantize_layers(m, calib, row_cfg, device="cpu", widths=row_widths, notes=row_notes)
        out[name] = {ev: perplexity(m, w, batch_size=8, progress=False)["ppl"] for ev, w in evals.items()}
    chosen = noted_widths(notes)
    out[f"auto at {budget:.4f} bits"]["bits per weight"] = bpw([chosen[u.linears[0]] for u in units])
    out[f"W{bits} g64"]["bits per weight"] = budget
    if naive_row:
        out[naive_name]["bits per weight"] = bpw(naive)
    return out, {name: str(w) for name, w in chosen.items()}


def tiny_llama(shared: Path = SHARED, rows: dict[int, list[str]] | None = None,
               only: dict[str, set[str]] | None = None) -> dict[str, dict]:
    return _c4_protocol(shared / "assets" / "llmq-tiny-llama", shared,
                        rows or {4: ["RTN", "GPTQ", "Tune", "RTN, e2e 1000"],
                                3: ["RTN", "GPTQ", "GPTQ act-order", "AWQ", "Tune", "RTN, e2e 1000"]},
                        ("WikiText-2", "C4 900-999"), only)


def tiny_moe(shared: Path = SHARED, rows: dict[int, list[str]] | None = None,
             datasets: tuple[str, ...] = ("WikiText-2", "C4 900-999")) -> dict[str, dict]:
    """llmq-tiny-moe (Qwen3-MoE, 8 experts, top-2) under llmq-tiny-llama's protocol; every expert calibrated on
    its routed tokens, starved ones by the default policy."""
    methods = ["RTN", "GPTQ", "GPTQ act-order", "AWQ"]
    return _c4_protocol(shared / "assets" / "llmq-tiny-moe", shared, rows or {4: methods, 3: methods}, datasets)


def markdown(title: str, table: dict[str, dict]) -> str:
    evals = list(dict.fromkeys(e for v in table.values() for e in v))  # every column, in first-seen order
    lines = [f"**{title}**", "", "| | " + " | ".join(evals) + " |", "|---" * (len(evals) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(f"{v[e]:.3f}" if e in v else "" for e in evals) + " |"
              for row, v in table.items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--only", choices=["stories260k", "tiny-llama", "tiny-moe", "mixed"])
    args = p.parse_args()
    tables = {}
    if args.only in (None, "stories260k"):
        tables["stories260K, asym g32, every linear"] = stories260k(args.shared)
    if args.only in (None, "tiny-llama"):
        tables["llmq-tiny-llama, asym g128, seqlen 256"] = tiny_llama(args.shared)
    if args.only in (None, "tiny-moe"):
        tables["llmq-tiny-moe, asym g128, seqlen 256"] = tiny_moe(args.shared)
    if args.only in (None, "mixed"):
        for bits in (3, 2):
            title = f"llmq-tiny-llama mixed precision at W{bits} g64's bits, GPTQ, seqlen 256"
            tables[title], allocation = tiny_llama_mixed(args.shared, bits=bits)
            print(widths_table(allocation) + "\n")
    for title, table in tables.items():
        print(markdown(title, table) + "\n")
    print(json.dumps(tables))


if __name__ == "__main__":
    main()
