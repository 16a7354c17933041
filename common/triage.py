"""Triage of neurons from 01's per-image statistics alone (no forward pass): how selective each
neuron is, how strongly it fires on its best images, and whether it is dead or barely active.

Shared by 09_score (which reports the numbers) and 03_describe (``--skip-dead`` leaves flagged
neurons undescribed), so that both apply exactly the same rule.

All three use the per-image spatial maximum of each channel (``01_stats/<layer>.max.npy``), the
same quantity 01 ranks its top images by. Images 01 skipped (NaN rows) are left out.

- **selectivity** (SIEVE): the 99th percentile of the per-image maximum over its median. The ratio
  is only meaningful for values ≥ 0, so the distribution is first shifted by ``lo`` = min(0, its
  1st percentile) (a no-op for ReLU outputs, which are never negative; layers without a ReLU at
  their output can be negative). A median at or near the floor (a neuron silent on most images:
  the most selective kind) would divide by zero, so the denominator is floored at
  ``1 / SELECTIVITY_CAP`` of the range ``q99 − lo``: selectivity runs from 1 (q99 = median) to
  ``SELECTIVITY_CAP``. A constant neuron gets 1.
- **dnr_score** (Describe-and-Refine): 1/K Σ log(1 + a_i) over the K largest per-image maxima.
  ``log(1 + a)`` is undefined for a ≤ −1, so negative maxima count as 0 (``log 1 = 0``).
- **dead**: the neuron's spread ``q99 − median`` is at most ``DEAD_FLOOR`` (5 %) of the median
  spread of its layer's neurons: its response hardly changes from image to image compared with
  its neighbours (a constant neuron, one that never fires, or one that fires on fewer than 1 % of
  the images — too few to describe).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

SELECTIVITY_Q = 99.0     # high quantile of the per-image maximum (SIEVE: p99)
LOW_Q = 1.0              # quantile below which values are taken as the floor of the distribution
SELECTIVITY_CAP = 100.0  # largest selectivity: the median is floored at 1 % of the range
DNR_K = 20               # images in the DnR top-k log-weighted score
DEAD_FLOOR = 0.05        # dead: spread below this share of the layer's median neuron spread


def triage_layer(max_stats: np.ndarray, k: int = DNR_K, block: int = 256) -> dict[str, np.ndarray]:
    """Selectivity, DnR score, dead flag and the quantiles behind them, per channel.

    ``max_stats`` is N_images × C (per-image spatial maximum, e.g. a memory map); rows with NaN
    (skipped images) are left out. Channels are read ``block`` at a time, so memory stays at
    N × block values whatever the layer's width. Returns arrays of length C: ``selectivity``,
    ``dnr_score``, ``dead`` (bool), ``q99``, ``median``, ``lo``.
    """
    n_channels = max_stats.shape[1]
    usable = ~np.isnan(np.asarray(max_stats[:, :1], dtype=np.float64)).ravel()
    if not usable.any():
        raise ValueError("no usable image in the statistics (all rows are NaN)")
    k = max(1, min(k, int(usable.sum())))
    parts = {"q99": [], "median": [], "lo": [], "dnr_score": []}
    for start in range(0, n_channels, block):
        values = np.asarray(max_stats[:, start:start + block], dtype=np.float64)[usable]
        q_hi, median, q_lo = np.percentile(values, [SELECTIVITY_Q, 50.0, LOW_Q], axis=0)
        parts["q99"].append(q_hi)
        parts["median"].append(median)
        parts["lo"].append(np.minimum(0.0, q_lo))
        top = -np.partition(-values, k - 1, axis=0)[:k]
        parts["dnr_score"].append(np.log1p(np.maximum(top, 0.0)).mean(axis=0))
    out = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    span = out["q99"] - out["lo"]
    denominator = np.maximum(out["median"] - out["lo"], span / SELECTIVITY_CAP)
    out["selectivity"] = np.ones_like(span)  # a constant neuron (span 0, denominator 0): 1
    np.divide(span, denominator, out=out["selectivity"], where=span > 0)
    spread = out["q99"] - out["median"]
    out["dead"] = spread <= DEAD_FLOOR * float(np.median(spread))  # spreads ≥ 0: covers spread 0
    return out


def dead_neurons(stats_dir: str | Path, layers: Iterable[str]) -> set[tuple[str, int]]:
    """``(layer, channel)`` of every neuron the triage flags as dead, for the given layers."""
    from common.artefacts import read_stats
    out: set[tuple[str, int]] = set()
    for layer in layers:
        stats = read_stats(stats_dir, layer, "max")
        flags = triage_layer(stats)["dead"]
        out.update((layer, int(c)) for c in np.flatnonzero(flags))
    return out
