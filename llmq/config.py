"""Frozen settings for a quantization run, and recipe files that set them.

A recipe is a flat YAML mapping whose keys are the ``llmq quantize`` options (``group_size`` for
``--group-size``). Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmq.arch.table import ARCHITECTURES
from llmq.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")  # float16 is refused: activations of some models overflow it
SYMMETRIC_BY_DEFAULT = (4, 8)  # the widths vLLM's Marlin kernels serve (symmetric GPTQ only)
METHODS = ("rtn", "gptq", "awq", "awq+gptq", "tune")
# where a mixture-of-experts expert with too few routed tokens gets its calibration statistics
EXPERT_POLICIES = ("all_tokens", "routed", "rtn")
RANGE_SEARCHES = ("coarse_to_fine", "full")  # llmq.algorithms.quant.row_qparams


@dataclass(frozen=True, order=True)
class Width:
    """One candidate width of a mixed-precision run: bits and group size; symmetric at the widths where that
    is llmq's default (4 and 8 bits, which vLLM's Marlin kernels serve), asymmetric below."""

    bits: int
    group_size: int

    @classmethod
    def parse(cls, text: str) -> Width:
        m = re.fullmatch(r"(\d+)g(-1|\d+)", str(text).strip())
        if m is None:
            raise ConfigError(f"width {text!r} is not of the form <bits>g<group size>, e.g. 3g128 or 4g-1")
        width = cls(int(m[1]), int(m[2]))
        if width.bits not in SUPPORTED_BITS or width.group_size == 0 or width.group_size < -1:
            raise ConfigError(f"width {text!r}: bits must be one of {', '.join(map(str, SUPPORTED_BITS))} and the "
                              "group size positive or -1")
        return width

    @property
    def sym(self) -> bool:
        return self.bits in SYMMETRIC_BY_DEFAULT

    def __str__(self) -> str:
        return f"{self.bits}g{self.group_size}"


@dataclass(frozen=True)
class QuantConfig:
    """How each linear weight is quantized.

    ``group_size=-1`` gives one group per output row; otherwise groups of ``group_size``
    consecutive input columns (the last one partial when in_features is not a multiple).
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    # None: symmetric at 4 and 8 bits, where vLLM's fast Marlin kernels take only symmetric GPTQ
    # checkpoints, asymmetric at 2 and 3 bits, where no fast kernel cares (eval/sym_vs_asym.py). Symmetry
    # cost nothing at W8 on both shared models and nothing at W4 on llmq-tiny-llama (g128, C4 121.99 ->
    # 121.76), +3% at W4 on the 64-wide stories260K (g32, GPTQ 6.37 -> 6.56), and a lot at W3/W2
    # (stories260K W3 GPTQ 7.99 -> 9.15; tiny-llama W3 C4 123.05 -> 123.26).
    sym: bool | None = None
    # Search each group's clipping range (shrink grid, as the reference GPTQ code's ``mse`` option).
    # None: on for GPTQ, off for RTN, which stays the classic min-max baseline. On the test models
    # it cut GPTQ's W3 perplexity loss by a fifth (stories260K g32: 0.39 of RTN's loss, not 0.50).
    mse: bool | None = None
    # How the range search walks the 80 shrink factors: "full" tries all (the reference); "coarse_to_fine" every
    # 4th, then the 6 around each row's best (26 evaluations): the reference's choice on 99% of llmq-tiny-llama's
    # W3 rows, its summed |w - q|^2.4 within 0.01%, and perplexity no worse on the shared models (tests/test_quant.py).
    range_search: str = "coarse_to_fine"
    act_order: bool = False
    # With act-order, static groups fix each group's parameters before solving so g_idx stays
    # in natural order (no reordering at inference) but lose accuracy: stories260K W3 g32 keeps
    # 0.52 of RTN's perplexity loss against 0.46 with groups formed in quantization order (the
    # reference GPTQ and AutoGPTQ default), so static groups are opt-in.
    static_groups: bool = False
    damp_percent: float = 0.01
    # Sum each batch's float32 Hessian part in float64 (llmq.algorithms.gptq.HessianAccumulator): the sums no longer
    # depend on the order of the batches, so under torchrun every number of ranks gives one process's bytes (at the same
    # threads per process). Costs twice the accumulators' memory (+485 MB at a 7B down_proj) and a float64 add per
    # batch; without it two ranks' perplexity is within 0.2% of one process's (tests/test_distributed.py).
    exact_sums: bool = False
    block_size: int = 128
    true_sequential: bool = True
    # Where the next layer's inputs come from: the quantized layer ("quantized", GPTQ's choice) or
    # the full-precision layer ("fp", the AWQ reference's behaviour).
    next_inputs: str = "quantized"
    awq_grid: int = 20  # AWQ: points of the scale exponent grid in [0, 1)
    awq_duo: bool = False  # AWQ: divide by the weight magnitude too (s = s_x^a / s_w^(1-a))
    # AWQ: the scale search runs on the first windows holding at most this many tokens (AutoAWQ's
    # 128 x 512); it keeps one linear's inputs for them, so this bounds the search's memory
    awq_max_tokens: int = 65536
    # Mixtures of experts: an expert routed fewer than ``expert_min_tokens`` calibration tokens (0: its input
    # width, below which its Hessian is singular) is "starved" and gets ``expert_policy``: "all_tokens" (the
    # first windows' every token pushed through it, for its statistics only), "routed" (its few tokens, plus GPTQ's
    # damping; RTN when it has none) or "rtn". The default is measured in eval/moe_starved.py.
    expert_policy: str = "all_tokens"
    expert_min_tokens: int = 0
    # "all_tokens" pushes every token of the first calibration windows through a starved expert until it has
    # seen at least this many (whole windows; 0: 16 times its input width), and its routed tokens after them:
    # as good as every window on llmq-tiny-moe (eval/moe_starved.py) without running every starved expert on every
    # token (66 of a Qwen3-30B-A3B-shaped layer's 128 experts on 65,536 tokens each took over half an hour)
    expert_fill_tokens: int = 0
    # Block-wise reconstruction (method tune; llmq.algorithms.tune): Adam steps per layer, windows per step, and
    # the learning rates of the weight offsets (in units of the group scale) and of the log-scales and zeros.
    # Layer i draws its windows with seed ``tune_seed + i``; on llmq-tiny-llama the draws alone move held-out C4 by
    # 0.06-0.19 at W3 g128 and 0.09 at W4 (README, Results), so compare settings over more than one seed.
    tune_iters: int = 200
    tune_batch: int = 4
    tune_lr: float = 1e-3
    tune_lr_qparams: float = 1e-3
    tune_seed: int = 0
    # The end-to-end phase (llmq.job.e2e; any method): after the layer pass, ``e2e_steps`` Adam steps of ``e2e_batch``
    # windows tune every linear's grid at once against the FP model's next-token distributions (KL), at the rates
    # ``tune_lr`` / ``tune_lr_qparams`` decayed along a cosine, windows drawn with seed ``tune_seed``. 0: off. The
    # whole model is in memory and a backward runs through all of it: it does not stream.
    e2e_steps: int = 0
    e2e_batch: int = 8
    # Mixed precision (llmq.job.mixed): a budget of effective bits per weight (scales, zeros and g_idx counted as
    # ``llmq info`` counts them) spread over ``mixed_widths`` ("<bits>g<group size>") by each group of linears'
    # measured sensitivity. None: every linear at ``bits``/``group_size``. Default widths: 2, 3, 4 and 8 bits at
    # ``group_size`` (those below the budget's floor, llmq.job.mixed.floor_bits, are not measured). Adding smaller
    # groups moved llmq-tiny-llama's C4 at the W3 g64 budget by no more than the proxy's noise (122.367 with the
    # defaults, 122.226 with 2/3/4 bits at g64 added, 122.387 with g32 too; at W2 124.877 either way), so the
    # defaults stay the shorter sensitivity pass.
    bits_per_weight: float | None = None
    mixed_widths: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(
                f"bits={self.bits} is not supported: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(
                f"group_size={self.group_size} is invalid: use a positive size such as 128, "
                "or -1 for one group per output row"
            )
        if not 0 < self.damp_percent < 1:
            raise ConfigError(f"damp_percent={self.damp_percent} must be in (0, 1); 0.01 is the usual value")
        if self.sym is None:
            object.__setattr__(self, "sym", self.bits in SYMMETRIC_BY_DEFAULT)
        if self.mse is None:
            # the end-to-end phase was measured from RTN with searched ranges (README, Results)
            object.__setattr__(self, "mse", self.method in ("gptq", "awq+gptq", "tune") or self.e2e_steps > 0)
        if self.range_search not in RANGE_SEARCHES:
            raise ConfigError(f"range_search={self.range_search!r} is unknown: choose one of "
                              f"{', '.join(RANGE_SEARCHES)}")
        if self.next_inputs not in ("quantized", "fp"):
            raise ConfigError(f"next_inputs={self.next_inputs!r} must be 'quantized' or 'fp'")
        if self.awq_max_tokens < 1:
            raise ConfigError(f"awq_max_tokens={self.awq_max_tokens} must be positive (65536 is the usual value)")
        if self.expert_policy not in EXPERT_POLICIES:
            raise ConfigError(f"expert_policy={self.expert_policy!r} is unknown: choose one of "
                              f"{', '.join(EXPERT_POLICIES)}")
        if self.expert_min_tokens < 0:
            raise ConfigError(f"expert_min_tokens={self.expert_min_tokens} must be >= 0 (0: each expert's input width)")
        if self.expert_fill_tokens < 0:
            raise ConfigError(f"expert_fill_tokens={self.expert_fill_tokens} must be >= 0 (0: 16 times a starved "
                              "expert's input width)")
        if (self.tune_iters < 0 or self.tune_batch < 1 or self.tune_lr <= 0 or self.tune_lr_qparams < 0
                or self.tune_seed < 0):
            raise ConfigError(f"tune_iters={self.tune_iters}, tune_batch={self.tune_batch}, tune_lr={self.tune_lr}, "
                              f"tune_lr_qparams={self.tune_lr_qparams}, tune_seed={self.tune_seed}: need iters >= 0, "
                              "batch >= 1, lr > 0, lr_qparams >= 0 and seed >= 0")
        if self.e2e_steps < 0 or self.e2e_batch < 1:
            raise ConfigError(f"e2e_steps={self.e2e_steps}, e2e_batch={self.e2e_batch}: need steps >= 0 (0: no "
                              "end-to-end phase) and batch >= 1")
        if self.mixed_widths is None:
            object.__setattr__(self, "mixed_widths", tuple(f"{b}g{self.group_size}" for b in SUPPORTED_BITS))
        if isinstance(self.mixed_widths, str):
            object.__setattr__(self, "mixed_widths", tuple(w for w in self.mixed_widths.split(",") if w.strip()))
        object.__setattr__(self, "mixed_widths", tuple(str(Width.parse(w)) for w in self.mixed_widths))
        if self.bits_per_weight is not None:
            if not self.mixed_widths:
                raise ConfigError("bits_per_weight needs candidate widths: give mixed_widths such as 3g128,4g128")
            if not 1 < self.bits_per_weight <= 16:
                raise ConfigError(f"bits_per_weight={self.bits_per_weight} must be in (1, 16]: it counts the "
                                  "effective bits of each quantized weight, e.g. 3.3")
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size} must be positive (128 is the usual value)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def widths(self) -> tuple[Width, ...]:
        return tuple(Width.parse(w) for w in self.mixed_widths)

    def at(self, width: Width) -> QuantConfig:
        """These settings at another width (its own default symmetry); a run of one width, not a budget."""
        return dataclasses.replace(self, bits=width.bits, group_size=width.group_size, sym=width.sym,
                                   bits_per_weight=None)


@dataclass(frozen=True)
class CalibConfig:
    """Which calibration text, and how many windows of how many tokens."""

    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.seqlen < 2:
            raise ConfigError(
                f"nsamples={self.nsamples}, seqlen={self.seqlen}: need at least 1 window of 2 tokens"
            )


@dataclass(frozen=True)
class Recipe:
    """Everything ``llmq quantize`` needs: the model, where to write, and the two configs."""

    model: str
    out: str | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    device: str | None = None
    trust_remote_code: bool = False
    format: str = "auto"  # packed layout: auto | gptq | gptq_v2 (zero-point conventions) | awq (GEMM) | gguf
    # format gguf: a llama-quantize preset (Q4_K_M, ...) or one llama.cpp type for every weight matrix (Q4_0, ...)
    gguf_type: str | None = None
    apply_awq: str | None = None  # AWQ search results to re-apply instead of searching
    max_shard_size: str = "5GB"
    revision: str | None = None  # hub branch, tag or commit of ``model``
    # dtype of the layer forwards: auto = the checkpoint's when bfloat16, else float32 (see llmq.utils.device)
    compute_dtype: str = "auto"
    # the table entry to use when the model's model_type shares another's layout (None: its own entry, or
    # one inferred from the model when it has none)
    arch: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("auto", "gptq", "gptq_v2", "awq", "gguf"):
            raise ConfigError(f"format={self.format!r} is unknown: choose auto, gptq, gptq_v2, awq or gguf")
        if self.gguf_type is not None and self.format != "gguf":
            raise ConfigError(f"gguf_type={self.gguf_type!r} is a GGUF setting: add --format gguf, or drop it")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype={self.compute_dtype!r} is unknown: choose auto, float32 or bfloat16 "
                              "(float16 is refused: activations of some models overflow it)")
        if self.arch is not None and self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch={self.arch!r} is not a table entry: choose one of "
                              f"{', '.join(sorted(ARCHITECTURES))}, or leave it out to use the model's own entry "
                              "(or one inferred from the model)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Recipe:
        """Build from flat keys (``bits``, ``group_size``, ``calib``, ...); unknown keys are errors."""
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
        quant_keys = {f.name for f in dataclasses.fields(QuantConfig)}
        calib_keys = {f.name for f in dataclasses.fields(CalibConfig)}
        top_keys = {"model", "out", "device", "trust_remote_code", "format", "max_shard_size", "apply_awq", "revision",
                    "compute_dtype", "arch", "gguf_type"}
        unknown = sorted(set(raw) - quant_keys - calib_keys - top_keys)
        if unknown:
            known = ", ".join(sorted(quant_keys | calib_keys | top_keys))
            raise ConfigError(f"unknown recipe key(s) {', '.join(unknown)}; known keys: {known}")
        if "model" not in raw:
            raise ConfigError("the recipe names no model: add `model: <hub id or local folder>`")
        if raw.get("sym") is None and raw.get("format") == "awq":
            raw["sym"] = False  # the AWQ GEMM layout keeps zero points, and vLLM's AWQ Marlin kernel runs them
        return cls(
            model=str(raw["model"]),
            out=raw.get("out"),
            quant=QuantConfig(**{k: v for k, v in raw.items() if k in quant_keys}),
            calib=CalibConfig(**{k: v for k, v in raw.items() if k in calib_keys}),
            device=raw.get("device"),
            trust_remote_code=bool(raw.get("trust_remote_code", False)),
            **{k: str(raw[k]) for k in ("format", "max_shard_size", "apply_awq", "revision", "compute_dtype", "arch",
                                        "gguf_type")
               if raw.get(k) is not None},
        )

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of option: value")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict, the inverse of ``from_dict`` (recorded in the output's config)."""
        out = {"model": self.model, "out": self.out, "device": self.device, "trust_remote_code": self.trust_remote_code,
               "format": self.format,
               "max_shard_size": self.max_shard_size, "apply_awq": self.apply_awq, "revision": self.revision,
               "compute_dtype": self.compute_dtype, "arch": self.arch, "gguf_type": self.gguf_type}
        out.update(dataclasses.asdict(self.quant))
        out.update(dataclasses.asdict(self.calib))
        return out
