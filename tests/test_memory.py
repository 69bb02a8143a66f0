"""Loading a packed W4 checkpoint adds far less memory than loading the same model in FP16."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_model

from llmq.config import QuantConfig
from llmq.formats.export import save_packed
from llmq.job.pipeline import quantize_layers

# Peak RSS above the baseline after imports: the kernel's high-water mark (VmHWM) is reset after
# the imports (writing 5 to /proc/self/clear_refs), then read after the load and one forward pass,
# which touches every weight (transformers maps safetensors lazily: untouched pages are not resident).
MEASURE = r"""
import json, sys
import torch, transformers, llmq, llmq.runtime.loader

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

mode, path = sys.argv[1:]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
if mode == "packed":
    model = llmq.from_pretrained(path, torch_dtype=torch.float16)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
with torch.no_grad():
    model(torch.zeros(1, 8, dtype=torch.long))
print(json.dumps({"added_peak": status("VmHWM") - before, "added_now": status("VmRSS") - before}))
"""


def measure(mode: str, path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, mode, str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_packed_w4_load_adds_well_under_half_the_fp16_memory(tmp_path, report):
    # ~420 MB in FP16, so the model, not the interpreter (~20 MB for a first forward), dominates
    model = tiny_model("llama", vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                       num_attention_heads=8, num_key_value_heads=8)
    model.half().save_pretrained(tmp_path / "fp16")
    model.float()
    cfg = QuantConfig(method="rtn", bits=4, group_size=128)
    results = quantize_layers(model, torch.zeros(1, 2, dtype=torch.long), cfg)
    save_packed(model, None, results, tmp_path / "w4", cfg)
    del model, results
    fp16, packed = measure("fp16", tmp_path / "fp16"), measure("packed", tmp_path / "w4")
    ratio = packed["added_peak"] / fp16["added_peak"]
    report(f"memory added by loading (MB): FP16 peak {fp16['added_peak'] / 1e6:.0f} resident "
           f"{fp16['added_now'] / 1e6:.0f}; packed W4 g128 peak {packed['added_peak'] / 1e6:.0f} resident "
           f"{packed['added_now'] / 1e6:.0f}; peak ratio {ratio:.2f}")
    assert fp16["added_peak"] > 400e6, "the FP16 load must dominate the measurement"
    assert ratio < 0.45  # W4 g128 is 0.27 of FP16; the rest is the first forward pass and allocator slack


def test_a_streamed_layer_s_codes_are_freed_before_the_next_layer_loads():
    """With a sink (streaming), nothing keeps a written layer's codes alive into the next layer: at each load,
    every codes tensor of the layers before is gone (for a Qwen3-30B-A3B layer they are 604 MB)."""
    import weakref

    from llmq.arch import get_arch
    from llmq.job.pipeline import InMemoryLayers

    model = tiny_model("qwen3_moe")
    written: list[weakref.ref] = []
    alive_at_load: list[int] = []

    class Source(InMemoryLayers):
        def load_layer(self, index):
            alive_at_load.append(sum(ref() is not None for ref in written))
            return super().load_layer(index)

    def sink(index, layer, results, hidden):
        written.extend(weakref.ref(qw.code_bytes) for qw in results.values())

    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_layers(model, calib, QuantConfig(method="gptq", bits=4, group_size=32),
                    source=Source(model, get_arch("qwen3_moe")), sink=sink)
    assert len(written) > 0 and alive_at_load == [0] * model.config.num_hidden_layers
