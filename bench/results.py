"""Run benchmark scripts and record their output, dated, in bench/RESULTS.md.

Each argument is one benchmark: a script path, optionally followed by its own arguments, given as
one quoted string. Every script runs with this Python, one after another; its output is shown on
the terminal as it comes. Then a new section — the date and time (UTC), the machine (CPU model,
cores, memory, GPU, Python and torch versions) and, per script, its exit status and what it printed
on stdout — is inserted at the top of the "Measurements" part of the results file, newest first.
The file is written atomically (common.io.write_text). The exit
status is 1 when any script failed, else 0; the section is written either way.

  python bench/results.py bench/bench_extract.py "bench/bench_cluster.py --threads 1"
  python bench/results.py --results /tmp/RESULTS.md bench/bench_score.py
"""
import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.io import write_text  # noqa: E402  (after the project root is on the path)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"  # default results file, beside this script
MEASUREMENTS = "## Measurements"  # heading of the part that new sections go to the top of
MARKER = "<!-- make bench inserts new sections below this line -->"  # insertion point, if present
STDERR_TAIL = 40  # lines of a failed script's stderr kept in the section
HEADER = f"""# Benchmark results

Dated figures of the project's benchmarks. `make bench` runs them through `bench/results.py`, which
inserts a new section at the top of "Measurements" below, headed by the date and time (UTC) and the
machine, with each script's exit status and printed output; the newest section comes first.

{MEASUREMENTS}

{MARKER}
"""


def build_parser():
    """Return the command-line parser: benchmark commands and the results file."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("benchmarks", nargs="+",
                        help='benchmark scripts, each with its arguments as one string '
                             '("bench/bench_cluster.py --threads 1")')
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file to update")
    return parser


def pump(source, sink, chunks):
    """Copy a child's pipe to a terminal stream as it arrives, keeping every chunk read."""
    while True:
        chunk = source.read1(65536)  # whatever is there, without waiting for a full block
        if not chunk:
            break
        chunks.append(chunk)
        sink.write(chunk)
        sink.flush()
    source.close()


def run_benchmark(command):
    """Run one benchmark (script and arguments as one string) with this Python.

    Its stdout and stderr are shown as they come. Returns (exit status, stdout text, stderr text).
    """
    argv = [sys.executable, *shlex.split(command)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # so that output streams instead of arriving at exit
    print(f"==> {command}", flush=True)
    try:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as error:
        return 127, "", f"cannot start {command}: {error}\n"
    out, err = [], []
    threads = [threading.Thread(target=pump, args=(child.stdout, sys.stdout.buffer, out)),
               threading.Thread(target=pump, args=(child.stderr, sys.stderr.buffer, err))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    status = child.wait()
    return (status, b"".join(out).decode("utf-8", errors="replace"),
            b"".join(err).decode("utf-8", errors="replace"))


def read_first(path, key):
    """Return the value of the first `key: value` line of a /proc-style file, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        return None
    return None


def gpu_names():
    """Return the GPU names nvidia-smi reports, or None when there is no nvidia-smi or it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return ", ".join(names) if done.returncode == 0 and names else None


def torch_version():
    """Return torch's version (with its CUDA version, if any) when torch imports, else None."""
    try:
        import torch
    except (ImportError, OSError):
        return None
    cuda = getattr(torch.version, "cuda", None)
    return f"{torch.__version__} (CUDA {cuda})" if cuda else torch.__version__


def git_commit():
    """Return the checked-out commit, marked when the working tree has changes, or None."""
    if shutil.which("git") is None:
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def machine():
    """Return the machine's description as (label, value) pairs, leaving out what is unknown."""
    memory = read_first("/proc/meminfo", "MemTotal")  # "24576000 kB"
    if memory and memory.split()[0].isdigit():
        memory = f"{int(memory.split()[0]) / 1024 ** 2:.1f} GiB"
    try:
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        load = None
    facts = [("CPU", read_first("/proc/cpuinfo", "model name") or platform.processor() or None),
             ("cores", str(os.cpu_count())),
             ("memory", memory),
             ("GPU", gpu_names() or "none found"),
             ("Python", platform.python_version()),
             ("torch", torch_version()),
             ("load average at start (1, 5, 15 min)", load),
             ("commit", git_commit())]
    return [(label, value) for label, value in facts if value]


def fence(text):
    """Return a Markdown code fence longer than any run of backticks inside text."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def section(when, facts, results):
    """Return the Markdown section of one `make bench`: date, machine, then each script's output.

    `results` holds (command, exit status, stdout, stderr) per benchmark; a failed one also shows
    the last lines of its stderr.
    """
    cpu = dict(facts).get("CPU", "unknown CPU")
    lines = [f"### {when:%Y-%m-%d %H:%M} UTC — {cpu}, {os.cpu_count()} cores", ""]
    lines += [f"- {label}: {value}" for label, value in facts]
    for command, status, out, err in results:
        verdict = "ok" if status == 0 else "FAILED"
        lines += ["", f"#### `{command}` — exit status {status} ({verdict})", ""]
        body = out.rstrip("\n") or "(no output)"
        mark = fence(body)
        lines += [mark, body, mark]
        if status != 0 and err.strip():
            tail = "\n".join(err.rstrip("\n").splitlines()[-STDERR_TAIL:])
            mark = fence(tail)
            lines += ["", "Last lines of its stderr:", "", mark, tail, mark]
    return "\n".join(lines) + "\n"


def insert(document, new):
    """Return document with the section `new` at the top of its measurements part.

    The section goes after the marker line when there is one, else right after the measurements
    heading; a document with neither gets the heading and marker appended first.
    """
    lines = document.splitlines(keepends=True)
    stripped = [line.strip() for line in lines]
    if MARKER in stripped:
        at = stripped.index(MARKER) + 1
    elif MEASUREMENTS in stripped:
        at = stripped.index(MEASUREMENTS) + 1
    else:
        lines = [document.rstrip("\n") + "\n", "\n", MEASUREMENTS + "\n", "\n", MARKER + "\n"]
        at = len(lines)
    head, tail = "".join(lines[:at]), "".join(lines[at:]).lstrip("\n")
    if not head.endswith("\n"):
        head += "\n"
    return head + "\n" + new + ("\n" + tail if tail else "")


def run(benchmarks, results_path):
    """Run every benchmark, then record them in results_path; return how many failed."""
    when = datetime.datetime.now(datetime.timezone.utc)
    facts = machine()
    results = [(command, *run_benchmark(command)) for command in benchmarks]
    document = results_path.read_text(encoding="utf-8") if results_path.exists() else HEADER
    write_text(results_path, insert(document, section(when, facts, results)))
    failed = [command for command, status, _, _ in results if status != 0]
    print(f"==> recorded {len(results)} benchmark(s) in {results_path}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return len(failed)


def main(argv=None):
    """Parse the arguments, run the benchmarks, record them; exit status 1 if any failed."""
    args = build_parser().parse_args(argv)
    return 1 if run(args.benchmarks, args.results) else 0


if __name__ == "__main__":
    sys.exit(main())
