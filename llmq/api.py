"""The one-call Python API: quantize a model to a folder, measure a perplexity, load a packed checkpoint.

These are the functions the CLI calls (``llmq quantize``, ``llmq ppl``), with the same names as its options
and the recipe keys, so a run written in Python and one on the command line give the same bytes::

    import llmq

    out = llmq.quantize("meta-llama/Llama-2-7b-hf", "llama2-7b-w4", method="gptq", bits=4, group_size=128,
                        calib="c4", nsamples=128, seqlen=2048)
    print(llmq.perplexity(out, "wikitext2", seqlen=2048)["ppl"])
    model = llmq.from_pretrained(out)

Everything below this module (the job in :mod:`llmq.job`, the formats, the runtime) is reachable for those who
want the pieces; this module only puts them behind three calls.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from llmq.config import Recipe
from llmq.errors import ConfigError
from llmq.eval.ppl import perplexity as _perplexity
from llmq.io.data import eval_windows
from llmq.job.plan import plan
from llmq.job.runner import Quantized, quantize_to_disk, save, write_quantized
from llmq.job.runner import quantize as _quantize_in_memory
from llmq.runtime.loader import from_pretrained, load_model
from llmq.utils.device import resolve_device

__all__ = ["from_pretrained", "load_model", "perplexity", "plan", "quantize", "quantize_to_disk", "save",
           "write_quantized"]


def recipe_from(model: str | Path | None = None, out: str | Path | None = None,
                recipe: str | Path | Recipe | None = None, **settings: Any) -> Recipe:
    """The :class:`~llmq.config.Recipe` that ``quantize(model, out, recipe=..., **settings)`` runs: the recipe
    (a YAML file or an object) with ``model``, ``out`` and every setting that is not None laid over it."""
    given = {k: v for k, v in settings.items() if v is not None}
    if model is not None:
        given["model"] = str(model)
    if out is not None:
        given["out"] = str(out)
    if isinstance(recipe, Recipe):
        if not given:
            return recipe
        return Recipe.from_dict({**{k: v for k, v in recipe.to_dict().items() if v is not None}, **given})
    if recipe is not None:
        return Recipe.from_yaml(recipe, **given)
    return Recipe.from_dict(given)


def quantize(model: str | Path | Recipe | None = None, out: str | Path | None = None, *,
             method: str | None = None, bits: int | None = None, group_size: int | None = None,
             calib: str | None = None, nsamples: int | None = None, seqlen: int | None = None,
             recipe: str | Path | Recipe | None = None, overwrite: bool = False,
             offload_activations: str | Path | None = None, **options: Any) -> Path:
    """Quantize ``model`` (a hub id or a local folder) and write the packed checkpoint to ``out``.

    The same job as ``llmq quantize``: every keyword is a CLI option / recipe key with underscores (``sym``,
    ``act_order``, ``mse``, ``damp_percent``, ``format``, ``seed``, ``device``, ``revision``, ``e2e_steps``,
    ``bits_per_weight``, ...); a keyword left None takes the recipe's value, else the default (``method="gptq"``,
    ``bits=4``, ``group_size=128``, ``calib="c4"``, ``nsamples=128``, ``seqlen=2048``). The layers are streamed
    from the input shards and the run resumes where it stopped when called again (not with ``e2e_steps``, which
    holds the whole model). Bad settings raise :class:`~llmq.errors.ConfigError` before any calibration.

    Example (runs offline on a local model and calibration file)::

        import llmq

        out = llmq.quantize("path/to/llmq-tiny-llama", "tiny-w4", method="gptq", bits=4, group_size=128,
                            calib="path/to/c4.jsonl", nsamples=8, seqlen=128)
        model = llmq.from_pretrained(out)

    Returns the output folder. (``quantize(recipe_object)`` without ``out``, the form of earlier versions, still
    runs the job in memory and returns the in-memory result; it is deprecated for
    :func:`llmq.job.runner.quantize`.)
    """
    if isinstance(model, Recipe) and out is None and recipe is None and not options and all(
            v is None for v in (method, bits, group_size, calib, nsamples, seqlen)):
        warnings.warn("llmq.api.quantize(recipe) is the in-memory job: call llmq.job.runner.quantize(recipe) "
                      "for it, or llmq.quantize(model, out, ...) to write a checkpoint", DeprecationWarning,
                      stacklevel=2)
        return _quantize_in_memory(model)  # type: ignore[return-value]
    if isinstance(model, Recipe):
        model, recipe = None, model
    r = recipe_from(model, out, recipe, method=method, bits=bits, group_size=group_size, calib=calib,
                    nsamples=nsamples, seqlen=seqlen, **options)
    if not r.out:
        raise ConfigError("no output folder: pass out=DIR (or `out:` in the recipe)")
    return write_quantized(r, overwrite=overwrite, offload_activations=offload_activations)


def perplexity(model: str | Path | nn.Module, dataset: str = "wikitext2", seqlen: int = 2048, *,
               tokenizer: Any = None, revision: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, kernel: str = "auto", batch_size: int = 1,
               progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``model`` on ``dataset`` by the GPTQ paper's protocol, as ``llmq ppl --json`` prints it.

    ``model`` is a hub id, a local folder (a plain transformers model or a packed checkpoint) or an in-memory
    model (then pass its ``tokenizer``). ``dataset`` is ``wikitext2`` (test split, non-overlapping windows),
    ``c4`` (256 validation windows, seed 0), a ``.txt`` file or a ``.jsonl`` file's ``text`` rows.

    Example::

        import llmq

        result = llmq.perplexity("path/to/llmq-tiny-llama", "path/to/wiki.test.raw", seqlen=128)
        print(result["ppl"], result["windows"])

    Returns ``{"ppl", "nll", "tokens", "windows", "seqlen", "model", "dataset"}``.
    """
    resolved = resolve_device(device)
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ConfigError("an in-memory model needs its tokenizer: llmq.perplexity(model, ..., tokenizer=tok)")
        name = type(model).__name__
    else:
        name = str(model)
        model, tokenizer = load_model(name, revision=revision, dtype=dtype, kernel=kernel, device=resolved)
    result = _perplexity(model, eval_windows(str(dataset), tokenizer, seqlen), batch_size=batch_size,
                         device=resolved if device is not None else None, progress=progress)
    result.update(model=name, dataset=str(dataset))
    return result


# names earlier versions exported from this module
__all__ += ["Quantized"]
