"""The GPU run, ready to go (bench/gpu.sh calls this): 01_extract against a bare forward loop on a
GPU, the hf describer's throughput, and peak GPU memory.

Prints, measured in this one run on whatever device ``--device`` picks:
  * images/s of a bare loop (01's own decoding threads and batches, forward pass only) and of
    01_extract on a random-init ResNet-50 over ``--n`` synthetic 224-px images, and their ratio
    (target ≥ 0.9: the tool keeps the GPU at least 90 % as busy as a loop that does nothing else);
  * neurons per minute of the hf describer on a tiny random LLaVA built here (no download), at
    batch 1 and batch 16 (batching on);
  * peak GPU memory of 01 and of the describer (torch's allocator), and the card's name.

Decoding workers default to the machine's cores. The images are made here, in parallel, each from
its own seed: smooth colour fields with a few bars and discs, JPEG quality 90 — photo-like to
decode, distinct bytes so that 01's duplicate check keeps every one.

  python bench/bench_gpu.py [--n 20000] [--batch 128] [--workers N] [--device auto]
                            [--hf-neurons 256] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDE = 224
TARGET = 0.9  # 01's images/s ÷ the bare loop's


def synthetic_image(args: tuple[str, int]) -> str:
    """Write image ``index`` (seeded by it) to ``folder``; return its path."""
    folder, index = args
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x, y = (int(v) for v in rng.integers(0, SIDE, 2))
        w, h = (int(v) for v in rng.integers(8, SIDE // 2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x, y, x + w, y + h // 4), fill=colour)
        else:
            draw.ellipse((x, y, x + w, y + w), outline=colour, width=int(rng.integers(2, 8)))
    path = os.path.join(folder, f"{index % 10}", f"img_{index:06d}.jpg")
    img.save(path, quality=90)
    return path


def make_images(folder: Path, n: int, workers: int) -> Path:
    """``n`` synthetic images in ten class folders and the CSV that lists them."""
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        paths = list(pool.map(synthetic_image, [(str(folder), i) for i in range(n)],
                              chunksize=256))
    csv_path = folder / "images.csv"
    csv_path.write_text("path,label\n" + "".join(f"{p},{Path(p).parent.name}\n" for p in paths),
                        encoding="utf-8")
    return csv_path


def extract_throughput(csv_path: Path, work: Path, batch: int, workers: int, device: str) -> dict:
    """images/s of the bare loop and of 01 (best of two interleaved runs each) and 01's peak
    GPU memory."""
    import torch
    from common.artefacts import Run
    from common.images import list_images
    from bench.bench_extract import bare_loop
    from common.models import load_model
    from tools.stages import load_stage
    extract = load_stage("01_extract")
    entries = list_images(csv_path)
    torch.manual_seed(0)
    bundle = load_model("resnet50", random_init=True, device=device)
    bare_loop(extract, bundle, entries[:2 * batch], batch, workers)  # warm-up: kernels, threads
    bare, full, peak = [], [], 0
    for rep in range(2):
        bare.append(bare_loop(extract, bundle, entries, batch, workers)[0])  # wall clock
        if bundle.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(bundle.device)
        start = time.perf_counter()
        extract.run(Run(work / f"run_{rep}"), str(csv_path), bundle, bundle.default_layers,
                    extract.Settings(batch_size=batch, workers=workers, device=device))
        if bundle.device.type == "cuda":
            torch.cuda.synchronize(bundle.device)
        full.append(time.perf_counter() - start)
        if bundle.device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(bundle.device))
    n = len(entries)
    result = {"device": str(bundle.device), "images": n, "batch": batch, "workers": workers,
              "bare_images_per_s": n / min(bare), "extract_images_per_s": n / min(full),
              "extract_peak_gpu_mib": peak / 2 ** 20}
    result["ratio"] = result["extract_images_per_s"] / result["bare_images_per_s"]
    return result


def describer_throughput(n: int, device: str) -> dict:
    """Neurons per minute of the hf describer (bench_describe_embed's tiny random LLaVA, fixed
    answer length) at batch 1 and 16, and its peak GPU memory."""
    from bench.bench_describe_embed import bench_hf
    seconds = bench_hf(n, device)
    return {"neurons_per_min_batch1": 60 / seconds[1], "neurons_per_min_batch16": 60 / seconds[16],
            "describer_peak_gpu_mib": seconds["peak_gpu_mib"]}


def main(argv=None) -> dict:
    """Make the images, run the measurements, print them (and a JSON line)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000, help="synthetic 224-px images for 01")
    p.add_argument("--batch", type=int, default=128, help="images per forward pass")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="decoding threads of 01 (and processes making the images)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    p.add_argument("--hf-neurons", type=int, default=256, help="mosaics for the describer")
    p.add_argument("--work", help="folder for the images and runs (default: a temporary one)")
    args = p.parse_args(argv)
    from common.cli import keep_freed_memory
    keep_freed_memory()
    import torch
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU run)"
    print(f"device: {card}; torch {torch.__version__}; {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        csv_path = make_images(work / "images", args.n, args.workers)
        print(f"made {args.n} synthetic {SIDE}-px images in {time.perf_counter() - start:.1f} s",
              flush=True)
        result = {"card": card}
        result.update(extract_throughput(csv_path, work, args.batch, args.workers, args.device))
        print(f"01 on random-init ResNet-50 ({result['device']}, batch {args.batch}, "
              f"{args.workers} decoding threads): bare loop {result['bare_images_per_s']:.0f} "
              f"images/s, 01 {result['extract_images_per_s']:.0f} images/s, ratio "
              f"{result['ratio']:.3f} (target ≥ {TARGET}); 01's peak GPU memory "
              f"{result['extract_peak_gpu_mib']:.0f} MiB", flush=True)
    result.update(describer_throughput(args.hf_neurons, args.device))
    print(f"hf describer, tiny random LLaVA: {result['neurons_per_min_batch1']:.0f} neurons/min "
          f"at batch 1, {result['neurons_per_min_batch16']:.0f} at batch 16; peak GPU memory "
          f"{result['describer_peak_gpu_mib']:.0f} MiB", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
