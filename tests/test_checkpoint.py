"""Packed checkpoints: save -> from_pretrained round trips, determinism, strict refusal of bad files."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import cpu_int4, shared_path, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmq
from llmq.config import QuantConfig, Recipe
from llmq.errors import CheckpointError
from llmq.eval.ppl import perplexity
from llmq.formats.export import save_packed
from llmq.formats.info import checkpoint_info
from llmq.io.data import calibration_windows, eval_windows
from llmq.job.e2e import quantize_model
from llmq.job.pipeline import quantize_layers
from llmq.job.runner import quantize, save
from llmq.runtime.qlinear import QuantLinear


@pytest.fixture(scope="module")
def tiny_llama():
    path = shared_path("assets", "llmq-tiny-llama")
    rows = shared_path("assets", "c4-sample", "c4_train_00000_first1000.jsonl").read_text().splitlines()
    c4 = [json.loads(r)["text"] for r in rows]
    tok = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(c4[:900], tok, nsamples=16, seqlen=128, seed=0, per_document=True)
    evals = eval_windows(c4[900:], tok, 256)[:40]
    return path, tok, calib, evals


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_save_then_from_pretrained_gives_the_in_memory_model(tiny_llama, tmp_path, bits, sym, act_order):
    path, tok, calib, evals = tiny_llama
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = QuantConfig(bits=bits, group_size=128, sym=sym, act_order=act_order)
    results = quantize_layers(model, calib, cfg, device="cpu")
    save_packed(model, tok, results, tmp_path / "q", cfg)
    loaded = llmq.from_pretrained(str(tmp_path / "q"), torch_dtype=torch.float32)
    assert {c.kernel for c in loaded.llmq_kernels.values()} == {cpu_int4() if cpu_int4() == "int4_avx2" else "dequant"}
    qlinears = [m for m in llmq.from_pretrained(str(tmp_path / "q"), torch_dtype=torch.float32, kernel="pure").modules()
                if isinstance(m, QuantLinear)]
    assert len(qlinears) == len(loaded.llmq_kernels) == len(results) == 6 * 7
    if act_order:
        assert any(not torch.equal(m.g_idx, m.g_idx.sort().values) for m in qlinears), "act-order g_idx kept"
    with torch.no_grad():
        want, got = model(evals[:4]).logits, loaded(evals[:4]).logits
    # unquantized tensors (embeddings, norms) are stored in float16: logits agree to that precision
    assert torch.allclose(got, want, atol=2e-2, rtol=1e-3), (got - want).abs().max()
    ppl_mem = perplexity(model, evals, batch_size=8, progress=False)["ppl"]
    ppl_packed = perplexity(loaded, evals, batch_size=8, progress=False)["ppl"]
    assert ppl_packed == pytest.approx(ppl_mem, rel=1e-3)
    generated = loaded.generate(evals[:1, :8], max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, model.generate(evals[:1, :8], max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("e2e_steps", [0, 10], ids=["block-wise", "then-end-to-end"])
def test_a_tuned_checkpoint_reloads_to_the_in_memory_model(tiny_llama, tmp_path, e2e_steps):
    """Issue 14: block-wise reconstruction, and the end-to-end phase after it, write plain codes, fp16 scales and
    zeros in the same layout."""
    path, tok, calib, evals = tiny_llama
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = QuantConfig(method="tune", bits=3, group_size=128, sym=False, tune_iters=20, e2e_steps=e2e_steps,
                      e2e_batch=4)
    results = quantize_model(model, calib, cfg, device="cpu")
    save_packed(model, tok, results, tmp_path / "q", cfg)
    loaded = llmq.from_pretrained(str(tmp_path / "q"), torch_dtype=torch.float32)
    with torch.no_grad():
        want, got = model(evals[:4]).logits, loaded(evals[:4]).logits
    assert torch.allclose(got, want, atol=2e-2, rtol=1e-3), (got - want).abs().max()
    pure = {n: m for n, m in llmq.from_pretrained(str(tmp_path / "q"), torch_dtype=torch.float32,
                                                  kernel="pure").named_modules() if isinstance(m, QuantLinear)}
    assert sorted(pure) == sorted(results)
    for name, m in pure.items():
        assert torch.equal(m.dequantized_weight(torch.float32), results[name].dequantize()), name


@pytest.mark.parametrize("method", [dict(method="gptq", act_order=True), dict(method="awq"),
                                    dict(method="tune", tune_iters=10),
                                    dict(method="tune", tune_iters=10, e2e_steps=5, e2e_batch=4)],
                         ids=["gptq", "awq", "tune", "tune-then-end-to-end"])
def test_same_recipe_and_seed_give_identical_bytes(tmp_path, method):
    recipe = dict(model=str(shared_path("assets", "stories260K")), **method, bits=3, group_size=32,
                  nsamples=8, seqlen=64, max_shard_size="100KB",
                  calib=str(shared_path("assets", "tinystories-text", "tinystories_sample.cs336.txt")))
    outs = []
    for run in range(2):
        r = Recipe.from_dict({**recipe, "out": str(tmp_path / f"run{run}")})
        outs.append(save(quantize(r), r))
    files = sorted(p.name for p in outs[0].iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    assert files == sorted(p.name for p in outs[1].iterdir())
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    info = checkpoint_info(outs[0])
    # stories260K: gate/up have 172 outputs and down 172 inputs, which the layout cannot hold
    assert info["unquantized"] == sorted(f"model.layers.{i}.mlp.{n}" for i in range(5)
                                         for n in ("down_proj", "gate_proj", "up_proj"))
    qc = json.loads((outs[0] / "config.json").read_text())["quantization_config"]
    assert qc["modules_in_block_to_quantize"] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                 ["self_attn.o_proj"]]
    assert qc == json.loads((outs[0] / "quantize_config.json").read_text())


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A random tiny LLaMA (all dims multiples of 32), RTN W4 g32 asymmetric, packed; and its in-memory twin."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    cfg = QuantConfig(method="rtn", bits=4, group_size=32, sym=False)
    results = quantize_layers(model, torch.zeros(1, 4, dtype=torch.long), cfg)
    out = tmp_path_factory.mktemp("ckpt") / "q"
    save_packed(model, None, results, out, cfg)
    return model, out


def test_info_reports_bits_and_size(small_checkpoint):
    _, out = small_checkpoint
    info = checkpoint_info(out)
    assert info["bits"] == 4 and info["group_size"] == 32 and info["method"] == "rtn"
    # 4-bit codes + per 32 weights one fp16 scale and one 4-bit zero, + an int32 g_idx per input column
    assert 4 + 20 / 32 < info["effective_bits_per_weight"] < 4 + 20 / 32 + 32 / 64 + 1e-9
    assert info["unquantized"] == []


def test_device_map_places_the_model(small_checkpoint):
    model, out = small_checkpoint
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
        for device_map in ("auto", "cpu", {"": "cpu"}):
            got = llmq.from_pretrained(str(out), torch_dtype=torch.float32, device_map=device_map)(ids).logits
            assert torch.allclose(got, want, atol=1e-2), device_map


def _corrupt(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def _edit_config(fn):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        fn(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _garbage_header(folder):
    path = folder / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + path.read_bytes()[24:])


def _drop_tensor(name):
    def edit(folder):
        tensors = load_file(folder / "model.safetensors")
        del tensors[name]
        save_file(tensors, folder / "model.safetensors")
    return edit


@pytest.mark.parametrize("edit, message", [
    (_truncate, "corrupt or truncated .*not fully covered"),
    (_garbage_header, "corrupt or truncated"),
    (_drop_tensor("model.layers.1.mlp.up_proj.qzeros"), "up_proj lacks tensor\\(s\\) qzeros"),
    (_drop_tensor("model.norm.weight"), "lacks 1 tensor\\(s\\).*model.norm.weight"),
    (_edit_config(lambda qc: qc.update(bits=3)), "qweight has shape .* expected .* config and tensors disagree"),
    (_edit_config(lambda qc: qc.update(bits=5)), "bits=5"),
    (_edit_config(lambda qc: qc.update(quant_method="bitsandbytes")), "quant_method 'bitsandbytes' is not supported"),
    (_edit_config(lambda qc: qc.update(checkpoint_format="marlin")), "checkpoint_format 'marlin' is not supported"),
    (lambda folder: (folder / "model.safetensors").unlink(), "neither model.safetensors"),
])
def test_bad_checkpoints_are_refused_with_the_reason(small_checkpoint, tmp_path, edit, message):
    _, out = small_checkpoint
    with pytest.raises(CheckpointError, match=message):
        llmq.from_pretrained(_corrupt(out, tmp_path / "bad", edit))


def test_missing_shard_and_plain_model_are_refused(tmp_path, small_checkpoint):
    model, _ = small_checkpoint
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no quantization_config"):
        llmq.from_pretrained(str(tmp_path / "plain"))
    with pytest.raises(CheckpointError, match="does not exist"):
        llmq.from_pretrained(str(tmp_path / "nowhere"))
    cfg = QuantConfig(method="rtn", bits=4, group_size=32)
    results = quantize_layers(model, torch.zeros(1, 4, dtype=torch.long), cfg)
    save_packed(model, None, results, tmp_path / "sharded", cfg, max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} listed in the index is missing"):
        llmq.from_pretrained(str(tmp_path / "sharded"))


def autogptq_pack(intweight_kn: np.ndarray, zeros_gn: np.ndarray, bits: int):
    """AutoGPTQ's ``QuantLinear.pack`` loops (qlinear_cuda_old.py), transcribed with numpy uint32."""
    def pack_rows(x):  # x: [R, C] -> [R*bits/32, C]
        x = x.astype(np.uint32)
        out = np.zeros((x.shape[0] * bits // 32, x.shape[1]), dtype=np.uint32)
        i, row = 0, 0
        while row < out.shape[0]:
            if bits in (2, 4, 8):
                for j in range(i, i + 32 // bits):
                    out[row] |= x[j] << (bits * (j - i))
                i += 32 // bits
                row += 1
            else:  # 3 bits: 32 values in 3 words
                for j in range(i, i + 10):
                    out[row] |= x[j] << (3 * (j - i))
                i += 10
                out[row] |= x[i] << 30
                row += 1
                out[row] |= (x[i] >> 2) & 1
                i += 1
                for j in range(i, i + 10):
                    out[row] |= x[j] << (3 * (j - i) + 1)
                i += 10
                out[row] |= x[i] << 31
                row += 1
                out[row] |= (x[i] >> 1) & 0x3
                i += 1
                for j in range(i, i + 10):
                    out[row] |= x[j] << (3 * (j - i) + 2)
                i += 10
                row += 1
        return out.view(np.int32)

    return pack_rows(intweight_kn), pack_rows(zeros_gn.T).T.copy()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_reads_checkpoints_packed_the_autogptq_way(tmp_path, bits, fmt):
    """A checkpoint whose tensors come from AutoGPTQ's packing loops (act-order g_idx) loads exactly."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    cfg = QuantConfig(method="gptq", bits=bits, group_size=32, act_order=True, mse=False)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    results = quantize_layers(model, calib, cfg)
    save_packed(model, None, results, tmp_path / "llmq", cfg, fmt="gptq_v2")
    tensors = load_file(tmp_path / "llmq" / "model.safetensors")
    for name, qw in results.items():
        zeros = qw.zeros.T.numpy().astype(np.int64) - (1 if fmt == "gptq" else 0)  # v1 stores zero - 1
        zeros = zeros & (2**bits - 1)  # AutoGPTQ wraps -1 the same way; our zeros are >= 1 with v1 below
        qweight, qzeros = autogptq_pack(qw.codes.T.numpy(), zeros, bits)
        tensors[f"{name}.qweight"] = torch.from_numpy(qweight)
        tensors[f"{name}.qzeros"] = torch.from_numpy(qzeros)
    if fmt == "gptq" and any(bool((qw.zeros == 0).any()) for qw in results.values()):
        pytest.skip("a zero point of 0 cannot be written in v1 (covered by test_pack)")
    save_file(tensors, tmp_path / "llmq" / "model.safetensors")
    config = json.loads((tmp_path / "llmq" / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = fmt
    (tmp_path / "llmq" / "config.json").write_text(json.dumps(config))
    loaded = llmq.from_pretrained(str(tmp_path / "llmq"), torch_dtype=torch.float32, kernel="pure")
    modules = dict(loaded.named_modules())
    for name, qw in results.items():
        assert torch.equal(modules[name].dequantized_weight(torch.float32), qw.dequantize()), name


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features", [96, 160, 640])
def test_sliced_forward_matches_the_full_dequantized_reference(bits, in_features):
    """QuantLinear's forward (a slice of rows at a time) equals x @ W^T with the whole weight unpacked."""
    from llmq.formats.pack import pack_gptq

    g = torch.Generator().manual_seed(bits)
    n, gs = 64, 32
    codes = torch.randint(0, 2**bits, (n, in_features), generator=g, dtype=torch.uint8)
    zeros = torch.randint(1, 2**bits, (n, in_features // gs), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, in_features // gs, generator=g).half().float()
    g_idx = (torch.randperm(in_features, generator=g) // gs).int()  # act-order style
    layer = QuantLinear(in_features, n, bits, in_features // gs, bias=True, zero_offset=1, dtype=torch.float32)
    for name, t in pack_gptq(codes, scales, zeros, g_idx, bits, "gptq").items():
        getattr(layer, name).copy_(t)
    layer.bias.copy_(torch.randn(n, generator=g))
    x = torch.randn(3, 5, in_features, generator=g)
    want = torch.nn.functional.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-3)  # float32, another summation order
    from llmq.algorithms.quant import dequantize

    assert torch.equal(layer.dequantized_weight(torch.float32), dequantize(codes, scales, zeros, g_idx))


def test_streamed_shards_are_the_bytes_save_file_writes(tmp_path):
    from llmq.io.checkpoint import save_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(5, 7, generator=g).half(), "b": torch.randn(3, generator=g).bfloat16(),
               "codes": torch.randint(0, 2**31 - 1, (4, 2), dtype=torch.int32, generator=g),
               "u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "idx": torch.arange(6)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    save_tensors(tmp_path / "ours.safetensors", tensors)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_spool_resumed_from_a_commit_discards_what_came_after(tmp_path):
    from llmq.io.checkpoint import SpoolWriter

    tensors = {f"t{i}": torch.randn(100, 10 + i) for i in range(6)}
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    ref = SpoolWriter(tmp_path / "ref")
    for k, t in tensors.items():
        ref.add(k, t)
    ref.close(max_bytes=12_000)
    killed = SpoolWriter(tmp_path / "run")
    for k in ("t0", "t1", "t2"):
        killed.add(k, tensors[k])
    state = json.loads(json.dumps(killed.sync()))  # what a run commits to progress.json
    killed.add("t3", torch.full((100, 13), float("nan")))  # written after the commit, then "killed"
    killed.file.close()
    resumed = SpoolWriter(tmp_path / "run", state=state)
    for k in ("t3", "t4", "t5"):
        resumed.add(k, tensors[k])
    resumed.close(max_bytes=12_000)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert len(names) > 2 and names == sorted(p.name for p in (tmp_path / "run").iterdir())
    assert all((tmp_path / "ref" / n).read_bytes() == (tmp_path / "run" / n).read_bytes() for n in names)
    assert torch.equal(load_file(tmp_path / "run" / "model-00002-of-00003.safetensors")["t2"], tensors["t2"])


@pytest.mark.parametrize("qc, shapes, kernel, why", [
    (dict(quant_method="gptq", bits=4, group_size=128, sym=True, checkpoint_format="gptq"),
     {"a": (256, 256), "b": (768, 256)}, "gptq_marlin", []),
    (dict(quant_method="gptq", bits=8, group_size=-1, sym=True, desc_act=True), {"a": (256, 768)}, "gptq_marlin", []),
    (dict(quant_method="gptq", bits=4, group_size=128, sym=False, checkpoint_format="gptq"), {"a": (256, 256)},
     "gptq", ["asymmetric"]),
    (dict(quant_method="gptq", bits=3, group_size=256, sym=True), {"a": (256, 256)}, "gptq",
     ["bits=3", "group_size=256"]),
    (dict(quant_method="gptq", bits=4, group_size=32, sym=True), {"a": (64, 64)}, "gptq", ["(64 x 64) need"]),
    (dict(quant_method="awq", bits=4, group_size=128, zero_point=True), {"a": (256, 256)}, "awq_marlin", []),
])
def test_info_says_which_vllm_kernel_a_checkpoint_gets(qc, shapes, kernel, why):
    from llmq.formats.info import vllm_kernel

    got = vllm_kernel(qc, shapes)
    assert got["kernel"] == kernel
    assert len(got["why_not_marlin"]) == len(why) and all(w in r for w, r in zip(why, got["why_not_marlin"],
                                                                                  strict=True)), got


def test_info_reads_the_shapes_from_the_checkpoint(small_checkpoint):
    _, out = small_checkpoint  # RTN W4 g32, asymmetric, hidden 64: two reasons Marlin does not take it
    # (of the 2 x 7 linears only down_proj, 64 x 128, has the shape Marlin needs)
    vllm = checkpoint_info(out)["vllm"]
    assert vllm["kernel"] == "gptq" and len(vllm["why_not_marlin"]) == 2
    assert "asymmetric" in vllm["why_not_marlin"][0] and "12 linear(s)" in vllm["why_not_marlin"][1]
