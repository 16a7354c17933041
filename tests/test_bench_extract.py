"""bench/bench_extract.py's memory measure runs 01 in a child process that loads the stage script
by path; checked here on a stand-in script, without running 01."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_extract", ROOT / "bench" / "bench_extract.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_child_loads_a_stage_script_with_dataclasses_and_reports_its_peak(tmp_path):
    """A stage script with postponed annotations and a dataclass (as 01_extract.py has) loads,
    its main gets the arguments, and the child prints its peak memory."""
    script = tmp_path / "stage.py"
    script.write_text("from __future__ import annotations\n"
                      "from dataclasses import dataclass\n\n\n"
                      "@dataclass\nclass Settings:\n    batch: int = 32\n\n\n"
                      "def main(argv):\n    print('ARGS', argv, Settings().batch)\n")
    code = bench.CHILD.format(root=str(ROOT), script=str(script), argv=["--run", "x"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ARGS ['--run', 'x'] 32" in proc.stdout
    assert int(proc.stdout.split("PEAK_KB")[-1].split()[0]) > 0
