"""Baskets (Neurobasket, seed 002): groups of neurons of one layer, found in one of two ways.

The paper's way (``finch``, the default of 11): the *images* are clustered, not the neurons.
FINCH (Sarfraz et al., 2019; the ``finch-clust`` package) builds a hierarchy of image clusters from
each image's feature vector at the layer (01's per-image channel means), level 1 the finest.
Clusters are kept when they pass the four filters (``filter_clusters``): cohesion (mean silhouette
of its images), purity (how alike its images' predictions are: the offline stand-in for the
paper's caption purity), the simplified Davies–Bouldin ratio R_i, each dropping the outliers beyond
``FILTER_SD`` standard deviations of its level; and a level is kept only while it has more
clusters than the run has classes. Each kept cluster is filled with its neurons by Eq. 1–4
(``active_neurons``, ``neuron_set``): a neuron is active on an image when its activation is at
least μ(x) + α σ(x) over the layer's neurons on that image, and belongs to the basket when it is
active on at least β of the basket's images. ``consistency`` is the paper's Eq. 5.

The older way (``corr``): a layer's neurons are compared by their co-activation: the Pearson
correlation, over the images, of 01's per-image spatial maximum of each channel
(``01_stats/<layer>.max.npy``). They are clustered hierarchically with average linkage on the
distance ``1 − r``, and the tree is cut by one rule: two groups are joined only while the mean
correlation between the members of one and the members of the other is at least ``min_corr``.
Every cluster of two or more neurons is a basket; neurons left alone are in none.

Which images "activate a set of neurons jointly" (the mosaic of a union or difference, and of a
``corr`` basket): each member's per-image maximum is standardised over the images (z-score), and
an image's joint score is the mean z of the members. Following the seed's consistency rule (a
neuron counts as active on an image, and the basket needs most of its members active), an image
is a joint hit when at least ``JOINT_SHARE`` of the members are in their own top ``ACTIVE_TOP`` of
images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

JOINT_SHARE = 0.75  # share of the members that must be active on an image (the seed's β)
ACTIVE_TOP = 0.10   # a member is active on an image among its own top 10 % of images
FILTER_SD = 2.0     # a cluster whose filter score lies beyond μ ± 2σ of its level is dropped


def correlation(stats: np.ndarray, block: int = 4096) -> np.ndarray:
    """Pearson correlation (C × C) of the columns of an N × C array, read ``block`` rows at a time.

    Rows with a NaN (images 01 skipped) are left out. A constant column correlates 0 with every
    other (and 1 with itself), so a dead neuron joins no basket.
    """
    n_cols = stats.shape[1]
    count, total = 0, np.zeros(n_cols)
    cross = np.zeros((n_cols, n_cols))
    for start in range(0, stats.shape[0], block):
        rows = np.asarray(stats[start:start + block], dtype=np.float64)
        rows = rows[np.isfinite(rows).all(axis=1)]
        count += len(rows)
        total += rows.sum(axis=0)
        cross += rows.T @ rows
    if count < 2:
        raise ValueError("fewer than two usable images: co-activation is undefined")
    mean = total / count
    cov = (cross - count * np.outer(mean, mean)) / (count - 1)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    live = sd > 1e-12 * max(1.0, float(np.abs(mean).max()))
    corr = np.zeros((n_cols, n_cols))
    corr[np.ix_(live, live)] = cov[np.ix_(live, live)] / np.outer(sd[live], sd[live])
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


@dataclass
class Basket:
    """One basket: its members and its place in the layer's tree."""

    number: int              # 1 = largest basket of the layer
    members: list[int]       # channels, ascending
    node: int                # its node in the layer's linkage tree (scipy numbering)
    cohesion: float          # mean pairwise correlation of the members
    join_corr: float         # mean correlation at which the node is merged with its sibling
    parent: int              # parent node (−1 at the root)
    sibling_members: list[int] = field(default_factory=list)  # channels under the sibling node
    depth: int = 0           # ancestors between the node and the root


def cluster(corr: np.ndarray, min_corr: float) -> tuple[np.ndarray, list[Basket]]:
    """Average-linkage tree of ``1 − corr`` and its baskets at the cut ``min_corr``.

    Returns the scipy linkage matrix and the baskets (two members or more), largest first, ties
    by lowest channel. With average linkage a node's height is ``1 −`` the mean correlation
    between its two children, and heights grow towards the root, so cutting at ``1 − min_corr``
    keeps exactly the nodes whose children correlate at least ``min_corr`` on average.
    """
    from scipy.cluster.hierarchy import fcluster, linkage, to_tree
    from scipy.spatial.distance import squareform
    n = corr.shape[0]
    if n < 2:
        return np.zeros((0, 4)), []
    distance = np.clip(1.0 - corr, 0.0, 2.0)
    # squareform (no checks) reads the upper triangle only: the diagonal never counts
    tree = linkage(squareform(distance, checks=False), method="average")
    labels = fcluster(tree, t=1.0 - min_corr, criterion="distance")
    root, nodes = to_tree(tree, rd=True)
    parent = {}
    for node in nodes:
        if not node.is_leaf():
            parent[node.left.id] = node.id
            parent[node.right.id] = node.id
    leaves = {node.id: sorted(node.pre_order()) for node in nodes}
    by_members = {tuple(v): k for k, v in leaves.items()}
    baskets = []
    for label in np.unique(labels):
        members = [int(c) for c in np.flatnonzero(labels == label)]
        if len(members) < 2:
            continue
        node = by_members[tuple(members)]
        up = parent.get(node, -1)
        sibling = -1
        if up >= 0:
            kids = (nodes[up].left.id, nodes[up].right.id)
            sibling = kids[1] if kids[0] == node else kids[0]
        depth, walk = 0, node
        while walk in parent:
            walk, depth = parent[walk], depth + 1
        sub = corr[np.ix_(members, members)]
        baskets.append(Basket(number=0, members=members, node=int(node),
                              cohesion=float(sub[~np.eye(len(members), dtype=bool)].mean()),
                              join_corr=float(1.0 - nodes[up].dist) if up >= 0 else float("nan"),
                              parent=int(up), sibling_members=leaves.get(sibling, []),
                              depth=depth))
    baskets.sort(key=lambda b: (-len(b.members), b.members[0]))
    for i, basket in enumerate(baskets, 1):
        basket.number = i
    return tree, baskets


def standardise(stats: np.ndarray) -> np.ndarray:
    """Each column as a z-score over its finite rows (constant columns give 0; NaN rows stay NaN)."""
    stats = np.asarray(stats, dtype=np.float64)
    mean = np.nanmean(stats, axis=0)
    sd = np.nanstd(stats, axis=0)
    return (stats - mean) / np.where(sd > 0, sd, 1.0)


def joint_images(columns: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Images that activate a set of neurons together.

    ``columns``: N × m per-image maxima of the m members (NaN rows: skipped images). Returns the
    ``n_images`` best image ids by joint score (mean z of the members), their scores, and the
    number of joint hits (images where at least ``JOINT_SHARE`` of the members are among their own
    top ``ACTIVE_TOP`` of images).
    """
    z = standardise(columns)
    usable = np.isfinite(z).all(axis=1)
    score = np.where(usable, z.mean(axis=1) if z.shape[1] else 0.0, -np.inf)
    order = np.argsort(-score, kind="stable")
    order = order[np.isfinite(score[order])][:n_images]
    threshold = np.nanquantile(columns[usable], 1 - ACTIVE_TOP, axis=0) if usable.any() else None
    hits = 0
    if threshold is not None:
        active = columns[usable] >= threshold
        hits = int((active.mean(axis=1) >= JOINT_SHARE).sum())
    return order, score[order], hits


def random_baskets(n_channels: int, size: int, n: int, seed: int,
                   exclude: list[int] = ()) -> list[list[int]]:
    """``n`` random sets of ``size`` channels of one layer (seeded), none using ``exclude``."""
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(n_channels), list(exclude))
    size = min(size, len(pool))
    return [sorted(int(c) for c in rng.choice(pool, size=size, replace=False)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# The paper's baskets: FINCH on the images, the four filters, Eq. 1–5


def image_hierarchy(features: np.ndarray) -> np.ndarray:
    """FINCH's partitions of the rows of ``features`` (N × D, cosine distance): an N × levels
    array of cluster ids, column 0 the finest level. Deterministic for N ≤ 20,000 (exact first
    neighbours); beyond, FINCH needs ``pynndescent`` for approximate ones."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # finch warns on import when pynndescent is absent
        from finch import FINCH
    if len(features) < 3:
        return np.zeros((len(features), 0), dtype=np.int64)
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # finch prints progress
        parts, _, _ = FINCH(np.asarray(features, dtype=np.float32), distance="cosine",
                            verbose=False)
    return np.asarray(parts, dtype=np.int64).reshape(len(features), -1)


def silhouettes(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's silhouette (cosine distance) under the partition ``labels``; 0 for an image
    alone in its cluster, NaN for all when there are fewer than two clusters."""
    from sklearn.metrics import silhouette_samples
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return np.full(len(labels), np.nan)
    return silhouette_samples(features, labels, metric="cosine")


def davies_bouldin_ratios(features: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """The simplified Davies–Bouldin ratio of each cluster: R_i = max over j ≠ i of
    (s_i + s_j) / d(c_i, c_j), with c the centroid and s the mean Euclidean distance of a
    cluster's images to it (sklearn's davies_bouldin_score is the mean of these R_i). High:
    close to, or as spread as, another cluster."""
    ids = np.unique(labels)
    cents = np.stack([features[labels == k].mean(axis=0) for k in ids])
    spread = np.array([np.linalg.norm(features[labels == k] - c, axis=1).mean()
                       for k, c in zip(ids, cents)])
    dist = np.linalg.norm(cents[:, None, :] - cents[None, :, :], axis=2)
    ratio = (spread[:, None] + spread[None, :]) / np.where(dist > 0, dist, np.inf)
    np.fill_diagonal(ratio, -np.inf)
    worst = ratio.max(axis=1) if len(ids) > 1 else np.full(len(ids), np.nan)
    return {int(k): float(v) for k, v in zip(ids, worst)}


def purity(vectors: np.ndarray) -> float:
    """Mean cosine between each row of ``vectors`` (an image's description as a vector) and
    their mean: 1 when every image is described alike."""
    norms = np.linalg.norm(vectors, axis=1)
    centre = vectors.mean(axis=0)
    if not np.linalg.norm(centre) or not norms.all():
        return float("nan")
    return float((vectors @ centre / (norms * np.linalg.norm(centre))).mean())


def outliers(scores: np.ndarray, high_is_bad: bool, n_sd: float = FILTER_SD) -> np.ndarray:
    """Which of ``scores`` lie beyond ``n_sd`` standard deviations from their mean on the bad
    side (NaN scores are never outliers)."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    if finite.sum() < 2:
        return np.zeros(len(scores), dtype=bool)
    mean, sd = scores[finite].mean(), scores[finite].std()
    return scores > mean + n_sd * sd if high_is_bad else scores < mean - n_sd * sd  # NaN: False


def active_neurons(activations: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 1–2: N × C booleans, neuron c active on image x when A_c(x) ≥ μ(x) + α σ(x), μ and σ
    taken over the layer's C neurons on image x."""
    acts = np.asarray(activations, dtype=np.float64)
    mu = acts.mean(axis=1, keepdims=True)
    sigma = acts.std(axis=1, keepdims=True)
    return acts >= mu + alpha * sigma


def neuron_set(active: np.ndarray, beta: float) -> tuple[list[int], np.ndarray]:
    """Eq. 3–4 for one basket: ``active`` holds the basket's images' rows of
    ``active_neurons``; returns the neurons active on at least a share ``beta`` of them and every
    neuron's share p_N."""
    share = active.mean(axis=0) if len(active) else np.zeros(active.shape[1])
    return [int(c) for c in np.flatnonzero(share >= beta - 1e-12)], share


def consistency(profiles: np.ndarray) -> float:
    """Eq. 5: the mean pairwise cosine between the columns of ``profiles`` (images × neurons:
    each neuron's activations over a basket's images); NaN for fewer than two neurons."""
    m = profiles.shape[1]
    if m < 2:
        return float("nan")
    unit = profiles / np.where((n := np.linalg.norm(profiles, axis=0)) > 0, n, 1.0)
    cos = unit.T @ unit
    return float((cos.sum() - np.trace(cos)) / (m * (m - 1)))
