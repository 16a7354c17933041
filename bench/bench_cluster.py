"""Benchmark of 05_cluster's k search on layers of ResNet-50's sizes, against an exhaustive sweep.

Synthetic unit vectors (384-d, like all-MiniLM-L6-v2) with n/20 planted concepts per layer are
clustered exactly as 05 does it (coarse-to-fine silhouette search, KMeans, metrics). The reference
fits every k of the same range on the largest layer. Printed: seconds and fits per layer, the total,
the sweep's seconds and the ratio sweep ÷ search on the largest layer — the search's fits are timed
again within the sweep, so that both sides share one stretch of a shared machine's drifting load
(the ratio with the search timed apart is printed too) — and whether both chose the same k; then
the seconds of a 512-neuron layer whose neurons repeat 40 sentences (identical descriptions, one
weighted point each).

  python bench/bench_cluster.py [--k-max 128] [--n-init 3] [--threads 0]
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tools.stages import load_stage  # noqa: E402

SIZES = (64, 256, 512, 1024, 2048)  # channels of ResNet-50's relu, layer1, layer2, layer3, layer4
DIM = 384  # text embedding width of all-MiniLM-L6-v2
DUPLICATED_N, DUPLICATED_DISTINCT = 512, 40  # a layer whose descriptions are mostly repeats


def synthetic_layer(n: int, seed: int) -> np.ndarray:
    """``n`` unit vectors around n/20 random concept directions, noisy enough to overlap a little.

    n/20 keeps the best k of every layer inside the default range, so the search has a peak to find.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 20, 2), DIM))
    x = centres[rng.integers(len(centres), size=n)] + 0.9 * rng.normal(size=(n, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv=None) -> float:
    """Time the search on every layer and the exhaustive sweep on the largest; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k-min", type=int, default=2, help="smallest k")
    parser.add_argument("--k-max", type=int, default=128,
                        help="largest k (the sweep fits every k up to it on the largest layer)")
    parser.add_argument("--n-init", type=int, default=3, help="KMeans restarts per k")
    parser.add_argument("--grid-points", type=int, default=8,
                        help="k values of the search's first round")
    parser.add_argument("--threads", type=int, default=0,
                        help="BLAS/OpenMP threads (0: the libraries' default)")
    args = parser.parse_args(argv)
    from sklearn.metrics.pairwise import cosine_distances
    from threadpoolctl import threadpool_limits

    stage = load_stage("05_cluster")
    limit = args.threads or None
    print(f"05_cluster k search: k in [{args.k_min}, {args.k_max}], n_init={args.n_init}, "
          f"{args.grid_points} k per round, threads={args.threads or 'default'}")
    total = 0.0
    with threadpool_limits(limit):
        for i, n in enumerate(SIZES):
            x = synthetic_layer(n, seed=i)
            start = time.perf_counter()
            res = stage.cluster_layer(x, args.k_min, args.k_max, seed=0, n_init=args.n_init,
                                      points=args.grid_points)
            seconds = time.perf_counter() - start
            total += seconds
            print(f"  {n:5d} neurons: {seconds:7.2f} s, {len(res.curve):3d} fits, k={res.k}, "
                  f"silhouette={res.silhouette:.3f}")
        search_seconds, search_k, search_fits, res_curve = seconds, res.k, len(res.curve), res.curve
        print(f"search total over {len(SIZES)} layers: {total:.2f} s")

        data = stage.deduplicate(x)
        lo, hi, _ = stage.k_range(len(x), len(data.points), args.k_min, args.k_max)
        dist = cosine_distances(x)
        sweep, fit_seconds = {}, {}
        for k in range(lo, hi + 1):
            start = time.perf_counter()
            sweep[k] = stage.silhouette(dist, stage.fit_kmeans(data, k, 0, args.n_init)[0])
            fit_seconds[k] = time.perf_counter() - start
    sweep_seconds = sum(fit_seconds.values())
    # The search's fits are fits of the sweep (same k, same seed, same result): timed within the
    # sweep, both sides share one stretch of the machine's load, which drifts over minutes.
    same_fits = sum(fit_seconds[k] for k in res_curve)
    best = max(sweep, key=lambda k: (sweep[k], -k))
    print(f"exhaustive sweep on {SIZES[-1]} neurons: {sweep_seconds:.2f} s, {len(sweep)} fits, "
          f"k={best}, silhouette={sweep[best]:.3f}")
    print(f"search on {SIZES[-1]} neurons: {search_seconds:.2f} s measured alone, "
          f"{same_fits:.2f} s for the same fits within the sweep; {search_fits} fits, "
          f"k={search_k}, silhouette={sweep[search_k]:.3f}")
    ratio = sweep_seconds / same_fits
    print(f"ratio exhaustive / search (largest layer): {ratio:.1f}x in time (same stretch), "
          f"{sweep_seconds / search_seconds:.1f}x measured apart, {len(sweep) / search_fits:.1f}x "
          f"in fits; same k: {'yes' if best == search_k else 'no'}")
    repeated = synthetic_layer(DUPLICATED_DISTINCT, seed=9)[
        np.random.default_rng(9).integers(DUPLICATED_DISTINCT, size=DUPLICATED_N)]
    with threadpool_limits(limit):
        start = time.perf_counter()
        res = stage.cluster_layer(repeated, args.k_min, 512, seed=0, n_init=args.n_init,
                                  points=args.grid_points)
    print(f"{DUPLICATED_N} neurons repeating {DUPLICATED_DISTINCT} sentences, k ≤ 512: "
          f"{time.perf_counter() - start:.2f} s, {len(res.curve)} fits, k={res.k}")
    return ratio


if __name__ == "__main__":
    main()
