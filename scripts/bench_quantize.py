"""Time one quantization run and print one JSON line of figures.

    python scripts/bench_quantize.py ../shared/assets/llmq-tiny-llama --method gptq --bits 4 --group-size 128 \
        --calib ../shared/assets/c4-sample/c4_train_00000_first1000.jsonl --nsamples 128 --seqlen 256

Reports wall time (load + calibration + quantization), quantization time, seconds per decoder
layer (mean and each), seconds per stage summed over layers (load, observe, hessian, solve,
propagate, awq_search, write), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--method", default="gptq", choices=["rtn", "gptq", "awq", "awq+gptq"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--mse", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--calib", default="c4")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llmq.config import QuantConfig
    from llmq.io.data import get_calibration
    from llmq.job.pipeline import quantize_layers
    from llmq.runtime.loader import load_model
    from llmq.utils.device import resolve_device
    from llmq.utils.timing import StageTimes

    start = time.perf_counter()
    cfg = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, act_order=args.act_order,
                      mse=args.mse)
    model, tokenizer = load_model(args.model)
    calib = get_calibration(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed)
    layer_times: list[float] = []
    t_layer = [time.perf_counter()]

    def sink(index, layer, results, hidden) -> None:
        now = time.perf_counter()
        layer_times.append(now - t_layer[0])
        t_layer[0] = now

    timer = StageTimes()
    t_quant = time.perf_counter()
    t_layer[0] = t_quant
    quantize_layers(model, calib, cfg, device=resolve_device(args.device), sink=sink, timer=timer)
    end = time.perf_counter()
    print(json.dumps({
        "model": args.model, "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
        "act_order": cfg.act_order, "mse": cfg.mse, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "threads": torch.get_num_threads(),
        "wall_s": round(end - start, 3), "quantize_s": round(end - t_quant, 3),
        "s_per_layer": round(sum(layer_times) / len(layer_times), 3),
        "layer_s": [round(t, 3) for t in layer_times],
        "stage_s": timer.as_dict(),  # observe includes hessian; awq_search includes its own forwards
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
