"""GPTQ onto llama.cpp's GGUF grids (issue 43): the column pass against a slow reference, its gain over the
grids' own weighted round-to-nearest, and the grid it returns decoding to exactly the weights it evaluated."""

import gguf
import pytest
import torch
from test_gptq import output_error, random_problem

from llmq.algorithms.ggml import GGML_TYPES, dequantize_grid, encode, ggml_spec, grid_scales, search_scales
from llmq.algorithms.ggml_gptq import gptq_ggml, rtn_ggml

TYPES = sorted(GGML_TYPES)


def slow_gptq_on_grid(W, H, scale, mins, levels, damp_percent=0.01):
    """Column by column in float64 (Algorithm 1 without lazy blocks), column ``j`` rounded to the nearest of
    ``scale[:, j] * levels - mins[:, j]`` (a grid fixed beforehand, one scale and min per column)."""
    W, H = W.double().clone(), H.double().clone()
    scale, mins, levels = scale.double(), mins.double(), levels.double()
    cols = W.shape[1]
    Hinv = torch.linalg.inv(H + damp_percent * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype))
    Q = torch.zeros_like(W)
    for j in range(cols):
        t = (W[:, j] + mins[:, j]) / scale[:, j]
        q = levels[(t[:, None] - levels[None, :]).abs().argmin(1)]  # the nearest level
        Q[:, j] = scale[:, j] * q - mins[:, j]
        W -= ((W[:, j] - Q[:, j]) / Hinv[j, j])[:, None] * Hinv[j][None, :]
        Hinv -= Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q.float()


@pytest.mark.parametrize("ggml_type", TYPES)
def test_gptq_on_a_ggml_grid_matches_the_column_by_column_reference(ggml_type):
    """With act-order the blocks are fitted up front from the original weights: the same grid the reference
    uses, so the two passes differ only by float32 against float64 (a rounding on a boundary may flip)."""
    W, H = random_problem(16, 256, seed=1)
    res = gptq_ggml(W, H, ggml_type, act_order=True)
    spec = ggml_spec(ggml_type)
    scale, mins = grid_scales(search_scales(W, ggml_type, torch.diag(H).clamp_min(0)))
    scale, mins = scale.repeat_interleave(spec.sub, 1), mins.repeat_interleave(spec.sub, 1)  # per column
    perm = torch.argsort(torch.diag(H), descending=True)
    slow = slow_gptq_on_grid(W[:, perm], H[perm][:, perm], scale[:, perm], mins[:, perm], spec.levels.by_code)
    slow = slow[:, torch.argsort(perm)]
    fast = dequantize_grid(res.weight)
    assert (fast != slow).float().mean().item() < 0.02
    assert output_error(W, fast, H) == pytest.approx(output_error(W, slow, H), rel=0.02)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_gptq_beats_the_grids_weighted_round_to_nearest_and_writes_what_it_evaluated(ggml_type):
    W, H = random_problem(32, 512, seed=0)
    importance = torch.diag(H).clamp_min(0)
    gptq = gptq_ggml(W, H, ggml_type)
    rtn = rtn_ggml(W, ggml_type, importance)  # llama.cpp's weighted search with an importance matrix
    err_gptq, err_rtn = (output_error(W, dequantize_grid(g), H) for g in (gptq.weight, rtn))
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    raw = encode(gptq.weight)  # llama.cpp's bytes decode to exactly the weights GPTQ evaluated
    decoded = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ggml_spec(ggml_type).type_id))
    assert torch.equal(torch.from_numpy(decoded.reshape(W.shape)), dequantize_grid(gptq.weight))
