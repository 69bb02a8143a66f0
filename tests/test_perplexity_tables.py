"""Must-show perplexity tables on the two real models in ../shared (protocol: ../shared/README.md).

The tables come from eval/ppl_table.py, the script that reproduces them outside the tests.
"""

import sys
from pathlib import Path

import pytest
from helpers import SHARED, shared_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import ppl_table  # noqa: E402

pytestmark = pytest.mark.slow


def test_stories260k_gptq_keeps_less_than_rtn_loses_and_tuning_less_than_gptq(report):
    shared_path("assets", "stories260K")
    table = ppl_table.stories260k(SHARED)
    report(ppl_table.markdown("stories260K, asym g32, every linear quantized", table))
    ppl = {row: v["TinyStories"] for row, v in table.items()}

    def kept(row):  # the perplexity increase over FP as a fraction of RTN's at W3
        return (ppl[row] - ppl["FP"]) / (ppl["W3 RTN"] - ppl["FP"])

    report("W3, perplexity increase as a fraction of RTN's: "
           + ", ".join(f"{row[3:]} {kept(row):.3f}" for row in ppl if row.startswith("W3 ") and row != "W3 RTN"))
    assert ppl["FP"] < ppl["W4 GPTQ"] < ppl["W4 RTN"]
    assert kept("W3 GPTQ") <= 0.58
    assert kept("W3 GPTQ act-order") <= 0.48
    # AWQ (issue 4): beats RTN at W4 and W3; combined with GPTQ at least as good as the better of the two
    assert ppl["W4 AWQ"] < ppl["W4 RTN"] and ppl["W3 AWQ"] < ppl["W3 RTN"]
    assert ppl["W3 AWQ+GPTQ"] <= min(ppl["W3 AWQ"], ppl["W3 GPTQ"])
    # issue 16: the coarse-to-fine range search (26 of the 80 shrink factors) loses no perplexity to the full one
    assert ppl["W3 GPTQ"] <= ppl["W3 GPTQ full range search"]

    def of_gptq(bits):  # issue 14: block-wise reconstruction's perplexity increase as a fraction of GPTQ's (400 steps
        # of 16 windows: at the default 4 windows a step the W3 ratio is 0.55-0.63 with the steps' noise, see
        # eval/ppl_table.py)
        return (ppl[f"W{bits} Tune 400 x 16"] - ppl["FP"]) / (ppl[f"W{bits} GPTQ"] - ppl["FP"])

    report(f"tune's perplexity increase as a fraction of GPTQ's: W3 {of_gptq(3):.3f}, W2 {of_gptq(2):.3f}")
    assert of_gptq(3) <= 0.6
    assert of_gptq(2) <= 0.5
    # the end-to-end phase after it (--e2e-steps, llmq.job.e2e: every grid against the whole model's KL to FP on the
    # calibration windows) loses less again on the held-out text: at W2 by 1.05 (12.190 to 11.137); at W3 by 0.09
    # (6.973 to 6.882), near the machines' spread of tune's own W3 row, so that row is eval/ppl_table.py's
    report(f"W2: tune {ppl['W2 Tune 400 x 16']:.3f}, then 200 end-to-end steps {ppl['W2 Tune 400 x 16, e2e 200']:.3f}")
    assert ppl["W2 Tune 400 x 16, e2e 200"] < ppl["W2 Tune 400 x 16"] - 0.3


def test_tiny_llama_gptq_beats_rtn_on_held_out_c4(report):
    shared_path("assets", "llmq-tiny-llama")
    # WikiText-2 (1514 windows, 7x C4's) only for the rows asserted on there; the W4 rows are eval/ppl_table.py's.
    # The tune rows are the next test's (the two run side by side under pytest-xdist).
    table = ppl_table.tiny_llama(SHARED, rows={3: ["RTN", "GPTQ", "GPTQ act-order", "AWQ"]},
                                 only={"WikiText-2": {"FP"}})
    report(ppl_table.markdown("llmq-tiny-llama, asym g128, seqlen 256", table))
    assert table["FP"]["WikiText-2"] == pytest.approx(126.74, abs=0.2)  # training-log.txt: 126.7438
    assert table["W3 GPTQ"]["C4 900-999"] < table["W3 RTN"]["C4 900-999"]
    assert table["W3 GPTQ act-order"]["C4 900-999"] < table["W3 RTN"]["C4 900-999"]
    assert table["W3 AWQ"]["C4 900-999"] < table["W3 RTN"]["C4 900-999"]


def test_tiny_llama_block_tuning_beats_gptq_on_held_out_c4_and_wikitext2(report):
    """Issue 14: block-wise reconstruction beats GPTQ on both held-out sets."""
    shared_path("assets", "llmq-tiny-llama")
    table = ppl_table.tiny_llama(SHARED, rows={3: ["GPTQ", "Tune"]}, only={"WikiText-2": {"W3 GPTQ", "W3 Tune"}})
    report(ppl_table.markdown("llmq-tiny-llama, asym g128, seqlen 256: block-wise reconstruction", table))
    assert table["W3 Tune"]["C4 900-999"] < table["W3 GPTQ"]["C4 900-999"]
    assert table["W3 Tune"]["WikiText-2"] < table["W3 GPTQ"]["WikiText-2"]


def test_tiny_moe_gptq_beats_rtn_on_held_out_c4(report):
    """The rows asserted on; the whole table (W4 and W3, WikiText-2 too) is eval/ppl_table.py --only tiny-moe."""
    shared_path("assets", "llmq-tiny-moe")
    table = ppl_table.tiny_moe(SHARED, rows={3: ["RTN", "GPTQ", "GPTQ act-order", "AWQ"]}, datasets=("C4 900-999",))
    report(ppl_table.markdown("llmq-tiny-moe, asym g128, seqlen 256", table))
    c4 = {row: v["C4 900-999"] for row, v in table.items()}
    assert c4["FP"] == pytest.approx(136.50, abs=0.2)  # ../shared/README.md
    assert c4["FP"] < c4["W3 GPTQ"] < c4["W3 RTN"]
    assert c4["W3 GPTQ act-order"] < c4["W3 RTN"]
    assert c4["W3 AWQ"] < c4["W3 RTN"]


@pytest.mark.parametrize("bits", [2, 3])
def test_tiny_llama_mixed_precision_beats_uniform_and_naive_at_the_same_bits(report, bits):
    """Issue 14: at uniform W3 g64's and W2 g64's effective bits per weight, the automatic allocation has a lower
    held-out C4 perplexity than the uniform width and than W{b} g128 with the leftover spent on the first layers at
    W{b+1} (the naive baseline), and stays within the budget. (At W3, before the allocation's floor kept every
    group at 3 bits or more, auto narrowed layer 2's gate/up to 2 bits and lost to the naive row, 122.450 against
    122.387; with it 122.155, on an AVX512 EPYC. eval/ppl_table.py --only mixed prints the table.)"""
    shared_path("assets", "llmq-tiny-llama")
    table, allocation = ppl_table.tiny_llama_mixed(SHARED, bits=bits)
    report(ppl_table.markdown(f"llmq-tiny-llama mixed precision at W{bits} g64's bits, GPTQ, seqlen 256", table))
    report(ppl_table.widths_table(allocation))
    uniform, *naive, auto = table.values()
    assert auto["bits per weight"] <= uniform["bits per weight"]
    assert auto["C4 900-999"] < uniform["C4 900-999"]
    for row in naive:
        assert row["bits per weight"] <= uniform["bits per weight"]
        assert auto["C4 900-999"] < row["C4 900-999"]
    assert len(set(allocation.values())) > 1  # mixed indeed
