"""Benchmark of 13's relevance pass: its time as a ratio to 01's on the same images (target ≤ 2).

The relevance pass runs over the labelled images only (one forward and one backward pass each),
so 01 is timed on exactly those images too: a temporary image list holds the labelled rows of
the demo's list. Both run as separate processes, as Make runs them, in a temporary folder.

  python bench/bench_relevance.py [--images data/demo_images/images.csv]
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 2.0  # relevance ÷ 01 on the same images (issue 14)


def timed(cmd: list[str]) -> float:
    """Run ``cmd`` from the project root; return its wall time (raise if it fails)."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def labelled_list(images: Path, out: Path) -> int:
    """Write the labelled rows of ``images`` to ``out`` with absolute paths; return their count."""
    with open(images, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("label")]
    for r in rows:
        r["path"] = str((images.parent / r["path"]).resolve())
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main(argv=None) -> None:
    """Time 01 and the relevance pass on the demo's labelled images and print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, default=ROOT / "data" / "demo_images" / "images.csv",
                   help="image list with a label column (the demo's by default)")
    p.add_argument("--batch-size", type=int, default=32, help="images per pass (both stages)")
    args = p.parse_args(argv)
    if not args.images.is_file():
        sys.exit(f"{args.images} not found: build the demo images first (make all)")
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = labelled_list(args.images, work / "labelled.csv")
        t01 = timed([py, "01_extract.py", "--images", str(work / "labelled.csv"), "--run",
                     str(work / "run"), "--topk", "100", "--batch-size", str(args.batch_size),
                     "--workers", "2"])
        t13 = timed([py, "13_audit.py", "relevance", "--run", str(work / "run"),
                     "--batch-size", str(args.batch_size)])
    ratio = t13 / t01
    print(f"bench_relevance: {n} labelled images; 01 {t01:.1f} s, relevance {t13:.1f} s, "
          f"ratio {ratio:.2f} (target ≤ {TARGET_RATIO}) {'OK' if ratio <= TARGET_RATIO else 'MISSED'}")


if __name__ == "__main__":
    main()
