"""Streaming quantization (``llmq quantize`` / ``quantize_to_disk``): memory, resume after SIGKILL, equivalence."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import shared_path, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import llmq.job.pipeline
from llmq.config import Recipe
from llmq.errors import CheckpointError, ConfigError
from llmq.job.runner import quantize, quantize_to_disk, save


def make_model(folder: Path, seed: int = 0, **shape) -> Path:
    """A random LLaMA saved as safetensors with stories260K's tokenizer (vocab 512)."""
    model = tiny_model("llama", seed=seed, **{"vocab_size": 512, **shape})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(shared_path("assets", "stories260K")).save_pretrained(folder)
    return folder


def recipe(model: Path, out: Path, **kw) -> Recipe:
    text = shared_path("assets", "tinystories-text", "TinyStories-valid.Ahmedessaa-30k.txt")
    raw = dict(model=str(model), out=str(out), method="gptq", bits=4, group_size=32, calib=str(text), nsamples=8,
               seqlen=64)
    return Recipe.from_dict({**raw, **kw})


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fp") / "small", hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3)


@pytest.mark.parametrize("kw", [dict(method="gptq", act_order=True), dict(method="rtn", bits=3),
                                dict(method="awq", format="awq"), dict(method="gptq", next_inputs="fp"),
                                dict(method="tune", bits=3, tune_iters=10), dict(method="gptq", bits_per_weight=3.6)],
                         ids=["gptq-act-order", "rtn-w3", "awq", "gptq-fp-inputs", "tune", "mixed"])
def test_streaming_writes_the_bytes_of_the_in_memory_reference(small, tmp_path, kw):
    # the reference loads the whole model and packs it at the end; a tiny shard size makes both cut shards
    r_mem, r_stream = (recipe(small, tmp_path / name, max_shard_size="40KB", **kw) for name in ("mem", "stream"))
    save(quantize(r_mem), r_mem)
    quantize_to_disk(r_stream)
    mem, stream = files(tmp_path / "mem"), files(tmp_path / "stream")
    assert "model.safetensors.index.json" in mem
    assert mem.keys() == stream.keys()
    assert [name for name in mem if mem[name] != stream[name]] == []
    assert not (tmp_path / ".stream.partial").exists()


def test_offloaded_activations_give_the_same_bytes(small, tmp_path, monkeypatch):
    used = []
    allocate = llmq.job.pipeline.allocate_activations

    def spy(shape, dtype, device, offload_dir=None, name="hidden"):
        used.append(offload_dir)
        return allocate(shape, dtype, device, offload_dir, name)
    monkeypatch.setattr(llmq.job.pipeline, "allocate_activations", spy)
    quantize_to_disk(recipe(small, tmp_path / "ram"))
    assert used == [None]
    quantize_to_disk(recipe(small, tmp_path / "disk"), offload_activations=tmp_path / "acts")
    assert used[1] is not None and used[1].parent == tmp_path / "acts"
    assert not any((tmp_path / "acts").iterdir())  # cleaned up after the run
    assert files(tmp_path / "ram") == files(tmp_path / "disk")


def test_a_finished_output_is_never_touched_without_overwrite(small, tmp_path):
    r = recipe(small, tmp_path / "q")
    quantize_to_disk(r)
    before = files(tmp_path / "q")
    with pytest.raises(CheckpointError, match="not empty.*--overwrite"):
        quantize_to_disk(recipe(small, tmp_path / "q", bits=3))
    assert files(tmp_path / "q") == before
    quantize_to_disk(recipe(small, tmp_path / "q", bits=3), overwrite=True)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"] == 3


def test_an_unfinished_run_with_other_settings_is_not_resumed(small, tmp_path):
    work = tmp_path / ".q.partial"
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"settings": "another run", "next_layer": 1}))
    with pytest.raises(CheckpointError, match="other settings.*--overwrite"):
        quantize_to_disk(recipe(small, tmp_path / "q"))
    quantize_to_disk(recipe(small, tmp_path / "q"), overwrite=True)
    quantize_to_disk(recipe(small, tmp_path / "ref"))
    assert files(tmp_path / "q") == files(tmp_path / "ref")


def test_a_run_started_in_another_environment_starts_afresh(small, tmp_path, monkeypatch, caplog):
    """Same settings, other torch version (or device, dtype, batch size): resuming would not give the same bytes."""
    import llmq.job.runner

    real = llmq.job.runner._environment
    monkeypatch.setattr(llmq.job.runner, "_environment", lambda *a: {**real(*a), "torch": "0.0-elsewhere"})
    r = recipe(small, tmp_path / "q")
    with pytest.raises(KeyboardInterrupt):  # stopped after its first layer, as a kill would
        monkeypatch.setattr(llmq.job.runner, "kill_point", lambda name: (_ for _ in ()).throw(KeyboardInterrupt)
                            if name == "layer.committed" else None)
        quantize_to_disk(r)
    state = json.loads((tmp_path / ".q.partial" / "progress.json").read_text())
    assert state["next_layer"] == 1 and state["environment"]["torch"] == "0.0-elsewhere"
    monkeypatch.undo()
    with caplog.at_level("WARNING"):
        quantize_to_disk(r)
    assert "another environment (torch 0.0-elsewhere -> " in caplog.text and "starting afresh" in caplog.text
    quantize_to_disk(recipe(small, tmp_path / "ref"))
    assert files(tmp_path / "q") == files(tmp_path / "ref")


def test_bad_inputs_are_refused_with_the_fix(small, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (small / name).exists():
            (pickled / name).write_bytes((small / name).read_bytes())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        quantize_to_disk(recipe(pickled, tmp_path / "a"))

    partial = tmp_path / "partial"
    partial.mkdir()
    for p in small.iterdir():
        (partial / p.name).write_bytes(p.read_bytes())
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        quantize_to_disk(recipe(partial, tmp_path / "b"))
    assert not (tmp_path / "b").exists()

    quantize_to_disk(recipe(small, tmp_path / "q"))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_to_disk(recipe(tmp_path / "q", tmp_path / "c"))


# Anonymous memory of one quantization above the baseline after imports, sampled every 2 ms from a thread, and its
# peak in each layer (from one layer's "layer.solved" point to the next). Anonymous only: VmHWM also counts
# file-backed pages (shared libraries, mapped shards), which varied by ~100 MB from run to run under a full suite.
# Per layer, within one process: two processes' peaks differ by up to ~90 MB from their first layer on (heap
# state), which says nothing about memory held as layers go by; one process's later layers against its first do.
MEASURE = r"""
import json, sys, threading
import llmq.job.pipeline
from llmq.job.runner import quantize_to_disk
from llmq.config import Recipe

def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

recipe = Recipe.from_dict(json.loads(sys.argv[1]))
before, layer_peaks, done = anon(), [0], threading.Event()
def sample():
    while not done.wait(0.002):
        layer_peaks[-1] = max(layer_peaks[-1], anon() - before)
solved = llmq.job.pipeline.kill_point
def layer_solved(name, *args):
    if name == "layer.solved":
        layer_peaks.append(anon() - before)  # the next layer's peak starts from here
    solved(name, *args)
llmq.job.pipeline.kill_point = layer_solved
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
quantize_to_disk(recipe)
done.set()
sampler.join()
print(json.dumps({"layer_peaks": layer_peaks[:-1], "whole_run": max(layer_peaks)}))
"""


# The measured process's heap holds no freed memory to speak of: one malloc arena (each thread's arena keeps its own
# free memory, by thread timing), and a fixed mmap threshold, so every block over 1 MB is mapped and unmapped
# on free (glibc's default threshold rises to 32 MB after the first frees, and such blocks then stay in the heap:
# the layer peaks crept by up to 65 MB over 10 layers with it, and stay within 10 MB with this).
QUIET_HEAP = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}


@pytest.mark.slow
def test_peak_memory_grows_far_less_than_the_extra_layers(tmp_path, report):
    # float32 layers of 12.6M parameters (50 MB) on 10 layers: from the first two layers' peak to the last two's,
    # eight layers (403 MB) have gone by. Min-max ranges: the MSE search's time, not its memory.
    shape = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8)
    folder = make_model(tmp_path / "fp", num_hidden_layers=10, **shape)
    size = (folder / "model.safetensors").stat().st_size
    r = recipe(folder, tmp_path / "q", group_size=128, nsamples=4, mse=False)
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(r.to_dict())], capture_output=True, text=True,
                         env=QUIET_HEAP)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    peaks = measured["layer_peaks"]
    assert len(peaks) == 10
    layer = size / 10  # the embedding (vocab 512) is 2 MB of it
    growth = max(peaks[-2:]) - max(peaks[:2])
    report(f"streaming peak memory added per layer (MB): {' '.join(f'{p / 1e6:.0f}' for p in peaks)}; growth from "
           f"layers 0-1 to 8-9 {growth / 1e6:.0f} MB for 8 layers of {layer / 1e6:.0f} MB; whole run "
           f"{measured['whole_run'] / 1e6:.0f} MB, model {size / 1e6:.0f} MB")
    assert growth < 0.2 * 8 * layer
    assert measured["whole_run"] < size  # less than the model itself, calibration text and tokenizer included


# Named points (llmq/utils/killpoints.py) spread over a run of the 3-layer model, which writes its head (the
# embedding: spool write 1), then 30 tensors per layer, then the tail and the final shards.
# Each point with the layers its kill leaves committed (None: no state at all).
KILL_POINTS = {
    "spool.write@1": None,  # the embedding half-written, nothing committed yet
    "spool.write@45": 1,  # half a tensor of layer 1 on disk, after layer 0's commit
    "activations.write@2": 1,  # layer 1's outputs half saved
    "commit.written@2": 1,  # the new state written beside the old one, not yet renamed
    "commit.renamed@2": 2,  # renamed, the folder not yet fsynced
    "layer.committed@1": 1,  # between layers
    "shard.write@3": 3,  # laying out the final shards: a shard half-written
    "shard.renamed@1": 3,  # one shard complete, the others not
    "finish.shards_written": 3,  # all shards, no config yet
    "finish.metadata_written": 3,  # everything, the state still there
    "finish.state_removed": None,  # the state dropped, the folder not yet renamed
}


def committed(work: Path) -> int | None:
    path = work / "progress.json"
    return json.loads(path.read_text())["next_layer"] if path.is_file() else None


def cli_quantize(r: Recipe) -> list[str]:
    return ["quantize", r.model, "--method", r.quant.method, "--bits", str(r.quant.bits), "--group-size",
            str(r.quant.group_size), "--calib", r.calib.calib, "--nsamples", str(r.calib.nsamples), "--seqlen",
            str(r.calib.seqlen), "--max-shard-size", r.max_shard_size, "--out", r.out, "--tune-iters",
            str(r.quant.tune_iters)] + (["--bits-per-weight", str(r.quant.bits_per_weight)]
                                        if r.quant.bits_per_weight is not None else [])


def killed_at(point: str, r: Recipe) -> None:
    """Run ``llmq quantize`` in a child process that SIGKILLs itself at ``point``."""
    proc = subprocess.run([sys.executable, "-m", "llmq.cli", *cli_quantize(r)], capture_output=True, text=True,
                          env={**os.environ, "LLMQ_KILL_AT": point})
    assert proc.returncode == -signal.SIGKILL, f"{point} was never reached: {proc.stderr[-2000:]}"
    assert not Path(r.out).exists(), "a killed run never leaves an output that looks complete"


@pytest.mark.slow
def test_a_kill_at_any_point_then_rerun_gives_the_uninterrupted_bytes(small, tmp_path):
    reference = recipe(small, tmp_path / "ref", max_shard_size="40KB")
    quantize_to_disk(reference)
    ref = files(tmp_path / "ref")
    assert "model.safetensors.index.json" in ref  # several shards, so the layout can be cut between them
    for i, (point, layers) in enumerate(KILL_POINTS.items()):
        r = recipe(small, tmp_path / f"q{i}", max_shard_size="40KB")
        killed_at(point, r)
        assert committed(tmp_path / f".q{i}.partial") == layers, point
        quantize_to_disk(r)  # the same job again
        assert files(Path(r.out)) == ref, point
        assert not (tmp_path / f".q{i}.partial").exists()
    # killed, resumed, killed again while resuming, resumed again
    r = recipe(small, tmp_path / "twice", max_shard_size="40KB")
    killed_at("layer.committed@1", r)
    killed_at("spool.write@20", r)  # inside the layer after the one the first run finished
    quantize_to_disk(r)
    assert files(tmp_path / "twice") == ref


def test_a_tune_run_killed_between_layers_resumes_both_activation_streams(small, tmp_path):
    """Block-wise reconstruction carries the FP model's activations beside the quantized ones: both are saved
    with each layer's commit, and a resumed run continues from them to the uninterrupted bytes."""
    reference = recipe(small, tmp_path / "ref", method="tune", bits=3, tune_iters=10)
    quantize_to_disk(reference)
    r = recipe(small, tmp_path / "q", method="tune", bits=3, tune_iters=10)
    killed_at("layer.committed@1", r)
    work = tmp_path / ".q.partial"
    saved = json.loads((work / "progress.json").read_text())["hidden"]
    with safe_open(str(work / saved), framework="pt") as f:
        assert sorted(f.keys()) == ["hidden", "teacher"]
        assert not torch.equal(f.get_tensor("hidden"), f.get_tensor("teacher"))  # quantized vs FP stream
    quantize_to_disk(r)
    assert files(tmp_path / "q") == files(tmp_path / "ref")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    losses = qc["meta"]["llmq"]["tune_loss"]
    assert sorted(losses) == [f"model.layers.{i}" for i in range(3)]  # the first layer's, noted before the kill
    assert all(v["after"] <= v["before"] for v in losses.values())


def test_a_mixed_precision_run_killed_between_layers_resumes_with_the_widths_it_chose(small, tmp_path):
    """The allocation is part of the resume state: a resumed run skips the sensitivity pass and keeps the widths."""
    reference = recipe(small, tmp_path / "ref", bits_per_weight=3.6)
    quantize_to_disk(reference)
    r = recipe(small, tmp_path / "q", bits_per_weight=3.6)
    killed_at("layer.committed@1", r)
    notes = json.loads((tmp_path / ".q.partial" / "progress.json").read_text())["notes"]
    assert len({json.dumps(v) for k, v in notes.items() if k.startswith("widths/")}) > 1
    quantize_to_disk(r)
    assert files(tmp_path / "q") == files(tmp_path / "ref")


def test_a_run_killed_while_writing_its_final_files_starts_again(small, tmp_path, monkeypatch):
    import llmq.job.runner

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after the spool became shards: the committed state cannot resume
    monkeypatch.setattr(llmq.job.runner, "write_metadata", killed)
    with pytest.raises(KeyboardInterrupt):
        quantize_to_disk(recipe(small, tmp_path / "q"))
    assert (tmp_path / ".q.partial" / "progress.json").exists() and not (tmp_path / "q").exists()
    monkeypatch.undo()
    quantize_to_disk(recipe(small, tmp_path / "q"))
    quantize_to_disk(recipe(small, tmp_path / "ref"))
    assert files(tmp_path / "q") == files(tmp_path / "ref")
