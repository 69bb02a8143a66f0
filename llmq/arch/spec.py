"""The vocabulary of the architecture table: what an entry can say about a decoder layer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Rows:
    """A row slice of a fused linear: its output rows split in proportion to ``parts`` (config attribute names
    or numbers), part ``index`` taken. Phi-3's v inside ``qkv_proj`` is ``Rows(("num_attention_heads",
    "num_key_value_heads", "num_key_value_heads"), 2)`` (each part is heads x head_dim rows); the up half
    of a ``gate_up_proj`` is ``Rows((1, 1), 1)``."""

    parts: tuple[str | int, ...]
    index: int

    def resolved(self, config: Any) -> Rows:
        """The same slice with every part a number, read from ``config``."""
        return Rows(tuple(p if isinstance(p, int) else int(getattr(config, p)) for p in self.parts), self.index)

    def span(self, rows: int) -> tuple[int, int]:
        """``(start, stop)`` of the slice in a linear with ``rows`` output rows (parts must be resolved)."""
        total = sum(self.parts)
        if rows % total:
            raise ValueError(f"{rows} rows do not split in proportion {self.parts}")
        unit = rows // total
        start = unit * sum(self.parts[: self.index])
        return start, start + unit * self.parts[self.index]


@dataclass(frozen=True)
class ScaleGroup:
    """Where an AWQ scale folds: ``linears`` read ``prev``'s output (AWQ, Lin et al. 2024, Sec. 3.2).

    The linears' input columns are multiplied by ``s`` and ``prev``'s output channels divided by it
    (a norm's weight and bias, or a linear's output rows), which leaves the function unchanged.
    ``inspect`` is the module whose output the scale search compares (default: the one linear);
    ``input_of`` the module whose input the search runs on (default: the first linear; a MoE block,
    whose experts each see only their routed tokens). ``also`` are modules reading the same input that
    stay in full precision (a MoE router): their columns are scaled too, so they compute the same.

    ``inspect`` may name several modules reading the same input in parallel (Cohere's attention and MLP):
    their outputs are summed, as the layer adds them to the residual. ``prev_rows``: ``prev`` is a fused
    linear and only these rows produce the linears' input (v inside ``qkv_proj``). ``norm_offset``: ``prev``
    is a norm computing ``(offset + weight) * normed(x)`` (Gemma's ``1 + w``), whose fold is
    ``(offset + w) / s - offset``.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | tuple[str, ...] | None = None
    input_of: str | None = None
    also: tuple[str, ...] = ()
    prev_rows: Rows | None = None
    norm_offset: float = 0.0

    def resolved(self, config: Any) -> ScaleGroup:
        """The group with its row slice's parts read from ``config``."""
        return replace(self, prev_rows=self.prev_rows.resolved(config)) if self.prev_rows else self


@dataclass(frozen=True)
class ExpertNames:
    """The three linears of one expert's gated MLP, ``down(act(gate(x)) * up(x))``, by their checkpoint names."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class SparseLayers:
    """Which decoder layers hold a MoE block, from config attributes (an absent one does not apply).

    ``step``: only every k-th layer is sparse, ``(i + 1) % k == 0`` (Qwen's ``decoder_sparse_step``);
    ``dense``: a list of dense layers (Qwen's ``mlp_only_layers``); ``first_dense``: the first k layers
    are dense (DeepSeek's and GLM's ``first_k_dense_replace``).
    """

    step: str | None = None
    dense: str | None = None
    first_dense: str | None = None

    def __call__(self, config: Any, index: int) -> bool:
        step = getattr(config, self.step, None) if self.step else None
        dense = getattr(config, self.dense, None) if self.dense else None
        first = getattr(config, self.first_dense, None) if self.first_dense else None
        return not ((step and (index + 1) % step) or (dense and index in dense) or (first and index < first))


@dataclass(frozen=True)
class MoESpec:
    """A mixture-of-experts block inside a decoder layer (names relative to the layer unless said otherwise).

    Experts become one gated MLP each (``llmq.arch.experts``), named ``{block}.{experts}.{e}.{gate|up|down}``
    as in the checkpoints on disk; their gate/up (and the shared expert's) read the block's input and form
    one true-sequential group, the downs the next. The router is never quantized.
    """

    num_experts: str  # the config attribute giving the number of routed experts
    block: str = "mlp"  # the MoE block (the dense MLP's place)
    experts: str = "experts"  # inside the block: transformers' fused experts, [E, 2I, H] and [E, H, I]
    router: str = "gate"  # inside the block
    names: ExpertNames = field(default_factory=ExpertNames)
    shared: str | None = None  # inside the block: a shared expert, a dense gated MLP every token goes through
    shared_gate: str | None = None  # inside the block: the shared expert's sigmoid gate (1 output, full precision)
    sparse: SparseLayers = field(default_factory=SparseLayers)
    disk_block: str | None = None  # the block's name in checkpoints when it is not ``block`` (Mixtral)


@dataclass(frozen=True)
class GgufKey:
    """One GGUF metadata key an architecture writes beyond the common ones (llama.cpp's
    ``TextModel.set_gguf_parameters`` in ``convert_hf_to_gguf``).

    ``key``: the GGUF key, ``{arch}`` standing for the architecture (``"{arch}.expert_feed_forward_length"``).
    ``source``: the config attribute holding the value, or several tried in order (the writer's flattened view of
    the config, which also has ``rope_theta``, ``head_dim`` and the rope parameters, and the saved
    tokenizer_config.json's entries as ``tokenizer_config.<name>``); ``value``: a constant instead.
    ``kind``: the GGUF value type (``u32``, ``i32``, ``f32``, ``bool``, ``str``, ``bool[]``). ``default``: written when
    the config lacks the source (None: the key is left out). ``when``: ``(attribute, value)`` the config must hold for
    the key to be written (the LLaMA converter's ``add_bos_token = False`` for 49152-token vocabularies).
    """

    key: str
    source: str | tuple[str, ...] | None = None
    kind: str = "u32"
    value: Any = None
    default: Any = None
    when: tuple[str, Any] | None = None


@dataclass(frozen=True)
class GgufSpec:
    """How an architecture becomes a GGUF file llama.cpp loads (``llmq.formats.gguf``), after the architecture's
    class in llama.cpp's ``convert_hf_to_gguf.py`` / ``conversion/*.py``.

    ``arch``: llama.cpp's architecture name (``general.architecture``; the tensor names follow
    ``gguf.get_tensor_name_map`` for it). ``permute_qk``: q and k rows reordered from Hugging Face's rotate-half rope
    to llama.cpp's interleaved one (``LlamaModel.permute``; only for LLaMA-rope architectures). ``norm_offset``: added
    to every ``*norm.weight`` (Gemma computes ``(1 + w) * x``, llama.cpp ``w * x``). ``keys``: hyper-parameters beyond
    the common ones. ``extra_tensors``: tensors the converter generates from the config (``"rope_freqs"``: Llama 3's
    rope scaling factors; ``"rope_factors"``: Phi-3's LongRoPE long/short factors). ``ignore``: config attributes
    the converter drops before reading the config (Granite's ``head_dim``). ``common``: False where the family's
    converter writes its own hyper-parameters instead of the common ones (Gemma 2, Phi-3): then ``keys`` are all.
    """

    arch: str
    permute_qk: bool = False
    norm_offset: float = 0.0
    keys: tuple[GgufKey, ...] = ()
    extra_tensors: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    common: bool = True


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path of the nn.ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # linears inside a (dense) layer, in true-sequential groups
    before: tuple[str, ...]  # modules run before the first layer (embedding, rotary)
    after: tuple[str, ...]  # modules run after the last layer (final norm, lm_head)
    scale_groups: tuple[ScaleGroup, ...] = ()  # AWQ: where each activation-aware scale folds
    moe: MoESpec | None = None
    # float16 holds the family's activations: False where they overflow it (Gemma's reach 1e5), so its
    # unquantized tensors are stored, and its layers run, in bfloat16 or float32, never float16
    fp16_ok: bool = True
    gguf: GgufSpec | None = None  # how llama.cpp stores the family; None: no GGUF export

    @property
    def linears(self) -> tuple[str, ...]:
        """The linears of a dense layer."""
        return tuple(name for group in self.sequential for name in group)

    def is_sparse(self, config: Any, index: int) -> bool:
        return self.moe is not None and self.moe.sparse(config, index)

    def experts(self, config: Any) -> list[str]:
        """Each routed expert's name in a sparse layer (``mlp.experts.3``)."""
        m = self.moe
        return [f"{m.block}.{m.experts}.{e}" for e in range(getattr(config, m.num_experts))]

    def _mlp(self, name: str) -> bool:
        return self.moe is not None and name.startswith(self.moe.block + ".")

    def _members(self, config: Any) -> list[str]:
        """Every gated MLP of a sparse layer's MoE block: the routed experts, then the shared expert."""
        m = self.moe
        return self.experts(config) + ([f"{m.block}.{m.shared}"] if m.shared else [])

    def groups(self, config: Any, index: int) -> tuple[tuple[str, ...], ...]:
        """Layer ``index``'s linears in true-sequential groups: a sparse layer's MoE block replaces the MLP."""
        if not self.is_sparse(config, index):
            return self.sequential
        n, members = self.moe.names, self._members(config)
        attention = tuple(g for g in self.sequential if not any(self._mlp(name) for name in g))
        return attention + (tuple(f"{e}.{p}" for e in members for p in (n.gate, n.up)),
                            tuple(f"{e}.{n.down}" for e in members))

    def layer_scale_groups(self, config: Any, index: int) -> tuple[ScaleGroup, ...]:
        """AWQ scale groups of layer ``index``: in a sparse layer the MLP norm folds into every expert's gate/up
        (and the router's columns), and each expert's up into its down."""
        if not self.is_sparse(config, index):
            return tuple(sg.resolved(config) for sg in self.scale_groups)
        m, n, members = self.moe, self.moe.names, self._members(config)
        norm = next(sg.prev for sg in self.scale_groups if self._mlp(sg.linears[0]) and not self._mlp(sg.prev))
        attention = tuple(sg.resolved(config) for sg in self.scale_groups if not self._mlp(sg.linears[0]))
        also = tuple(f"{m.block}.{x}" for x in (m.router, m.shared_gate) if x)
        gate_up = tuple(f"{e}.{p}" for e in members for p in (n.gate, n.up))
        return attention + (ScaleGroup(norm, gate_up, inspect=m.block, input_of=m.block, also=also),) + tuple(
            ScaleGroup(f"{e}.{n.up}", (f"{e}.{n.down}",)) for e in members)

    def to_disk(self, key: str) -> str:
        """A tensor's name in the model -> its name in checkpoints (they differ where ``disk_block`` is set)."""
        return self._rename(key, self.moe.block, self.moe.disk_block) if self.moe and self.moe.disk_block else key

    def from_disk(self, key: str) -> str:
        return self._rename(key, self.moe.disk_block, self.moe.block) if self.moe and self.moe.disk_block else key

    def _rename(self, key: str, old: str, new: str) -> str:
        return re.sub(rf"^({re.escape(self.layers)}\.\d+\.){re.escape(old)}\.", rf"\g<1>{new}.", key)


def with_moe(spec: ArchSpec, moe: MoESpec) -> ArchSpec:
    """``spec``'s layout with a MoE block in its MLP's place (dense layers keep the MLP)."""
    return replace(spec, moe=moe)
