"""Long runs say where they are (issue 45): one line per finished layer, with its time, its loss and the time
left, wherever the output goes (a log file as well as a terminal)."""

import subprocess
import sys

from helpers import shared_path

from llmq.utils.timing import LayerProgress, format_seconds


def test_each_layer_gets_a_line_with_its_time_and_the_time_left():
    ticks = iter([0.0, 10.0, 30.0, 60.0])  # the run starts at 0; layers take 10, 20, 30 s
    progress = LayerProgress(total=5, start=1, clock=lambda: next(ticks), enabled=False)
    assert progress.step(1, "gptq, GPTQ loss 0.5") == "layer 2/5 done in 10.0 s (gptq, GPTQ loss 0.5); about 30 s left"
    assert progress.step(2) == "layer 3/5 done in 20.0 s; about 30 s left"  # mean 15 s x 2 left
    assert progress.step(3) == "layer 4/5 done in 30.0 s; about 20 s left"  # mean 20 s x 1 left
    assert [format_seconds(s) for s in (59.4, 75, 3725)] == ["59 s", "1 min 15 s", "1 h 2 min"]


def test_quantize_writes_a_line_per_layer_into_a_log_file(tmp_path):
    model = shared_path("assets", "stories260K")  # 5 layers
    text = shared_path("assets", "tinystories-text", "tinystories_sample.cs336.txt")
    log = tmp_path / "run.log"
    with log.open("w") as f:  # not a terminal: no progress bar is drawn, and the lines must still come
        proc = subprocess.run([sys.executable, "-m", "llmq", "quantize", str(model), "--method", "gptq", "--bits", "4",
                               "--group-size", "32", "--calib", str(text), "--nsamples", "4", "--seqlen", "64",
                               "--out", str(tmp_path / "q")], stdout=f, stderr=subprocess.STDOUT, timeout=600)
    lines = [line for line in log.read_text().splitlines() if " done in " in line]
    assert proc.returncode == 0, log.read_text()
    assert [line.split("llmq.progress: ")[1].split(" done")[0] for line in lines] == [f"layer {i}/5"
                                                                                      for i in range(1, 6)]
    assert all("GPTQ loss" in line for line in lines)
    assert all("left" in line for line in lines[:-1]) and "left" not in lines[-1]
