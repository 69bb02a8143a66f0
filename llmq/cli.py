"""``llmq`` command line: quantize, ppl, eval, generate, info, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from llmq.config import COMPUTE_DTYPES, METHODS, RANGE_SEARCHES
from llmq.errors import LlmqError
from llmq.runtime.kernels import KERNEL_CHOICES
from llmq.utils.timing import PROGRESS_LOGGER

log = logging.getLogger("llmq")

QUANTIZE_HELP = """Quantize MODEL's decoder-layer linears layer by layer and write a packed checkpoint to --out.

The checkpoint uses the GPTQ layout (int32-packed codes, fp16 scales, quantization_config in
config.json) that llmq.from_pretrained, transformers (with gptqmodel) and vLLM load. Linears whose
shape the layout cannot hold (a dimension not a multiple of 32) stay in full precision.

The model is streamed: each decoder layer is read from the input safetensors shards when it is
quantized and its packed tensors are appended to the output, so memory holds about one layer plus
the calibration activations. The run can be killed at any point: the same command continues from
the first unfinished layer (state in .<out>.partial beside --out) and writes the same bytes."""


# the quantize options that are recipe keys (the rest: --recipe, --overwrite, --offload-activations)
QUANTIZE_KEYS = ("model", "method", "bits", "group_size", "sym", "act_order", "static_groups", "mse", "range_search",
                 "damp_percent", "exact_sums", "calib", "nsamples", "seqlen", "seed", "device", "trust_remote_code",
                 "out", "format", "max_shard_size", "apply_awq", "next_inputs", "revision", "compute_dtype",
                 "expert_policy", "expert_min_tokens", "expert_fill_tokens", "arch", "gguf_type", "tune_iters",
                 "tune_batch", "tune_lr", "tune_lr_qparams", "tune_seed", "e2e_steps", "e2e_batch", "bits_per_weight",
                 "mixed_widths")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model", description=QUANTIZE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="local folder or Hugging Face hub id (e.g. Qwen/Qwen2.5-7B)")
    p.add_argument("--revision", help="hub branch, tag or commit of MODEL (default: main)")
    p.add_argument("--recipe", help="YAML recipe with the same keys as these options (group_size, ...)")
    p.add_argument("--method", choices=METHODS,
                   help="rtn, gptq, awq, awq+gptq; tune: block-wise reconstruction against the FP layer "
                        "from an RTN start (default gptq)")
    p.add_argument("--bits", type=int, help="2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, help="input columns per group, -1 for one per row (default 128)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric groups (default: symmetric at 4 and 8 bits, where vLLM's Marlin kernels need it, "
                        "asymmetric at 2 and 3 bits and in the AWQ layout)")
    p.add_argument("--act-order", action="store_true", default=None, help="GPTQ in descending diag(H) order")
    p.add_argument("--static-groups", action="store_true", default=None,
                   help="with --act-order: fix group parameters up front (natural g_idx)")
    p.add_argument("--mse", action=argparse.BooleanOptionalAction, default=None,
                   help="search each group's clipping range (default: on for gptq, off for rtn)")
    p.add_argument("--range-search", choices=RANGE_SEARCHES,
                   help="with --mse: every 4th shrink factor then the best's neighbours (default), or all 80")
    p.add_argument("--damp-percent", type=float, help="GPTQ damping, fraction of mean(diag H) (default 0.01)")
    p.add_argument("--exact-sums", action="store_true", default=None,
                   help="sum Hessians in float64 so any number of torchrun ranks gives one process's bytes "
                        "(twice the Hessian memory)")
    p.add_argument("--calib", help="c4 | wikitext2 | pileval | a local .txt/.jsonl/.parquet (default c4)")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, help="seed for drawing calibration windows (default 0)")
    p.add_argument("--device", help="compute device (default: cuda when present, else cpu)")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES,
                   help="dtype of the layer forwards (default auto: the checkpoint's if bfloat16, else float32); "
                        "Hessians and the solver are always float32")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument("--arch", metavar="NAME",
                   help="the table entry to use for a model_type that shares its layout (e.g. llama); default: the "
                        "model's own entry, or, for a dense decoder without one, groups inferred from the model "
                        "(GPTQ and RTN only)")
    p.add_argument("--out", help="output folder (must not exist or be empty)")
    p.add_argument("--format", choices=["auto", "gptq", "gptq_v2", "awq", "gguf"],
                   help="packed layout: GPTQ with zero-point convention gptq (v1, stores zero-1, cannot hold 0) or "
                        "gptq_v2; auto picks v1 when exact, else gptq_v2 (default); awq = AutoAWQ GEMM, 4-bit; "
                        "gguf = one llama.cpp file (--out FILE.gguf), the linears rounded onto llama.cpp's own grids")
    p.add_argument("--gguf-type", metavar="PRESET|TYPE",
                   help="with --format gguf: a llama-quantize preset (Q4_K_M, Q4_K_S, Q5_K_M, Q3_K_M, Q2_K, Q4_0, "
                        "IQ4_NL, Q8_0, ...: each tensor's type as llama.cpp's own quantizer picks it) or one type "
                        "for every weight matrix (default Q4_K_M)")
    p.add_argument("--apply-awq", help="re-apply AWQ scales and clips saved by an earlier run "
                                       "(awq_search.safetensors) instead of searching")
    p.add_argument("--next-inputs", choices=["quantized", "fp"],
                   help="next layer's inputs from the quantized layer (default) or the full-precision one "
                        "(the AWQ reference)")
    p.add_argument("--expert-policy", choices=["all_tokens", "routed", "rtn"],
                   help="mixtures of experts: an expert routed too few calibration tokens takes its statistics from "
                        "every token of the first windows pushed through it (all_tokens, default), its own few "
                        "plus damping (routed) or none (rtn)")
    p.add_argument("--expert-min-tokens", type=int,
                   help="tokens below which an expert is starved (default 0: its input width)")
    p.add_argument("--expert-fill-tokens", type=int,
                   help="all_tokens: a starved expert sees every token of the first windows holding this many, then "
                        "its routed tokens (default 0: 16 times its input width)")
    p.add_argument("--tune-iters", type=int, help="method tune: Adam steps per layer (default 200)")
    p.add_argument("--tune-batch", type=int, help="method tune: calibration windows per step (default 4)")
    p.add_argument("--tune-lr", type=float,
                   help="method tune: learning rate of the rounding offsets, in group scales (default 1e-3)")
    p.add_argument("--tune-lr-qparams", type=float,
                   help="method tune: learning rate of the log-scales and zero points (default 1e-3)")
    p.add_argument("--tune-seed", type=int,
                   help="method tune: seed of the window draws (layer i draws with seed + i; default 0)")
    p.add_argument("--e2e-steps", type=int,
                   help="after the layers, tune every linear's grid at once against the FP model's outputs for N Adam "
                        "steps (any method; default 0: off). Holds the whole model in memory: not streamed, "
                        "not resumable")
    p.add_argument("--e2e-batch", type=int, help="--e2e-steps: calibration windows per step (default 8)")
    p.add_argument("--bits-per-weight", type=float, metavar="B",
                   help="mixed precision: a budget of effective bits per weight (scales and zeros counted, as llmq "
                        "info counts them), spread over --mixed-widths by each group of linears' measured "
                        "sensitivity; --group-size sets the default candidates' groups")
    p.add_argument("--mixed-widths", metavar="W,W,...",
                   help="mixed precision: candidate widths as <bits>g<group size> (default 2, 3, 4 and 8 bits at "
                        "--group-size)")
    p.add_argument("--max-shard-size", help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (and discard an unfinished run with other settings)")
    p.add_argument("--offload-activations", metavar="DIR",
                   help="keep calibration activations in memory-mapped files under DIR instead of RAM/GPU "
                        "(automatic, in the output's work folder, when they exceed half the free memory)")


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _add_load_options(p: argparse.ArgumentParser, dtype_default: str) -> None:
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help=f"compute dtype of the loaded model (auto: {dtype_default})")
    p.add_argument("--kernel", choices=KERNEL_CHOICES, default="auto",
                   help="packed checkpoints: the kernel for every quantized linear (auto: the fastest each allows; "
                        "pure: the reference forward, for debugging)")


def _dtype(name: str):  # noqa: ANN202
    import torch

    return None if name == "auto" else getattr(torch, name)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming tokens, and report tokens/s")
    p.add_argument("model", help="local folder (plain or packed) or hub id")
    p.add_argument("prompt")
    p.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template as a "
                                                       "user turn")
    p.add_argument("--device", help="default: cuda when present, else cpu")
    p.add_argument("--trust-remote-code", action="store_true")
    _add_load_options(p, "bfloat16 on the CPU, float16 on CUDA")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a model or packed checkpoint")
    p.add_argument("model", help="local folder (plain or packed) or hub id")
    p.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="folder of extra task YAMLs (e.g. tasks over local files)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", help="default: cuda when present, else cpu")
    _add_load_options(p, "bfloat16 for a bf16 checkpoint or one packed from it, else float32")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a packed checkpoint")
    p.add_argument("checkpoint", help="folder written by llmq quantize (or any GPTQ-layout checkpoint), or its hub id")
    p.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--load", action="store_true", help="also load it and report the kernel each quantized linear "
                                                       "gets (with --device, --dtype, --kernel)")
    p.add_argument("--device", help="with --load: default cuda when present, else cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="with --load: compute dtype (auto: bfloat16 on the CPU, float16 on CUDA)")
    p.add_argument("--kernel", choices=KERNEL_CHOICES, default="auto")


def _add_ppl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppl", help="perplexity by the GPTQ paper's protocol")
    p.add_argument("model", help="local folder (plain or packed) or hub id")
    p.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    p.add_argument("--dataset", default="wikitext2",
                   help="wikitext2 | c4 | a local .txt (one text) or .jsonl (rows joined with blank lines)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", help="default: cuda when present, else cpu")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    _add_load_options(p, "bfloat16 for a bf16 checkpoint or one packed from it, else float32")


def _add_table(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help="a perplexity table (methods x widths x group sizes, FP row first), resumable, "
                                     "with table.md, table.csv and plot.png")
    p.add_argument("model", nargs="?", help="local folder or hub id (or `model:` in --recipe)")
    p.add_argument("--recipe", help="a table recipe (recipes/tables/*.yaml), or a quantize recipe every cell starts "
                                    "from")
    p.add_argument("--methods", help="comma-separated methods, each with optional recipe keys: "
                                     "rtn,gptq,gptq:act_order=true,awq (default rtn,gptq,awq)")
    p.add_argument("--bits", help="comma-separated widths (default 4,3)")
    p.add_argument("--group-sizes", help="comma-separated group sizes, -1 for one per row (default 128)")
    p.add_argument("--datasets", help="comma-separated: wikitext2, c4 or local files, as llmq ppl "
                                      "(default wikitext2,c4)")
    p.add_argument("--seqlen", type=int, help="evaluation window length (default 2048)")
    p.add_argument("--tasks", help="lm-eval tasks as extra columns (their accuracy)")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--calib", help="calibration set of every cell (default c4)")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, help="calibration window length (default 2048)")
    p.add_argument("--revision", help="hub branch, tag or commit of MODEL")
    p.add_argument("--device", help="default: cuda when present, else cpu")
    p.add_argument("--out", required=True, help="folder for results.jsonl, table.md, table.csv, plot.png (a rerun "
                                                "with the same settings skips finished cells)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each cell's packed checkpoint in "
                                                                   "OUT/checkpoints/")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo on a small LLaMA trained on the spot")
    p.add_argument("--out", default="llmq-demo", help="working folder (default ./llmq-demo)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps of the demo model (default: llmq.eval.demo_model.DEMO_STEPS, about a minute)")
    p.add_argument("--seed", type=int, default=0)


def cmd_quantize(args: argparse.Namespace) -> int:
    from llmq.api import quantize, recipe_from

    recipe = recipe_from(recipe=args.recipe, **{k: getattr(args, k) for k in QUANTIZE_KEYS})
    if not recipe.out:
        raise LlmqError("no output folder: pass --out DIR (or `out:` in the recipe)")
    out = quantize(recipe=recipe, overwrite=args.overwrite, offload_activations=args.offload_activations)
    if int(os.environ.get("RANK", "0")):  # under torchrun rank 0 reports for the job
        return 0
    if recipe.quant.bits_per_weight is not None:
        from llmq.formats.info import checkpoint_info
        from llmq.job.mixed import widths_table

        info = checkpoint_info(out)
        print(widths_table({name: f"{w['bits']}g{w['group_size']}" for name, w in info["allocation"].items()}))
        print(f"effective bits per weight {info['effective_bits_per_weight']:.4f} "
              f"(budget {recipe.quant.bits_per_weight})")
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llmq.eval.ppl import run_lm_eval
    from llmq.runtime.loader import load_model
    from llmq.utils.device import resolve_device

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, revision=args.revision, dtype=_dtype(args.dtype), kernel=args.kernel,
                                  device=device)
    out = run_lm_eval(model, tokenizer, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                      num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size, device=str(device))
    print(json.dumps(out["results"], default=str))
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from llmq.eval.table import TableSpec, run_table

    raw: dict = {}
    if args.recipe:
        spec_file = yaml.safe_load(Path(args.recipe).read_text()) or {}
        if not isinstance(spec_file, dict):
            raise LlmqError(f"recipe {args.recipe} must be a YAML mapping")
        if "methods" in spec_file or "quantize" in spec_file:
            raw = spec_file  # a table recipe (TABLE_KEYS)
        else:  # a quantize recipe: the cells' base
            raw = {"model": spec_file.pop("model", None), "quantize": spec_file}
    base = dict(raw.get("quantize") or {})
    base.update({k: v for k, v in (("calib", args.calib), ("nsamples", args.nsamples), ("seqlen", args.calib_seqlen))
                 if v is not None})
    raw.update({k: v for k, v in (("model", args.model), ("methods", args.methods), ("bits", args.bits),
                                  ("group_sizes", args.group_sizes), ("datasets", args.datasets),
                                  ("seqlen", args.seqlen), ("tasks", args.tasks), ("revision", args.revision))
                if v is not None})
    raw["quantize"] = base
    if raw.get("model") is None:
        raise LlmqError("no model: give MODEL or `model:` in --recipe")
    records = run_table(TableSpec.from_dict(raw), args.out, keep_checkpoints=args.keep_checkpoints,
                        device=args.device, include_path=args.include_path)
    print(Path(args.out, "table.md").read_text(), end="")
    print(f"{len(records)} cells; wrote {', '.join(p.name for p in sorted(Path(args.out).glob('table.*')))}"
          + (", plot.png" if Path(args.out, "plot.png").is_file() else ""))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from llmq.formats.info import checkpoint_info, format_info
    from llmq.io.source import resolve_model

    folder = resolve_model(args.checkpoint, args.revision)
    info = checkpoint_info(folder)
    if args.load:
        from llmq.formats.info import kernel_info
        from llmq.runtime.loader import default_dtype, from_pretrained
        from llmq.utils.device import resolve_device

        device = resolve_device(args.device)
        dtype = _dtype(args.dtype) or default_dtype(device)
        model = from_pretrained(folder, device=device, torch_dtype=dtype, kernel=args.kernel)
        info["load"] = kernel_info(model.llmq_kernels, device, dtype)
    print(json.dumps(info) if args.json else format_info(info))
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from llmq.api import perplexity

    result = perplexity(args.model, args.dataset, args.seqlen, revision=args.revision, device=args.device,
                        dtype=_dtype(args.dtype), kernel=args.kernel)
    print(json.dumps(result) if args.json else f"{args.dataset} perplexity {result['ppl']:.4f} "
          f"({result['windows']} windows of {result['seqlen']} tokens)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from llmq.runtime.generate import generate
    from llmq.runtime.loader import default_dtype, load_model
    from llmq.utils.device import resolve_device

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, revision=args.revision, dtype=_dtype(args.dtype) or default_dtype(device),
                                  trust_remote_code=args.trust_remote_code, kernel=args.kernel, device=device)
    g = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat, out=sys.stdout)
    print(f"{g.new_tokens} new tokens: prefill {g.prompt_tokens} tokens at {g.prefill_tokens_per_s:.1f} tokens/s, "
          f"decode {g.decode_tokens_per_s:.2f} tokens/s", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llmq.eval.demo import run_demo

    kwargs = {} if args.train_steps is None else {"train_steps": args.train_steps}
    run_demo(args.out, seed=args.seed, **kwargs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``llmq`` and its subcommands (the docs' CLI reference is rendered from it)."""
    parser = argparse.ArgumentParser(prog="llmq", description="Low-bit weight quantization of open LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each module's loss")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_ppl(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_info(sub)
    _add_demo(sub)
    _add_table(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # a long run says where it is, one line per layer, whether the output is a terminal or a log file
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO)
    commands = {"quantize": cmd_quantize, "ppl": cmd_ppl, "eval": cmd_eval, "generate": cmd_generate, "info": cmd_info,
                "demo": cmd_demo, "table": cmd_table}
    try:
        return commands[args.command](args)
    except LlmqError as e:
        print(f"llmq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
