"""The quantization job end to end: load a model, draw calibration windows, quantize, save.

This is what ``llmq quantize`` and the Python API run; each step is also usable on its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .arch import get_arch
from .config import Recipe
from .data import get_calibration
from .errors import CheckpointError
from .pipeline import LayerResults, quantize_layers

log = logging.getLogger(__name__)


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
    """A causal LM on the CPU and its tokenizer; the architecture is checked before any weight loads."""
    check_model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise CheckpointError(f"cannot load a model config from {name_or_path}: {e}") from e
    get_arch(config.model_type)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype or "auto", trust_remote_code=trust_remote_code
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def quantize(recipe: Recipe) -> tuple[PreTrainedModel, object, LayerResults]:
    """Run ``recipe``: returns the model (weights replaced by their quantized values), tokenizer, codes."""
    model, tokenizer = load_model(recipe.model, trust_remote_code=recipe.trust_remote_code)
    c = recipe.calib
    if recipe.quant.method == "rtn":
        calib = torch.zeros(1, 2, dtype=torch.long)  # RTN reads no data; one dummy window fills the pipeline
    else:
        calib = get_calibration(c.calib, tokenizer, c.nsamples, c.seqlen, c.seed)
    results = quantize_layers(model, calib, recipe.quant, device=resolve_device(recipe.device))
    return model, tokenizer, results


def _staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.incomplete-{os.getpid()}"


def save_fake_quantized(model: PreTrainedModel, tokenizer, out: str | Path, recipe: Recipe) -> Path:
    """Save the model with its weights replaced by their quantized values, in plain safetensors.

    Written into a hidden sibling folder and renamed when complete, so an interrupted run never
    leaves a folder that looks finished.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: choose another --out or remove it")
    staging = _staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "llmq_recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out
