"""The scaling benchmark's arithmetic and its resumable record (bench/bench_scale.py), without
running the pipeline: the growth exponent and crossing point against exact power laws, and a run
stopped after some sizes going on from its scale.json."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "bench_scale.py")
scale = importlib.util.module_from_spec(spec)
sys.modules["bench_scale"] = scale  # its dataclass looks its module up while being made
spec.loader.exec_module(scale)


def test_exponent_and_crossing_of_exact_power_laws():
    """Times a·nᵇ give back b and a; a stage growing as n² from 1/1000 of 01's linear time
    overtakes it where a₁·n = a·n², at n = a₁/a = 1000; no crossing when it grows no faster."""
    ns = [512, 1024, 2048, 4096]
    b, a = scale.exponent(ns, [0.5 * n ** 1.3 for n in ns])
    assert b == pytest.approx(1.3) and a == pytest.approx(0.5)
    forward = scale.exponent(ns, [2.0 * n for n in ns])
    quadratic = scale.exponent(ns, [0.002 * n ** 2 for n in ns])
    assert scale.crossing(quadratic, forward) == pytest.approx(1000.0)
    assert scale.crossing(scale.exponent(ns, [5.0 * n for n in ns]), forward) is None


def test_report_names_the_stage_over_target():
    """The report's table flags exactly the stage whose exponent is over 1.15, with where it
    overtakes 01."""
    measures = []
    for n in (1000, 2000, 4000):
        m = scale.Measure(n=n)
        for number, _ in scale.STAGES:
            m.seconds[number] = (0.01 * n if number == "01" else
                                 1e-5 * n ** 2 if number == "05" else 0.001 * n)
            m.peak_mib[number] = 100.0
        measures.append(m)
    lines = scale.report("neurons", "neurons", measures)
    over = [line for line in lines if "overtakes 01" in line]
    assert len(over) == 1 and over[0].startswith("| 05 cluster") and "| 2.00 |" in over[0]
    assert f"{1000:,}" in over[0]  # 0.01·n = 1e-5·n² at n = 1,000
    # 06 jumping at the one size with layer pairs is named as such, not as a growth
    measures[-1].seconds["06"] = 1e-4 * 4000 ** 2
    measures[-1].pairs = [["a", "b", 2, 16, 1.0]]
    row = next(line for line in scale.report("neurons", "neurons", measures)
               if line.startswith("| 06"))
    assert "not a growth" in row and "overtakes" not in row
    measures[0].pairs = measures[1].pairs = measures[-1].pairs  # pairs at every size: a growth
    row = next(line for line in scale.report("neurons", "neurons", measures)
               if line.startswith("| 06"))
    assert "overtakes 01" in row
    assert "anonymous" not in lines[0]  # no size measured the anonymous part: no such column
    # with it measured at every size, each cell shows it and it gets an exponent of its own
    for m in measures:
        m.anon_mib = {number: 10.0 * (m.n / 1000) ** 0.5 for number, _ in scale.STAGES}
    lines = scale.report("neurons", "neurons", measures)
    assert "anonymous memory exponent" in lines[2]
    row = next(line for line in lines if line.startswith("| 02"))
    assert "· 100 / 20 |" in row and "| 0.00 | 0.50 |" in row  # n = 4,000: 10·√4 = 20 MiB
    assert all(line.count("|") == lines[2].count("|") for line in lines[2:] if line)


def test_a_stopped_run_goes_on_from_what_it_saved(tmp_path, monkeypatch):
    """Each finished size is saved to scale.json at once; --resume runs only the sizes missing
    there (and never one whose measure lacks a stage, or that other code measured)."""
    runs, stop = [], ["img-40"]

    def fake_pipeline(work, run, variables, log):
        runs.append(run)
        if run in stop:
            raise RuntimeError("stopped")  # the first run dies at its second size
        m = scale.Measure(n=0)
        for number, _ in scale.STAGES:
            m.seconds[number], m.peak_mib[number] = 1.0, 10.0
        return m

    monkeypatch.setattr(scale, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(scale, "code_version", lambda: "abc123")
    monkeypatch.setattr(scale, "demo_images", lambda work, n, log: work / f"images-{n}.csv")
    args = ["--workloads", "images", "--sizes", "1,2,4", "--base-images", "20", "--work",
            str(tmp_path), "--plot", str(tmp_path / "scale.png")]
    assert scale.main(args) == 1
    stop.clear()
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert list(saved["images"]) == ["20 images, x1"]
    # a half-measured size in the record is measured again
    saved["images"]["20 images, x2"] = {"n": 40, "seconds": {"01": 1.0}, "peak_mib": {"01": 1.0}}
    (tmp_path / "scale.json").write_text(json.dumps(saved))
    runs.clear()
    assert scale.main(args + ["--resume"]) == 0
    assert runs == ["img-40", "img-80"]
    assert list(json.loads((tmp_path / "scale.json").read_text())["images"]) == [
        "20 images, x1", "20 images, x2", "20 images, x4"]
    # sizes measured by other code, or by a tree with uncommitted changes, are measured again
    runs.clear()
    monkeypatch.setattr(scale, "code_version", lambda: "def456")
    assert scale.main(args + ["--resume"]) == 0
    assert runs == ["img-20", "img-40", "img-80"]
    runs.clear()
    monkeypatch.setattr(scale, "code_version", lambda: "def456+changes")
    assert scale.main(args + ["--resume"]) == 0
    assert runs == ["img-20", "img-40", "img-80"]
    assert (tmp_path / "scale.png").is_file() and math.isfinite(
        scale.exponent([20, 40, 80], [1.0, 1.0, 1.0])[0])


def test_06s_time_per_layer_pair_is_read_from_its_own_log_line(caplog):
    """06 logs each layer pair's connections (common.attribution); the benchmark reads those
    lines back, and fits the time against the later layer's neurons (one backward pass each)."""
    import logging

    import torch
    from common.attribution import connection_strengths
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_model import FakeNet
    with caplog.at_level(logging.INFO, logger="neuron-atlas.attribution"):
        connection_strengths(FakeNet().eval(), ["relu1", "pool", "conv2"], torch.rand(3, 3, 8, 8))
    pairs = scale.connection_times("unrelated line\n" + caplog.text)
    assert [p[:4] for p in pairs] == [["relu1", "pool", 4, 3], ["pool", "conv2", 2, 3]]
    assert all(p[4] >= 0 for p in pairs)
    # more images than a batch: 06 logs each pair once per batch, and the batches add up
    twice = scale.connection_times("connections a → b: 8 backward passes over 32 images in 2.5 s\n"
                                   "connections a → b: 8 backward passes over 4 images in 0.5 s")
    assert twice == [["a", "b", 8, 36, 3.0]]
    # times 0.02·passes^1.5 give back the exponent 1.5; a single pair is no report
    m = scale.Measure(n=3904, pairs=[["a", "b", n, 16, 0.02 * n ** 1.5] for n in (256, 512, 2048)])
    lines = scale.report_pairs(m, "neurons")
    assert lines[0] == "#### 06's connections at 3,904 neurons, by layer pair"
    assert "exponent of the time in the later layer's neurons: 1.50" in lines[-2]
    assert "| a → b | 2,048 | 16 |" in "\n".join(lines)
    assert scale.report_pairs(scale.Measure(n=1, pairs=m.pairs[:1]), "images") == []


def test_memory_of_a_process_tree_counts_a_shared_page_once(tmp_path):
    """Two children mapping and touching the same 64 MiB file: summed resident sets count it twice,
    the benchmark's measure about once, and not in its anonymous part; 64 MiB that one child
    writes in its own memory are in both."""
    import subprocess
    import time

    import psutil
    data = tmp_path / "shared.bin"
    data.write_bytes(b"\1" * (64 << 20))
    child = ("import mmap, sys, time\n"
             "f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
             "s = sum(m[i] for i in range(0, len(m), 4096))\n"
             "own = bytearray(b'\\2' * (64 << 20)) if len(sys.argv) > 2 else b''\n"
             "print('ready', flush=True); time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys\n"
                               f"kids = [subprocess.Popen([sys.executable, '-c', {child!r}, "
                               f"{str(data)!r}, *own], stdout=subprocess.PIPE) "
                               "for own in ([], ['own'])]\n"
                               "[k.stdout.readline() for k in kids]\n"
                               "print('ready', flush=True)\n"
                               "[k.wait() for k in kids]\n"], stdout=subprocess.PIPE)
    try:
        assert parent.stdout.readline().strip() == b"ready"
        proc = psutil.Process(parent.pid)
        time.sleep(0.2)
        summed = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        measured, anon = scale.tree_memory(proc)
        if getattr(proc.memory_full_info(), "pss", None) is None:
            pytest.skip("this system reports no proportional set size")
        mib = 1 << 20
        assert summed - measured > 50 * mib  # the second copy of the 64 MiB is not counted
        assert measured > 128 * mib  # the mapped file itself is, and the child's own memory
        if "Pss_Anon" not in open(f"/proc/{parent.pid}/smaps_rollup").read():
            pytest.skip("this kernel does not split the proportional set size")
        assert 64 * mib < anon < measured - 50 * mib  # the child's memory; not the mapped file
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()
