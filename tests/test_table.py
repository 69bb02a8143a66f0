"""`llmq table` (issue 15): the grid, its outputs, resumption after a kill, and the recipes in recipes/."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import shared_path

from llmq.cli import main as cli_main
from llmq.errors import ConfigError
from llmq.eval.table import PLOT_DPI, PLOT_INCHES, Cell, TableSpec, grid, markdown, parse_methods, plot

REPO = Path(__file__).resolve().parents[1]


def table_args(out: Path) -> list[str]:
    text = shared_path("assets", "tinystories-text")
    return ["table", str(shared_path("assets", "stories260K")), "--methods", "rtn,gptq", "--bits", "4,3",
            "--group-sizes", "32", "--datasets", str(text / "tinystories_sample.cs336.txt"), "--seqlen", "128",
            "--calib", str(text / "TinyStories-valid.Ahmedessaa-30k.txt"), "--nsamples", "16", "--calib-seqlen",
            "128", "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "full"
    assert cli_main([*table_args(out), "--keep-checkpoints"]) == 0
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_the_table_writes_its_outputs_and_its_numbers_are_llmq_ppl_on_the_cells_checkpoints(uninterrupted, capsys):
    out = uninterrupted
    rows = records(out)
    assert [r["name"] for r in rows] == ["FP", "W4 g32 RTN", "W4 g32 GPTQ", "W3 g32 RTN", "W3 g32 GPTQ"]
    ppl = {r["name"]: r["metrics"]["tinystories_sample.cs336"] for r in rows}
    assert ppl["FP"] < ppl["W3 g32 GPTQ"] < ppl["W3 g32 RTN"] and ppl["W4 g32 GPTQ"] < ppl["W4 g32 RTN"]
    dataset = str(shared_path("assets", "tinystories-text", "tinystories_sample.cs336.txt"))
    for r in rows:
        folder = shared_path("assets", "stories260K") if r["name"] == "FP" else \
            out / "checkpoints" / Cell(**{**r["cell"], "extra": ()}).slug
        capsys.readouterr()
        assert cli_main(["ppl", str(folder), "--dataset", dataset, "--seqlen", "128", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["ppl"] == ppl[r["name"]], r["name"]
    md = (out / "table.md").read_text()
    assert md.index("| FP |") < md.index("| W4 g32 RTN |")
    assert f"**{ppl['W4 g32 GPTQ']:.3f}**" in md  # the best quantized value of the column in bold
    with (out / "table.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [float(row["tinystories_sample.cs336"]) for row in table] == pytest.approx(list(ppl.values()), abs=1e-4)
    assert float(table[3]["bits_per_weight"]) < float(table[1]["bits_per_weight"]) < 16  # W3 < W4 < FP
    import matplotlib.image

    image = matplotlib.image.imread(out / "plot.png")
    assert image.shape[:2] == (PLOT_INCHES[1] * PLOT_DPI, PLOT_INCHES[0] * PLOT_DPI)  # one dataset: one panel


def test_a_table_killed_after_its_first_cell_skips_it_and_ends_with_the_same_table(uninterrupted, tmp_path, caplog):
    out = tmp_path / "killed"
    # the second cell_done: after the FP row and the first quantized cell
    proc = subprocess.run([sys.executable, "-m", "llmq.cli", *table_args(out)], capture_output=True, text=True,
                          env={**os.environ, "LLMQ_KILL_AT": "table.cell_done@2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [r["name"] for r in records(out)] == ["FP", "W4 g32 RTN"]
    assert not (out / "table.md").exists()
    with caplog.at_level(logging.INFO, logger="llmq.eval.table"):
        assert cli_main(table_args(out)) == 0
    skipped = [r.getMessage() for r in caplog.records if "finished in an earlier run" in r.getMessage()]
    assert skipped == ["FP: finished in an earlier run, skipped", "W4 g32 RTN: finished in an earlier run, skipped"]
    assert [r["name"] for r in records(out)] == [r["name"] for r in records(uninterrupted)]  # nothing twice
    assert (out / "table.md").read_text() == (uninterrupted / "table.md").read_text()
    assert (out / "table.csv").read_text() == (uninterrupted / "table.csv").read_text()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # not kept


def test_methods_carry_recipe_keys_and_bad_cells_fail_before_any_runs():
    assert parse_methods("rtn, gptq:act_order=true:damp_percent=0.1") == [
        ("rtn", {}), ("gptq", {"act_order": True, "damp_percent": 0.1})]
    cells = grid("gptq:act_order=true,awq", "4,3", "128,-1")
    assert cells[0] == Cell() and len(cells) == 1 + 2 * 2 * 2
    assert cells[1].name == "W4 g128 GPTQ act_order=true" and cells[1].slug == "gptq-act_order=true-w4g128"
    with pytest.raises(ConfigError, match="unknown method 'gptqq'"):
        parse_methods("gptqq")
    with pytest.raises(ConfigError, match="key=value"):
        parse_methods("gptq:act_order")
    with pytest.raises(ConfigError, match="unknown recipe key"):  # validated before the first cell
        TableSpec.from_dict({"model": "m", "methods": "gptq:act_ordr=true"})
    with pytest.raises(ConfigError, match="unknown table recipe key"):
        TableSpec.from_dict({"model": "m", "method": "gptq"})


def test_without_matplotlib_the_table_is_written_and_the_plot_skipped(monkeypatch, tmp_path, caplog):
    rows = [{"name": "FP", "cell": {"method": "fp", "bits": None, "group_size": None, "extra": []},
             "bits_per_weight": 16.0, "metrics": {"wikitext2": 5.47}}]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with caplog.at_level(logging.WARNING, logger="llmq.eval.table"):
        assert plot(rows, tmp_path / "plot.png") is False
    assert "pip install matplotlib" in caplog.text and not (tmp_path / "plot.png").exists()
    assert "| FP | 5.470 | 16.000 |" in markdown(rows)


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "tables").glob("*.yaml")), ids=lambda p: p.name)
def test_every_table_recipe_validates(path):
    spec = TableSpec.from_yaml(path)
    assert len(spec.cells()) > 1 and spec.datasets


def test_a_cell_with_the_end_to_end_phase_is_quantized_in_memory_and_measured(tmp_path):
    """``llmq table`` streams its cells, but one with ``e2e_steps`` needs the whole model: it is quantized in memory
    (as ``llmq quantize --e2e-steps`` does) rather than refused, and its checkpoint records the phase's KL."""
    out = tmp_path / "t"
    args = table_args(out)
    args[args.index("--methods") + 1] = "tune:tune_iters=5:e2e_steps=10"
    args[args.index("--bits") + 1] = "3"
    assert cli_main([*args, "--keep-checkpoints"]) == 0
    rows = records(out)
    assert [r["name"] for r in rows][0] == "FP" and len(rows) == 2
    ppl = {r["name"]: r["metrics"]["tinystories_sample.cs336"] for r in rows}
    quantized = rows[1]
    assert ppl["FP"] < ppl[quantized["name"]]
    cell = Cell(**{**quantized["cell"], "extra": tuple(map(tuple, quantized["cell"]["extra"]))})
    folder = out / "checkpoints" / cell.slug
    kl = json.loads((folder / "config.json").read_text())["quantization_config"]["meta"]["llmq"]["e2e"]["kl"]
    assert kl["after"] < kl["before"]
