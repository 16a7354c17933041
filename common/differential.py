"""Differential activation statistics: which neurons behave differently on two groups of images.

Stage 08 compares, for a confusion (true class T predicted as P), the images of T predicted P
(KO) with the images of T predicted T (OK). For every neuron (a column of 01's per-image
statistics) and both per-image aggregations (spatial max and mean):

- Δμ = μ_KO − μ_OK;
- z = Δμ over its pooled-variance standard error (the Student two-sample statistic), so that
  |z| ≥ 2 is the classic "two standard errors" rule — which fires for about 5 % of neurons even
  when nothing differs (``chance_rate``);
- the effect size Δμ / s_p (Cohen's d);
- the Welch t-test p-value (no equal-variance assumption);
- the Benjamini–Hochberg q-value over all neurons of all layers of one aggregation (one family
  of tests): the flag to trust.
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
STAT_COLS = ("mu_ok", "mu_ko", "delta_mu", "z", "effect", "p", "q", "flag_z", "flag_fdr")


def compare_groups(ko: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
    """Per column (neuron) of ``ko`` (n_KO × C) against ``ok`` (n_OK × C).

    ``z`` is Δμ over the pooled-variance standard error of Δμ, s_p·√(1/n_KO + 1/n_OK), i.e.
    the Student two-sample statistic; under no difference it is ≈ N(0, 1), which is what makes
    |z| ≥ 2 mean "two standard errors". ``effect`` is Δμ / s_p (Cohen's d), the size of the
    difference in units of the neurons' spread. ``p`` is Welch's two-sided t-test (no equal-variance
    assumption). Constant neurons get z = 0 and p = 1 when both groups agree exactly.
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
        z = np.where(se > 0, delta / se, np.where(delta == 0, 0.0, np.sign(delta) * np.inf))
        effect = np.where(sd > 0, delta / sd, np.where(delta == 0, 0.0, np.sign(delta) * np.inf))
        # Constant neurons (a dead unit is 0 on every image) make scipy warn about precision;
        # they are handled just below, so the warning is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = sps.ttest_ind(ko, ok, axis=0, equal_var=False).pvalue
    p = np.where(np.isnan(p), np.where(delta == 0, 1.0, 0.0), p)
    return {"mu_ok": mu_ok, "mu_ko": mu_ko, "delta_mu": delta, "z": z, "effect": effect, "p": p}


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of a flat array of p-values."""
    if p.size == 0:
        return p.copy()
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
    """Share of neurons expected to pass |z| ≥ threshold when nothing differs (t distribution)."""
    return float(2 * sps.t.sf(z_threshold, n_ok + n_ko - 2))
