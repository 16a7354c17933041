"""Benchmark of 03_describe (offline backend) + 04_embed on a finished demo run, and of the hf
backend's batching on a tiny random LLaVA.

Prints, measured in this one run:
  * 03_describe --backend offline: wall time for all neurons of the run and neurons per second;
  * 04_embed: wall time for the same neurons; 03 + 04 against the 120 s target (2 CPU cores);
  * hf backend, tiny LLaVA built in memory: generation seconds per neuron at batch 1 and batch 16
    (greedy, fixed answer length) and their ratio — batching must pay (ratio > 1).

The stages run as separate processes, as Make runs them, writing into a temporary folder so the
run's own descriptions are left alone.

  python bench/bench_describe_embed.py [--run data/demo] [--hf-neurons 32]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.artefacts import read_descriptions  # noqa: E402

TARGET_S = 120.0  # 03 + 04 on the whole demo, 2 CPU cores


def timed(cmd: list[str]) -> float:
    """Run ``cmd`` from the project root; return its wall time (raise if it fails)."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def bench_stages(run: Path, work: Path) -> dict:
    """Time 03 (offline) and 04 as subprocesses on ``run``, writing into ``work``."""
    py = sys.executable
    out03 = work / "03_descriptions.csv"
    # 03 and 04 read and write a run folder: ``work`` becomes one, 01's and 02's files linked in.
    for name in run.glob("0[12]_*"):
        if not (work / name.name).exists():
            (work / name.name).symlink_to(name.resolve())
    t03 = timed([py, "03_describe.py", "--run", str(work)])
    t04 = timed([py, "04_embed.py", "--run", str(work)])
    rows = read_descriptions(out03)
    return {"neurons": len(rows), "ok": sum(r.status == "ok" for r in rows), "t03": t03,
            "t04": t04}


def bench_hf(n: int, device: str = "auto") -> dict:
    """Seconds per neuron of the tiny LLaVA at batch 1 and batch 16 on ``n`` mosaics (keys 1 and
    16), and its peak GPU memory in MiB ("peak_gpu_mib", 0 without a GPU)."""
    import numpy as np
    import torch
    from PIL import Image
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_vlms import llava
    from common.describers import HFDescriber
    with tempfile.TemporaryDirectory() as folder:
        llava(folder)
        hf = HFDescriber(folder, device=device, temperature=0, max_new_tokens=16)
    hf.gen.min_new_tokens = hf.gen.max_new_tokens  # equal work per answer at any batch
    on_gpu = hf.model.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(hf.model.device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(n)]
    prompts = ["black white stripes " * (1 + i % 5) for i in range(n)]  # uneven: padding
    hf.generate(images[:2], prompts[:2])  # warm-up
    result = {}
    for batch in (1, 16):
        start = time.perf_counter()
        for s in range(0, n, batch):
            hf.generate(images[s:s + batch], prompts[s:s + batch])
        result[batch] = (time.perf_counter() - start) / n
    result["peak_gpu_mib"] = (torch.cuda.max_memory_allocated(hf.model.device) / 2 ** 20
                              if on_gpu else 0.0)
    return result


def main(argv=None):
    """Run the measurements and print figures and ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=str(ROOT / "data" / "demo"), help="finished run (01, 02)")
    p.add_argument("--hf-neurons", type=int, default=32, help="mosaics for the hf measurement")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / "02_mosaics.csv").is_file():
        sys.exit(f"{run}/02_mosaics.csv not found: build the demo run first (make all)")
    with tempfile.TemporaryDirectory() as work:
        s = bench_stages(run, Path(work))
    total = s["t03"] + s["t04"]
    print(f"03_describe offline: {s['neurons']} neurons ({s['ok']} ok) in {s['t03']:.1f} s "
          f"= {s['neurons'] / s['t03']:.1f} neurons/s")
    print(f"04_embed: {s['t04']:.1f} s for {s['ok']} neurons")
    print(f"03 + 04: {total:.1f} s (target ≤ {TARGET_S:.0f} s; {total / TARGET_S:.2f} of it) "
          f"-> {'PASS' if total <= TARGET_S else 'FAIL'}")
    hf = bench_hf(args.hf_neurons)
    print(f"hf tiny LLaVA: {hf[1] * 1000:.1f} ms/neuron at batch 1, {hf[16] * 1000:.1f} ms/neuron "
          f"at batch 16 -> batching speed-up {hf[1] / hf[16]:.1f}x")


if __name__ == "__main__":
    main()
