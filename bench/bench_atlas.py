"""Benchmark of 10_atlas: the demo's atlas (size, build time) and a synthetic run of 5,952 neurons
(build time, and how fast its largest layer page, of 4,000 neurons, and that layer's map become
interactive in headless Chromium).

Targets: demo atlas ≤ 40 MB built in ≤ 60 s; synthetic run built in ≤ 180 s, a 4,000-neuron layer
page interactive in < 2 s. The demo part needs `make all` first (it is skipped, saying so,
otherwise). The synthetic run has layers of 96, 256, 576, 1,024 and 4,000 neurons, 640-px PNG
mosaics made of photo crops (scikit-image's sample photos; 40 distinct files, hard-linked, so
every neuron's file is decoded), descriptions, embeddings, clusters, a 2-D map, a trace and
stage 09's scores — everything but 08, which needs a model. "Interactive" is the time from asking
for the page until its script has drawn the first cards (or the plot) and marked the page ready.

  python bench/bench_atlas.py [--skip-demo] [--workers 2] [--keep DIR]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from common.artefacts import ScoreRow, columns  # noqa: E402
from common.io import save_npz, write_csv  # noqa: E402
from common.provenance import write_meta  # noqa: E402
from tools.stages import load_stage  # noqa: E402

SIZES = (96, 256, 576, 1024, 4000)  # neurons per layer: the last one the page to time
MOSAIC_PX, TILE = 640, 64  # 10 × 10 tiles of 64 px, the demo's mosaic
UNIQUE_MOSAICS = 40
N_IMAGES, TOPK = 2000, 100
WORDS = ("red yellow striped fur wheel window grass sky water text face dog cat metal wood "
         "circle grid edge dots leaves sand snow brick glass feather").split()


def folder_size(path: Path) -> float:
    """Megabytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def mosaics(folder: Path, rng: np.random.Generator) -> list[Path]:
    """``UNIQUE_MOSAICS`` PNG mosaics of random crops of scikit-image's photos."""
    from PIL import Image
    from skimage import data
    photos = [np.asarray(getattr(data, name)())[..., :3] for name in
              ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for m in range(UNIQUE_MOSAICS):
        canvas = np.full((MOSAIC_PX, MOSAIC_PX, 3), 128, np.uint8)
        for t in range(100):
            photo = photos[rng.integers(len(photos))]
            y = rng.integers(0, photo.shape[0] - TILE)
            x = rng.integers(0, photo.shape[1] - TILE)
            r, c = divmod(t, 10)
            canvas[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = photo[y:y + TILE, x:x + TILE]
        path = folder / f"m{m}.png"
        Image.fromarray(canvas).save(path)
        out.append(path)
    return out


def synthetic_run(run: Path, seed: int = 0) -> None:
    """Write the artefacts of a synthetic run (01-06 and 09, no 08; SIZES) into ``run``."""
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True)
    layers = [f"layer{i}" for i in range(len(SIZES))]
    classes = [f"class {k}" for k in range(10)]
    images = [{"image_id": i, "path": f"img/{i}.jpg", "label": classes[i % 10], "label_idx": i % 10,
               "status": "ok", "reason": ""} for i in range(N_IMAGES)]
    write_csv(run / "01_images.csv", images, list(images[0]))
    preds = [{**{k: r[k] for k in ("image_id", "path", "label", "label_idx")},
              "pred_idx": (p := int(rng.integers(10))), "pred_name": classes[p], "prob": 0.5,
              "correct": int(p == r["label_idx"]), "top5_idx": p, "top5_prob": 0.5}
             for r in images]
    write_csv(run / "01_predictions.csv", preds, list(preds[0]))
    arrays = {"layers": np.array(layers), "input_size": np.array([224, 224])}
    for layer, c in zip(layers, SIZES):
        values = -np.sort(-rng.gamma(2.0, 2.0, size=(c, TOPK)), axis=1).astype(np.float32)
        arrays.update({f"{layer}/values": values,
                       f"{layer}/image_ids": rng.integers(0, N_IMAGES, size=(c, TOPK)),
                       f"{layer}/y": np.zeros((c, TOPK), np.int32),
                       f"{layer}/x": np.zeros((c, TOPK), np.int32),
                       f"{layer}/fmap": np.array([c, 7, 7]),
                       f"{layer}/rf": np.array([32.0, 32, 8, 8, 0, 0])})
    save_npz(run / "01_activations.npz", arrays)
    m1 = write_meta(run / "01_extract.meta.json", "01_extract", {},
                    [run / "01_activations.npz"], model={"name": "synthetic", "input_size": 224})

    unique = mosaics(run / "unique", rng)
    mrows, drows, crows, cats, scores = [], [], [], [], []
    for layer, c in zip(layers, SIZES):
        (run / "02_mosaics" / layer).mkdir(parents=True)
        k = max(2, c // 40)
        xy = rng.normal(size=(c, 2))
        cluster = rng.integers(k, size=c)
        for ch in range(c):
            rel = f"02_mosaics/{layer}/{ch}.png"
            os.link(unique[(ch * 7 + len(layer)) % UNIQUE_MOSAICS], run / rel)
            mrows.append({"layer": layer, "channel": ch, "path": rel, "n_tiles": 100, "grid": 10,
                          "tile_px": TILE, "crop": "rf"})
            words = rng.choice(WORDS, size=3, replace=False)
            drows.append({"layer": layer, "channel": ch, "level": 1 + layers.index(layer),
                          "description": f"{words[0].capitalize()} {words[1]} and {words[2]}.",
                          "backend": "synthetic", "model": "none", "status": "ok", "reason": ""})
            crows.append({"layer": layer, "channel": ch, "kind": "fused",
                          "cluster": int(cluster[ch]), "x": float(xy[ch, 0] + cluster[ch]),
                          "y": float(xy[ch, 1])})
            cats.append({"layer": layer, "channel": ch, "category": "textures/shapes",
                         "score": 0.5, "method": "synthetic"})
            scores.append({"layer": layer, "channel": ch, "subconcept": "",
                           **{s: round(float(rng.random()), 3) for s in
                              ("selectivity", "dnr_score", "clarity", "polysemanticity",
                               "redundancy", "verify_corr", "verify_auprc", "control_corr",
                               "control_auprc")},
                           "dead": int(rng.random() < 0.05), "n_held_out": 200,
                           "margin": round(float(rng.random()) - 0.5, 3),
                           "embedder": "synthetic", "matcher": "synthetic"})
    shutil.rmtree(run / "unique")
    write_csv(run / "02_mosaics.csv", mrows, list(mrows[0]))
    m2 = write_meta(run / "02_mosaics.meta.json", "02_mosaics", {}, [run / "02_mosaics.csv"],
                    inputs=[m1])
    write_csv(run / "03_descriptions.csv", drows, list(drows[0]))
    m3 = write_meta(run / "03_describe.meta.json", "03_describe", {},
                    [run / "03_descriptions.csv"], inputs=[m2])
    n = sum(SIZES)
    vectors = rng.normal(size=(n, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    save_npz(run / "04_embeddings.npz", {
        "layer": np.array([r["layer"] for r in drows]), "channel": np.array(
            [r["channel"] for r in drows], np.int64), "text": vectors, "image": vectors,
        "fused": vectors, "text_model": np.array("synthetic"), "image_model": np.array("synthetic"),
        "fusion": np.array("mean")})
    m4 = write_meta(run / "04_embed.meta.json", "04_embed", {}, [run / "04_embeddings.npz"],
                    inputs=[m3])
    write_csv(run / "05_clusters.csv", crows, list(crows[0]))
    kw = [{"layer": r["layer"], "kind": "fused", "cluster": r["cluster"], "rank": 1,
           "term": WORDS[r["cluster"] % len(WORDS)], "weight": 1.0} for r in crows]
    write_csv(run / "05_keywords.csv", kw, list(kw[0]))
    write_csv(run / "05_metrics.csv", [{"layer": L, "kind": "fused", "k": max(2, c // 40),
                                        "wins": 0, "better": "tie"}
                                       for L, c in zip(layers, SIZES)],
              ["layer", "kind", "k", "cohesion", "silhouette", "davies_bouldin", "ari_text_fused",
               "wins", "better"])
    write_csv(run / "05_categories.csv", cats, list(cats[0]))
    m5 = write_meta(run / "05_cluster.meta.json", "05_cluster", {}, [run / "05_clusters.csv"],
                    inputs=[m4],
                    projection_used={L: {"fused": "umap"} for L in layers})
    trace = [{"source_layer": a, "source_cluster": i, "source_keywords": "", "target_layer": b,
              "target_cluster": i % max(2, cb // 40), "target_keywords": "", "similarity": 0.7}
             for a, b, ca, cb in zip(layers, layers[1:], SIZES, SIZES[1:])
             for i in range(max(2, ca // 40))]
    write_csv(run / "06_trace.csv", trace, list(trace[0]))
    write_meta(run / "06_trace.meta.json", "06_trace", {"kind": "fused"}, [run / "06_trace.csv"],
               inputs=[m5])
    write_csv(run / "09_scores.csv", scores, columns(ScoreRow))  # 09's columns, some left empty
    write_meta(run / "09_score.meta.json", "09_score", {}, [run / "09_scores.csv"], inputs=[m4])


def page_seconds(driver, url: str) -> float:
    """Seconds from asking for ``url`` until the page marks itself ready."""
    from tools.browser import wait_ready
    start = time.perf_counter()
    driver.get(url)
    wait_ready(driver, timeout=60)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    """Time the builds and the page loads; print the figures against their targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "data" / "demo", help="demo run")
    parser.add_argument("--skip-demo", action="store_true", help="only the synthetic run")
    parser.add_argument("--workers", type=int, default=2, help="processes making thumbnails")
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the synthetic run in this new folder and keep it")
    args = parser.parse_args(argv)
    stage = load_stage("10_atlas")
    figures = {}
    if not args.skip_demo:
        if (args.demo / "08_confusion.csv").exists():
            with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
                start = time.perf_counter()
                stage.build(args.demo, stage.Settings(workers=args.workers), Path(tmp) / "atlas")
                seconds = time.perf_counter() - start
                size = folder_size(Path(tmp) / "atlas")
            figures.update(demo_seconds=seconds, demo_mb=size)
            print(f"demo atlas: built in {seconds:.1f} s (target ≤ 60), {size:.1f} MB (≤ 40)")
        else:
            print(f"demo atlas: skipped, {args.demo} is not a finished run (make all first)")
    base = Path(tempfile.mkdtemp(prefix="atlas-bench-")) if args.keep is None else args.keep
    try:
        run = base / "synthetic"
        synthetic_run(run)
        start = time.perf_counter()
        stage.build(run, stage.Settings(workers=args.workers))
        seconds = time.perf_counter() - start
        figures.update(synthetic_seconds=seconds, synthetic_mb=folder_size(run / "atlas"))
        print(f"synthetic run of {sum(SIZES)} neurons: atlas built in {seconds:.1f} s "
              f"(target ≤ 180), {figures['synthetic_mb']:.1f} MB")
        from tools.browser import NoBrowser, headless_chromium
        try:
            driver = headless_chromium()
        except NoBrowser as err:
            print(f"browser timing skipped: {err}")
            return figures
        try:
            largest = f"layer{len(SIZES) - 1}"
            page_seconds(driver, (run / "atlas" / "index.html").as_uri())  # warm the browser
            for name, rel in (("layer page", f"layers/{largest}.html"),
                              ("map page", f"maps/{largest}.html")):
                best = min(page_seconds(driver, (run / "atlas" / rel).as_uri()) for _ in range(3))
                figures[name] = best
                print(f"{name} of {SIZES[-1]} neurons interactive in {best:.2f} s "
                      f"(best of 3; target < 2)")
        finally:
            driver.quit()
    finally:
        if args.keep is None:
            shutil.rmtree(base)
    return figures


if __name__ == "__main__":
    main()
