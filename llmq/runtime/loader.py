"""``llmq.from_pretrained``: load a GPTQ-layout (or AutoAWQ GEMM) checkpoint with its linears kept packed.

The full-precision model is never materialised: the skeleton is built on the meta device
(accelerate's ``init_empty_weights``), quantized linears are swapped for ``QuantLinear`` and every
tensor is read shard by shard into place; then each packed linear moves onto the kernel chosen for it
(:mod:`llmq.runtime.kernels`). Reads llmq's checkpoints and those AutoGPTQ/GPTQModel
write (v1 and v2 zero points, act-order ``g_idx``, bits 2/3/4/8); refuses, with the reason,
anything it cannot read exactly.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llmq.arch import ARCHITECTURES, model_namer
from llmq.arch.experts import split_experts
from llmq.errors import CheckpointError
from llmq.formats.dynamic import module_settings
from llmq.formats.pack import GPTQ_BITS
from llmq.io.checkpoint import read_tensor, shard_files
from llmq.io.source import resolve_model
from llmq.io.stream import checkpoint_dtype
from llmq.runtime.kernels import KERNEL_CHOICES, prepare
from llmq.runtime.kernels.attention import use_float32_attention
from llmq.runtime.qlinear import AwqQuantLinear, QuantLinear
from llmq.utils.device import compute_dtype

log = logging.getLogger(__name__)

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def read_quant_config(config: Any) -> dict[str, Any]:
    """The checkpoint's ``quantization_config``, checked for what this loader can decode."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise CheckpointError("config.json has no quantization_config: this is not a quantized checkpoint "
                              "(load it with transformers directly)")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or qc.get("bits", 4) != 4 or not qc.get("zero_point", True):
            raise CheckpointError(f"AWQ checkpoint (version {version!r}, bits {qc.get('bits')}, zero_point "
                                  f"{qc.get('zero_point')}) is not supported: llmq reads 4-bit GEMM with zero points")
        return {**qc, "bits": 4, "checkpoint_format": "awq"}
    if method != "gptq":
        raise CheckpointError(f"quant_method {method!r} is not supported by llmq.from_pretrained "
                              "(supported: gptq, awq)")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"checkpoint_format {fmt!r} is not supported (supported: gptq, gptq_v2)")
    if qc.get("bits") not in GPTQ_BITS:
        raise CheckpointError(f"bits={qc.get('bits')} in quantization_config is not one of {GPTQ_BITS}")
    return {**qc, "checkpoint_format": fmt}


def _swap_quant_linears(model: nn.Module, shapes: dict[str, dict[str, tuple]], qc: dict[str, Any],
                        dtype: torch.dtype, scale_dtypes: dict[str, torch.dtype], disk_name: dict[str, str]) -> None:
    """Replace each quantized linear by a packed module; its scales keep their stored dtype (fp16), so the
    weights decode exactly whatever ``dtype`` the model computes in. Each linear's bits are the config's, or
    its ``dynamic`` rule's (mixed precision; rules name modules as on disk, ``disk_name``)."""
    for name, tensors in shapes.items():
        settings = module_settings(qc, disk_name[name])
        if settings is None:
            raise CheckpointError(f"{disk_name[name]} has quantized tensors, but a dynamic rule of the config "
                                  "excludes it from quantization: config and tensors disagree")
        bits = settings["bits"]
        if bits not in GPTQ_BITS:
            raise CheckpointError(f"bits={bits} for {disk_name[name]} in quantization_config is not one of "
                                  f"{GPTQ_BITS}")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint has quantized tensors for {name}, which the model lacks") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{name} is a {type(linear).__name__}, not a linear: config and tensors disagree")
        awq = qc["checkpoint_format"] == "awq"
        missing = [s for s in QUANT_SUFFIXES if s not in tensors and not (awq and s == "g_idx")]
        if missing:
            raise CheckpointError(f"{name} lacks tensor(s) {', '.join(missing)}: the checkpoint is incomplete")
        k, n = linear.in_features, linear.out_features
        if awq:
            n_groups = k // qc["group_size"]
            expected = {"qweight": (k, n // 8), "qzeros": (n_groups, n // 8), "scales": (n_groups, n)}
        else:
            n_groups = tensors["scales"][0]
            expected = {"qweight": (k * bits // 32, n), "qzeros": (n_groups, n * bits // 32),
                        "scales": (n_groups, n), "g_idx": (k,)}
        for suffix, shape in expected.items():
            if tuple(tensors[suffix]) != shape:
                raise CheckpointError(
                    f"{name}.{suffix} has shape {tuple(tensors[suffix])}, expected {shape} for bits={bits} "
                    f"and a ({linear.out_features}, {linear.in_features}) weight: config and tensors disagree"
                )
        if awq:
            qlinear = AwqQuantLinear(k, n, qc["group_size"], linear.bias is not None, dtype=dtype, device="meta",
                                     scales_dtype=scale_dtypes[name])
        else:
            qlinear = QuantLinear(k, n, bits, n_groups, linear.bias is not None,
                                  zero_offset=1 if qc["checkpoint_format"] == "gptq" else 0, dtype=dtype, device="meta",
                                  scales_dtype=scale_dtypes[name])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, qlinear)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, device: torch.device) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if old is None or tuple(old.shape) != tuple(value.shape):
        raise CheckpointError(f"tensor {key} has shape {tuple(value.shape)}, the model expects "
                              f"{None if old is None else tuple(old.shape)}: config and tensors disagree")
    if value.is_floating_point() and old.is_floating_point():
        value = value.to(old.dtype)
    elif value.dtype != old.dtype and not (isinstance(module, QuantLinear) and attr == "g_idx"):
        raise CheckpointError(f"tensor {key} has dtype {value.dtype}, expected {old.dtype}")
    value = value.to(device=device, dtype=old.dtype)
    if isinstance(old, nn.Parameter):
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


_ST_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on the CPU (the dtype torch's int4/int8 CPU kernels are fast in), float16 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cpu" else torch.float16


def from_pretrained(
    path_or_hub_id: str | Path,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    kernel: str = "auto",
) -> PreTrainedModel:
    """A transformers model whose quantized linears stay packed, each on the fastest kernel it can use.

    ``path_or_hub_id`` is a local folder or a hub id (``revision``: branch, tag or commit), read
    through the hub cache. ``torch_dtype`` is the compute dtype (default :func:`default_dtype` of
    ``device``); the stored scales are kept as they are, so the weights decode to what the quantizer
    produced in any dtype. ``kernel`` is ``"auto"`` (per linear, the fastest path its bits, groups,
    shapes, device and dtype allow: see :mod:`llmq.runtime.kernels`), a path's name to force it, or ``"pure"``
    for the reference :class:`QuantLinear` forward; the choices are in ``model.llmq_kernels``.
    ``device_map`` (accelerate's: ``"auto"``, a dict, or one device) spreads the loaded model over
    devices; without it everything goes to ``device``.

    Example (a checkpoint that :func:`llmq.quantize` wrote)::

        import llmq

        model = llmq.from_pretrained("tiny-w4", torch_dtype=torch.float32)
        print(model.llmq_kernels)
    """
    if kernel not in KERNEL_CHOICES:
        raise CheckpointError(f"kernel {kernel!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if torch_dtype is None:
        torch_dtype = default_dtype("cuda" if device_map is not None and torch.cuda.is_available() else device)
    folder = resolve_model(path_or_hub_id, revision, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    qc = read_quant_config(config)
    # the entry the checkpoint was made with (``--arch``), else its model_type's; None: a dense layout without one
    arch = ((qc.get("meta") or {}).get("llmq") or {}).get("recipe", {}).get("arch")
    spec = ARCHITECTURES.get(arch or config.model_type)
    skeleton_config = copy.deepcopy(config)
    del skeleton_config.quantization_config  # build a plain model; the swap below makes it quantized
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(skeleton_config, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    if spec is not None:
        split_experts(model, spec)  # per-expert linears, as the checkpoint stores them
    stored = shard_files(folder)
    to_model = model_namer(model, spec)
    disk_names = {to_model(k): k for k in stored}  # name in the model -> name on disk
    where = {k: stored[d] for k, d in disk_names.items()}
    shapes: dict[str, dict[str, tuple]] = defaultdict(dict)
    scale_dtypes: dict[str, torch.dtype] = {}
    for key, path in where.items():
        module, _, suffix = key.rpartition(".")
        if suffix in QUANT_SUFFIXES:
            with safe_open(str(path), framework="pt") as f:
                sl = f.get_slice(disk_names[key])
                shapes[module][suffix] = tuple(sl.get_shape())
                if suffix == "scales":
                    if sl.get_dtype() not in _ST_FLOATS:
                        raise CheckpointError(f"{key} has dtype {sl.get_dtype()}, expected F16, BF16 or F32")
                    scale_dtypes[module] = _ST_FLOATS[sl.get_dtype()]

    _swap_quant_linears(model, shapes, qc, torch_dtype, {m: scale_dtypes.get(m, torch.float16) for m in shapes},
                        {m: disk_names.get(m + ".qweight", m).removesuffix(".qweight") for m in shapes})

    target = torch.device("cpu") if device_map is not None else torch.device(device)
    expected = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()
                                                           if k.rpartition(".")[0] in shapes}
    by_shard: dict[Path, list[str]] = defaultdict(list)
    for key, path in where.items():
        by_shard[path].append(key)
    loaded = set()
    for path, keys in tqdm(sorted(by_shard.items()), desc="loading shards", unit="shard",
                           disable=len(by_shard) < 2):
        for key in keys:
            if key not in expected:
                raise CheckpointError(f"unexpected tensor {key} in {path.name}: the checkpoint does not match "
                                      f"the {config.model_type} architecture in config.json")
            _set_tensor(model, key, read_tensor(path, disk_names[key]), target)
            loaded.add(key)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded |= {k for k, p in model.named_parameters(remove_duplicate=False) if p.device.type != "meta"}
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}: it is incomplete")
    # Kept beside the config, not in it: transformers and lm-eval treat a config's
    # quantization_config as a request to run their own GPTQ integration on the model.
    model.llmq_quantization_config = qc
    model.eval()
    if device_map is None:
        model.to(target)  # buffers built outside the meta device (rotary tables) follow
        model.llmq_kernels = prepare(model, torch_dtype, kernel)
        use_float32_attention(model, torch_dtype, target)
        return model
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    elif isinstance(device_map, (str, torch.device)):
        device_map = {"": device_map}

    def device_of(name: str) -> torch.device:  # the longest prefix of name that the map places
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            where = device_map.get(".".join(parts[:i]))
            if where is not None:
                return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
        return target

    model.llmq_kernels = prepare(model, torch_dtype, kernel, device_of)
    return dispatch_model(model, device_map=device_map)


def load_config(folder: str | Path, trust_remote_code: bool = False) -> Any:
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load a model config from {folder}: {e}") from e


def load_model(
    name_or_path: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
    revision: str | None = None, kernel: str = "auto", device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, object]:
    """A causal LM on ``device`` and its tokenizer (any architecture: evaluation needs no table entry).

    ``name_or_path`` is a local folder, a hub id (read through the hub cache), or a ``.gguf`` file (its weights
    decoded, with the tokenizer llmq stored in it, or else the file's own). A quantized
    checkpoint (``quantization_config`` in its config) loads packed through
    :func:`llmq.from_pretrained` (with ``kernel``), anything else through transformers; both in
    ``dtype`` or else :func:`llmq.utils.device.compute_dtype` of the stored dtype (bfloat16 for a bf16
    checkpoint and for one packed from it, float32 otherwise), so a packed model and its source are
    compared in the same precision.
    """
    if str(name_or_path).endswith(".gguf") and Path(name_or_path).is_file():  # a llama.cpp file, dequantized
        from llmq.formats.gguf import load_gguf_model, load_gguf_tokenizer

        model = load_gguf_model(name_or_path, dtype=dtype or torch.float32).eval().to(device)
        return model, load_gguf_tokenizer(name_or_path)
    folder = resolve_model(name_or_path, revision, trust_remote_code=trust_remote_code)
    config = load_config(folder, trust_remote_code)
    dtype = dtype or compute_dtype(checkpoint_dtype(config))
    if getattr(config, "quantization_config", None) is not None:
        model = from_pretrained(folder, device=device, torch_dtype=dtype, trust_remote_code=trust_remote_code,
                                kernel=kernel)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model, tokenizer
