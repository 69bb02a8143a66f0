"""The quantization job end to end: load a model, draw calibration windows, quantize, save.

This is what ``llmq quantize`` and the Python API run; each step is also usable on its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .arch import get_arch
from .config import Recipe
from .data import get_calibration
from .errors import CheckpointError, ConfigError
from .export import save_packed
from .loader import from_pretrained
from .pack import can_pack
from .pipeline import LayerResults, quantize_layers

log = logging.getLogger(__name__)

AWQ_SEARCH_FILE = "awq_search.safetensors"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_model_source(name_or_path: str) -> None:
    """Fail early, with the fix, when a local model path does not exist.

    Hub ids (``org/name``) are left to transformers, which reads them from the hub or its cache.
    """
    path = Path(name_or_path)
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: point at a transformers model folder")
        return
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or path.suffix
    if looks_local:
        raise CheckpointError(
            f"model path {name_or_path} does not exist: give a local transformers model folder "
            "or a Hugging Face hub id such as meta-llama/Llama-2-7b-hf"
        )


def load_model(
    name_or_path: str, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, object]:
    """A causal LM on the CPU and its tokenizer; the architecture is checked before any weight loads.

    A quantized checkpoint (``quantization_config`` in its config) loads packed through
    :func:`llmq.from_pretrained`; anything else through transformers.
    """
    check_model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise CheckpointError(f"cannot load a model config from {name_or_path}: {e}") from e
    get_arch(config.model_type)
    if getattr(config, "quantization_config", None) is not None:
        model = from_pretrained(name_or_path, torch_dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
                                trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype or "auto", trust_remote_code=trust_remote_code
        )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return model, tokenizer


class Quantized(NamedTuple):
    model: PreTrainedModel  # weights replaced by their quantized values
    tokenizer: Any
    results: LayerResults  # full module name -> codes and quantization parameters
    awq: dict[str, torch.Tensor]  # AWQ search results (scales, clips) by name; empty for other methods


def quantize(recipe: Recipe, packable_only: bool = True) -> Quantized:
    """Run ``recipe``.

    With ``packable_only``, linears whose shape the output layout cannot hold stay in full
    precision, so the in-memory model is exactly the one the packed checkpoint decodes to.
    """
    model, tokenizer = load_model(recipe.model, trust_remote_code=recipe.trust_remote_code)
    c = recipe.calib
    if recipe.quant.method == "rtn":
        calib = torch.zeros(1, 2, dtype=torch.long)  # RTN reads no data; one dummy window fills the pipeline
    else:
        calib = get_calibration(c.calib, tokenizer, c.nsamples, c.seqlen, c.seed)
    bits, gs, awq_format = recipe.quant.bits, recipe.quant.group_size, recipe.format == "awq"

    def keep_fp(name: str, m: torch.nn.Linear) -> bool:
        return not can_pack(m.in_features, m.out_features, bits) or (awq_format and m.in_features % gs != 0)

    awq_state = load_file(recipe.apply_awq) if recipe.apply_awq else None
    awq_record: dict[str, torch.Tensor] = {}
    results = quantize_layers(model, calib, recipe.quant, device=resolve_device(recipe.device),
                              keep_fp=keep_fp if packable_only else None, awq_state=awq_state, awq_record=awq_record)
    return Quantized(model, tokenizer, results, awq_record)


def save(run: Quantized, recipe: Recipe, overwrite: bool = False) -> Path:
    """Write the packed checkpoint of a ``quantize(recipe)`` run to ``recipe.out``.

    AWQ search results go beside it as ``awq_search.safetensors`` (for ``--apply-awq``).
    """
    model, tokenizer, results, awq = run
    if not recipe.out:
        raise ConfigError("no output folder: pass --out DIR (or `out:` in the recipe)")
    recorded = {k: v for k, v in recipe.to_dict().items() if k not in ("out", "device")}  # same bytes anywhere
    extra = {AWQ_SEARCH_FILE: lambda path: save_file(awq, str(path))} if awq else {}
    return save_packed(model, tokenizer, results, recipe.out, recipe.quant, recipe=recorded,
                       fmt=recipe.format, max_shard_size=recipe.max_shard_size, overwrite=overwrite, extra=extra)
