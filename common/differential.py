"""Differential activation statistics: which neurons behave differently on two groups of images.

Stage 08 compares, for a confusion (true class T predicted as P), the images of T predicted P
(KO) with the images of T predicted T (OK). For every neuron (a column of 01's per-image
statistics) and both per-image aggregations (spatial max and mean):

- Δμ = μ_KO − μ_OK;
- ``sigma`` = s_p, the pooled standard deviation of the two groups,
  √(((n_KO − 1)·s²_KO + (n_OK − 1)·s²_OK) / (n_KO + n_OK − 2)) — the thesis's "combined standard
  deviation of the two sets" (§ statistical neuron analysis), read as the pooled one;
- ``z`` = Δμ / s_p, the thesis's z, with its ``flag_z``: |z| ≥ 2 (a shift of two standard
  deviations of the neuron, whatever the number of images);
- ``t`` = Δμ / (s_p·√(1/n_KO + 1/n_OK)), the Student two-sample statistic (z scaled by the
  number of images);
- ``p``, the Welch t-test p-value (no equal-variance assumption);
- ``q``, the Benjamini–Hochberg q-value over all neurons of all layers of one aggregation (one
  family of tests), with its ``flag_fdr``: q ≤ FDR — the flag that accounts for testing many
  neurons.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats as sps

from common import artefacts
from common.cli import StageError

AGGS = ("max", "mean")  # per-image aggregations of a channel's feature map, as stored by 01
STAT_COLS = ("mu_ok", "mu_ko", "delta_mu", "sigma", "z", "t", "p", "q", "flag_z", "flag_fdr")


def compare_groups(ko: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
    """Per column (neuron) of ``ko`` (n_KO × C) against ``ok`` (n_OK × C).

    ``sigma`` is the pooled standard deviation s_p of the two groups; ``z`` = Δμ / s_p (the
    thesis's z: the shift in units of the neuron's spread); ``t`` = Δμ over the standard error
    s_p·√(1/n_KO + 1/n_OK) (the Student two-sample statistic). ``p`` is Welch's two-sided t-test
    (no equal-variance assumption). Constant neurons get z = t = 0 and p = 1 when both groups
    agree exactly, ±inf and p = 0 when they differ.
    """
    ko = np.asarray(ko, dtype=np.float64)
    ok = np.asarray(ok, dtype=np.float64)
    n1, n2 = len(ko), len(ok)
    mu_ko, mu_ok = ko.mean(axis=0), ok.mean(axis=0)
    delta = mu_ko - mu_ok
    pooled_var = ((n1 - 1) * ko.var(axis=0, ddof=1)
                  + (n2 - 1) * ok.var(axis=0, ddof=1)) / (n1 + n2 - 2)
    sd = np.sqrt(pooled_var)
    se = sd * math.sqrt(1 / n1 + 1 / n2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, delta / se, np.where(delta == 0, 0.0, np.sign(delta) * np.inf))
        z = np.where(sd > 0, delta / sd, np.where(delta == 0, 0.0, np.sign(delta) * np.inf))
        # Constant neurons (a dead unit is 0 on every image) make scipy warn about precision;
        # they are handled just below, so the warning is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = sps.ttest_ind(ko, ok, axis=0, equal_var=False).pvalue
    p = np.where(np.isnan(p), np.where(delta == 0, 1.0, 0.0), p)
    return {"mu_ok": mu_ok, "mu_ko": mu_ko, "delta_mu": delta, "sigma": sd, "z": z, "t": t,
            "p": p}


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of a flat array of p-values (none for
    none)."""
    return sps.false_discovery_control(np.clip(p, 0.0, 1.0), method="bh")


def layer_stats(stats_dir: Path, layers: list[str], ok_ids: np.ndarray, ko_ids: np.ndarray,
                min_images: int, pair_label: str, fdr: float, z_threshold: float) -> dict:
    """Differential statistics of every neuron of every layer, for both aggregations.

    Rows are read from the memory-mapped 01_stats files, so only the OK and KO images are loaded.
    Rows that are NaN (skipped images) are dropped; fewer than ``min_images`` usable rows on a
    side is a StageError naming ``pair_label``. q-values and flags (``flag_z``: |z| ≥
    ``z_threshold``; ``flag_fdr``: q ≤ ``fdr``) are computed over all neurons of all layers of one
    aggregation. Returns ``{layer: {agg: {column: array}}, "_n": {layer: (n_ok, n_ko)}}``.
    """
    out: dict = {"_n": {}}
    for layer in layers:
        out[layer] = {}
        for agg in AGGS:
            table = artefacts.read_stats(stats_dir, layer, agg)
            ko = np.asarray(table[ko_ids], dtype=np.float64)
            ok = np.asarray(table[ok_ids], dtype=np.float64)
            ko = ko[~np.isnan(ko).any(axis=1)]
            ok = ok[~np.isnan(ok).any(axis=1)]
            if min(len(ok), len(ko)) < min_images:
                raise StageError(
                    f"pair {pair_label}: OK has {len(ok)} usable images and KO {len(ko)} in layer "
                    f"{layer}; the comparison needs at least {min_images} in each (--min-images). "
                    f"Pick a pair with more errors, or add images of that class")
            out[layer][agg] = compare_groups(ko, ok)
            out["_n"][layer] = (len(ok), len(ko))
    for agg in AGGS:
        flat_q = bh_qvalues(np.concatenate([out[layer][agg]["p"] for layer in layers]))
        start = 0
        for layer in layers:
            res = out[layer][agg]
            c = len(res["p"])
            res["q"] = flat_q[start:start + c]
            res["flag_z"] = np.abs(res["z"]) >= z_threshold
            res["flag_fdr"] = res["q"] <= fdr
            start += c
    return out


def chance_rate(n_ok: int, n_ko: int, z_threshold: float) -> float:
    """Share of neurons expected to pass |z| ≥ threshold when nothing differs.

    z = Δμ / s_p = t·√(1/n_KO + 1/n_OK) and t follows Student's t with n_OK + n_KO − 2 degrees of
    freedom under normal, equal-variance groups, so |z| ≥ c is |t| ≥ c / √(1/n_KO + 1/n_OK).
    """
    return float(2 * sps.t.sf(z_threshold / math.sqrt(1 / n_ok + 1 / n_ko), n_ok + n_ko - 2))
