"""Benchmark of 09_score on a finished demo run: its time as a ratio to 01's on the same images,
the time of its refinement (Describe-and-Refine's loop) as a ratio to 01's and the describer calls
it made per neuron, the run's layer summary (verification before and after refinement, distinct
sentences) (share of neurons whose sentence beats its control, SIEVE's Activation
Rate before and after its filter) and Describe-and-Refine's Table 1 for the run: where each
layer's best-described neuron ranks under five ways of ranking neurons.

Both stages run as separate processes, as Make runs them, writing into a temporary folder so the
run's own files are left alone (09 describes the sub-concepts from scratch there, in a fresh
folder each time). 01 runs with the demo's arguments on the demo's images. The two alternate,
ROUNDS times, and the best time of each is kept, since the load of a shared machine drifts.

  python bench/bench_score.py [--run data/demo] [--images data/demo_images/images.csv]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.artefacts import read_score_rows, read_stats, read_summary  # noqa: E402
from common.provenance import read_meta  # noqa: E402
from common.scores import RANKINGS, ranks_by_method  # noqa: E402

TARGET_RATIO = 0.5  # 09 ÷ 01 on the same images
TARGET_REFINE = 1.0  # 09's refinement ÷ 01 (issue 21, offline)
GOAL_BEATING = 0.8  # share of neurons whose sentence beats its control (offline matcher)
ROUNDS = 2          # alternate runs of 01 and 09; the best of each is kept


def timed(cmd: list[str]) -> float:
    """Run ``cmd`` from the project root; return its wall time (raise if it fails)."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def score_command(py: str, run: Path, work: Path) -> list[str]:
    """09_score on the finished ``run``, writing into ``work`` (made a run folder: the run's
    01-04 files linked in)."""
    for name in run.glob("0[1-4]_*"):
        if not (work / name.name).exists():
            (work / name.name).symlink_to(name.resolve())
    return [py, "09_score.py", "--run", str(work)]


def main(argv=None) -> None:
    """Time 01 and 09 on the demo run and print the ratio and the layer summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "data" / "demo", help="finished run folder")
    p.add_argument("--images", default="data/demo_images/images.csv", help="the run's images")
    args = p.parse_args(argv)
    run = args.run
    if not (run / "04_embeddings.npz").exists():
        sys.exit(f"{run} has no finished run: `make all` first")
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        t01 = t09 = t_refine = float("inf")
        for round_ in range(ROUNDS):
            work = Path(tmp) / str(round_)
            t01 = min(t01, timed([py, "01_extract.py", "--images", args.images, "--run",
                                  str(work / "x"), "--topk", "100", "--batch-size", "32",
                                  "--workers", "2"]))
            start = time.perf_counter()
            done = subprocess.run(score_command(py, run, work), cwd=ROOT, check=True,
                                  stderr=subprocess.PIPE, text=True)
            t09 = min(t09, time.perf_counter() - start)
            refine = read_meta(work / "09_scores.csv")["refine"]
            # the refinement's own time, from 09's log line (metas hold no times: they are
            # the same on every re-run)
            took = re.search(r"refinement \(.*; ([0-9.]+) s$", done.stderr, re.M)
            t_refine = min(t_refine, float(took.group(1)) if took else float("nan"))
        summary = read_summary(work / "09_summary.csv")
        rows = read_score_rows(work / "09_scores.csv")
        neurons = sum(r.neurons for r in summary)
    ratio = t09 / t01
    print(f"09_score on {neurons} neurons: {t09:.1f} s; 01_extract on the same images: "
          f"{t01:.1f} s; ratio {ratio:.2f} (target ≤ {TARGET_RATIO})")
    print(f"refinement (at most {refine['iterations']} iterations, {refine['units']} sentences, "
          f"{refine['replaced']} replaced): {t_refine:.1f} s, ratio to 01 {t_refine / t01:.2f} "
          f"(target ≤ {TARGET_REFINE}); describer calls per neuron: mean "
          f"{refine['describer_calls_mean']:.2f}, max {refine['describer_calls_max']}")
    total_beat = total_auprc = 0.0
    for r in summary:
        share, by_auprc = r.share_beating_control, r.share_beating_control_auprc
        total_beat += share * r.neurons
        total_auprc += by_auprc * r.neurons
        print(f"  {r.layer}: {r.neurons} neurons, {r.dead} dead, clarity {r.mean_clarity:.4g}, "
              f"polysemanticity {r.mean_polysemanticity:.4g}, verify r {r.mean_verify_corr:.4g} "
              f"vs control {r.mean_control_corr:.4g}, beating control {share:.0%} (by AUPRC "
              f"{by_auprc:.0%}; {r.matcher} matcher, {r.embedder} crops), reliably "
              f"{r.share_reliable:.0%}; {r.selected} selected, {r.split} split; Activation Rate "
              f"{r.mean_ar:.3f} over {r.hypotheses} hypotheses, {r.mean_ar_kept:.3f} over the "
              f"{r.hypotheses_kept} SIEVE's filter keeps; verify r before refinement "
              f"{r.mean_first_corr:.4g}, after {r.mean_verify_corr:.4g}; distinct sentences "
              f"{r.distinct_first} before, {r.distinct_sentences} after")
    print(f"share of all neurons beating their control: {total_beat / neurons:.0%} by Pearson r "
          f"(goal ≥ {GOAL_BEATING:.0%} offline), {total_auprc / neurons:.0%} by AUPRC")
    print(dnr_table(rows, run / "01_stats", [r.layer for r in summary]))


def dnr_table(rows, stats_dir: Path, layers: list[str]) -> str:
    """DnR's Table 1 over the run: per layer, its best-described neuron (highest lower end of
    the margin's interval) and its rank among the layer's neurons, with its score, under each
    ranking method (common.scores.RANKINGS)."""
    lines = ["DnR Table 1 analogue: rank (score) of each layer's best-described neuron among its "
             "layer's neurons; " + "; ".join(RANKINGS)]
    for layer in layers:
        mine = [r for r in rows if r.layer == layer and r.subconcept is None]
        verified = [r for r in mine if r.margin_low == r.margin_low]  # not NaN
        if not verified:
            lines.append(f"  {layer}: no verified neuron")
            continue
        best = max(verified, key=lambda r: r.margin_low)
        consistency = [r.dnr_consistency for r in sorted(mine, key=lambda r: r.channel)]
        table = ranks_by_method(read_stats(stats_dir, layer, "max"), consistency)
        cells = ", ".join(f"{m} {int(table[m][1][best.channel])} ({table[m][0][best.channel]:.4g})"
                          if table[m][0][best.channel] == table[m][0][best.channel]  # not NaN
                          else f"{m} – (no score)" for m in RANKINGS)
        lines.append(f"  {layer} neuron {best.channel} of {len(mine)} (margin {best.margin:.3f}, "
                     f"interval low {best.margin_low:.3f}): {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
