"""Issue 16: data-parallel calibration over torch.distributed (gloo, two ranks spawned by torchrun on this CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import shared_path

from llmq.errors import ConfigError
from llmq.job.distributed import Ranks

C4 = ("assets", "c4-sample", "c4_train_00000_first1000.jsonl")


def quantize_args(out: Path, method: str = "gptq", nsamples: int = 128, *extra: str) -> list[str]:
    return ["quantize", str(shared_path("assets", "llmq-tiny-llama")), "--method", method, "--bits", "3",
            "--group-size", "128", "--calib", str(shared_path(*C4)), "--nsamples", str(nsamples), "--seqlen", "256",
            "--out", str(out), *extra]


def run(args: list[str], nproc: int, **env: str) -> subprocess.CompletedProcess:
    """``llmq -v`` in one process, or under ``torchrun --standalone --nproc-per-node nproc`` (one thread per rank)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "llmq.cli", "-v", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **env}, timeout=900)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def c4_ppl(folder: Path) -> float:
    from llmq.eval.ppl import perplexity
    from llmq.io.data import eval_windows
    from llmq.runtime.loader import load_model

    records = shared_path(*C4).read_text().splitlines()
    model, tokenizer = load_model(str(folder))
    windows = eval_windows([json.loads(r)["text"] for r in records[900:]], tokenizer, 256)
    return perplexity(model, windows, progress=False)["ppl"]


def test_windows_are_split_into_contiguous_shares_that_cover_every_window_once():
    for n, world in [(128, 2), (7, 3), (2, 4), (16, 1)]:
        shares = [range(n)[Ranks(r, world).windows(n)] for r in range(world)]
        assert [i for share in shares for i in share] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_what_two_ranks_cannot_run_yet_is_refused_before_calibration():
    from llmq.config import QuantConfig
    from llmq.job.distributed import check_distributed

    for cfg in (QuantConfig(method="tune"), QuantConfig(bits_per_weight=3.5)):
        with pytest.raises(ConfigError, match="torch.distributed"):
            check_distributed(cfg, Ranks(0, 2))
        check_distributed(cfg, Ranks())  # one process: anything


def test_a_lost_peer_is_reported_as_such_and_a_misuse_as_itself():
    """gloo raises a plain RuntimeError both when a peer dies and when a call is wrong; only the first is a lost
    rank (the messages are gloo's own, from torch 2.13: a rank that exited, and a short output list)."""
    from llmq.job.distributed import RankLostError, _collective

    def fails(message):
        def fn():
            raise RuntimeError(message)
        return fn

    lost = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
            "[127.0.0.1]:61126. This is typically caused by a remote worker crashing.")
    with pytest.raises(RankLostError, match="lost contact.*run the same command again"):
        _collective(fails(lost))
    misuse = "ProcessGroupGloo::allgather: invalid output tensor list at index 0 (expected length 2, got 1)"
    with pytest.raises(RuntimeError, match="invalid output tensor list") as raised:
        _collective(fails(misuse))
    assert not isinstance(raised.value, RankLostError)
    assert _collective(lambda x: x + 1, 1) == 2


@pytest.fixture(scope="module")
def outs(tmp_path_factory) -> dict[str, Path]:
    """GPTQ W3 g128 on llmq-tiny-llama (128 x 256 C4 windows) in one process, and twice with two gloo ranks."""
    folder = tmp_path_factory.mktemp("distributed")
    outs = {name: folder / name for name in ("one", "two", "two-again")}
    for name, out in outs.items():
        proc = run(quantize_args(out), nproc=1 if name == "one" else 2)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return outs


# the tests sharing the `outs` fixture (three quantization runs) run in one pytest-xdist worker
OUTS = pytest.mark.xdist_group("distributed-outs")


@pytest.mark.slow
@OUTS
def test_two_gloo_ranks_give_the_same_bytes_every_run_and_the_one_process_perplexity(outs, report):
    """Two ranks, twice, give the same bytes; their held-out C4 perplexity is within 0.2% of one process's. Not the
    same bytes: each rank sums its own windows' Hessian first, and GPTQ turns those last-bit differences into other
    roundings (one process with batches of 4 windows instead of 8 moved it by 0.07%). With --exact-sums they are
    the same bytes (the next test)."""
    assert files(outs["two"]) == files(outs["two-again"])
    one, two = c4_ppl(outs["one"]), c4_ppl(outs["two"])
    report(f"llmq-tiny-llama GPTQ W3 g128, C4 900-999: one process {one:.3f}, two gloo ranks {two:.3f} "
           f"({(two / one - 1) * 100:+.3f}%)")
    assert abs(two / one - 1) < 0.002


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("awq", ()), ("gptq", ("--exact-sums",)), ("awq+gptq", ("--exact-sums",))])
def test_two_gloo_ranks_give_the_one_process_bytes(tmp_path, method, extra):
    """W3 g128, one process and two ranks, byte for byte (one process's own reruns are the same bytes:
    test_checkpoint's test_same_recipe_and_seed_give_identical_bytes).

    AWQ: every rank searches the scales on all search windows (their inputs gathered, here spanning both ranks'
    shares), each trying half the grid, and clips its half of each weight's rows; RTN sums no Hessian.
    GPTQ and AWQ+GPTQ with --exact-sums: each rank sums its batches' Hessian parts in float64, then the ranks' sums
    are added, which is one process's sum exactly; each rank solves its half of every linear's rows."""
    outs = {nproc: tmp_path / str(nproc) for nproc in (1, 2)}
    for nproc, out in outs.items():
        proc = run(quantize_args(out, method, 16, *extra), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert files(outs[2]) == files(outs[1])


@pytest.mark.slow
@OUTS
def test_a_rank_killed_mid_run_fails_the_job_and_the_rerun_resumes_to_the_same_bytes(outs, tmp_path):
    out = tmp_path / "q"
    killed = run(quantize_args(out), nproc=2, LLMQ_KILL_AT="layer.solved@3", LLMQ_KILL_RANK="1")
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr or "lost contact" in killed.stderr, killed.stderr[-3000:]
    assert not out.exists(), "a failed job never leaves an output that looks complete"
    state = json.loads((tmp_path / ".q.partial" / "progress.json").read_text())
    assert state["next_layer"] == 2  # layers 0 and 1 committed: rank 1 died solving layer 2
    resumed = run(quantize_args(out), nproc=2, LLMQ_KILL_AT="")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "at layer 2" in resumed.stderr
    assert files(out) == files(outs["two"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_two_ranks_count_every_experts_tokens_over_all_windows(tmp_path, method):
    """llmq-tiny-moe: the routed-token counts the two ranks agree on cover every window's every token (top-k of them
    in each layer), and every expert of every layer is quantized; the checkpoint and the counts are one process's.
    AWQ sums no Hessian; each expert's clip samples are taken at its routed-token stream's positions over all
    ranks. GPTQ runs with --exact-sums: without, its Hessians are summed in another order (the last bits), so layer
    0's attention, quantized before its experts are counted, can round a few codes otherwise (8 words of o_proj
    here) and flip a near-tie of the router (layer-0 counts one process's within 3 tokens). Starved experts see
    every token of the first 10 windows (--expert-fill-tokens): all of rank 0's 8, then 2 of rank 1's, so the fill
    ends inside rank 1's share."""
    args = ["quantize", str(shared_path("assets", "llmq-tiny-moe")), "--method", method, "--bits", "4", "--calib",
            str(shared_path(*C4)), "--nsamples", "16", "--seqlen", "128", "--expert-fill-tokens", "1280",
            *(["--exact-sums"] * (method == "gptq"))]
    experts = {}
    for nproc in (1, 2):
        proc = run([*args, "--out", str(tmp_path / str(nproc))], nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        meta = json.loads((tmp_path / str(nproc) / "quantize_config.json").read_text())["meta"]["llmq"]
        experts[nproc] = meta["experts"]
        assert not meta["unquantized"]
    assert experts[2].keys() == experts[1].keys()
    config = json.loads(shared_path("assets", "llmq-tiny-moe", "config.json").read_text())
    for counts in experts.values():
        for layer in range(config["num_hidden_layers"]):
            routed = sum(v["tokens"] for n, v in counts.items() if n.startswith(f"model.layers.{layer}."))
            assert routed == 16 * 128 * config["num_experts_per_tok"], (layer, routed)
    assert experts[2] == experts[1]
    assert files(tmp_path / "2") == files(tmp_path / "1")
    assert any(v["policy"] == "all_tokens" for v in experts[1].values())  # the fill is exercised
