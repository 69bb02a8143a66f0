import logging

import pytest
import torch
from helpers import shared_path
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmq.algorithms.gptq import HessianAccumulator, gptq_quantize
from llmq.algorithms.quant import quantize, row_qparams, rtn_quantize
from llmq.config import QuantConfig


def slow_gptq(W, H, cfg):
    """Column-by-column OBS updates with an explicit inverse Hessian (Frantar et al., Eq. 2-3).

    Written from the paper, independently of the Cholesky/lazy-block solver: quantize column j,
    move every remaining weight by -(w_j - q_j) / [H^-1]_jj * [H^-1]_j,: and remove j from H^-1 by
    Gaussian elimination. Float64 throughout.
    """
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    gs = cfg.group_size if cfg.group_size > 0 else cols
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H).float(), descending=True) if cfg.act_order else torch.arange(cols)
    static = [row_qparams(W[:, i : i + gs], cfg.bits, cfg.sym, cfg.mse) for i in range(0, cols, gs)]
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.inv(H + cfg.damp_percent * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype))
    Q = torch.zeros_like(W)
    for j in range(cols):
        if cfg.static_groups:
            scale, zero = static[int(perm[j]) // gs]
        elif j % gs == 0:
            scale, zero = row_qparams(W[:, j : j + gs].float(), cfg.bits, cfg.sym, cfg.mse)
        q = quantize(W[:, j].float(), scale, zero, cfg.maxq).double()
        Q[:, j] = scale.double() * (q - zero.double())
        W -= ((W[:, j] - Q[:, j]) / Hinv[j, j])[:, None] * Hinv[j][None, :]
        Hinv -= Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q[:, torch.argsort(perm)].float()


def random_problem(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(4 * cols, cols, generator=g) @ mix * torch.rand(cols, generator=g) * 3  # correlated, uneven
    acc = HessianAccumulator(cols)
    acc.add(X)
    return torch.randn(rows, cols, generator=g) * 0.1, acc.hessian()


def output_error(W, Q, H):
    D = (W - Q).double()
    return torch.trace(D @ H.double() @ D.T).item()


@pytest.mark.parametrize("group_size, block_size", [(-1, 128), (32, 128), (32, 48), (64, 16), (24, 128)])
@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, True), (True, False)])
def test_blocked_solver_matches_column_by_column_reference(group_size, block_size, act_order, static_groups):
    for seed in range(2):
        W, H = random_problem(24, 160, seed)
        cfg = QuantConfig(bits=3, group_size=group_size, block_size=block_size, act_order=act_order,
                          static_groups=static_groups)
        fast = gptq_quantize(W, H, cfg).weight.dequantize()
        slow = slow_gptq(W, H, cfg)
        # float32 vs float64 can flip a rounding that sits on a boundary; anything more is a bug
        mismatch = (fast != slow).float().mean().item()
        assert mismatch < 0.01, f"{mismatch:.2%} of weights differ"
        assert output_error(W, fast, H) == pytest.approx(output_error(W, slow, H), rel=2e-3)


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_rtn_codes(group_size, sym, act_order):
    W = torch.randn(32, 96)
    cfg = QuantConfig(bits=3, group_size=group_size, sym=sym, act_order=act_order, static_groups=True)
    res = gptq_quantize(W, 2 * torch.eye(96), cfg)
    rtn = rtn_quantize(W, cfg)
    assert torch.equal(res.weight.codes, rtn.codes)
    assert torch.equal(res.weight.scales, rtn.scales)
    assert torch.equal(res.weight.zeros, rtn.zeros)


def test_dead_inputs_get_zero_weights():
    W, H = random_problem(8, 64, 0)
    H[5, :] = H[:, 5] = 0
    qw = gptq_quantize(W, H, QuantConfig(bits=4, group_size=32)).weight
    assert (qw.dequantize()[:, 5] == 0).all()


def test_damping_is_raised_until_cholesky_succeeds():
    H = torch.eye(64)
    H[0, 0] = -0.05  # not PD; 1% damping (0.0098) is not enough, 10% is
    res = gptq_quantize(torch.randn(4, 64), H, QuantConfig(bits=4, group_size=32))
    assert not res.fell_back_to_rtn
    assert res.damp == pytest.approx(0.1 * H.diag().mean().item())


def test_hopeless_hessian_falls_back_to_rtn_with_a_warning(caplog):
    H = torch.eye(64)
    H[0, 0] = -1000.0  # no damping up to 10x mean(diag) makes this PD
    W = torch.randn(4, 64)
    cfg = QuantConfig(bits=4, group_size=32)
    with caplog.at_level(logging.WARNING, logger="llmq.algorithms.gptq"):
        res = gptq_quantize(W, H, cfg)
    assert res.fell_back_to_rtn
    assert torch.equal(res.weight.codes, rtn_quantize(W, cfg).codes)
    assert "falls back to RTN" in caplog.text


@pytest.fixture(scope="module")
def tiny_llama_layer_inputs():
    """Full-precision inputs of every linear in two layers of llmq-tiny-llama on C4 calibration text."""
    path = shared_path("assets", "llmq-tiny-llama")
    c4 = shared_path("assets", "c4-sample", "c4_train_00000_first1000.jsonl")
    import json

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    text = "\n\n".join(json.loads(line)["text"] for line in c4.read_text().splitlines()[:60])
    ids = torch.tensor(tok(text).input_ids[: 16 * 256]).view(16, 256)
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".layers.0." in name or ".layers.4." in name):
            inputs[name] = []
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: inputs[name].append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    weights = dict(model.named_modules())
    return {name: (weights[name].weight.data, torch.cat(xs)) for name, xs in inputs.items()}


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_output_error_below_rtn_on_real_layers(tiny_llama_layer_inputs, bits):
    cfg = QuantConfig(bits=bits, group_size=128)
    for name, (W, X) in tiny_llama_layer_inputs.items():
        acc = HessianAccumulator(X.shape[1])
        acc.add(X)
        q_gptq = gptq_quantize(W, acc.hessian(), cfg).weight.dequantize()
        q_rtn = rtn_quantize(W, cfg).dequantize()
        err_gptq = torch.linalg.norm(X @ (W - q_gptq).T).item()
        err_rtn = torch.linalg.norm(X @ (W - q_rtn).T).item()
        assert err_gptq < err_rtn, f"{name}: GPTQ {err_gptq:.4g} >= RTN {err_rtn:.4g}"


def test_linears_fed_the_same_input_share_one_hessian_equal_to_their_own():
    from helpers import tiny_model

    from llmq.job.methods import SharedHessians
    from llmq.job.pipeline import _observe
    from llmq.utils.timing import StageTimes

    layer = tiny_model("llama", num_hidden_layers=1).model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
    modules = {n: layer.get_submodule(n) for n in names}
    hidden = torch.randn(6, 16, 64)
    pos = torch.arange(16)[None]
    kwargs = {"position_embeddings": tiny_model("llama").model.rotary_emb(hidden, pos), "attention_mask": None}
    shared = SharedHessians(modules, StageTimes())
    _observe(layer, hidden, kwargs, 4, modules, shared.add)
    own = {n: HessianAccumulator(m.in_features) for n, m in modules.items()}
    _observe(layer, hidden, kwargs, 4, modules, lambda n, x: own[n].add(x))
    assert len(shared.accs) == 2  # one for q/k/v (the normed input), one for gate/up
    for n in names:
        assert torch.equal(shared.hessian(n), own[n].hessian())


def test_a_freed_input_s_memory_is_never_taken_for_a_shared_input_and_no_input_is_kept_alive():
    """Experts' inputs are fresh tensors of one shape, each freed before the next is made (so the allocator may hand
    the same memory out again); only linears called on one live tensor share a Hessian, and SharedHessians holds no
    input once its linears have run (an MoE layer's 128 down_proj inputs would otherwise stay: 805 MB)."""
    import gc

    from llmq.job.methods import SharedHessians
    from llmq.utils.timing import StageTimes

    modules = {f"experts.{e}.{n}": torch.nn.Linear(8, 4) for e in range(3) for n in ("gate", "up")}
    shared = SharedHessians(modules, StageTimes())
    for e in range(3):
        x = torch.randn(5, 8)
        shared.add(f"experts.{e}.gate", x)
        shared.add(f"experts.{e}.up", x)
        del x
        gc.collect()
    assert sorted(shared.accs) == [f"experts.{e}.gate" for e in range(3)]  # each expert's gate/up share, no other
    assert all(shared.owner[f"experts.{e}.up"] == f"experts.{e}.gate" for e in range(3))
    assert all(ref() is None for ref in shared.last.values())


@pytest.mark.parametrize("part_elements", [1 << 24, 100])  # one row block, and row blocks of one row
def test_exact_sums_do_not_depend_on_how_the_batches_are_split_between_ranks(monkeypatch, part_elements):
    """Issue 16: ranks sum their own batches, then add the ranks' sums. With ``exact=True`` (float64 sums of each
    batch's float32 part) that is one process's H bit for bit, for any split; the float32 running sum is not (the
    control), and the exact H is the float32 one's within float32 rounding."""
    monkeypatch.setattr(HessianAccumulator, "PART_ELEMENTS", part_elements)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(96, 96, generator=g) / 10 + torch.eye(96)
    batches = [(torch.randn(3, 40, 96, generator=g) @ mix) * torch.rand(96, generator=g) * 4 for _ in range(12)]

    def hessian(exact, split):
        parts = []
        for share in (batches[:split], batches[split:]):
            acc = HessianAccumulator(96, exact=exact)
            for x in share:
                acc.add(x)
            parts.append(acc)
        if split:  # what Ranks.sum_ does: rank 0's sum plus rank 1's, and their token counts
            parts[0].sum += parts[1].sum
            parts[0].n_tokens += parts[1].n_tokens
        return parts[0].hessian() if split else parts[1].hessian()

    one = hessian(True, 0)
    assert one.dtype == torch.float32
    for split in (1, 5, 6, 11):
        assert torch.equal(hessian(True, split), one), split
    assert not all(torch.equal(hessian(False, split), hessian(False, 0)) for split in (1, 5, 6, 11))
    torch.testing.assert_close(hessian(False, 0), one, rtol=1e-5, atol=1e-5 * one.abs().max().item())


@pytest.mark.parametrize("act_order", [False, True])
def test_linears_sharing_a_hessian_solved_together_give_their_own_solves_codes(monkeypatch, act_order):
    """q/k/v and gate/up of llmq-tiny-llama are solved as one stacked weight each (4 solves per layer, not 7): every
    linear's codes, scales and zeros are those of its own solve (``JOINT_BYTES=0``: one linear per solve), bit for
    bit, since GPTQ and its range search treat each row on its own."""
    import llmq.algorithms.gptq
    import llmq.job.methods as methods
    from llmq.job.pipeline import quantize_layers

    model_dir = shared_path("assets", "llmq-tiny-llama")
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(bits=3, group_size=64, act_order=act_order)
    solves, solve = [], llmq.algorithms.gptq.gptq_quantize
    monkeypatch.setattr(methods, "gptq_quantize", lambda W, H, c: solves.append(W.shape[0]) or solve(W, H, c))
    runs = {}
    for joint in (methods.JOINT_BYTES, 0):
        monkeypatch.setattr(methods, "JOINT_BYTES", joint)
        solves.clear()
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        runs[joint] = quantize_layers(model, ids, cfg)
        assert len(solves) == (4 if joint else 7) * model.config.num_hidden_layers
    together, alone = runs.values()
    assert together.keys() == alone.keys()
    for name, qw in alone.items():
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(together[name], field), getattr(qw, field)), (name, field)
