"""Scaling benchmark: how each stage's time and peak memory grow with the images and the neurons.

Two workloads, each run through the whole pipeline (01 → 10, offline describer) with `make`, one
stage target at a time, as a user runs it:

- **images**: the demo's model and layers (EfficientNet-Lite0, 512 neurons) on demo-style image
  sets of ``base × s`` images (``tools.demo``, seed 0), for each scale ``s`` of ``--sizes``;
- **neurons**: a random-init ResNet-50 on ``--neuron-images`` demo-style images, its layer choice
  widened with the scale (``layer2`` 512 neurons, ``layer3`` 1,024, ``layer4`` 2,048, and at 8× all
  five stages ``conv1 … layer4``, 3,904 neurons: the thesis's ResNet-50 run).

Per stage and size it measures the wall time and the peak memory (the proportional set size of the
stage's whole process tree, sampled every 0.1 s: a page that several of its processes share, such as
a worker's copy-on-write memory or a mapped scratch file, counts once), and apart the peak of the
part of it that only swap could free (anonymous and shared memory: not the pages of mapped files,
such as 02's scratch file or the libraries, which the kernel drops under pressure and reads again),
and fits the growth exponent b of time ≈ a·nᵇ (the slope on log–log axes, by least squares over the
sizes, n = images or neurons actually run). A stage whose exponent is over the target (1.15) is
named with the size at which, by the two fits, it would take longer than 01 (the forward pass).
After the largest neuron workload it checks that the atlas was built and that ``make -q all`` holds.
The one-layer sizes give 06 nothing to connect, so its growth is read inside the largest size
instead: 06 logs the time of each layer pair's connections (one backward pass per neuron of the
later layer), and the report fits that time against those neurons.

It prints a markdown report (``bench/results.py`` files it in bench/RESULTS.md) and draws the times
against the size on log–log axes (``--plot``, default bench/scale.png). Everything runs in a
temporary data folder (``DATA=…``), deleted at the end unless ``--keep`` or ``--work``. Each
finished size is saved at once in the data folder's ``scale.json``, so that a run stopped after
hours keeps what it measured: ``--work DIR --resume`` measures only the sizes it lacks.

  python bench/bench_scale.py [--sizes 1,2,4,8] [--base-images 1500] [--neuron-images 300]
                              [--workloads images,neurons] [--plot bench/scale.png] [--keep]
                              [--work DIR [--resume]]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.io import write_text  # noqa: E402  (after the project root is on the path)

# make targets of 01 → 10 in the order `make all` runs them (08 does not wait for 09)
STAGES = [("01", "extract"), ("02", "mosaics"), ("03", "describe"), ("04", "embed"),
          ("05", "cluster"), ("06", "trace"), ("09", "score"), ("08", "debug"), ("10", "atlas")]
TARGET_EXPONENT = 1.15
# ResNet-50's layer choice at each neuron scale (its block outputs: 64, 256, 512, 1024, 2048)
RESNET_LAYERS = {1: "layer2", 2: "layer3", 4: "layer4",
                 8: "conv1,layer1,layer2,layer3,layer4"}
RESNET_WIDTH = {"conv1": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
POLL = 0.1  # seconds between memory samples
# 06's log line for each layer pair it connects (common/attribution.py, connection_strengths)
CONNECTION_LINE = re.compile(r"connections (\S+) → (\S+): (\d+) backward passes over (\d+) "
                             r"images in ([\d.]+) s")


@dataclass
class Measure:
    """One workload at one size: n (images or neurons) and per stage (time s, peak MiB, and the
    peak MiB of anonymous and shared memory: what ``tree_memory`` measures)."""
    n: int
    seconds: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)
    anon_mib: dict[str, float] = field(default_factory=dict)  # empty in sizes saved before it
    code: str = ""  # the project's commit (and "+changes" when the tree differed) it measured
    # 06's connections, one [earlier layer, later layer, backward passes, images, seconds] per pair
    pairs: list = field(default_factory=list)


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """Bytes of memory held by ``proc`` and all its descendants (0 for those already gone): the
    sum of their proportional set sizes, in which a page shared by k processes counts 1/k in
    each, so that it counts once in the sum (summed resident sets count it k times); and the part
    of that sum in anonymous and shared memory, which only swap could free (the rest is pages of
    mapped files). Without /proc/<pid>/smaps_rollup (not Linux), resident sets for both."""
    total = anon = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            pss, pss_anon = _rollup(p.pid)
        except FileNotFoundError:  # gone, or no smaps_rollup
            try:
                pss = pss_anon = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        total, anon = total + pss, anon + pss_anon
    return total, anon


def _rollup(pid: int) -> tuple[int, int]:
    """(PSS, PSS of anonymous and shared memory) of process ``pid`` in bytes, from the kernel's
    /proc/<pid>/smaps_rollup (kernels before 5.x give no split: then both are the PSS)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) * 1024
    pss = fields.get("Pss", 0)
    if "Pss_Anon" not in fields:
        return pss, pss
    return pss, fields["Pss_Anon"] + fields.get("Pss_Shmem", 0)


def run_measured(cmd: list[str], log: Path) -> tuple[float, float, float]:
    """Run ``cmd`` from the project root (output to ``log``); return (wall seconds, peak MiB of its
    process tree, peak MiB of its anonymous and shared memory). Raise with the log's end when it
    fails."""
    with open(log, "ab") as out:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        proc, peak, peak_anon = psutil.Process(child.pid), 0, 0
        while child.poll() is None:
            total, anon = tree_memory(proc)
            peak, peak_anon = max(peak, total), max(peak_anon, anon)
            time.sleep(POLL)
        seconds = time.perf_counter() - start
    if child.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({child.returncode}):\n" + "\n".join(tail))
    return seconds, peak / 2 ** 20, peak_anon / 2 ** 20


def code_version() -> str:
    """The commit the project is at, with "+changes" when tracked files differ from it: a size
    measured on other code is never reused."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    head = git("rev-parse", "HEAD").strip() or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no").strip()
                   else "")


def load_saved(path: Path) -> dict[str, dict[str, Measure]]:
    """The sizes measured before, from ``scale.json``: workload → size → Measure (only those
    with every stage measured); empty when there is no such file."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return {workload: {size: Measure(**m) for size, m in sizes.items()
                       if set(m["seconds"]) == {number for number, _ in STAGES}}
            for workload, sizes in saved.items()}


def save(path: Path, measured: dict[str, dict[str, Measure]]) -> None:
    """Write every size measured so far to ``scale.json`` (atomically)."""
    write_text(path, json.dumps({workload: {size: vars(m) for size, m in sizes.items()}
                                 for workload, sizes in measured.items()}, indent=1))


def demo_images(work: Path, n: int, log: Path) -> Path:
    """A demo-style image set of ``n`` images under ``work`` (built once); its images.csv."""
    folder = work / f"images-{n}"
    if not (folder / "images.csv").exists():
        subprocess.run([sys.executable, "-m", "tools.demo", str(folder), "--n-images", str(n),
                        "--seed", "0"], cwd=ROOT, check=True, stdout=open(log, "ab"),
                       stderr=subprocess.STDOUT)
    return folder / "images.csv"


def run_pipeline(work: Path, run: str, variables: dict[str, str], log: Path) -> Measure:
    """Every stage of 01 → 10 on a fresh run ``run`` in ``work``, one make target at a time."""
    shutil.rmtree(work / run, ignore_errors=True)
    make = ["make", "--no-print-directory", f"DATA={work}", f"RUN={run}",
            *[f"{k}={v}" for k, v in variables.items()]]
    measure = Measure(n=0)
    for number, target in STAGES:
        before = log.stat().st_size if log.exists() else 0
        seconds, peak, anon = run_measured([*make, target], log)
        measure.seconds[number], measure.peak_mib[number] = seconds, peak
        measure.anon_mib[number] = anon
        print(f"    {number} {target:<8} {seconds:8.1f} s {peak:8.0f} MiB ({anon:.0f} MiB "
              f"anonymous)", flush=True)
        if number == "06":
            with open(log, "rb") as f:
                f.seek(before)
                measure.pairs = connection_times(f.read().decode(errors="replace"))
    return measure


def connection_times(text: str) -> list[list]:
    """06's time per layer pair, from its log: [earlier, later, backward passes, images, s]
    (06 logs a pair once per batch of images: its batches are added up)."""
    pairs: dict[tuple[str, str], list] = {}
    for a, b, passes, images, seconds in CONNECTION_LINE.findall(text):
        row = pairs.setdefault((a, b), [a, b, int(passes), 0, 0.0])
        row[3] += int(images)
        row[4] += float(seconds)
    return list(pairs.values())


def report_pairs(measure: Measure, unit: str) -> list[str]:
    """Markdown lines on 06's connections in ``measure`` (its layer pairs; its size is n
    ``unit``): one backward pass per neuron of the later layer, so the time against those
    neurons, and its exponent; none for fewer than two pairs."""
    if len(measure.pairs) < 2:
        return []
    lines = [f"#### 06's connections at {measure.n:,} {unit}, by layer pair", "",
             "| layer pair | backward passes (later layer's neurons) | images | time | per pass |",
             "|---|---|---|---|---|"]
    for a, b, passes, images, seconds in measure.pairs:
        lines.append(f"| {a} → {b} | {passes:,} | {images} | {seconds:.1f} s | "
                     f"{1000 * seconds / passes:.0f} ms |")
    b_time = exponent([p[2] for p in measure.pairs], [p[4] for p in measure.pairs])[0]
    total = sum(p[4] for p in measure.pairs)
    return lines + ["", f"All pairs: {total:.1f} s; exponent of the time in the later layer's "
                        f"neurons: {b_time:.2f}.", ""]


def exponent(ns: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares fit of log(value) = log(a) + b·log(n); returns (b, a)."""
    b, log_a = np.polyfit(np.log(ns), np.log(np.maximum(values, 1e-3)), 1)
    return float(b), float(math.exp(log_a))


def crossing(stage: tuple[float, float], forward: tuple[float, float]) -> float | None:
    """The n at which a·nᵇ of ``stage`` overtakes 01's fit ``forward``; None when it never does
    (its exponent is not above 01's by at least 0.01: a fit's rounding is no growth)."""
    (b, a), (b1, a1) = stage, forward
    if b < b1 + 0.01:
        return None
    return (a1 / a) ** (1.0 / (b - b1))


def report(name: str, unit: str, measures: list[Measure]) -> list[str]:
    """Markdown lines: per stage its time and peak memory at each size (and the anonymous and
    shared part of it, where every size measured it), and their exponents."""
    ns = [m.n for m in measures]
    split = all(m.anon_mib for m in measures)  # sizes saved before the split lack it
    cell = "time · peak MiB / of it anonymous" if split else "time · peak MiB"
    lines = [f"#### {name}: {cell}, per stage, by {unit}", "",
             "| stage | " + " | ".join(f"{n:,} {unit}" for n in ns)
             + " | time exponent | memory exponent"
             + (" | anonymous memory exponent" if split else "") + " | over target |",
             "|---|" + "---|" * (len(ns) + 3 + split)]
    forward = exponent(ns, [m.seconds["01"] for m in measures])
    for number, target in STAGES:
        times = [m.seconds[number] for m in measures]
        peaks = [m.peak_mib[number] for m in measures]
        anons = [m.anon_mib[number] for m in measures] if split else []
        b_time, b_mem = exponent(ns, times)[0], exponent(ns, peaks)[0]
        over = ""
        if number == "06" and measures[-1].pairs and not all(m.pairs for m in measures):
            over = ("not a growth: smaller sizes have no layer pair to connect (see 06's table "
                    "by layer pair)")
        elif b_time > TARGET_EXPONENT:
            cross = crossing(exponent(ns, times), forward)
            over = ("yes: " + (f"overtakes 01 at about {cross:,.0f} {unit}" if cross else
                               "but stays below 01"))
        cells = [f"{t:.1f} s · {p:.0f}" + (f" / {a:.0f}" if split else "")
                 for t, p, a in zip(times, peaks, anons or peaks)]
        lines.append(f"| {number} {target} | " + " | ".join(cells) + f" | {b_time:.2f} | "
                     f"{b_mem:.2f} | " + (f"{exponent(ns, anons)[0]:.2f} | " if split else "")
                     + f"{over} |")
    total = [sum(m.seconds.values()) for m in measures]
    lines.append("| all | " + " | ".join(f"{t:.1f} s" for t in total)
                 + f" | {exponent(ns, total)[0]:.2f} | |" + (" |" if split else "") + " |")
    return lines + [""]


def plot(results: dict[str, tuple[str, list[Measure]]], path: Path) -> None:
    """Time per stage against size, log–log, one panel per workload."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, (unit, measures)) in zip(axes[0], results.items()):
        ns = [m.n for m in measures]
        for number, target in STAGES:
            ax.plot(ns, [m.seconds[number] for m in measures], marker="o",
                    label=f"{number} {target}")
        ax.plot(ns, [measures[0].seconds["01"] * n / ns[0] for n in ns], "k:",
                label="linear (from 01)")
        ax.set(xscale="log", yscale="log", xlabel=unit, ylabel="seconds", title=name)
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    """Run the workloads, print the report, draw the plot."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,2,4,8", help="scales, comma-separated (neurons: of 1, 2, "
                   "4, 8 only)")
    p.add_argument("--base-images", type=int, default=1500, help="images at scale 1")
    p.add_argument("--neuron-images", type=int, default=300, help="images of the neuron workload")
    p.add_argument("--workloads", default="images,neurons", help="images, neurons or both")
    p.add_argument("--plot", type=Path, default=ROOT / "bench" / "scale.png", help="PNG written")
    p.add_argument("--work", type=Path, help="data folder (default: a temporary one, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the data folder")
    p.add_argument("--resume", action="store_true", help="with --work: reuse the sizes its "
                   "scale.json holds and measure only the others")
    args = p.parse_args(argv)
    if args.resume and args.work is None:
        p.error("--resume needs --work DIR: the data folder of the run to go on with")
    sizes = [int(s) for s in args.sizes.split(",")]
    workloads = args.workloads.split(",")
    if "neurons" in workloads and not set(sizes) <= set(RESNET_LAYERS):
        p.error(f"the neuron workload has the scales {sorted(RESNET_LAYERS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="neuron-atlas-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench_scale.log"
    print(f"data in {work}; stage output in {log}", flush=True)
    results: dict[str, tuple[str, list[Measure]]] = {}
    state = work / "scale.json"
    measured = load_saved(state) if args.resume else {}
    status = 0

    code = code_version()

    def measure(workload: str, size: int, n: int, run: str, variables: dict[str, str]) -> Measure:
        """The pipeline on one size, or its saved measure (--resume) when made by the same code;
        saved once measured."""
        key = f"{args.base_images if workload == 'images' else args.neuron_images} images, x{size}"
        m = measured.get(workload, {}).get(key)
        if m is not None and m.n == n and m.code == code and "+changes" not in code:
            print("    measured before (scale.json): not run again", flush=True)
            return m
        if m is not None:
            print(f"    measured before on other code ({m.code or 'unknown'}): run again",
                  flush=True)
        m = run_pipeline(work, run, variables, log)
        m.n, m.code = n, code
        measured.setdefault(workload, {})[key] = m
        save(state, measured)
        return m

    try:
        if "images" in workloads:
            measures = []
            for s in sizes:
                n = args.base_images * s
                print(f"  images × {s}: {n} images", flush=True)
                images = demo_images(work, n, log)
                measures.append(measure("images", s, n, f"img-{n}", {"IMAGES": str(images)}))
            results["images (EfficientNet-Lite0, 512 neurons)"] = ("images", measures)
        if "neurons" in workloads:
            images = demo_images(work, args.neuron_images, log)
            measures = []
            for s in sizes:
                layers = RESNET_LAYERS[s]
                n = sum(RESNET_WIDTH[name] for name in layers.split(","))
                print(f"  neurons × {s}: {n} neurons ({layers})", flush=True)
                variables = {"IMAGES": str(images), "MODEL": "resnet50", "RANDOM_INIT": "1",
                             "LAYERS": layers}
                measures.append(measure("neurons", s, n, f"neurons-{n}", variables))
            results[f"neurons (random-init ResNet-50, {args.neuron_images} images)"] = (
                "neurons", measures)
            last = f"neurons-{measures[-1].n}"
            atlas = work / last / "atlas" / "index.html"
            q = subprocess.run(["make", "-q", "all", f"DATA={work}", f"RUN={last}",
                                *[f"{k}={v}" for k, v in variables.items()]], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            print(f"  largest neuron run: atlas built: {atlas.is_file()}; `make -q all` "
                  f"{'holds' if q == 0 else 'does NOT hold'}", flush=True)
            status |= int(q != 0 or not atlas.is_file())
    except RuntimeError as err:
        print(f"FAILED: {err}", flush=True)
        status = 1
    print()
    for name, (unit, measures) in results.items():
        if len(measures) >= 2:
            print("\n".join(report(name, unit, measures)))
        if measures:
            print("\n".join(report_pairs(measures[-1], unit)))
    if any(len(m) >= 2 for _, m in results.values()):
        plot({k: v for k, v in results.items() if len(v[1]) >= 2}, args.plot)
        print(f"plot: {args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
