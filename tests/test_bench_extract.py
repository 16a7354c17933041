"""bench/bench_extract.py's memory measure runs 01 in a child process that loads the stage script
(tools.stages.load_stage) and reports its peak memory; checked here with 01's --help, without
running the model."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_extract", ROOT / "bench" / "bench_extract.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_memory_child_loads_01_and_reports_its_peak():
    """The child loads 01_extract.py (dataclasses, postponed annotations), hands it the arguments
    and prints its peak memory even when the stage exits."""
    code = bench.CHILD.format(root=str(ROOT), stage="01_extract", argv=["--help"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--images" in proc.stdout  # 01's own help
    assert int(proc.stdout.split("PEAK_KB")[-1].split()[0]) > 0


def test_the_childs_peak_is_its_own_not_its_parents():
    """A parent holding 1,200 MiB starts the child: the child's peak (01's --help: about 500 MiB,
    with torch) does not include the parent's memory, as getrusage's ru_maxrss would after a
    fork."""
    code = bench.CHILD.format(root=str(ROOT), stage="01_extract", argv=["--help"])
    parent = ("import subprocess, sys\n"
              "ballast = bytearray(1200 << 20)\n"
              "ballast[::4096] = b'\\1' * len(ballast[::4096])\n"
              f"print(subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, "
              "text=True).stdout)\n")
    proc = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak_kb = int(proc.stdout.split("PEAK_KB")[-1].split()[0])
    assert 0 < peak_kb < 1000 * 1024


def test_the_memory_ratio_runs_8n_distinct_images_against_the_first_n(tmp_path, monkeypatch):
    """The 8·N list names 8·N different images (01 skips an image listed again, so a list that
    repeats N images would run only N), the N list is its first N, and each size's figure is the
    highest of its runs."""
    from tools.demo import build_demo_set
    made, runs = [], []

    def demo_csv(folder, n):
        made.append(n)
        return Path(build_demo_set(folder / "demo", n_images=n, seed=0))

    def peak(csv_path, out):
        rows = csv_path.read_text(encoding="utf-8").splitlines()[1:]
        runs.append([row.split(",")[0] for row in rows])
        return 1000 * len(rows) + len(runs)  # later runs of a size peak higher

    monkeypatch.setattr(bench, "image_csv", demo_csv)
    monkeypatch.setattr(bench, "peak_memory_kb", peak)
    ratio = bench.memory_ratio(3, tmp_path, repeats=2)
    small, big = runs[0], runs[2]
    assert made == [24] and len(runs) == 4
    assert len(big) == 24 and len(set(big)) == 24  # distinct images
    assert small == big[:3] and runs[1] == small and runs[3] == big
    assert ratio == (24_000 + 4) / (3_000 + 2)
