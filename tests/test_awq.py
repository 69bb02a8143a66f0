import pytest
import torch
from helpers import shared_path, tiny_model
from transformers import AutoModelForCausalLM

from llmq.algorithms.awq import can_fold, fold_scales, search_clip, search_scale
from llmq.algorithms.quant import _minmax_qparams, quantize, rtn_quantize
from llmq.arch import ARCHITECTURES, get_arch, get_layers
from llmq.arch.experts import split_experts
from llmq.config import QuantConfig

CALIB = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
CFG3 = QuantConfig(method="rtn", bits=3, group_size=32)


def _randomise_norms(model, gen):
    """Every norm's weight drawn from [0.5, 1.5] (Gemma's zeros and LLaMA's ones would hide a wrong fold)."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)


def _fold(layer, group, scales):
    prev = layer.get_submodule(group.prev)
    rows = group.prev_rows.span(prev.out_features) if group.prev_rows else None
    fold_scales(prev, [layer.get_submodule(n) for n in group.linears], scales,
                [layer.get_submodule(n) for n in group.also], rows, group.norm_offset)


def _foldable(layer, group) -> bool:
    prev = layer.get_submodule(group.prev)
    rows = group.prev_rows.span(prev.out_features) if group.prev_rows else None
    return can_fold(prev, [layer.get_submodule(n) for n in group.linears], [layer.get_submodule(n) for n in group.also],
                    rows)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_folding_random_scales_is_exact(model_type):
    """Random scales folded into every scale group the table names leave the logits as they were: norms of
    either kind (Gemma's 1 + w), whole linears and row slices of fused ones (Phi-3's v and up halves)."""
    gen = torch.Generator().manual_seed(0)
    # as many kv heads as heads, so that v -> o folds (and Phi-3's v slice of qkv_proj is exercised)
    model = tiny_model(model_type, num_key_value_heads=4)
    _randomise_norms(model, gen)
    spec = get_arch(model_type)
    split_experts(model, spec)
    with torch.no_grad():
        before = model(CALIB).logits
    folded, norms = set(), set()
    for i, layer in enumerate(get_layers(model, spec)):
        for group in spec.layer_scale_groups(model.config, i):
            linears = [layer.get_submodule(name) for name in group.linears]
            if not isinstance(layer.get_submodule(group.prev), torch.nn.Linear):
                norms.add(group.prev)
            if not _foldable(layer, group):
                with pytest.raises(ValueError):
                    _fold(layer, group, torch.ones(linears[0].in_features))
                continue
            _fold(layer, group, torch.randn(linears[0].in_features, generator=gen).exp())
            folded.add(group.prev.rsplit(".", 2)[-1] if "experts" in group.prev else group.prev)
    assert norms <= folded, "every norm the table names takes its scale"
    assert {"self_attn.v_proj", "self_attn.qkv_proj"} & folded  # v -> o, or v's rows of a fused qkv -> o
    assert {"mlp.up_proj", "up_proj", "w3", "mlp.gate_up_proj"} & folded  # up -> down, dense, per expert or fused
    with torch.no_grad():
        after = model(CALIB).logits
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()


@pytest.mark.parametrize("model_type", sorted(t for t, s in ARCHITECTURES.items()
                                              if any(g.norm_offset or g.prev_rows for g in s.scale_groups)))
def test_folds_are_wrong_without_the_norm_kind_and_the_row_slice(model_type):
    """The control: Gemma's norms folded as ``w * x`` norms, or a fused linear's slice folded from its first
    rows, change the logits, so the exact folds above rest on ``norm_offset`` and ``prev_rows``."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_model(model_type, num_key_value_heads=4)
    _randomise_norms(model, gen)
    spec = get_arch(model_type)
    with torch.no_grad():
        before = model(CALIB).logits
    layer = get_layers(model, spec)[0]
    group = next(g.resolved(model.config) for g in spec.scale_groups if g.norm_offset or g.prev_rows)
    prev = layer.get_submodule(group.prev)
    n = layer.get_submodule(group.linears[0]).in_features
    wrong = (0, n) if group.prev_rows else None  # the first rows instead of the slice
    fold_scales(prev, [layer.get_submodule(x) for x in group.linears], torch.randn(n, generator=gen).exp(), (),
                wrong, 0.0)
    with torch.no_grad():
        assert not torch.allclose(model(CALIB).logits, before, atol=1e-3)


def test_fold_rejects_mismatched_and_unsupported():
    prev, fc = torch.nn.Linear(8, 16), torch.nn.Linear(12, 4)
    assert not can_fold(prev, [fc])
    with pytest.raises(ValueError):
        fold_scales(prev, [fc], torch.ones(12))
    assert not can_fold(torch.nn.GELU(), [torch.nn.Linear(8, 4)])


def test_fold_into_layernorm_with_bias_and_linear():
    torch.manual_seed(0)
    x = torch.randn(10, 8)
    for prev in (torch.nn.LayerNorm(8), torch.nn.Linear(6, 8)):
        if isinstance(prev, torch.nn.LayerNorm):
            x_in = x
            with torch.no_grad():
                prev.weight.uniform_(0.5, 2)
                prev.bias.normal_()
        else:
            x_in = torch.randn(10, 6)
        fcs = [torch.nn.Linear(8, 5), torch.nn.Linear(8, 3)]
        with torch.no_grad():
            want = [fc(prev(x_in)) for fc in fcs]
            fold_scales(prev, fcs, torch.randn(8).exp())
            got = [fc(prev(x_in)) for fc in fcs]
        for a, b in zip(want, got, strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_searched_scales_fold_exactly_on_stories260k():
    model = AutoModelForCausalLM.from_pretrained(shared_path("assets", "stories260K")).eval()
    layer = get_layers(model, get_arch("llama"))[1]
    captured = {}

    def hook(name):
        return lambda module, args: captured.__setitem__(name, args[0].detach().clone())

    handles = [layer.mlp.register_forward_pre_hook(hook("mlp")),
               layer.mlp.down_proj.register_forward_pre_hook(hook("down"))]
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    for h in handles:
        h.remove()
    mlp_lin = [layer.mlp.gate_proj, layer.mlp.up_proj]
    s_mlp, loss_mlp = search_scale(captured["mlp"], mlp_lin, layer.mlp, CFG3)
    s_down, loss_down = search_scale(captured["down"], [layer.mlp.down_proj], layer.mlp.down_proj, CFG3, duo=True)
    for s in (s_mlp, s_down):
        assert torch.isfinite(s).all() and (s > 0).all()
    assert not (torch.allclose(s_mlp, torch.ones_like(s_mlp)) and torch.allclose(s_down, torch.ones_like(s_down)))
    assert loss_mlp >= 0 and loss_down >= 0
    fold_scales(layer.post_attention_layernorm, mlp_lin, s_mlp)
    fold_scales(layer.mlp.up_proj, [layer.mlp.down_proj], s_down)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()


@pytest.mark.parametrize("duo", [False, True])
def test_search_scale_beats_rtn_with_outlier_channels(duo):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=gen)
    outliers = torch.tensor([3, 17, 40, 77, 100])
    x[:, outliers] *= torch.linspace(10, 50, len(outliers))
    fc = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(64, 128, generator=gen) * 0.05)
    original = fc.weight.detach().clone()
    _, rtn_loss = search_scale(x, [fc], fc, CFG3, n_grid=1)  # alpha = 0 only: s = 1, plain RTN
    with torch.no_grad():
        direct = (fc(x) - x @ rtn_quantize(original, CFG3).dequantize().T).pow(2).mean().item()
    assert rtn_loss == pytest.approx(direct, rel=1e-4)
    scales, loss = search_scale(x, [fc], fc, CFG3, duo=duo)
    assert torch.equal(fc.weight, original), "weights are restored"
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert loss <= rtn_loss
    assert loss < 0.9 * rtn_loss


@pytest.mark.parametrize("cols", [128, 100])
def test_search_clip_reduces_output_error(cols):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, cols, generator=gen)
    x = torch.randn(2048, cols, generator=gen)
    clipped = search_clip(w, x, CFG3)
    assert clipped.shape == w.shape
    assert (clipped.abs() <= w.abs()).all(), "clipping never widens the range"
    sample = x[::4]

    def err(weight):
        return ((rtn_quantize(weight, CFG3).dequantize() - w) @ sample.T).pow(2).sum().item()

    assert err(clipped) <= err(w)
    assert not torch.equal(clipped, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_search_scale_leaves_its_inputs_untouched(dtype):
    """The inputs are the layer's calibration activations: the search only reads them (a float32 view once
    got abs_() applied in place, and every candidate was then judged on |x|)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 64, generator=gen).to(dtype)
    before = x.clone()
    fc = torch.nn.Linear(64, 32, bias=False).to(dtype)
    search_scale(x, [fc], fc, CFG3, batch_tokens=16)
    assert torch.equal(x, before)


def search_clip_reference(w, x, cfg, n_grid=20, max_shrink=0.5, n_tokens=512):
    """AutoAWQ's ``_compute_best_clip`` as written: every (row, token, group) product broadcast, then summed."""
    out_f, cols = w.shape
    gs = cfg.group_size
    wf = w.float().view(out_f, 1, cols // gs, gs)
    xf = x.reshape(-1, cols).float()
    xf = xf[:: max(1, xf.shape[0] // n_tokens)][:n_tokens].view(1, -1, cols // gs, gs)
    org_max = wf.abs().amax(dim=-1, keepdim=True)
    best, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    org_out = (xf * wf).sum(dim=-1)
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        cur = torch.clamp(wf, -max_val, max_val)
        scale, zero = _minmax_qparams(cur.amin(-1, keepdim=True).clamp(max=0), cur.amax(-1, keepdim=True).clamp(min=0),
                                      cfg.maxq, cfg.sym)
        q = scale * (quantize(cur, scale, zero, cfg.maxq) - zero)
        err = ((xf * q).sum(dim=-1) - org_out).pow(2).mean(dim=1).view(min_err.shape)
        best = torch.where(err < min_err, max_val, best)
        min_err = torch.minimum(err, min_err)
    return torch.clamp(wf, -best, best).view(out_f, cols)


@pytest.mark.parametrize("sym", [False, True])
def test_batched_clip_search_picks_what_the_broadcast_reference_picks(sym):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 256, generator=gen) * 0.05
    w[:, 7] *= 8  # an outlier column, so clipping pays off in some groups
    x = torch.randn(3, 400, 256, generator=gen)
    cfg = QuantConfig(bits=3, group_size=64, sym=sym)
    fast, ref = search_clip(w, x, cfg), search_clip_reference(w, x, cfg)
    assert not torch.equal(ref, w), "the reference clips some groups"
    assert torch.equal(fast, ref)
