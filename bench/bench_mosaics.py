"""Benchmark of 02_mosaics: its time ÷ decoding the same unique source images once.

Both sides use the same number of worker processes; the baseline decodes each unique top image
and resizes it to the network input, which 02 must do anyway, so the ratio is the price of cutting,
tiling and saving the mosaics. Target ≤ 1.5.

  python bench/bench_mosaics.py [--n 512] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from common.activations import read_activations  # noqa: E402
from common.io import read_csv  # noqa: E402
from common.stages import load_stage  # noqa: E402


def decode(path: str) -> int:
    """Decode one image to the network input (what 02 needs from each source image)."""
    from common.images import load_rgb, network_input
    return int(np.asarray(network_input(load_rgb(path)[0], 224)).sum() % 7)


def encode_png(path: str) -> int:
    """Re-encode one mosaic with 02's PNG writer (the output-format cost of 02)."""
    from PIL import Image
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return len(load_stage("02_mosaics").png_bytes(rgb))


def main(argv=None) -> float:
    """Extract on the demo set, then time 02 against the decode-once baseline."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=512, help="demo images")
    parser.add_argument("--workers", type=int, default=2, help="processes on both sides")
    parser.add_argument("--grid", type=int, default=10, help="mosaic grid")
    args = parser.parse_args(argv)
    from common.demo import build_demo_set
    extract, mosaics = load_stage("01_extract"), load_stage("02_mosaics")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        csv_path = build_demo_set(tmp / "demo", n_images=args.n, seed=0)
        run = tmp / "run"
        extract.main(["--images", str(csv_path), "--out", str(run), "--device", "cpu"])
        layers, _, tops = read_activations(run / "01_activations.npz")
        rows = read_csv(run / "01_images.csv")
        needed = sorted({int(i) for name in layers
                         for i in np.unique(tops[name].image_ids[:, :args.grid ** 2]) if i >= 0})
        paths = [rows[i]["path"] for i in needed]
        n_neurons = sum(tops[name].channels for name in layers)

        start = time.perf_counter()
        with mp.get_context("fork").Pool(args.workers) as pool:
            pool.map(decode, paths, chunksize=8)
        baseline = time.perf_counter() - start

        start = time.perf_counter()
        mosaics.main(["--activations", str(run / "01_activations.npz"), "--images",
                      str(run / "01_images.csv"), "--out-dir", str(run / "02_mosaics"),
                      "--index", str(run / "02_mosaics.csv"), "--workers", str(args.workers),
                      "--grid", str(args.grid)])
        elapsed = time.perf_counter() - start

        # The floor set by the output format: only encoding the same PNGs, same processes.
        pngs = sorted((run / "02_mosaics").rglob("*.png"))
        start = time.perf_counter()
        with mp.get_context("fork").Pool(args.workers) as pool:
            pool.map(encode_png, [str(p) for p in pngs], chunksize=8)
        encode = time.perf_counter() - start
    ratio = elapsed / baseline
    print(f"02_mosaics: {n_neurons} mosaics from {len(paths)} unique images  decode-once "
          f"{baseline:.2f} s  02 {elapsed:.2f} s  ratio {ratio:.2f}  (target ≤ 1.5)")
    print(f"           of which the PNG encoding alone (re-encoding the mosaics) takes {encode:.2f} s: "
          f"(02 − PNG encoding) ÷ decode-once = {(elapsed - encode) / baseline:.2f}")
    print(json.dumps({"mosaics_ratio": ratio}))
    return ratio


if __name__ == "__main__":
    main()
