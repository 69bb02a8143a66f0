"""Write a quantized model as a packed checkpoint in the GPTQ layout (or AutoAWQ's GEMM layout).

``quantization_config`` carries the keys transformers' GPTQConfig, GPTQModel and vLLM read, and
llmq's own settings under ``meta``. Linears the layout cannot hold (a dimension not a multiple
of 32) were left in full precision by the pipeline; they are listed under ``meta.llmq.unquantized``
and, for GPTQModel/vLLM, as negative ``dynamic`` rules.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from llmq._version import __version__
from llmq.algorithms.quant import QuantizedWeight, natural_g_idx
from llmq.arch import ArchSpec, disk_namer, get_arch, layer_linears, resolve_arch
from llmq.config import QuantConfig
from llmq.errors import ConfigError
from llmq.formats.dynamic import override_rule, skip_rule
from llmq.formats.pack import can_pack, pack_awq, pack_cols, pack_gptq, unpack_cols
from llmq.io.checkpoint import SpoolWriter, atomic_output_dir, half_dtype, parse_size, write_json

log = logging.getLogger(__name__)

FORMATS = ("auto", "gptq", "gptq_v2", "awq")


def choose_format(results: dict[str, QuantizedWeight], requested: str = "auto") -> str:
    """v1 ("gptq") when every zero point is >= 1, else "gptq_v2"; an explicit v1 that cannot be exact is an error."""
    has_zero = any(bool((qw.zeros == 0).any()) for qw in results.values())
    if requested == "auto":
        return "gptq_v2" if has_zero else "gptq"
    if requested not in FORMATS:
        raise ConfigError(f"format {requested!r} is unknown: choose one of {', '.join(FORMATS)}")
    if requested == "gptq" and has_zero:
        raise ConfigError('format "gptq" (v1) cannot store a zero point of 0, which this model has: '
                          'use gptq_v2 or auto')
    return requested


def check_format(fmt: str, cfg: QuantConfig) -> None:
    """Refuse, before any work, a layout that cannot hold what ``cfg`` produces; the message says the fix (GGUF's
    settings: :func:`llmq.formats.gguf.check_gguf_settings`)."""
    if fmt == "gguf":
        return
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is unknown: choose one of {', '.join(FORMATS)}")
    if fmt == "awq":
        if cfg.bits_per_weight is not None:
            raise ConfigError("the AWQ GEMM layout holds one width (4-bit) only, so it cannot hold a mixed-precision "
                              "run (bits_per_weight): use --format auto for the GPTQ layout")
        if cfg.bits != 4:
            raise ConfigError(f"the AWQ GEMM layout holds 4-bit weights only, not bits={cfg.bits}: "
                              "use --bits 4, or --format auto for the GPTQ layout")
        if cfg.group_size <= 0:
            raise ConfigError("the AWQ GEMM layout needs whole groups of a fixed size, not group_size=-1: "
                              "use --group-size 128 (or 64, 32), or --format auto for the GPTQ layout")
        if cfg.act_order and not cfg.static_groups:
            raise ConfigError("act-order groups (a permuted g_idx) cannot be stored in the AWQ GEMM layout: "
                              "add --static-groups, drop --act-order, or use --format auto for the GPTQ layout")
    if fmt == "gptq" and not cfg.sym:
        raise ConfigError('format "gptq" (v1) stores zero - 1 and cannot hold the zero point 0 that an asymmetric '
                          "group of non-negative weights gets: use --format auto (v1 whenever every zero point "
                          "is >= 1, else gptq_v2), --format gptq_v2, or --sym")


def check_layout(fmt: str, cfg: QuantConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse linears (``name -> (out, in)``) that the layout could pack but not in ``cfg``'s groups.

    Linears no layout can hold (a dimension not a multiple of 32) are not refused: they stay in
    full precision, with a warning, as the checkpoint's config says.
    """
    if fmt != "awq":
        return
    bad = {name: k for name, (n, k) in shapes.items() if can_pack(k, n, cfg.bits) and k % cfg.group_size}
    if bad:
        name, k = next(iter(bad.items()))
        divisors = [g for g in (128, 64, 32) if all(v % g == 0 for v in bad.values())]
        raise ConfigError(
            f"group_size={cfg.group_size} does not divide the {k} input features of {name} ({len(bad)} linear(s) "
            "in all), and the AWQ GEMM layout holds whole groups only: use "
            + (f"--group-size {divisors[0]}" if divisors else "another --group-size") + " or --format auto")


def awq_quantization_config(cfg: QuantConfig, unquantized: list[str], recipe: dict[str, Any] | None,
                            notes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The config AutoAWQ writes for its GEMM layout (read by transformers' AwqConfig and vLLM)."""
    qc = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": cfg.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": unquantized or None,
        "meta": {"quantizer": [f"llmq:{__version__}"],
                 "llmq": {"quant": dataclasses.asdict(cfg), "recipe": recipe or {}, "unquantized": unquantized}},
    }
    qc["meta"]["llmq"].update(notes or {})
    return qc


def _awq_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    k = qw.codes.shape[1]
    if qw.bits != 4 or qw.group_size <= 0 or k % qw.group_size:
        raise ConfigError(f"{name}: the AWQ GEMM layout holds 4-bit weights in whole groups only "
                          f"(bits={qw.bits}, group_size={qw.group_size}, in_features={k}); use --format gptq")
    if not torch.equal(qw.g_idx.long().cpu(), natural_g_idx(k, qw.group_size).long()):
        raise ConfigError(f"{name}: act-order groups (a permuted g_idx) cannot be stored in the AWQ layout; "
                          "use --static-groups or --format gptq")
    return pack_awq(qw.codes, qw.zeros, qw.scales)


def quantization_config(
    cfg: QuantConfig, fmt: str, spec: ArchSpec, n_layers: int, unquantized: list[str], recipe: dict[str, Any] | None,
    notes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    qc: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.act_order,
        "sym": cfg.sym,
        "true_sequential": cfg.true_sequential,
        "static_groups": cfg.static_groups,
        "damp_percent": cfg.damp_percent,
        "checkpoint_format": fmt,
        "meta": {
            "quantizer": [f"llmq:{__version__}"],
            "llmq": {"quant": dataclasses.asdict(cfg), "recipe": recipe or {}, "unquantized": unquantized},
        },
    }
    # what the methods noted, by section: "experts" (each expert's calibration tokens and the policy it got,
    # ``LayerJob.expert_policies``), "tune_loss" (each layer's block loss before and after tuning)
    qc["meta"]["llmq"].update(notes or {})
    widths = (notes or {}).get("widths")
    if widths:  # mixed precision: the most common width is the base, the others are positive dynamic rules
        base = Counter(tuple(w.items()) for w in widths.values()).most_common(1)[0][0]
        qc.update(base)
        qc["dynamic"] = {override_rule(name): w for name, w in widths.items() if tuple(w.items()) != base}
    if unquantized:
        qc["dynamic"] = {**{skip_rule(name): {} for name in unquantized}, **qc.get("dynamic", {})}
        depth = len(spec.layers.split(".")) + 1
        in_layer = {name.split(".", depth)[-1] for name in unquantized}
        if spec.moe is None and len(unquantized) == len(in_layer) * n_layers:  # the same linears in every layer
            qc["modules_in_block_to_quantize"] = [
                [n for n in group if n not in in_layer] for group in spec.sequential if set(group) - in_layer
            ]
    return qc


def _v2_zeros_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed raw zero points -> the v1 convention's packed ``zero - 1`` (same shape and dtype)."""
    zeros = unpack_cols(qzeros, bits, qzeros.shape[1] * 32 // bits).to(torch.int64)
    return pack_cols(zeros - 1, bits)


class PackedWriter:
    """Writes a packed checkpoint into a staging folder tensor by tensor, never holding more than one.

    Quantized linears are spooled with raw (v2) zero points; ``close`` settles the format: "auto"
    becomes v1 when no zero point is 0 (known only once every layer is done) and the zero points
    are rewritten on the way into the shards. ``state``/``sync`` make the writer resumable.
    """

    def __init__(self, staging: Path, requested: str, dtype: torch.dtype, bits: int,
                 state: dict[str, Any] | None = None):
        choose_format({}, requested)  # an unknown format fails here, before anything is written
        self.requested, self.dtype, self.bits = requested, dtype, bits
        self.spool = SpoolWriter(staging, state=state["spool"] if state else None)
        self.has_zero = bool(state["has_zero"]) if state else False
        self.bits_of: dict[str, int] = dict(state.get("bits_of", {})) if state else {}  # mixed precision: others

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """A tensor stored as is: floating point in the checkpoint's half dtype."""
        self.spool.add(key, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        if self.requested == "awq":
            packed = _awq_tensors(name, qw)
        else:
            if bool((qw.zeros == 0).any()):
                choose_format({name: qw}, self.requested)  # raises for an explicit v1
                self.has_zero = True
            packed = pack_gptq(qw.codes, qw.scales, qw.zeros, qw.g_idx, qw.bits, "gptq_v2")
            if qw.bits != self.bits:
                self.bits_of[name] = qw.bits
        for suffix, t in packed.items():
            self.spool.add(f"{name}.{suffix}", t)

    @property
    def format(self) -> str:
        if self.requested == "auto":
            return "gptq_v2" if self.has_zero else "gptq"
        return self.requested

    def sync(self) -> dict[str, Any]:
        return {"spool": self.spool.sync(), "has_zero": self.has_zero, "bits_of": self.bits_of}

    def close(self, max_bytes: int) -> str:
        """Write the shards; returns the format they are in."""
        fmt = self.format
        v1 = fmt == "gptq"
        self.spool.close(max_bytes, lambda name, t: _v2_zeros_to_v1(
            t, self.bits_of.get(name.removesuffix(".qzeros"), self.bits)) if v1 and name.endswith(".qzeros") else t)
        return fmt


def write_metadata(staging: Path, config: Any, dtype: torch.dtype, cfg: QuantConfig, fmt: str, n_layers: int,
                   unquantized: list[str], recipe: dict[str, Any] | None, tokenizer: Any = None,
                   generation_config: Any = None, extra: dict[str, Callable[[Path], None]] | None = None,
                   notes: dict[str, Any] | None = None, spec: ArchSpec | None = None) -> None:
    """Everything but the weights: config.json with quantization_config, quantize_config.json, tokenizer.

    ``notes`` (``"section/module name"`` in the model, or a bare module name for section ``experts``) go under
    ``meta.llmq.<section>`` with their checkpoint names.
    ``spec``: the table entry the run used (default: the model_type's own).
    """
    spec = spec or get_arch(config.model_type)
    sections: dict[str, dict[str, Any]] = {}
    for key, value in sorted((notes or {}).items()):
        section, _, name = key.rpartition("/")
        sections.setdefault(section or "experts", {})[spec.to_disk(name)] = value
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    if fmt == "awq":
        qc = awq_quantization_config(cfg, unquantized, recipe, sections)
    else:
        qc = quantization_config(cfg, fmt, spec, n_layers, unquantized, recipe, sections)
    config_dict["quantization_config"] = qc
    write_json(staging / "config.json", config_dict)
    write_json(staging / "quantize_config.json", qc)
    if generation_config is not None:
        generation_config.save_pretrained(staging)
    if tokenizer is not None:
        # transformers records how the tokenizer was fetched (offline mode adds local_files_only);
        # dropping it keeps the output's bytes independent of the environment
        tokenizer.init_kwargs.pop("local_files_only", None)
        tokenizer.save_pretrained(staging)
    for name, write in (extra or {}).items():
        write(staging / name)


def save_packed(
    model: PreTrainedModel,
    tokenizer: Any,
    results: dict[str, QuantizedWeight],
    out: str | Path,
    cfg: QuantConfig,
    recipe: dict[str, Any] | None = None,
    fmt: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    extra: dict[str, Callable[[Path], None]] | None = None,
    dtype: torch.dtype | None = None,
    notes: dict[str, Any] | None = None,
    spec: ArchSpec | None = None,
) -> Path:
    """Pack ``results`` (full module name -> quantized weight) and save with the rest of ``model``.

    Unquantized tensors are stored in ``dtype`` (default: the half dtype of the model's own).
    ``extra`` maps file names to writers for files that go into the same folder, atomically with it.
    ``spec``: the table entry the run used (default: the model's, or one inferred from it).
    """
    spec = spec or resolve_arch(model)
    check_format(fmt, cfg)
    choose_format(results, fmt)  # an impossible explicit format fails before anything is written
    dtype = dtype or half_dtype(next(model.parameters()).dtype, spec.fp16_ok)
    layers = model.get_submodule(spec.layers)
    quantized_params = {f"{name}.weight" for name in results}
    linears = {f"{spec.layers}.{i}.{name}": m for i, layer in enumerate(layers)
               for name, m in layer_linears(layer, spec, model.config, i).items()}
    to_disk = disk_namer(model, spec)
    unquantized = sorted(to_disk(name) for name in linears if name not in results)
    for name in sorted(n for n in linears if n not in results):
        log.warning("%s stays in %s: the GPTQ layout cannot hold its shape %s", name, dtype,
                    tuple(linears[name].weight.shape))
    tied = "lm_head.weight" if getattr(model.config, "tie_word_embeddings", False) else None
    with atomic_output_dir(out, overwrite) as staging:
        writer = PackedWriter(staging, fmt, dtype, cfg.bits)
        for key, tensor in model.state_dict().items():
            if key == tied:
                continue
            if key in quantized_params:
                writer.add_quantized(to_disk(key[: -len(".weight")]), results[key[: -len(".weight")]])
            else:
                writer.add(to_disk(key), tensor)
        fmt = writer.close(parse_size(max_shard_size))
        write_metadata(staging, model.config, dtype, cfg, fmt, len(layers), unquantized,
                       recipe, tokenizer, getattr(model, "generation_config", None), extra, notes, spec)
    return Path(out)
