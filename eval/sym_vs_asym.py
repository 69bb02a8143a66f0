"""Symmetric against asymmetric groups at each width, on the two models in ../shared (the measurement
behind llmq's per-width ``sym`` default; protocol of eval/ppl_table.py).

    python eval/sym_vs_asym.py          # markdown tables, then one JSON line

vLLM serves GPTQ checkpoints through its fast Marlin kernels only when they are symmetric 4- or
8-bit; asymmetric ones fall back to its slower GPTQ kernel. This prints what symmetry costs in
perplexity at W8, W4, W3 and W2 for RTN, GPTQ and GPTQ act-order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ppl_table

WIDTHS = (8, 4, 3, 2)


def measure(shared: Path) -> dict[str, dict[str, dict]]:
    rows = {bits: ["RTN", "RTN sym", "GPTQ", "GPTQ sym", "GPTQ act-order", "GPTQ act-order sym"] for bits in WIDTHS}
    return {"stories260K, g32": ppl_table.stories260k(shared, rows),
            "llmq-tiny-llama, g128": ppl_table.tiny_llama(shared, rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=ppl_table.SHARED)
    tables = measure(p.parse_args().shared)
    for title, table in tables.items():
        print(ppl_table.markdown(title, table) + "\n")
    print(json.dumps(tables))


if __name__ == "__main__":
    main()
