"""Read an unquantized safetensors checkpoint one decoder layer at a time.

The model is a skeleton on the meta device (accelerate's ``init_empty_weights``); a module's
tensors are read from the shards (``safe_open``, which maps the file and copies only what is
asked for) when the pipeline needs it and dropped back to the meta device afterwards. Peak memory
is one decoder layer's weights, whatever the depth of the model.
"""

from __future__ import annotations

import gc
import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from llmq.arch import ArchSpec, discover_arch, get_layers
from llmq.arch.discover import infer_layout
from llmq.errors import CheckpointError
from llmq.io.checkpoint import INDEX_FILE, SINGLE_FILE, read_tensor, shard_files
from llmq.utils.memory import malloc_trim

log = logging.getLogger(__name__)


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the weights are stored in (``dtype``/``torch_dtype`` in config.json; float32 if absent)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"config.json names an unknown dtype {config.dtype!r}")
    return dtype


class ShardedCheckpoint:
    """``tensor name -> shard`` for a folder of safetensors shards; reads tensors on request.

    ``to_disk`` maps a tensor's name in the model to its name in the shards (``ArchSpec.to_disk``).
    """

    def __init__(self, folder: Path, to_disk: Callable[[str], str] = lambda key: key):
        if not (folder / INDEX_FILE).is_file() and not (folder / SINGLE_FILE).is_file():
            if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
                raise CheckpointError(
                    f"{folder} holds pickled weights (*.bin), which llmq does not read: convert them once with "
                    "transformers (AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)) "
                    "to get safetensors shards")
        self.folder, self.to_disk = folder, to_disk
        self.where = shard_files(folder)

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (in ``keys`` order), copied out of their shards; a missing name is a clear error."""
        missing = [k for k in keys if self.to_disk(k) not in self.where]
        if missing:
            raise CheckpointError(
                f"{self.folder} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}: the checkpoint "
                "is incomplete or uses other tensor names than transformers' (re-save it with save_pretrained)")
        by_shard: dict[Path, list[str]] = defaultdict(list)
        for k in keys:
            by_shard[self.where[self.to_disk(k)]].append(k)
        out = {}
        for path, names in by_shard.items():
            for k in names:
                out[k] = read_tensor(path, self.to_disk(k))
        return {k: out[k] for k in keys}  # in the order asked for, whatever the shard layout


def empty_model(config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary tables are real)."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def materialize(module: nn.Module, prefix: str, ckpt: ShardedCheckpoint, device: torch.device | str = "cpu",
                ) -> None:
    """Read ``module``'s parameters and persistent buffers (``prefix`` + their name) from ``ckpt``."""
    skeleton = module.state_dict()
    tensors = ckpt.load([prefix + n for n in skeleton])
    for n, expected in skeleton.items():
        value = tensors[prefix + n]
        if tuple(value.shape) != tuple(expected.shape):
            raise CheckpointError(f"tensor {prefix + n} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(expected.shape)}: config.json and the weights disagree")
        set_module_tensor_to_device(module, n, device, value=value, dtype=expected.dtype)


def discover_streamed(skeleton: nn.Module, ckpt: ShardedCheckpoint) -> ArchSpec:
    """:func:`~llmq.arch.discover_arch` on a skeleton: the modules before the layers and layer 0 are read from
    ``ckpt`` for the one forward it takes, and dropped again (its buffers, such as rotary tables, stay)."""
    layout = infer_layout(skeleton)
    names = [*layout.before, f"{layout.layers}.0"]
    try:
        for name in names:
            materialize(skeleton.get_submodule(name), name + ".", ckpt)
        return discover_arch(skeleton, layout)
    finally:
        for name in names:
            module = skeleton.get_submodule(name)
            for key in module.state_dict():
                set_module_tensor_to_device(module, key, "meta")
        gc.collect()
        malloc_trim()


def release(module: nn.Module) -> None:
    """Drop a module's tensors back to the meta device, freeing their memory."""
    module.to("meta")
    gc.collect()
    malloc_trim()


class StreamingLayers:
    """A :class:`~llmq.job.pipeline.LayerSource` that reads each decoder layer from the shards when asked."""

    def __init__(self, model: nn.Module, spec: ArchSpec, ckpt: ShardedCheckpoint):
        self.layers, self.spec, self.ckpt = get_layers(model, spec), spec, ckpt

    def load_layer(self, index: int) -> nn.Module:
        layer = self.layers[index]
        materialize(layer, f"{self.spec.layers}.{index}.", self.ckpt)
        return layer

    def release_layer(self, index: int, layer: nn.Module) -> None:
        release(layer)

    def after_capture(self, model: nn.Module) -> None:
        for name in self.spec.before:  # the embedding: 262 MB for a 7B model, 2 GB for a 70B one
            release(model.get_submodule(name))


def generation_config(folder: Path, config: PretrainedConfig) -> GenerationConfig:
    """The checkpoint's generation config, or the one transformers derives from the model config."""
    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_model_config(config)
