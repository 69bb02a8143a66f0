"""Streaming quantization of a model with Llama-2-7B's (or Qwen3-30B-A3B's) exact shapes; prints one JSON line.

    python scripts/bench_scale.py                 # 32 layers: the full 7B shape (13.5 GB of bf16 weights)
    python scripts/bench_scale.py --layers 2      # same width, 2 layers, for a quick run
    python scripts/bench_scale.py --shape qwen3-30b-a3b --layers 2   # MoE: 128 experts, 1.2 GB of bf16 per layer
    python scripts/bench_scale.py --layers 2 --method gptq,awq   # one line per method, each in its own process
    python scripts/bench_scale.py --layers 2 --nproc 2          # the same job on 2 torch.distributed ranks (gloo)

The first run writes a random-weight bf16 checkpoint (hidden 4096, intermediate 11008, 32 heads,
vocab 32000, ``--layers`` decoder layers; ``--shape qwen3-30b-a3b``: hidden 2048, 128 experts of width
768 per layer, 8 active, 32/4 heads of 128, vocab 151936, stored one tensor per expert as on the hub) in
5 GB safetensors shards under ``--cache-dir`` and reuses it afterwards; it is generated one tensor at a
time, so making it needs little memory either. Then ``llmq.quantize_to_disk`` runs ``--method`` (GPTQ by
default; AWQ, AWQ+GPTQ, RTN) W4 g128 with 16 windows of 512 tokens (TinyStories text from ../shared,
stories260K's tokenizer, which fits in the 32000-token vocabulary) on ``--device`` (default cpu) and the
line reports wall time, seconds per layer, seconds per stage summed over layers, peak RSS (this process,
the quantization only: the checkpoint is generated in a child process), the highest RSS sampled in each
stage (every 20 ms) and the output size, beside the input size.

``--peer llm-compressor`` then runs llm-compressor's GPTQ on the same checkpoint with the same
calibration tokens and the same settings (W4 g128 asymmetric, no act-order, damping 0.01, and
llmq's MSE range search space through its ``memoryless_mse`` observer, or min-max ranges for both
with ``--no-mse``; it fixes each group's range on the original weights before the solve, llmq on
the updated weights when the solve reaches the group, as the reference GPTQ code does), the way its
README does it: the whole model loaded with ``from_pretrained``, ``oneshot`` with a
``GPTQModifier``, ``save_pretrained``. It runs in a child process (its own peak RSS) with
``--peer-python``, the interpreter where the peer is installed (llm-compressor pins an older
transformers, so it usually lives in its own virtualenv). Three lines are printed: llmq's, the
peer's, and the peer/llmq ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("LLMQ_SHARED") or Path(__file__).resolve().parents[2] / "shared")
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
# Qwen3-30B-A3B's config.json: 48 layers of 128 experts (8 active) 768 wide, hidden 2048, 32/4 heads of 128
QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[], num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False)
SHAPES = {"llama2-7b": LLAMA2_7B, "qwen3-30b-a3b": QWEN3_30B_A3B}
SHARD_BYTES = 5 * 10**9


def make_checkpoint(folder: Path, layers: int, shapes: dict = LLAMA2_7B) -> None:
    """Random N(0, 0.02) linears and embeddings, unit norms, bf16, written tensor by tensor (Llama-2-7B's
    widths unless ``shapes`` gives others; a ``model_type`` in it picks the family). Experts are stored one
    tensor per expert, as hub checkpoints store them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmq.arch import get_arch
    from llmq.arch.experts import split_experts
    from llmq.io.checkpoint import write_shards

    shapes = dict(shapes)
    model_type = shapes.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, dtype="bfloat16", **shapes)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    spec = get_arch(model_type)
    split_experts(skeleton, spec)
    shapes = {spec.to_disk(k): list(t.shape) for k, t in skeleton.state_dict().items()}
    specs = [(k, "BF16", shape, math.prod(shape) * 2) for k, shape in shapes.items()]

    def generate(name: str) -> torch.Tensor:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_shards(tmp, specs, generate, SHARD_BYTES)
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(SHARED / "assets" / "stories260K").save_pretrained(tmp)
    tmp.rename(folder)


class StageMemory:
    """Peak RSS per stage: wraps a :class:`~llmq.utils.timing.StageTimes` and samples /proc/self/statm every
    ``every`` seconds from a thread, charging each sample to the innermost stage running then (``"other"``
    outside any). Each ``load`` stage starts a new span (the head's, then one per decoder layer): the lowest
    and highest RSS of each span show whether memory grows with depth. Sampling misses spikes shorter than
    ``every``; VmHWM gives the true overall peak."""

    def __init__(self, timer, every: float = 0.02):
        import threading

        self.timer, self.every, self.stack = timer, every, []
        self.peak_mb: dict[str, int] = {}
        self.spans: list[list[int]] = []  # [lowest, highest] RSS from one "load" to the next
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def __call__(self, stage: str):
        from contextlib import contextmanager

        @contextmanager
        def charged():
            if stage == "load":
                self.spans.append([1 << 40, 0])
            self.stack.append(stage)
            try:
                with self.timer(stage):
                    yield
            finally:
                self.stack.pop()
        return charged()

    def _sample(self) -> None:
        with open("/proc/self/statm") as f:
            while not self.done.wait(self.every):
                f.seek(0)
                rss = int(f.read().split()[1]) * self.page >> 20
                stage = self.stack[-1] if self.stack else "other"
                self.peak_mb[stage] = max(self.peak_mb.get(stage, 0), rss)
                if self.spans:
                    span = self.spans[-1]
                    span[0], span[1] = min(span[0], rss), max(span[1], rss)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.thread.join()
        return dict(sorted(self.peak_mb.items()))


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def peak_rss_mb() -> int:
    """This process's peak RSS in MiB: VmHWM, which starts afresh at exec. (``ru_maxrss`` does not: a
    child started by ``subprocess`` reports its parent's peak if that is higher.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


PEERS = ("llm-compressor",)


def run_llmcompressor(model_dir: Path, calib: torch.Tensor, out: Path, bits: int, group_size: int,
                      mse: bool) -> dict:
    """llm-compressor's documented GPTQ flow; runs in the peer's interpreter and never imports llmq."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    stages = {}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    stages["load"] = time.perf_counter() - t
    nsamples, seqlen = calib.shape
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * seqlen] * nsamples})
    # llmq's search space: shrink factors 1 - i/100 down to 0.2, error sum |w - q|^2.4 (the reference GPTQ code's)
    search = dict(observer="memoryless_mse", observer_kwargs=dict(maxshrink=0.8, grid=100, norm=2.4))
    weights = QuantizationArgs(num_bits=bits, group_size=group_size, strategy="group", symmetric=False,
                               actorder=None, **(search if mse else dict(observer="memoryless_minmax")))
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=0.01, actorder=None)
    t = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=nsamples,
            shuffle_calibration_samples=False)
    stages["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    stages["write"] = time.perf_counter() - t
    return {"stage_s": {k: round(v, 1) for k, v in stages.items()}}


def peer_main(args: argparse.Namespace, model_dir: Path) -> None:
    """``--run-peer``: one peer run in this process; prints its JSON line."""
    import llmcompressor  # imported before the clock starts, as llmq is
    from safetensors.torch import load_file

    calib = load_file(args.calib_file)["input_ids"]
    out = Path(args.cache_dir) / f"out-{args.layers}L-w{args.bits}g{args.group_size}-{args.run_peer}"
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    figures = run_llmcompressor(model_dir, calib, out, args.bits, args.group_size, args.mse is not False)
    wall = time.perf_counter() - start
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = {k: weights["weights"][k] for k in ("num_bits", "group_size", "symmetric", "actorder", "observer",
                                                   "observer_kwargs")}
    result = {"tool": args.run_peer, "version": llmcompressor.__version__, **figures, "scheme": scheme,
              "layers": args.layers, "threads": torch.get_num_threads(), "wall_s": round(wall, 1),
              "s_per_layer": round(wall / args.layers, 1), "peak_rss_mb": peak_rss_mb(),
              "output_gb": round(dir_bytes(out) / 1e9, 3)}
    shutil.rmtree(out)
    print(json.dumps(result))


def run_peer(args: argparse.Namespace, calib: torch.Tensor) -> dict:
    """Runs ``--peer`` in a child process of ``--peer-python`` on the same calibration tokens."""
    from safetensors.torch import save_file

    cache = Path(args.cache_dir)
    calib_file = cache / f"calib-{args.nsamples}x{args.seqlen}.safetensors"
    save_file({"input_ids": calib.contiguous()}, calib_file)
    cmd = [args.peer_python, __file__, "--run-peer", args.peer, "--layers", str(args.layers), "--bits", str(args.bits),
           "--group-size", str(args.group_size), "--cache-dir", str(cache), "--calib-file", str(calib_file)]
    if args.mse is False:
        cmd.append("--no-mse")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"{args.peer} failed (exit {proc.returncode}); is it installed for {args.peer_python}? "
                 f"e.g. python -m venv --system-site-packages peer && peer/bin/pip install llmcompressor, "
                 f"then --peer-python peer/bin/python")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _argv_without(option: str) -> list[str]:
    """This command line without ``option`` and its value (``--option V`` or ``--option=V``)."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if not skip and a != option and not a.startswith(option + "="):
            argv.append(a)
        skip = a == option
    return argv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 is Llama-2-7B, 48 Qwen3-30B-A3B)")
    p.add_argument("--shape", choices=SHAPES, default="llama2-7b",
                   help="the model's widths: Llama-2-7B (dense) or Qwen3-30B-A3B (128 experts per layer)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=os.environ.get("LLMQ_BENCH_CACHE", Path.home() / ".cache" / "llmq-bench"),
                   help="where the random checkpoint is kept (and the output written)")
    p.add_argument("--offload-activations", metavar="DIR", help="as llmq quantize --offload-activations")
    p.add_argument("--keep", action="store_true", help="keep the quantized output")
    p.add_argument("--hessian-mb", type=int, help="float32 Hessians an MoE group gathers at once "
                   "(llmq.job.methods.HESSIAN_BYTES; smaller: less memory, more observe passes)")
    p.add_argument("--method", default="gptq",
                   help="gptq, awq, awq+gptq or rtn; several, comma-separated, run one after the other, each in its "
                        "own process (so each peak RSS is its own), one JSON line each")
    p.add_argument("--no-mse", dest="mse", action="store_false", default=None,
                   help="min-max group ranges instead of the MSE range search (llmq's GPTQ default)")
    # the choices of llmq.config.RANGE_SEARCHES, written out: the peer's interpreter may lack llmq
    p.add_argument("--range-search", choices=["coarse_to_fine", "full"],
                   help="the MSE range search (llmq's default coarse_to_fine; full: all 80 shrink factors)")
    p.add_argument("--compute-dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="as a recipe's compute_dtype (auto: bf16 layer forwards only where the device multiplies bf16 "
                   "natively)")
    p.add_argument("--nproc", type=int, default=1,
                   help="run llmq's job under torchrun on this many ranks (gloo on the CPU, one thread each unless "
                        "OMP_NUM_THREADS says otherwise); rank 0 prints the line")
    p.add_argument("--peer", choices=PEERS, help="also run this tool's GPTQ on the same checkpoint and calibration")
    p.add_argument("--peer-python", default=sys.executable, help="the interpreter where --peer is installed")
    p.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-peer", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--calib-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    cache = Path(args.cache_dir)
    model_dir = cache / f"{args.shape}-shape-{args.layers}L"
    if args.generate_only:
        make_checkpoint(model_dir, args.layers, SHAPES[args.shape])
        return
    if args.run_peer:
        peer_main(args, model_dir)
        return
    if not model_dir.is_dir():  # generated in a child, so its memory does not count in this run's peak
        subprocess.run([sys.executable, __file__, "--generate-only", "--layers", str(args.layers),
                        "--shape", args.shape, "--cache-dir", str(cache)], check=True)

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # start the ranks: each runs this script without --nproc
        if args.peer:
            sys.exit("--peer runs one process: use it without --nproc")
        argv = _argv_without("--nproc")
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                        __file__, *argv], check=True, env=env)
        return

    methods = args.method.split(",")
    if len(methods) > 1:
        argv = _argv_without("--method")
        for method in methods:
            subprocess.run([sys.executable, __file__, *argv, f"--method={method}"], check=True)
        return
    import llmq.job.methods
    from llmq.config import Recipe
    from llmq.job.runner import quantize_to_disk
    from llmq.utils.device import forward_dtype
    from llmq.utils.timing import StageTimes

    if args.hessian_mb:
        llmq.job.methods.HESSIAN_BYTES = args.hessian_mb << 20

    calib = SHARED / "assets" / "tinystories-text" / "TinyStories-valid.Ahmedessaa-30k.txt"
    method = methods[0]
    out = cache / f"out-{args.shape}-{args.layers}L-{method}-w{args.bits}g{args.group_size}"
    recipe = Recipe.from_dict(dict(model=str(model_dir), out=str(out), method=method, bits=args.bits,
                                   group_size=args.group_size, sym=False, calib=str(calib), nsamples=args.nsamples,
                                   seqlen=args.seqlen, device=args.device, mse=args.mse,
                                   compute_dtype=args.compute_dtype,
                                   **({"range_search": args.range_search} if args.range_search else {})))
    if not int(os.environ.get("RANK", "0")):  # a killed run's work: time every layer (rank 0's folder, only it)
        shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    timer = StageTimes()
    memory = StageMemory(timer)
    start = time.perf_counter()
    quantize_to_disk(recipe, overwrite=True, offload_activations=args.offload_activations, timer=memory)
    wall = time.perf_counter() - start
    stage_peaks = memory.stop()
    stages = timer.as_dict(1)
    if "observe" in stages:  # observe includes the Hessian updates: report the forwards on their own
        stages["observe_forward"] = round(stages["observe"] - stages.get("hessian", 0.0), 1)
    result = {
        "tool": "llmq", "shape": args.shape, "layers": args.layers, "hidden": SHAPES[args.shape]["hidden_size"],
        "intermediate": SHAPES[args.shape].get("moe_intermediate_size", SHAPES[args.shape]["intermediate_size"]),
        "experts": SHAPES[args.shape].get("num_experts", 0), "method": method,
        "bits": args.bits, "group_size": args.group_size, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "hessian_mb": llmq.job.methods.HESSIAN_BYTES >> 20, "mse": recipe.quant.mse, "device": args.device,
        "range_search": recipe.quant.range_search, "threads": torch.get_num_threads(),
        "forward_dtype": str(forward_dtype(torch.bfloat16, torch.device(args.device), args.compute_dtype)).removeprefix(
            "torch."),
        "ranks": int(os.environ.get("WORLD_SIZE", "1")),
        "wall_s": round(wall, 1), "s_per_layer": round(wall / args.layers, 1), "stage_s": stages,
        "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_by_stage": stage_peaks,
        "rss_mb_low_high_by_layer": memory.spans[1:], "rss_mb_low_high_head": memory.spans[:1],
        "input_gb": round(dir_bytes(model_dir) / 1e9, 2), "output_gb": round(dir_bytes(out) / 1e9, 3),
    }
    if int(os.environ.get("RANK", "0")):  # rank 0 wrote the output and reports for the job
        return
    if not args.keep:
        shutil.rmtree(out)
    print(json.dumps(result), flush=True)
    if args.peer:
        if method != "gptq":
            sys.exit("--peer compares GPTQ runs: use it with --method gptq")
        from transformers import AutoTokenizer

        from llmq.io.data import get_calibration

        c = recipe.calib  # the windows llmq drew, drawn again the same way
        calib_ids = get_calibration(c.calib, AutoTokenizer.from_pretrained(model_dir), c.nsamples, c.seqlen, c.seed)
        peer = run_peer(args, calib_ids)
        print(json.dumps(peer))
        ratio = {k: round(peer[k] / result[k], 2) for k in ("wall_s", "peak_rss_mb", "output_gb")}
        print(json.dumps({"ratio": f"{args.peer} / llmq", "layers": args.layers, **ratio}))


if __name__ == "__main__":
    main()
