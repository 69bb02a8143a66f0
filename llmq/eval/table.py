"""Perplexity tables for any model (``llmq table``): the papers' grid of methods x widths x group sizes,
datasets as columns, the FP row first.

A table is a list of :class:`Cell` measured one at a time; each result is appended to ``results.jsonl`` as
soon as it is known (with a key that hashes the cell and every setting that changes its numbers), so a rerun
after a kill skips the finished cells and redoes the unfinished one (whose streamed quantization itself
resumes from its last committed layer). How a cell is measured is a function given to :func:`run_cells`:
:func:`checkpoint_measure` quantizes to a packed checkpoint and evaluates it as ``llmq ppl`` would; the
scripts in ``eval/`` measure in memory. :func:`write_outputs` writes ``table.md``, ``table.csv`` and
``plot.png`` (perplexity against effective bits per weight, drawn with matplotlib).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from llmq.config import METHODS, Recipe
from llmq.errors import ConfigError
from llmq.utils.killpoints import kill_point

log = logging.getLogger(__name__)

FP = "fp"
RESULTS = "results.jsonl"
PLOT_INCHES = (6.4, 4.8)  # per dataset panel, at PLOT_DPI: plot.png is 640 * datasets x 480 pixels
PLOT_DPI = 100


@dataclass(frozen=True)
class Cell:
    """One row of the table: a method (with extra recipe keys) at a width and group size, or the FP model."""

    method: str = FP
    bits: int | None = None
    group_size: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # recipe keys of ``gptq:act_order=true``, sorted

    @property
    def is_fp(self) -> bool:
        return self.method == FP

    @property
    def label(self) -> str:
        """The method and its extra keys, as one line of the plot: ``GPTQ act_order=true``."""
        if self.is_fp:
            return "FP"
        return " ".join([self.method.upper(), *(f"{k}={_text(v)}" for k, v in self.extra)])

    @property
    def name(self) -> str:
        return "FP" if self.is_fp else f"W{self.bits} g{self.group_size} {self.label}"

    @property
    def slug(self) -> str:
        """A folder name for the cell's checkpoint."""
        if self.is_fp:
            return FP
        extra = "".join(f"-{k}={_text(v)}" for k, v in self.extra)
        return f"{self.method.replace('+', '_')}{extra}-w{self.bits}g{self.group_size}"

    def recipe_keys(self) -> dict[str, Any]:
        return {} if self.is_fp else {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                                      **dict(self.extra)}


def _text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def parse_methods(spec: str | Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``"rtn,gptq,gptq:act_order=true:sym=false"`` -> ``[("rtn", {}), ("gptq", {}), ("gptq", {"act_order": True,
    "sym": False})]``; values are YAML scalars. Any method of :data:`llmq.config.METHODS` is a value."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    out = []
    for item in filter(None, items):
        method, *pairs = item.split(":")
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r} in --methods: choose among {', '.join(METHODS)}, each "
                              "optionally with recipe keys, e.g. gptq:act_order=true")
        extra = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise ConfigError(f"{item!r}: extra keys are written key=value after the method, e.g. "
                                  "gptq:act_order=true")
            extra[key.strip().replace("-", "_")] = yaml.safe_load(value)
        out.append((method, extra))
    if not out:
        raise ConfigError("--methods names no method: give e.g. rtn,gptq,awq")
    return out


def _ints(spec: str | int | Sequence[int], what: str) -> list[int]:
    items = spec.split(",") if isinstance(spec, str) else [spec] if isinstance(spec, int) else list(spec)
    try:
        return [int(v) for v in items if str(v).strip()]
    except ValueError:
        raise ConfigError(f"--{what} takes comma-separated integers, not {spec!r}") from None


def grid(methods: str | Sequence[str], bits: str | Sequence[int], group_sizes: str | Sequence[int]) -> list[Cell]:
    """The FP row, then each width (descending) x group size x method, as the papers print them."""
    methods = parse_methods(methods)
    return [Cell()] + [Cell(method, b, g, tuple(sorted(extra.items())))
                       for b in sorted(_ints(bits, "bits"), reverse=True) for g in _ints(group_sizes, "group-sizes")
                       for method, extra in methods]


def check_cells(cells: list[Cell], base: dict[str, Any]) -> None:
    """Every cell's recipe, validated before any cell runs (a typo in an extra key fails here, not after hours)."""
    for cell in cells:
        if not cell.is_fp:
            Recipe.from_dict({"model": "-", **base, **cell.recipe_keys()})


def cell_key(cell: Cell, settings: dict[str, Any]) -> str:
    """What identifies a finished cell in ``results.jsonl``: the cell and the settings, hashed."""
    blob = json.dumps({"cell": dataclasses.asdict(cell), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Finished cells by key; a torn last line (a kill while appending) is ignored."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[record["key"]] = record
    return out


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


Measure = Callable[[Cell], dict[str, Any]]  # cell -> {"bits_per_weight": x, "metrics": {column: value}}


def run_cells(cells: list[Cell], measure: Measure, settings: dict[str, Any], results: Path | None = None,
              desc: str = "table") -> list[dict[str, Any]]:
    """Each cell's record (``name``, ``cell``, ``bits_per_weight``, ``metrics``, ``seconds``), in order.

    With ``results``, finished cells (same key) are read from it and skipped, and each new record is appended
    as soon as it is measured."""
    done = read_results(results) if results is not None else {}
    records = []
    bar = tqdm(cells, desc=desc, unit="cell")
    for cell in bar:
        bar.set_postfix_str(cell.name)
        key = cell_key(cell, settings)
        if key in done:
            log.info("%s: finished in an earlier run, skipped", cell.name)
            records.append(done[key])
            continue
        start = time.perf_counter()
        measured = measure(cell)
        record = {"key": key, "name": cell.name, "cell": dataclasses.asdict(cell), **measured,
                  "seconds": round(time.perf_counter() - start, 1)}
        record = json.loads(json.dumps(record, sort_keys=True))  # as a rerun reads it back: the same outputs
        log.info("%s: %s", cell.name, ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items()))
        if results is not None:
            _append(results, record)
        kill_point("table.cell_done")
        records.append(record)
    return records


def checkpoint_measure(model: str, base: dict[str, Any], datasets: list[str], seqlen: int, out: Path,
                       keep_checkpoints: bool = False, device: str | None = None, tasks: Sequence[str] = (),
                       include_path: str | None = None, revision: str | None = None) -> Measure:
    """Measure a cell as a user would: quantize to a packed checkpoint in ``out/checkpoints/<cell>`` (streamed, so
    a killed cell's partial run resumes; in memory with an end-to-end phase), load it and evaluate it exactly as
    ``llmq ppl`` (and ``llmq eval`` for ``tasks``) do. The FP row evaluates the model itself. Checkpoints are
    removed afterwards unless kept."""
    from llmq.eval.ppl import perplexity, run_lm_eval
    from llmq.formats.info import checkpoint_info
    from llmq.io.data import eval_windows
    from llmq.job.runner import write_quantized
    from llmq.runtime.loader import load_model
    from llmq.utils.device import resolve_device

    dev = resolve_device(device)
    windows: dict[str, Any] = {}

    def measure(cell: Cell) -> dict[str, Any]:
        folder, bpw = model, 16.0
        if not cell.is_fp:
            folder = str(out / "checkpoints" / cell.slug)
            if not (Path(folder) / "config.json").is_file():  # a finished checkpoint appears whole, or not at all
                write_quantized(Recipe.from_dict({**base, **cell.recipe_keys(), "model": model, "out": folder,
                                                   "revision": revision}))
            bpw = checkpoint_info(folder)["effective_bits_per_weight"]
        m, tokenizer = load_model(folder, revision=revision if cell.is_fp else None, device=dev)
        metrics = {}
        for ds in datasets:
            if ds not in windows:
                windows[ds] = eval_windows(ds, tokenizer, seqlen)
            metrics[dataset_column(ds)] = perplexity(m, windows[ds], device=dev, progress=False)["ppl"]
        if tasks:
            results = run_lm_eval(m, tokenizer, list(tasks), include_path=include_path, device=str(dev))["results"]
            metrics.update(_task_metrics(results))
        if not cell.is_fp and not keep_checkpoints:
            shutil.rmtree(folder)
        return {"bits_per_weight": bpw, "metrics": metrics}
    return measure


def dataset_column(dataset: str) -> str:
    """A dataset's column: its name (``wikitext2``), or a local file's name without folder and suffix."""
    return Path(dataset).stem if os.sep in dataset or Path(dataset).suffix else dataset


def _task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """One column per lm-eval task: its accuracy (``acc,none``; else ``acc_norm,none``, else its first metric)."""
    out = {}
    for task, metrics in results.items():
        for name in ("acc,none", "acc_norm,none", *metrics):
            if isinstance(metrics.get(name), (int, float)) and not name.endswith("_stderr,none"):
                out[f"{task} {name.split(',')[0]}"] = float(metrics[name])
                break
    return out


def _columns(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(c for r in records for c in r["metrics"]))


def _lower_is_better(column: str) -> bool:
    return not column.endswith((" acc", " acc_norm"))


def markdown(records: list[dict[str, Any]], title: str | None = None) -> str:
    """The papers' layout: a row per cell (FP first), a column per dataset (and task), bits per weight; the best
    quantized value of each column in bold."""
    columns = _columns(records)
    best = {}
    for c in columns:
        values = [r["metrics"][c] for r in records if r["cell"]["method"] != FP and c in r["metrics"]]
        if values:
            best[c] = min(values) if _lower_is_better(c) else max(values)
    lines = ([f"**{title}**", ""] if title else []) + [
        "| | " + " | ".join(columns) + " | bits per weight |", "|---" * (len(columns) + 2) + "|"]
    for r in records:
        cells = []
        for c in columns:
            v = r["metrics"].get(c)
            text = "" if v is None else f"{v:.3f}"
            cells.append(f"**{text}**" if v is not None and r["cell"]["method"] != FP and v == best.get(c) else text)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['bits_per_weight']:.3f} |")
    return "\n".join(lines)


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    columns = _columns(records)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "method", "bits", "group_size", "extra", "bits_per_weight", *columns])
        for r in records:
            cell = r["cell"]
            w.writerow([r["name"], cell["method"], cell["bits"], cell["group_size"],
                        ";".join(f"{k}={_text(v)}" for k, v in cell["extra"]), f"{r['bits_per_weight']:.4f}",
                        *(f"{r['metrics'][c]:.4f}" if c in r["metrics"] else "" for c in columns)])


def plot(records: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Perplexity (log scale) against effective bits per weight, a panel per dataset, a line per method, FP as
    a horizontal line; ``PLOT_INCHES`` per panel at ``PLOT_DPI``. False (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log.warning("matplotlib is not installed: %s not written (pip install matplotlib)", path.name)
        return False
    columns = [c for c in _columns(records) if _lower_is_better(c)]
    fig, axes = plt.subplots(1, len(columns), figsize=(PLOT_INCHES[0] * len(columns), PLOT_INCHES[1]),
                             dpi=PLOT_DPI, squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in records:
            if column not in r["metrics"]:
                continue
            if r["cell"]["method"] == FP:
                ax.axhline(r["metrics"][column], color="black", linestyle="--", linewidth=1, label="FP")
            else:
                lines.setdefault(Cell(**{**r["cell"], "extra": tuple(map(tuple, r["cell"]["extra"]))}).label,
                                 []).append((r["bits_per_weight"], r["metrics"][column]))
        for label, points in lines.items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # plain numbers, not 6 x 10^0
            axis(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(column)
        ax.set_xlabel("effective bits per weight (scales and zeros counted)")
        ax.set_ylabel("perplexity (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return True


def write_outputs(records: list[dict[str, Any]], out: Path, title: str = "") -> list[Path]:
    """``table.md``, ``table.csv`` and (with matplotlib) ``plot.png`` in ``out``; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(records, title or None) + "\n")
    write_csv(records, out / "table.csv")
    written = [out / "table.md", out / "table.csv"]
    if plot(records, out / "plot.png", title):
        written.append(out / "plot.png")
    return written


# keys of a table recipe (``llmq table --recipe recipes/tables/x.yaml``); ``quantize`` holds the quantize
# recipe keys every cell starts from
TABLE_KEYS = ("model", "methods", "bits", "group_sizes", "datasets", "seqlen", "tasks", "quantize", "revision")


@dataclass(frozen=True)
class TableSpec:
    model: str
    methods: str = "rtn,gptq,awq"
    bits: str = "4,3"
    group_sizes: str = "128"
    datasets: str = "wikitext2,c4"
    seqlen: int = 2048  # evaluation windows
    tasks: str = ""
    quantize: dict[str, Any] = dataclasses.field(default_factory=dict)  # base recipe keys (calib, nsamples, ...)
    revision: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TableSpec:
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(raw) - set(TABLE_KEYS))
        if unknown:
            raise ConfigError(f"unknown table recipe key(s) {', '.join(unknown)}; known keys: {', '.join(TABLE_KEYS)} "
                              "(quantize recipe keys go under `quantize:`)")
        if "model" not in raw:
            raise ConfigError("the table recipe names no model: add `model: <hub id or local folder>`")
        joined = {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in raw.items()
                  if k != "quantize"}
        spec = cls(**{**joined, "model": str(raw["model"]), "quantize": dict(raw.get("quantize") or {})})
        check_cells(spec.cells(), spec.quantize)
        return spec

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TableSpec:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"table recipe {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"table recipe {path} must be a YAML mapping")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw)

    def cells(self) -> list[Cell]:
        return grid(self.methods, self.bits, self.group_sizes)

    def settings(self) -> dict[str, Any]:
        """What changes a cell's numbers besides the cell itself."""
        return {"model": self.model, "revision": self.revision, "datasets": self.datasets, "seqlen": self.seqlen,
                "tasks": self.tasks, "quantize": self.quantize}


def run_table(spec: TableSpec, out: str | Path, keep_checkpoints: bool = False, device: str | None = None,
              include_path: str | None = None) -> list[dict[str, Any]]:
    """``llmq table``: every cell of ``spec`` (resumably, into ``out/results.jsonl``), then the outputs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in spec.datasets.split(",") if d.strip()]
    tasks = [t for t in spec.tasks.split(",") if t.strip()]
    measure = checkpoint_measure(spec.model, spec.quantize, datasets, spec.seqlen, out, keep_checkpoints, device,
                                 tasks, include_path, spec.revision)
    records = run_cells(spec.cells(), measure, spec.settings(), out / RESULTS)
    name = spec.model if not Path(spec.model).is_dir() else Path(spec.model).resolve().name
    write_outputs(records, out, title=f"{name}, seqlen {spec.seqlen}")
    return records
