"""How far to trust a neuron's description: interpretability of its top crops (SemanticLens §3.5),
splitting a polysemantic neuron's crops into sub-concepts (SIEVE), and the agreement measures used
to verify a description against the neuron's activations (Pearson correlation, AUPRC).

Crop vectors are rows of any embedding (CLIP or the CNN feature); every measure works on their
directions only (cosine).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from common.embedders import l2_normalise
from common.triage import DNR_K  # DnR's K, one for the triage's score and these

MIN_GROUP = 3  # smallest sub-concept (crops): a smaller group is an outlier, not a concept
REFERENCES = 10    # structureless reference sets behind the one-group choice of sub_concepts
REFERENCE_Q = 0.95  # a split must beat this quantile of the references' best silhouette


def clarity(vectors: np.ndarray) -> float:
    """Mean pairwise cosine of the rows of ``vectors`` (SemanticLens eq. 6), from −1/(n−1) to 1.

    Uses the closed form n/(n−1) · (‖mean of unit rows‖² − 1/n), which needs no n × n matrix.
    Fewer than two rows give NaN (no pair to compare).
    """
    unit = l2_normalise(np.asarray(vectors, dtype=np.float64))
    n = unit.shape[0]
    if n < 2:
        return float("nan")
    centre = unit.mean(axis=0)
    return float(n / (n - 1) * (centre @ centre - 1.0 / n))


def split_crops(vectors: np.ndarray, k: int, tree: np.ndarray | None = None) -> np.ndarray:
    """Labels 0 … k−1 of ``k`` groups of crops: Ward clustering of the unit vectors (SIEVE's
    agglomerative clustering), renumbered so that group 0 is the largest, ties by first crop.

    ``tree`` is the Ward linkage of the unit vectors when already computed (one tree serves
    every k).
    """
    from scipy.cluster.hierarchy import linkage
    if tree is None:
        tree = linkage(l2_normalise(vectors).astype(np.float64), method="ward")
    raw = cut_tree_into(tree, k)
    order = sorted(set(raw.tolist()), key=lambda g: (-(raw == g).sum(), int(np.argmax(raw == g))))
    return np.array([order.index(g) for g in raw], dtype=np.int64)


def cut_tree_into(tree: np.ndarray, k: int) -> np.ndarray:
    """Flat groups of a linkage ``tree`` (rows sorted by height, as scipy's ``linkage`` gives
    them) cut into at most ``k``: each point's group id. The same partition as scipy's
    ``fcluster(tree, k, criterion="maxclust")`` — the merges up to the height of the
    (n − k)-th are made, ties at that height included — without its validation of the whole
    tree at every call, which was most of 09's sub-concept time (about 40 cuts per neuron)."""
    n = tree.shape[0] + 1
    if k >= n:
        return np.arange(n)
    heights = tree[:, 2]
    made = int(np.searchsorted(heights, heights[n - k - 1], side="right"))
    parent = np.arange(n + made)
    parent[tree[:made, :2].astype(np.int64)] = (n + np.arange(made))[:, None]
    while True:  # follow each point up to the last group made above it
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent[:n]
        parent = up


def polysemanticity(vectors: np.ndarray) -> float:
    """1 − clarity of the sums of two groups of crops (SemanticLens eq. 10 with h = 2), 0 … 2.

    With two groups this is 1 − cos(sum of group 1, sum of group 2): 0 when both groups point the
    same way, 1 when they are orthogonal. Fewer than four crops give NaN.
    """
    unit = l2_normalise(vectors)
    if unit.shape[0] < 4:
        return float("nan")
    labels = split_crops(unit, 2)
    sums = np.stack([unit[labels == g].sum(axis=0) for g in range(2)])
    return 1.0 - clarity(sums)


def redundancy(means: np.ndarray) -> np.ndarray:
    """Per row of ``means`` (one neuron's mean crop vector each): its highest cosine with another
    row (SemanticLens eq. 9 before averaging), −1 … 1; NaN for a lone row or a zero row."""
    unit = l2_normalise(means)
    n = unit.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    out = sims.max(axis=1)
    zero = ~np.any(unit != 0, axis=1)
    out[zero] = np.nan
    return out


def silhouette(distance: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Rousseeuw 1987) of ``labels`` from a precomputed distance matrix: per
    point (b − a) / max(a, b), a its mean distance to the rest of its group, b the smallest mean
    distance to another group; 0 for a point alone in its group. Equals scikit-learn's
    ``silhouette_score(..., metric="precomputed")`` (tests/test_score.py checks it), which
    validates its inputs at each call: 09 makes about 40 calls per neuron, and this is about 50
    times faster on 20 crops."""
    labels = np.asarray(labels)
    groups = np.unique(labels)
    member = labels[None, :] == groups[:, None]              # groups × points
    sums = member.astype(np.float64) @ distance              # groups × points: Σ distance to group
    sizes = member.sum(axis=1)                               # per group
    own = np.searchsorted(groups, labels)
    points = np.arange(len(labels))
    own_size = sizes[own]
    a = sums[own, points] / np.maximum(own_size - 1, 1)  # alone: 0 (its distance to itself)
    mean_to = sums / sizes[:, None]
    mean_to[own, points] = np.inf
    b = mean_to.min(axis=0)
    width = np.maximum(a, b)
    s = np.where(own_size > 1, (b - a) / np.where(width > 0, width, 1.0), 0.0)  # width 0: a = b = 0
    return float(s.mean())


def _best_split(unit: np.ndarray, max_k: int) -> tuple[np.ndarray | None, float]:
    """The Ward split of the rows (unit vectors, or their coordinates in any orthonormal basis)
    into 2 … ``max_k`` groups, each of at least MIN_GROUP, with the highest cosine silhouette →
    (labels, silhouette); (None, −inf) when no split is usable."""
    from scipy.cluster.hierarchy import linkage
    tree = linkage(unit, method="ward")
    distance = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)  # cosine distances, once for every k
    np.fill_diagonal(distance, 0.0)
    best, best_score = None, -np.inf
    for k in range(2, max_k + 1):
        if unit.shape[0] < k * MIN_GROUP:
            break
        labels = split_crops(unit, k, tree)
        counts = np.bincount(labels)
        if len(counts) < k or counts.min() < MIN_GROUP:
            continue
        score = silhouette(distance, labels)
        if score > best_score:
            best, best_score = labels, score
    return best, best_score


def reference_sets(unit: np.ndarray, rng: np.random.Generator, references: int = REFERENCES
                   ) -> Iterator[np.ndarray]:
    """``references`` structureless sets beside the rows of ``unit`` (at least two): each as many
    points drawn from one Gaussian with the rows' mean and covariance (sample covariance, on their
    principal axes), before they are made unit length."""
    centre = unit.mean(axis=0)
    _, singular, axes = np.linalg.svd(unit - centre, full_matrices=False)
    spread = singular / np.sqrt(unit.shape[0] - 1)
    for _ in range(references):
        yield centre + (rng.standard_normal((unit.shape[0], len(spread))) * spread) @ axes


def reference_silhouette(unit: np.ndarray, max_k: int, rng: np.random.Generator,
                         references: int = REFERENCES) -> float:
    """The ``REFERENCE_Q`` quantile of the best silhouette that the same splitting reaches on
    ``reference_sets``, made unit length. A split whose silhouette does not beat this is what one
    cloud of that spread gives anyway."""
    best = [_best_split(l2_normalise(draw), max_k)[1]
            for draw in reference_sets(unit, rng, references)]
    finite = np.array([b for b in best if np.isfinite(b)])
    return float(np.quantile(finite, REFERENCE_Q)) if finite.size else -np.inf


def sub_concepts(vectors: np.ndarray, max_k: int = 3, rng: np.random.Generator | None = None,
                 detail: dict | None = None) -> np.ndarray | None:
    """Labels of the best split of crops into 2 … ``max_k`` groups, or None when one group fits
    them best (SIEVE: agglomerative clustering, the number of groups chosen by the silhouette).

    Among the Ward splits whose every group holds at least MIN_GROUP crops, the one with the
    highest cosine silhouette is taken if that silhouette beats ``reference_silhouette`` (drawn
    with ``rng``, seeded 0 when None); otherwise one group. The silhouette is undefined for one
    group and, being scale-free, is about 0.5 for any single cloud split in two; the reference
    says what a single cloud of the same spread reaches. ``detail``, when given, receives the
    split's ``silhouette`` and the ``reference``.
    """
    unit = l2_normalise(vectors).astype(np.float64)
    if unit.shape[0] < 2 * MIN_GROUP:
        return None
    u, singular, _ = np.linalg.svd(unit, full_matrices=False)
    unit = u * singular  # coordinates in the rows' own span: the same inner products, ≤ n dims
    best, best_score = _best_split(unit, max_k)
    if best is None:
        return None
    reference = reference_silhouette(unit, max_k, rng if rng is not None
                                     else np.random.default_rng(0))
    if detail is not None:
        detail.update(silhouette=best_score, reference=reference)
    return best if best_score > reference else None


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two equal-length vectors (``numpy.corrcoef``); NaN when either is
    constant or shorter than 2."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision–recall curve as average precision: Σ (R_n − R_(n−1)) P_n over the
    distinct score thresholds, highest first (tied scores enter together, as in scikit-learn's
    ``average_precision_score``). NaN without positives. A random score gives about the share of
    positives; a perfect one gives 1. Kept instead of scikit-learn's call, which checks its inputs
    at every call: 09 makes about 1,400 of them, and this is 18 times faster (0.10 against 1.9 ms
    per call for 750 images, measured here); tests/test_score.py checks the two agree."""
    positive = np.asarray(positive, bool)
    score = np.asarray(score, np.float64)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    hits = positive[order].astype(np.float64)
    ranked = score[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]
    true_pos = np.cumsum(hits)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def top_share_positives(activation: np.ndarray, share: float, minimum: int) -> np.ndarray:
    """Boolean mask of the images whose activation is among the top ``share`` (at least ``minimum``
    images, ties at the threshold included). The stages' share and minimum are one pair,
    ``common.verification.positives``'s."""
    activation = np.asarray(activation, np.float64)
    n = max(minimum, int(np.ceil(share * len(activation))))
    if n >= len(activation):
        return np.ones(len(activation), bool)
    threshold = np.partition(activation, len(activation) - n)[len(activation) - n]
    if threshold <= activation.min():  # a silent majority (ReLU zeros) is no positive
        return activation > threshold
    return activation >= threshold


def correlation_interval(r: float, n: int, z: float) -> tuple[float, float]:
    """Fisher-z interval of a Pearson ``r`` on ``n`` pairs: tanh(atanh r ± z / √(n − 3)).

    ``r`` is clipped just inside ±1 so that a perfect correlation keeps a finite transform.
    """
    centre = np.arctanh(np.clip(r, -1 + 1e-12, 1 - 1e-12))
    half = z / np.sqrt(n - 3)
    return float(np.tanh(centre - half)), float(np.tanh(centre + half))


def margin_interval(r: float, r_control: float, n: int, z: float) -> tuple[float, float, float]:
    """``r − r_control`` and its interval (Zou 2007: the two Fisher-z intervals combined),
    both correlations on the same ``n`` (≥ 4) images, taken as independent → (d, low, high).

    Treating them as independent ignores that both were measured on the same images; when the
    two sentences' match scores are positively correlated the true interval is narrower, so
    this one is on the cautious side.
    """
    l1, u1 = correlation_interval(r, n, z)
    l2, u2 = correlation_interval(r_control, n, z)
    d = r - r_control
    return (float(d), float(d - np.sqrt((r - l1) ** 2 + (u2 - r_control) ** 2)),
            float(d + np.sqrt((u1 - r) ** 2 + (r_control - l2) ** 2)))


# ---------------------------------------------------------------------------------------------
# Selection and test halves, the margin's bootstrap interval, SIEVE's Activation Rate, DnR's
# semantic consistency


def test_half(n: int, seed: int) -> np.ndarray:
    """Boolean mask over ``n`` images (usable images in image-id order): True for the *test*
    half, False for the *selection* half. A seeded permutation puts ⌈n/2⌉ images in the
    selection half and the rest in the test half, so the two never share an image. Candidates
    are ranked on the selection half; every figure reported is measured on the test half."""
    order = np.random.default_rng([seed, 21]).permutation(n)
    test = np.zeros(n, bool)
    test[order[(n + 1) // 2:]] = True
    return test


def _pearson_from_sums(n: int, sx: np.ndarray, sy: np.ndarray, sxx: np.ndarray, syy: np.ndarray,
                      sxy: np.ndarray) -> np.ndarray:
    """Pearson r of ``n`` pairs from their sums Σx, Σy, Σx², Σy², Σxy (arrays: one r each); NaN
    where x or y is constant — a spread under 1e-9 of its mean square, which is rounding (the
    values are best centred first)."""
    vx, vy = n * sxx - sx * sx, n * syy - sy * sy
    flat = (vx <= 1e-9 * n * sxx) | (vy <= 1e-9 * n * syy)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(flat, np.nan, (n * sxy - sx * sy) / np.sqrt(np.where(flat, 1.0, vx * vy)))


def bootstrap_margin(score: np.ndarray, control: np.ndarray, activation: np.ndarray,
                     resamples: int, rng: np.random.Generator, level: float = 0.95
                     ) -> tuple[float, float, float]:
    """Margin d = r(score, activation) − r(control, activation) on these images, and its
    percentile bootstrap interval at ``level`` → (d, low, high).

    Images are drawn with replacement ``resamples`` times and both correlations are recomputed
    on the same draw (a paired bootstrap: unlike ``margin_interval`` it keeps how alike the two
    sentences' scores are). Draws on which a correlation is undefined are left out; NaNs when
    fewer than 4 images or d is undefined."""
    score, control, activation = (np.asarray(v, np.float64) for v in (score, control, activation))
    d = pearson(score, activation) - pearson(control, activation)
    if len(score) < 4 or not np.isfinite(d):
        return float(d), float("nan"), float("nan")
    n = len(score)
    draw = rng.integers(0, n, (resamples, n))
    # Each draw as how often it took each image; the sums behind both correlations are then one
    # product with these counts (less than half the CPU time of gathering and correlating the
    # draws: 15 against 35 ms a sentence on 700 images and 1,000 draws).
    counts = np.bincount((draw + (np.arange(resamples) * n)[:, None]).ravel(),
                         minlength=resamples * n).reshape(resamples, n).astype(np.float64)
    s, c, a = score - score.mean(), control - control.mean(), activation - activation.mean()
    sums = counts @ np.stack([s, c, a, s * s, c * c, a * a, s * a, c * a], axis=1)
    margins = (_pearson_from_sums(n, sums[:, 0], sums[:, 2], sums[:, 3], sums[:, 5], sums[:, 6])
               - _pearson_from_sums(n, sums[:, 1], sums[:, 2], sums[:, 4], sums[:, 5],
                                    sums[:, 7]))
    margins = margins[np.isfinite(margins)]
    if margins.size < 2:
        return float(d), float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(margins, [tail, 100 - tail])
    return float(d), float(low), float(high)


def verdict_level(r: float, margin: float, low: float) -> str:
    """The verdict on a sentence (glossary ``margin``): ``reliable`` when the margin's interval
    lies above 0 and r > 0, ``weak`` when the margin is above 0 but its interval reaches 0,
    ``chance`` otherwise; ``none`` when a number is missing."""
    if not all(v is not None and np.isfinite(v) for v in (r, margin, low)):
        return "none"
    if low > 0 and r > 0:
        return "reliable"
    return "weak" if margin > 0 else "chance"


def activation_rate(positive: np.ndarray, match: np.ndarray) -> float:
    """SIEVE's Activation Rate on retrieved images: the share of the concept's images on which
    the neuron exceeds its top-1 % threshold.

    ``positive``: per image, whether the neuron is at or above the threshold
    (``top_share_positives``); ``match``: the matcher's score of the concept per image. The
    concept's images are the images the matcher ranks highest, as many as there are positives
    (so a perfect description reaches 1, a random one about the share of positives). NaN
    without positives."""
    positive = np.asarray(positive, bool)
    k = int(positive.sum())
    if k == 0:
        return float("nan")
    concept = np.argsort(-np.asarray(match, np.float64), kind="mergesort")[:k]
    return float(positive[concept].mean())


def generated_activation_rate(positive: np.ndarray, activation: np.ndarray,
                              responses: np.ndarray) -> float:
    """SIEVE's Activation Rate on generated images: the share of ``responses`` (the neuron's
    per-image maximum on images rendered for the concept, common/generation.py) at or above its
    top-1 % threshold — the lowest ``activation`` among the held-out ``positive`` images. NaN
    without positives or without responses."""
    positive = np.asarray(positive, bool)
    responses = np.asarray(responses, np.float64)
    if not positive.any() or not responses.size:
        return float("nan")
    threshold = float(np.asarray(activation, np.float64)[positive].min())
    return float((responses >= threshold).mean())


def mean_filter(rates: np.ndarray) -> tuple[float, np.ndarray, float]:
    """SIEVE's filter of hypotheses by Activation Rate: the mean rate, which hypotheses are kept
    (rate at or above that mean) and the mean recomputed over those kept → (mean, kept, mean
    kept). NaN rates are neither counted nor kept."""
    rates = np.asarray(rates, np.float64)
    finite = np.isfinite(rates)
    if not finite.any():
        return float("nan"), np.zeros(len(rates), bool), float("nan")
    mean = float(rates[finite].mean())
    kept = rates >= mean  # a NaN compares False: never kept
    return mean, kept, float(rates[kept].mean())


def semantic_consistency(activation: np.ndarray, match: np.ndarray, scale: float, alpha: float,
                         k: int = DNR_K) -> float:
    """DnR's top-K semantic consistency: α · mean top-K activation + (1 − α) · similarity².

    Over the ``k`` images where the neuron fires most: the activation term is their mean
    activation divided by ``scale`` (the layer's largest per-image maximum, so that both terms
    lie in 0 … 1 for a ReLU layer); the similarity is the matcher's score of the sentence on
    them, as its percentile among these images (0 … 1, 0.5 by chance), so that matchers on
    different scales (standardised offline scores, CLIP cosines) are comparable."""
    activation, match = np.asarray(activation, np.float64), np.asarray(match, np.float64)
    keep = np.isfinite(activation) & np.isfinite(match)
    activation, match = activation[keep], match[keep]
    if len(activation) < 2 or not scale > 0:
        return float("nan")
    top = np.argsort(-activation, kind="mergesort")[:min(k, len(activation))]
    from scipy.stats import rankdata
    percentile = (rankdata(match) - 1) / (len(match) - 1)
    return float(alpha * activation[top].mean() / scale
                 + (1 - alpha) * percentile[top].mean() ** 2)


RANKINGS = ("top-K log-weighted", "semantic consistency", "mean", "median", "squared mean")


def ranks_by_method(stats: np.ndarray, consistency: np.ndarray, k: int = DNR_K
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """DnR's Table 1 over one layer: per ranking method (``RANKINGS``), every neuron's score and
    rank (1 = highest; ties share the best rank; NaN scores rank last).

    ``stats``: images × neurons per-image maxima (NaN rows: skipped images); ``consistency``:
    each neuron's semantic consistency (09). Log-weighted: mean log(1 + a) of the top ``k``
    (negative values as 0, as the triage's ``dnr_score``); mean, median and squared mean over
    every image."""
    values = np.asarray(stats, np.float64)
    values = values[~np.isnan(values).any(axis=1)]
    k = max(1, min(k, len(values)))
    top = -np.partition(-values, k - 1, axis=0)[:k]
    scores = {"top-K log-weighted": np.log1p(np.maximum(top, 0.0)).mean(axis=0),
              "semantic consistency": np.asarray(consistency, np.float64),
              "mean": values.mean(axis=0), "median": np.median(values, axis=0),
              "squared mean": (values ** 2).mean(axis=0)}
    out = {}
    for method in RANKINGS:
        s = np.where(np.isfinite(scores[method]), scores[method], -np.inf)
        out[method] = (scores[method], 1 + (s[None, :] > s[:, None]).sum(axis=1))
    return out
