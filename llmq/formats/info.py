"""``llmq info``: what a packed checkpoint holds, what it costs on disk, and how vLLM will serve it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

from llmq.errors import CheckpointError
from llmq.formats.dynamic import OVERRIDABLE, module_settings
from llmq.io.checkpoint import shard_files

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "I16": 2, "F64": 8, "BOOL": 1}

# vLLM's Marlin kernels (vllm/model_executor/layers/quantization/gptq_marlin.py, awq_marlin.py and
# utils/marlin_utils.py): GPTQ only symmetric 4- or 8-bit (its uint4b8 / uint8b128 types), AWQ 4-bit
# with zero points; groups of -1/32/64/128; each linear's output a multiple of 64 and input a multiple
# of 128 (GPTQ_MARLIN_MIN_THREAD_N / _K). Anything else runs on vLLM's older GPTQ or AWQ GEMM kernels.
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128


def vllm_kernel(qc: dict[str, Any], linears: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The vLLM kernel family a checkpoint qualifies for (``linears``: quantized ``name -> (out, in)``), and why
    not Marlin when it does not."""
    awq = qc.get("quant_method") == "awq"
    bits, gs = qc.get("bits"), qc.get("group_size")
    why = []
    if awq:
        if not qc.get("zero_point", True):
            why.append("AWQ without zero points")
    else:
        if bits not in (4, 8):
            why.append(f"bits={bits} (Marlin runs 4- and 8-bit)")
        if not qc.get("sym"):
            why.append("asymmetric (Marlin runs symmetric GPTQ only; quantize with --sym)")
    if gs not in MARLIN_GROUP_SIZES:
        why.append(f"group_size={gs} (Marlin takes -1, 32, 64 or 128)")
    bad = [name for name, (n, k) in linears.items() if n % MARLIN_MIN_N or k % MARLIN_MIN_K]
    if bad:
        n, k = linears[bad[0]]
        why.append(f"{len(bad)} linear(s) such as {bad[0]} ({n} x {k}) need out % {MARLIN_MIN_N} == 0 and "
                   f"in % {MARLIN_MIN_K} == 0")
    partial = [name for name, (_, k) in linears.items() if gs and gs > 0 and k % gs]
    notes = []
    if partial:
        notes.append(f"{len(partial)} linear(s) such as {partial[0]} end in a partial group, which vLLM refuses")
    if not awq and qc.get("checkpoint_format") == "gptq_v2" and why:
        notes.append("gptq_v2 zero points: vLLM's GPTQ kernel has read them as v1 (vllm issue 26343); check that "
                     "your vLLM reads gptq_v2, or quantize with --sym")
    family = ("awq" if awq else "gptq") if why else ("awq_marlin" if awq else "gptq_marlin")
    return {"kernel": family, "why_not_marlin": why, "notes": notes}


def _vllm_kernel_by_width(qc: dict[str, Any], linears: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """:func:`vllm_kernel` for a checkpoint whose ``dynamic`` rules give linears other widths: Marlin only when
    every width qualifies (vLLM chooses gptq_marlin from the base width, then refuses a layer it cannot run)."""
    by_width: dict[tuple, dict[str, tuple[int, int]]] = {}
    for name, shape in linears.items():
        settings = module_settings(qc, name) or qc
        by_width.setdefault(tuple(settings.get(k) for k in OVERRIDABLE), {})[name] = shape
    if len(by_width) <= 1:
        return vllm_kernel(qc, linears)
    parts = {key: vllm_kernel({**qc, **dict(zip(OVERRIDABLE, key, strict=True))}, group)
             for key, group in sorted(by_width.items())}
    if all(not p["why_not_marlin"] for p in parts.values()):
        return {"kernel": "gptq_marlin", "why_not_marlin": [], "notes": [n for p in parts.values() for n in p["notes"]]}
    why = [f"{b}g{g}: {w}" for (b, g, *_), p in parts.items() for w in p["why_not_marlin"]]
    notes = [n for p in parts.values() for n in p["notes"]]
    notes.append("mixed widths: serve with vLLM's gptq kernel (quantization='gptq'); its Marlin path refuses the "
                 "widths listed")
    return {"kernel": "gptq", "why_not_marlin": why, "notes": notes}


def vllm_moe_kernel(qc: dict[str, Any], experts: dict[str, tuple[int, int]], hidden: int) -> dict[str, Any] | None:
    """How vLLM's fused-MoE layer would serve the experts (``experts``: quantized expert linears ``name -> (out,
    in)``; None when there are none). Its GPTQ Marlin MoE method takes symmetric 4/8-bit only, act-order
    included, with the hidden size a multiple of 128 and the expert width of max(64, group) (gptq_marlin.py,
    marlin_utils.check_moe_marlin_supports_layer); otherwise it falls back to MoeWNA16, which ignores g_idx
    and, from a GPTQ config, assumes symmetric weights (gptq.py ``get_quant_method``)."""
    if not experts:
        return None
    bits, gs, sym = qc.get("bits"), qc.get("group_size"), qc.get("sym")
    inter = {d for shape in experts.values() for d in shape} - {hidden}
    why = []
    if qc.get("quant_method") == "awq":
        why.append("AWQ layout (vLLM serves AWQ MoE through its own awq_marlin MoE path; check your version)")
    if bits not in (4, 8):
        why.append(f"bits={bits}")
    if not sym:
        why.append("asymmetric")
    if gs not in MARLIN_GROUP_SIZES:
        why.append(f"group_size={gs}")
    if hidden % 128 or any(i % max(64, gs or 0) for i in inter):
        why.append(f"hidden {hidden} not a multiple of 128 or expert width {sorted(inter)} not of {max(64, gs or 0)}")
    notes = []
    if qc.get("quant_method") != "awq" and not why:
        return {"kernel": "gptq_marlin (fused MoE)", "why_not_marlin": [], "notes": notes}
    if bits not in (4, 8):
        notes.append(f"vLLM's fused MoE kernels take 4- or 8-bit experts only: {bits}-bit experts are not served")
    elif not sym and qc.get("quant_method") != "awq":
        notes.append("vLLM's GPTQ fallback for MoE (MoeWNA16) assumes symmetric weights and would decode these "
                     "experts wrongly: quantize MoE models with --sym to serve them in vLLM")
    if qc.get("desc_act"):
        notes.append("act-order g_idx is ignored by the MoeWNA16 fallback")
    return {"kernel": "moe_wna16" if bits in (4, 8) else "none", "why_not_marlin": why, "notes": notes}


def checkpoint_info(folder: str | Path) -> dict[str, Any]:
    """Method, bits, group size, effective bits per quantized weight (scales and zeros counted),
    size on disk against FP16, and the linears left unquantized."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a checkpoint folder")
    config = json.loads(config_path.read_text())
    qc = config.get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{config_path} has no quantization_config: not a quantized checkpoint")
    quant_bytes = quant_weights = fp16_bytes = disk = 0
    linears: dict[str, tuple[int, int]] = {}
    widths: Counter[tuple[int, int, bool]] = Counter()  # (bits, group size, sym) -> weights at that width
    width_linears: Counter[tuple[int, int, bool]] = Counter()
    for key, path in shard_files(folder).items():
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice(key)
            shape, dtype = sl.get_shape(), sl.get_dtype()
        n = 1
        for d in shape:
            n *= d
        nbytes = n * _BYTES.get(dtype, 4)
        disk += nbytes
        module, _, suffix = key.rpartition(".")
        if suffix in ("qweight", "qzeros", "scales", "g_idx"):
            quant_bytes += nbytes
            if suffix == "qweight":
                if qc.get("quant_method") == "awq":  # [in, out / 8]
                    linears[module] = (shape[1] * 8, shape[0])
                else:  # [in * bits / 32, out]
                    settings = module_settings(qc, module) or qc
                    linears[module] = (shape[1], shape[0] * 32 // settings["bits"])
                    width = (settings["bits"], settings["group_size"], settings["sym"])
                    widths[width] += linears[module][0] * linears[module][1]
                    width_linears[width] += 1
                weights = linears[module][0] * linears[module][1]
                quant_weights += weights
                fp16_bytes += 2 * weights
        else:
            fp16_bytes += 2 * n if dtype in ("F16", "BF16", "F32") else nbytes
    meta = qc.get("meta", {}).get("llmq", {})
    return {
        "checkpoint": str(folder),
        "method": meta.get("quant", {}).get("method", qc.get("quant_method")),
        "quant_method": qc.get("quant_method"),
        "checkpoint_format": qc.get("checkpoint_format", "gptq"),
        "bits": qc.get("bits"),
        "group_size": qc.get("group_size"),
        "sym": qc.get("sym"),
        "act_order": qc.get("desc_act"),
        "effective_bits_per_weight": 8 * quant_bytes / quant_weights if quant_weights else None,
        "quantized_weights": quant_weights,
        "tensor_bytes": disk,
        "fp16_bytes": fp16_bytes,
        "size_vs_fp16": disk / fp16_bytes if fp16_bytes else None,
        "unquantized": meta.get("unquantized", []),
        "allocation": meta.get("widths", {}),  # a mixed-precision run's width of every linear
        # each width's linears and share of the quantized weights: one entry unless mixed precision
        "widths": [{"bits": b, "group_size": g, "sym": sym, "linears": width_linears[b, g, sym],
                    "share": n / quant_weights} for (b, g, sym), n in sorted(widths.items())],
        "vllm": _vllm_kernel_by_width(qc, {n: s for n, s in linears.items() if ".experts." not in n}),
        # checkpoints name each expert's linears ...experts.E.<linear>, as vLLM's expert mapping expects
        "vllm_moe": vllm_moe_kernel(qc, {n: s for n, s in linears.items() if ".experts." in n},
                                    config.get("hidden_size", 0)),
    }


def kernel_info(choices: dict[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    """What a load chose (``model.llmq_kernels``): kernels by count, and each reason a faster one was passed over."""
    counts = Counter(c.kernel for c in choices.values())
    reasons = Counter((c.kernel, c.reason) for c in choices.values() if c.reason and c.reason != "forced")
    example: dict[tuple[str, str], str] = {}
    for name, c in choices.items():
        example.setdefault((c.kernel, c.reason), name)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "kernels": dict(counts.most_common()),
            "passed_over": [{"kernel": k, "linears": n, "reason": r, "example": example[(k, r)]}
                            for (k, r), n in reasons.most_common()]}


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"checkpoint        {info['checkpoint']}",
        f"method            {info['method']} ({info['quant_method']}, {info['checkpoint_format']})",
        f"bits / group      {info['bits']} / {info['group_size']}  sym={info['sym']} act_order={info['act_order']}",
        f"bits per weight   {info['effective_bits_per_weight']:.3f} (scales, zeros and g_idx counted)",
        f"size              {info['tensor_bytes'] / 1e6:.2f} MB vs {info['fp16_bytes'] / 1e6:.2f} MB in FP16 "
        f"({info['size_vs_fp16']:.1%})",
        f"unquantized       {', '.join(info['unquantized']) or 'none'}",
    ]
    if len(info.get("widths", [])) > 1:
        lines.append("widths            " + "; ".join(
            f"{w['bits']}g{w['group_size']} {'sym' if w['sym'] else 'asym'}: {w['linears']} linears, "
            f"{w['share']:.1%} of weights" for w in info["widths"]))
    lines += [
        f"vLLM kernel       {info['vllm']['kernel']}"
        + (f" (not Marlin: {'; '.join(info['vllm']['why_not_marlin'])})" if info["vllm"]["why_not_marlin"] else ""),
    ]
    lines += [f"                  note: {note}" for note in info["vllm"]["notes"]]
    moe = info.get("vllm_moe")
    if moe:
        lines.append(f"vLLM MoE kernel   {moe['kernel']}" + (
            f" (not Marlin: {'; '.join(moe['why_not_marlin'])})" if moe["why_not_marlin"] else ""))
        lines += [f"                  note: {note}" for note in moe["notes"]]
    if "load" in info:
        load = info["load"]
        lines.append(f"loaded on         {load['device']} in {load['dtype']}: "
                     + ", ".join(f"{n} x {k}" for k, n in load["kernels"].items()))
        lines += [f"                  {p['linears']} on {p['kernel']} (e.g. {p['example']}): {p['reason']}"
                  for p in load["passed_over"]]
    return "\n".join(lines)
