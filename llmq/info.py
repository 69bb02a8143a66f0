"""``llmq info``: what a packed checkpoint holds, and what it costs on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .checkpoint import shard_files
from .errors import CheckpointError

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "I16": 2, "F64": 8, "BOOL": 1}


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
                weights = shape[0] * 32 // qc["bits"] * shape[1]
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
    }


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
    return "\n".join(lines)
