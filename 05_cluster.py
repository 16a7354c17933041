"""Stage 05: group each layer's neurons by meaning, measure the groups, and name each layer's concepts.

Reads, in the run folder (--run)
    03_descriptions.csv   one description per neuron (rows with status ``failed`` are skipped)
    04_embeddings.npz     text and fused embedding of every neuron
    01_activations.npz    optional, only its ``layers`` array: the layer order of the model
Writes, in the run folder
    05_clusters.csv       layer, channel, kind, cluster, x, y (x, y: the 2-D map of that layer and kind)
    05_metrics.csv        layer, kind, k, cohesion, silhouette, davies_bouldin, ari_text_fused,
                          wins, better (which embedding kind clusters better by these metrics)
    05_ksearch.csv        layer, kind, k, silhouette, inertia, chosen: every k the search fitted
    05_keywords.csv       layer, kind, cluster, rank, term, weight (kind, cluster ``all``: the layer)
    05_categories.csv     layer, channel, category, score, method
    05_plots/             <layer>_k.png, <layer>_map.png, <layer>_keywords.png,
                          <layer>_wordcloud.png, categories.png
    05_cluster.meta.json

For every layer and embedding kind, KMeans is fitted for a bracketing set of k values and the k with
the best cosine silhouette is kept: a geometric grid over [--k-min, --k-max] first, then finer
grids around the best peaks of the curve until their neighbours are all fitted: tens of fits
instead of one per k. Neurons whose embeddings are (nearly) identical — the same sentence — are
one KMeans point weighted by their number, so they share a cluster and cost one point. Metrics (of
all neurons, each counting once): cohesion (mean pairwise cosine inside a cluster, averaged over the
clusters with two or more members), cosine silhouette, Davies–Bouldin, and the adjusted Rand index
between the text and the fused partitions of the layer. Keywords: TF-IDF with one document per
neuron, English stop words and method filler ("neuron", "patches", "image"…) removed. Categories:
an NLI zero-shot classifier when --nli-model is given, else the cosine between each description
and one phrase per category (the meta records which).

Example:
    python 05_cluster.py --run data/demo --projection pca
"""

import argparse
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.artefacts import (CategoryRow, ClusterRow, Embeddings, KeywordRow, KSearchRow,
                              MetricRow, Run, columns, layer_slug, order_layers, read_descriptions,
                              read_embeddings, read_layer_order)
from common.cli import (StageError, add_run, add_settings, comma_list, exit_on_stage_error, setting,
                        settings_from, stage_parser, start_stage)
from common.embedders import l2_normalise
from common.io import atomic_path, sweep_temporaries, write_csv
from common.provenance import merge_lineage, read_meta, retract_meta, write_meta
from common.threads import single_threaded

log = logging.getLogger("neuron-atlas.05_cluster")

KINDS = ("text", "fused")  # embedding kinds clustered, in this order
NLI_TEMPLATE = "This neuron responds to {}."  # hypothesis the NLI model scores for each category
PHRASE_TEMPLATE = "a neuron that responds to {}"  # sentence embedded per category in the fallback
DUPLICATE_COSINE = 0.9999  # embeddings at least this close are one point with a weight in KMeans
SEARCH_TOLERANCE = 0.01  # a second silhouette peak this close to the best is refined too
SEARCH_PEAKS = 2  # peaks refined per round of the k search (the best and the runner-up)
REFINE_POINTS = 4  # k values per bracket in the later rounds, ends included: few costly fits per round
UMAP_MIN_POINTS = 5  # below this, a 2-D PCA is used instead of UMAP (UMAP needs a neighbour graph)
MAP_POINT_SIZE = 12  # marker size on the 2-D maps
TOKEN_PATTERN = r"(?u)\b[^\W\d_]{2,}(?:-[^\W\d_]+)*\b"  # words of 2+ letters; man-made: one term
KEYWORD_BARS = 20  # terms shown in the per-layer keyword chart (all --n-keywords are in the CSV)
WORDCLOUD_SIZE = (800, 400)  # pixels of a layer's word cloud

DEFAULT_CATEGORIES = {  # name -> phrase that the embedding fallback compares descriptions with
    "actions/scenes": "people or animals doing something, or a whole scene such as a street, a "
                      "beach, a kitchen or a field",
    "animals": "animals such as dogs, cats, birds, fish, snakes or insects",
    "colours": "a colour such as red, yellow, blue, green, orange, black or white",
    "full objects": "one complete object seen as a whole, such as a car, a bottle, a chair, a "
                    "lamp or a building",
    "numbers and letters": "printed text, letters, words, digits or numbers",
    "objects": "kinds of everyday things such as tools, food, clothing, furniture or vehicles",
    "parts": "parts of things such as wheels, eyes, legs, handles, windows or wings",
    "people": "people, human faces, hands or bodies",
    "textures/shapes": "textures and simple shapes such as stripes, dots, edges, grids, curves, "
                       "circles or fur",
}

# Words about the method rather than the concept, in the vocabulary of the prompts any describer
# answers, and hedges; left in, they would top every layer's keyword list. A describer's own
# template words are found in the run itself (``template_words``).
FILLER_WORDS = frozenset("""
neuron neurons patch patches image images picture pictures photo photos mosaic mosaics crop crops
tile tiles layer layers selective selectivity activate activates activated activating activation
activations respond responds responding response responsive detect detects detected detecting
detector appear appears appearing appearance consistently consistent show shows shown
showing depict depicts depicting feature features featuring featured contain contains containing
various variety visible like including include includes typically often mostly mainly
predominantly primarily generally focus focused focusing present presence seen common commonly
different multiple distinct recognizable specific particular related overall example examples
mix also such mostly
""".split())
TEMPLATE_SHARE = 0.8  # a word in more than this share of two layers' descriptions is describer wording


@dataclass
class LayerData:
    """The usable neurons of one layer: channels, descriptions and one matrix per embedding kind."""
    layer: str
    channels: np.ndarray
    descriptions: list[str]
    vectors: dict[str, np.ndarray]


@dataclass
class Clustering:
    """The partition chosen for one layer and kind, its quality figures and the k-search curve."""
    k: int
    labels: np.ndarray
    cohesion: float
    silhouette: float
    davies_bouldin: float
    curve: dict[int, tuple[float, float]] = field(default_factory=dict)  # k -> (silhouette, inertia)
    note: str = ""


def parse_categories(text: str) -> dict[str, str]:
    """Parse ``"name;name=phrase;…"`` into {name: phrase}; a bare name gets its default phrase.

    Semicolons separate items so that phrases may contain commas. A name without a phrase that is
    not one of the defaults is compared as itself.
    """
    categories: dict[str, str] = {}
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        name, _, phrase = item.partition("=")
        name = name.strip()
        categories[name] = phrase.strip() or DEFAULT_CATEGORIES.get(name, name)
    if len(categories) < 2:
        raise StageError(f"--categories needs at least two categories separated by ';', got {text!r}")
    return categories


def load_layers(descriptions_path: str | Path, embeddings_path: str | Path,
                model_order: list[str]) -> tuple[list[LayerData], Embeddings, dict]:
    """Join descriptions and embeddings on (layer, channel) and split them by layer.

    Only neurons with an ``ok`` description, an embedding row, and finite, non-zero text and fused
    vectors are kept; the others are counted in the returned ``skipped`` dict. Vectors are
    re-normalised so that dot products are cosines even if a row was stored slightly off unit length.
    Also returns the embeddings read (for the embedder name).
    """
    rows = read_descriptions(descriptions_path)
    if not rows:
        raise StageError(f"{descriptions_path} lists no neuron; re-run 03_describe")
    emb = read_embeddings(embeddings_path)
    index = {key: i for i, key in enumerate(emb.keys())}
    skipped = {"failed description": 0, "no embedding": 0, "bad vector": 0, "duplicate row": 0}
    picked: dict[str, list[tuple[int, str, int]]] = {}
    seen = set()
    for row in rows:
        if not row.ok:
            skipped["failed description"] += 1
            continue
        key = row.key
        if key in seen:
            skipped["duplicate row"] += 1
            continue
        seen.add(key)
        if key not in index:
            skipped["no embedding"] += 1
            continue
        i = index[key]
        norms = [np.linalg.norm(getattr(emb, kind)[i]) for kind in KINDS]
        if not all(np.isfinite(n) and n > 0 for n in norms):
            skipped["bad vector"] += 1
            continue
        picked.setdefault(row.layer, []).append((row.channel, row.description.strip(), i))
    layers = []
    found = [r.layer for r in rows if r.layer in picked]
    for name in order_layers(found, model_order):
        items = sorted(picked[name])
        idx = np.array([i for _, _, i in items])
        vectors = {}
        for kind in KINDS:
            vectors[kind] = l2_normalise(getattr(emb, kind)[idx], np.float64)
        layers.append(LayerData(name, np.array([c for c, _, _ in items], dtype=np.int64),
                                [t for _, t, _ in items], vectors))
    return layers, emb, skipped


def cohesion(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean over clusters of the mean pairwise cosine between a cluster's members.

    Singletons have no pairs and are left out of the average; NaN when no cluster has two members.
    """
    values = []
    for c in np.unique(labels):
        members = x[labels == c]
        n = len(members)
        if n < 2:
            continue
        total = members.sum(axis=0)
        # sum over i<j of x_i·x_j = (|Σx|² − Σ|x|²) / 2, so no n×n matrix is needed
        pair_sum = (total @ total - np.einsum("ij,ij->", members, members)) / 2.0
        values.append(pair_sum / (n * (n - 1) / 2.0))
    return float(np.mean(values)) if values else float("nan")


@dataclass
class Deduplicated:
    """A layer's vectors with near-identical rows merged into one weighted point."""
    points: np.ndarray   # one row per group: the mean of its members
    weights: np.ndarray  # members per group
    inverse: np.ndarray  # group of each original row
    coords: np.ndarray   # the points in coordinates of their own span (span_coords)


def span_coords(points: np.ndarray) -> np.ndarray:
    """``points`` (rows) in an orthonormal basis of the space their differences span, as float32.

    KMeans depends only on the distances between the points, and a change of orthonormal basis
    keeps every distance, so its fits on these coordinates are those on the points. What changes
    is the cost, which grows with the dimension: a layer's fused embeddings (1,664-d on the
    demo's embedders) span far fewer dimensions than they have when the layer has fewer distinct
    points than dimensions, or when its crop embeddings repeat (a deep layer's crops are whole
    images, of which a probe set has only so many) — 663 of 1,664 for the 2,048 neurons of a
    random-init ResNet-50's ``layer4`` on 300 images, whose k search took 69 s instead of 161 s.
    Directions whose spread is below float32 rounding of the stored embeddings (singular value
    under the largest × max(rows, dims) × float32's epsilon, numpy's rank tolerance) carry no
    information and are left out; that moves distances by float32 rounding only, so a fit can
    still land in another, as good local optimum where KMeans is on a knife edge.
    """
    centred = np.asarray(points, np.float64) - np.mean(points, axis=0)
    _, sing, basis = np.linalg.svd(centred, full_matrices=False)
    tolerance = (sing[0] if len(sing) else 0.0) * max(centred.shape) * np.finfo(np.float32).eps
    rank = max(int((sing > tolerance).sum()), 1)
    return (centred @ basis[:rank].T).astype(np.float32)


def deduplicate(x: np.ndarray) -> Deduplicated:
    """Group the unit rows of ``x`` whose cosine is at least DUPLICATE_COSINE (greedy, in row order:
    each row not yet grouped takes every ungrouped row that close to it).

    Identical descriptions have identical embeddings; a layer where hundreds of neurons say the
    same sentence is then clustered as a handful of weighted points. A group of one keeps its row
    exactly, so a layer without duplicates is clustered as before.
    """
    close = (x @ x.T) >= DUPLICATE_COSINE
    group = np.full(len(x), -1, dtype=np.int64)
    n_groups = 0
    for i in range(len(x)):
        if group[i] < 0:
            group[close[i] & (group < 0)] = n_groups
            n_groups += 1
    weights = np.bincount(group, minlength=n_groups)
    points = np.zeros((n_groups, x.shape[1]))
    np.add.at(points, group, x)
    points /= weights[:, None]
    return Deduplicated(points, weights, group, span_coords(points))


def fit_kmeans(data: Deduplicated, k: int, seed: int, n_init: int) -> tuple[np.ndarray, float]:
    """KMeans labels (of the original rows) and inertia for one k, seeded.

    KMeans runs on the merged points weighted by their multiplicity: for exact duplicates this is
    the same objective as on every row, at the cost of the distinct rows only; and in the
    coordinates of their own span (``span_coords``), at the cost of the dimensions they fill.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # near-duplicate embeddings make KMeans warn about empty clusters; silhouette judges that k
        warnings.simplefilter("ignore", ConvergenceWarning)
        # float32 halves the memory traffic of Lloyd iterations; cosines need no more precision
        model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(
            data.coords, sample_weight=data.weights)
    return model.labels_.astype(np.int64)[data.inverse], float(model.inertia_)


def silhouette(dist: np.ndarray, labels: np.ndarray) -> float:
    """Cosine silhouette from a precomputed distance matrix; NaN when it is undefined."""
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= len(labels):
        return float("nan")
    return float(silhouette_score(dist, labels, metric="precomputed"))


def k_range(n: int, distinct: int, k_min: int, k_max: int) -> tuple[int, int, str]:
    """The k values that can be tried on ``n`` rows of which ``distinct`` differ, and why none can
    when the range is empty.

    The silhouette needs 2 ≤ k ≤ n − 1, and KMeans cannot find more clusters than distinct points.
    """
    hi = min(k_max, n - 1, distinct)
    lo = max(k_min, 2)
    if hi >= lo:
        return lo, hi, ""
    if distinct == 1 and n > 1:
        reason = f"all {n} embeddings are (nearly) identical (identical descriptions?)"
    elif distinct < n:
        reason = f"only {distinct} distinct embeddings among {n} neurons"
    else:
        reason = f"{n} neurons are too few for k ≥ {lo} (the silhouette needs k ≤ n − 1)"
    return lo, hi, reason


def candidate_ks(lo: int, hi: int, points: int, geometric: bool) -> list[int]:
    """About ``points`` integers spread over [lo, hi], both ends included."""
    if geometric:
        grid = np.geomspace(lo, hi, points)
    else:
        grid = np.linspace(lo, hi, points)
    return sorted({int(round(v)) for v in grid} | {lo, hi})


def search_k(data: Deduplicated, dist: np.ndarray, lo: int, hi: int, seed: int, n_init: int,
             points: int) -> tuple[int, np.ndarray, dict[int, tuple[float, float]]]:
    """Find the k in [lo, hi] with the highest silhouette by coarse-to-fine bracketing.

    Round one fits a geometric grid of ``points`` k values (the best k of a layer can be 5 or
    500). Each later round takes the best local peak of the fitted curve, and the runner-up peak
    if it comes within SEARCH_TOLERANCE of it, and fits REFINE_POINTS k values spread between each
    peak's fitted neighbours; it stops when those brackets hold no unfitted k. Narrow brackets
    cost fewer of the fits near the best k, the costly ones when that k is large. Refining a
    runner-up too guards against the bumps of a noisy silhouette curve. Ties go to the smaller
    k. Returns the best k, its labels and the curve {k: (silhouette, inertia)} of every k fitted.
    """
    curve: dict[int, tuple[float, float]] = {}
    labels_of: dict[int, np.ndarray] = {}
    todo = candidate_ks(lo, hi, points, geometric=True)
    while todo:
        for k in todo:
            labels, inertia = fit_kmeans(data, k, seed, n_init)
            curve[k] = (silhouette(dist, labels), inertia)
            labels_of[k] = labels
        fitted = sorted(curve)
        scores = [curve[k][0] if np.isfinite(curve[k][0]) else -np.inf for k in fitted]
        top = max(scores)
        peaks = [i for i, score in enumerate(scores)
                 if score >= top - SEARCH_TOLERANCE
                 and score >= (scores[i - 1] if i > 0 else -np.inf)
                 and score >= (scores[i + 1] if i + 1 < len(scores) else -np.inf)]
        new: set[int] = set()
        for i in sorted(peaks, key=lambda i: -scores[i])[:SEARCH_PEAKS]:
            a, b = fitted[max(i - 1, 0)], fitted[min(i + 1, len(fitted) - 1)]
            new |= set(candidate_ks(a, b, REFINE_POINTS, geometric=False))
        todo = sorted(new - set(curve))
    best = max(curve, key=lambda k: (curve[k][0] if np.isfinite(curve[k][0]) else -np.inf, -k))
    return best, labels_of[best], curve


@single_threaded  # k-means++'s many small products: see common/threads.py
def cluster_layer(x: np.ndarray, k_min: int, k_max: int, seed: int, n_init: int,
                  points: int) -> Clustering:
    """Choose k, cluster ``x`` (unit rows) and compute the quality figures of the partition.

    Near-identical rows are clustered once, with their multiplicity (``deduplicate``), so they
    always share a cluster. Every figure is that of the partition of all neurons, each counting
    once: silhouette, cohesion and Davies–Bouldin are computed over every row, duplicates
    included (as if nothing had been merged); only KMeans and its inertia see the merged points.
    When no k can be tried (too few neurons, identical embeddings) every neuron goes to cluster 0
    and ``note`` says why; silhouette and Davies–Bouldin are then undefined (NaN).
    """
    from sklearn.metrics import davies_bouldin_score
    from sklearn.metrics.pairwise import cosine_distances

    data = deduplicate(x)
    lo, hi, reason = k_range(len(x), len(data.points), k_min, k_max)
    if reason:
        labels = np.zeros(len(x), dtype=np.int64)
        return Clustering(1, labels, cohesion(x, labels), float("nan"), float("nan"),
                          note=f"{reason}: all neurons put in one cluster")
    k, labels, curve = search_k(data, cosine_distances(x), lo, hi, seed, n_init, points)
    sil = curve[k][0]
    n_labels = len(np.unique(labels))
    dbi = davies_bouldin_score(x, labels) if 2 <= n_labels < len(x) else float("nan")
    return Clustering(k, labels, cohesion(x, labels), sil, float(dbi), curve)


def project_2d(x: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """Seeded 2-D map of unit rows: UMAP (cosine) when asked and possible, else PCA.

    UMAP needs a neighbour graph, so layers with fewer than UMAP_MIN_POINTS neurons fall back to
    PCA; the method actually used is returned so that the meta can say so. Identical rows (the
    same sentence) share one point: UMAP maps the distinct rows only — given exact duplicates its
    layout was not the same from one run to the next, with the same seed.
    """
    distinct, inverse = np.unique(x, axis=0, return_inverse=True)
    if len(distinct) < len(x):
        coords, used = project_2d(distinct, method, seed)
        return coords[inverse.reshape(-1)], used
    n = len(x)
    if method == "umap" and n >= UMAP_MIN_POINTS:
        import umap

        with warnings.catch_warnings():
            # UMAP warns that a fixed random_state disables parallelism: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), metric="cosine",
                                random_state=seed, n_jobs=1, init="spectral" if n > 10 else "random")
            return reducer.fit_transform(x).astype(np.float64), "umap"
    if method == "umap":
        log.info("only %d neurons: using PCA instead of UMAP for the 2-D map", n)
    coords = np.zeros((n, 2))
    if n >= 2:
        from sklearn.decomposition import PCA

        # the full SVD is exact and deterministic; scikit-learn fixes the sign of each axis
        m = min(2, x.shape[1])
        coords[:, :m] = PCA(n_components=m, svd_solver="full").fit_transform(x)
    return coords, "pca"


def english_stop_words() -> frozenset[str]:
    """scikit-learn's English stop-word list."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def template_words(layers: list[list[str]]) -> frozenset[str]:
    """Words that more than TEMPLATE_SHARE of the descriptions of each of two layers or more contain.

    A concept is rarely shared by most neurons of two layers, but a describer's template ("top
    images classified as …", "the patches show …") is: this finds the template of whatever
    describer wrote the descriptions, without a list per describer. A run of one layer has none.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    counter = CountVectorizer(lowercase=True, binary=True, token_pattern=TOKEN_PATTERN)
    try:
        present = counter.fit_transform([d for layer in layers for d in layer])
    except ValueError:  # no word at all
        return frozenset()
    common = np.zeros(present.shape[1], dtype=int)
    start = 0
    for layer in layers:
        share = np.asarray(present[start:start + len(layer)].mean(axis=0)).ravel()
        common += share > TEMPLATE_SHARE
        start += len(layer)
    return frozenset(str(w) for w in counter.get_feature_names_out()[common >= 2])


def tfidf_matrix(descriptions: list[str], stop_words: frozenset[str]):
    """TF-IDF of each description (one document per neuron) and the vocabulary, or None if empty.

    scikit-learn's smoothed idf is used and each row is L2-normalised, so a long description does
    not outweigh a short one. Only alphabetic tokens of two letters or more are counted.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(stop_words=sorted(stop_words), lowercase=True,
                                 token_pattern=TOKEN_PATTERN)
    try:
        matrix = vectorizer.fit_transform(descriptions)
    except ValueError:
        # scikit-learn raises ValueError when nothing is left after removing stop words
        return None, np.array([], dtype=str)
    return matrix, vectorizer.get_feature_names_out()


def top_terms(matrix, rows: np.ndarray | None, vocab: np.ndarray, n: int) -> list[tuple[str, float]]:
    """The ``n`` terms with the highest mean TF-IDF weight over ``rows`` (all rows if None).

    Ties are broken alphabetically so that the order is stable; zero weights are left out.
    """
    if matrix is None:
        return []
    sub = matrix if rows is None else matrix[rows]
    weights = np.asarray(sub.mean(axis=0)).ravel()
    order = sorted(range(len(vocab)), key=lambda j: (-weights[j], vocab[j]))
    return [(str(vocab[j]), float(weights[j])) for j in order[:n] if weights[j] > 0]


def keyword_table(data: LayerData, results: dict[str, Clustering], stop_words: frozenset[str],
                  n_keywords: int, cluster_terms: int) -> tuple[list[tuple[str, float]], list[dict]]:
    """The layer's top terms, and 05_keywords.csv rows for the layer and for each cluster of each kind.

    One TF-IDF model is fitted per layer (a document per neuron); a cluster's terms are those with
    the highest mean weight over its neurons, so they are frequent in the cluster and rare in the layer.
    """
    matrix, vocab = tfidf_matrix(data.descriptions, stop_words)
    layer_terms = top_terms(matrix, None, vocab, n_keywords)
    if not layer_terms:
        log.warning("%s: no keywords left after removing stop words", data.layer)
    rows = [{"layer": data.layer, "kind": "all", "cluster": "all", "rank": r, "term": t,
             "weight": fmt(w)} for r, (t, w) in enumerate(layer_terms, 1)]
    for kind, res in results.items():
        for c in np.unique(res.labels):
            terms = top_terms(matrix, np.flatnonzero(res.labels == c), vocab, cluster_terms)
            rows += [{"layer": data.layer, "kind": kind, "cluster": int(c), "rank": r, "term": t,
                      "weight": fmt(w)} for r, (t, w) in enumerate(terms, 1)]
    return layer_terms, rows


def load_classifier(model_name: str, device: str):
    """A transformers zero-shot-classification pipeline for ``model_name`` (path or hub name)."""
    import torch
    from transformers import pipeline

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return pipeline("zero-shot-classification", model=model_name, device=device)
    except (OSError, ValueError) as err:
        raise StageError(f"cannot load the NLI model {model_name!r} ({err}); give a local path "
                         "to an NLI model, or drop --nli-model to use embedding similarity") from err


def classify_nli(descriptions: list[str], categories: dict[str, str], classifier,
                 batch_size: int = 16) -> tuple[list[str], list[float]]:
    """Best category and its probability for each description from a zero-shot NLI classifier.

    ``classifier`` is called like a transformers zero-shot pipeline: on a list of texts with
    ``candidate_labels`` and ``hypothesis_template``, returning one dict with ``labels`` and
    ``scores`` (best first) per text.
    """
    from tqdm import tqdm

    names = list(categories)
    best, scores = [], []
    for start in tqdm(range(0, len(descriptions), batch_size), desc="categories (NLI)",
                      disable=len(descriptions) <= batch_size):
        batch = descriptions[start:start + batch_size]
        results = classifier(batch, candidate_labels=names, hypothesis_template=NLI_TEMPLATE)
        if isinstance(results, dict):
            results = [results]
        for result in results:
            best.append(str(result["labels"][0]))
            scores.append(float(result["scores"][0]))
    return best, scores


def classify_embedding(vectors: np.ndarray, categories: dict[str, str],
                       embedder) -> tuple[list[str], list[float]]:
    """Best category of each description by cosine between its embedding and a category phrase."""
    names = list(categories)
    phrases = l2_normalise(embedder.encode([PHRASE_TEMPLATE.format(categories[n]) for n in names]),
                           np.float64)
    sims = vectors @ phrases.T
    best = np.argmax(sims, axis=1)
    return [names[i] for i in best], [float(sims[r, i]) for r, i in enumerate(best)]


def assign_categories(layers: list[LayerData], emb: Embeddings, categories: dict[str, str],
                      nli_model: str | None, classifier, text_embedder, text_embedder_name,
                      device: str) -> tuple[list[str], list[float], str]:
    """Category and score of every neuron (layers in order), and the method used.

    An NLI zero-shot classifier is used when one is injected or ``nli_model`` names one;
    otherwise each description is compared with one phrase per category in a text embedder's
    space. 04's text embeddings are reused when they come from that same embedder.
    """
    all_descriptions = [d for data in layers for d in data.descriptions]
    if nli_model or classifier is not None:
        method = f"nli:{nli_model or getattr(classifier, 'name', 'injected')}"
        if classifier is None:
            classifier = load_classifier(nli_model, device)
        best, scores = classify_nli(all_descriptions, categories, classifier)
    else:
        if text_embedder is None:
            from common.embedders import load_text_embedder
            text_embedder = load_text_embedder(text_embedder_name, device=device)
        method = f"embedding:{text_embedder.name}"
        stored_model = emb.text_model
        if stored_model == text_embedder.name and emb.text.shape[1] == text_embedder.dim:
            vectors = np.vstack([data.vectors["text"] for data in layers])
        else:
            log.info("04's text embeddings come from %r, not %r: encoding the descriptions again",
                     stored_model, text_embedder.name)
            vectors = l2_normalise(text_embedder.encode(all_descriptions), np.float64)
        best, scores = classify_embedding(vectors, categories, text_embedder)
    return best, scores, method


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display is needed or used)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    plt = pyplot()

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_k_selection(layer: str, results: dict[str, Clustering], path: Path) -> None:
    """Silhouette and inertia against k for each kind, the chosen k marked."""
    plt = pyplot()
    fig, (ax_s, ax_i) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, res in results.items():
        if not res.curve:
            continue
        ks = sorted(res.curve)
        line, = ax_s.plot(ks, [res.curve[k][0] for k in ks], "o-", ms=3, label=f"{kind} (k={res.k})")
        ax_s.axvline(res.k, color=line.get_color(), ls=":", lw=1)
        ax_i.plot(ks, [res.curve[k][1] for k in ks], "o-", ms=3, color=line.get_color(), label=kind)
    ax_s.set(xlabel="k", ylabel="cosine silhouette", title=f"{layer}: silhouette")
    ax_i.set(xlabel="k", ylabel="inertia", title=f"{layer}: inertia (elbow)")
    for ax in (ax_s, ax_i):
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no k could be tried", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    save_figure(fig, path)


def plot_maps(layer: str, coords: dict[str, np.ndarray], results: dict[str, Clustering],
              methods: dict[str, str], path: Path) -> None:
    """The 2-D map of each kind, neurons coloured by their cluster; neurons with the same sentence
    share a point (``project_2d``), whose area then grows with how many they are."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(coords), figsize=(5 * len(coords), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], coords):
        xy, res = coords[kind], results[kind]
        _, inverse, counts = np.unique(xy, axis=0, return_inverse=True, return_counts=True)
        shared = counts[inverse.reshape(-1)]
        ax.scatter(xy[:, 0], xy[:, 1], c=res.labels % 20, cmap="tab20", vmin=0, vmax=19,
                   s=MAP_POINT_SIZE * shared, linewidths=0)
        ax.set(title=f"{layer} · {kind} · k={res.k} ({methods[kind].upper()})"
               + ("\npoint area: neurons with that sentence" if shared.max() > 1 else ""),
               xticks=[], yticks=[])
    fig.tight_layout()
    save_figure(fig, path)


def plot_keywords(layer: str, terms: list[tuple[str, float]], path: Path) -> None:
    """Horizontal bar chart of the layer's highest-weighted terms."""
    plt = pyplot()
    shown = terms[:KEYWORD_BARS]
    fig, ax = plt.subplots(figsize=(6, 0.25 * max(len(shown), 4) + 1))
    ax.barh(range(len(shown)), [w for _, w in shown], color="tab:blue")
    ax.set_yticks(range(len(shown)), [t for t, _ in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="mean TF-IDF weight", title=f"{layer}: top terms")
    if not shown:
        ax.text(0.5, 0.5, "no terms left after stop words", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    save_figure(fig, path)


def plot_wordcloud(terms: list[tuple[str, float]], path: Path, seed: int = 0) -> None:
    """The layer's word cloud (the thesis's §5.1.1 figure): every kept term sized by its mean
    TF-IDF weight, drawn by the ``wordcloud`` package with the font it ships (no network)."""
    from PIL import Image
    from wordcloud import WordCloud

    weights = {t: w for t, w in terms if w > 0}
    if weights:
        cloud = WordCloud(width=WORDCLOUD_SIZE[0], height=WORDCLOUD_SIZE[1],
                          background_color="white", colormap="viridis", random_state=seed,
                          prefer_horizontal=0.9, max_words=len(weights))
        image = cloud.generate_from_frequencies(weights).to_image()
    else:  # nothing left after stop words: a blank card, so the atlas still has a picture
        image = Image.new("RGB", WORDCLOUD_SIZE, "white")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def plot_categories(shares: dict[str, dict[str, float]], names: list[str], method: str,
                    path: Path) -> None:
    """Stacked bars of the share of each category per layer."""
    plt = pyplot()
    layers = list(shares)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(layers) + 3), 4.5))
    bottom = np.zeros(len(layers))
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        values = np.array([shares[layer].get(name, 0.0) for layer in layers])
        ax.bar(layers, values, bottom=bottom, label=name, color=colours(i % 10))
        bottom += values
    ax.set(ylabel="share of described neurons", ylim=(0, 1),
           title=f"concept categories per layer ({method})")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    save_figure(fig, path)


def metric_wins(results: dict[str, Clustering]) -> tuple[dict[str, int], str]:
    """Which embedding kind clusters the layer better, as the thesis compares them (§4.3.1).

    Each kind scores one win per metric on which it beats the other: higher cohesion, higher
    silhouette, lower Davies–Bouldin (an undefined value, NaN, beats nothing and loses to
    nothing; equal values are no win). ``better`` is the kind with at least two wins, else "tie".
    """
    (a, ra), (b, rb) = results.items()
    wins = {a: 0, b: 0}
    for x, y, higher in ((ra.cohesion, rb.cohesion, True), (ra.silhouette, rb.silhouette, True),
                         (ra.davies_bouldin, rb.davies_bouldin, False)):
        if not (np.isfinite(x) and np.isfinite(y)) or x == y:
            continue
        wins[a if (x > y) == higher else b] += 1
    best = [kind for kind, n in wins.items() if n >= 2]
    return wins, best[0] if best else "tie"


def fmt(value: float) -> str:
    """A float as a fixed-precision string (stable CSV bytes); empty for NaN."""
    return "" if not np.isfinite(value) else f"{value:.6f}"


@dataclass(frozen=True)
class Settings:
    """Stage 05's settings: one flag each (``--k-max`` …), defaults written here only."""

    k_min: int = setting(2, "smallest number of clusters tried", make="K_MIN")
    k_max: int = setting(512, "largest number of clusters tried (capped at neurons − 1 per "
                         "layer)", make="K_MAX")
    grid_points: int = setting(8, "k values fitted in the first, geometric round of the k search")
    n_init: int = setting(3, "KMeans restarts per k")
    seed: int = setting(0, "seed of KMeans and UMAP")
    projection: str = setting("umap", "2-D map method (PCA is instant, UMAP shows local "
                              "structure)", make="PROJECTION", choices=("umap", "pca"))
    n_keywords: int = setting(50, "TF-IDF terms kept per layer")
    cluster_terms: int = setting(10, "TF-IDF terms kept per cluster")
    extra_stop_words: str = setting(
        "", "comma-separated words to drop from keywords, besides English stop words and the "
        "built-in filler list")
    categories: str = setting(
        ";".join(DEFAULT_CATEGORIES), "';'-separated concept categories, each 'name' or "
        "'name=phrase' (the phrase is what the embedding fallback compares descriptions with)")
    nli_model: str | None = setting(
        None, "local path (or hub name) of an NLI model for zero-shot categories; without it, "
        "categories come from embedding similarity", make="NLI_MODEL")
    text_embedder: str | None = setting(
        None, "text embedder for the category phrases, as named to common.embedders (omitted: "
        "its offline default, all-MiniLM-L6-v2)")
    device: str = setting("auto", "auto, cpu or cuda", make="DEVICE")
    no_plots: bool = setting(False, "skip the PNG figures")


def run(run: Run, settings: Settings = Settings(), classifier=None, text_embedder=None) -> dict:
    """Cluster, map, and summarise every layer of ``run``; write its 05_* files.

    ``classifier`` (a zero-shot NLI callable) and ``text_embedder`` (an object with ``.encode``
    and ``.name``) may be injected; otherwise they are loaded here only if needed: the classifier
    when the settings name an NLI model, the embedder for the embedding-similarity fallback.
    Returns the meta that was written.
    """
    from sklearn.metrics import adjusted_rand_score
    from tqdm import tqdm

    k_min, k_max, seed, n_init = settings.k_min, settings.k_max, settings.seed, settings.n_init
    grid_points, projection = settings.grid_points, settings.projection
    if k_min < 2 or k_max < k_min:
        raise StageError(f"need 2 ≤ --k-min ≤ --k-max, got {k_min} and {k_max}")
    if grid_points < 3:
        raise StageError(f"--grid-points must be at least 3, got {grid_points}")
    n_keywords, cluster_terms = settings.n_keywords, settings.cluster_terms
    nli_model, plots = settings.nli_model, not settings.no_plots
    categories = parse_categories(settings.categories)
    extra_stop_words = tuple(comma_list(settings.extra_stop_words))
    descriptions_path, embeddings_path, out_dir = run.descriptions, run.embeddings, run.folder
    # 01's layer order when 01_activations.npz is there, else the descriptions' own order
    activations_path = run.activations if run.activations.exists() else None
    plot_dir = run.plots
    for path, producer in ((descriptions_path, "03_describe"), (embeddings_path, "04_embed")):
        if not Path(path).exists():
            raise StageError(f"{path} does not exist; run {producer} first (e.g. `make`)")
    input_metas = [read_meta(descriptions_path), read_meta(embeddings_path)]
    if activations_path is not None:
        input_metas.append(read_meta(activations_path))
    merge_lineage(input_metas)  # fail before any work when the inputs come from different runs
    sweep_temporaries(out_dir)  # what a killed earlier run left half-written
    retract_meta(run.meta("05_cluster"))  # outputs are replaced from here on

    layers, emb, skipped = load_layers(descriptions_path, embeddings_path,
                                       read_layer_order(activations_path) if activations_path
                                       else [])
    if not layers:
        raise StageError(f"no neuron has both an 'ok' description and an embedding "
                         f"(skipped: {skipped}); check 03_describe and 04_embed")
    for reason, count in skipped.items():
        if count:
            log.warning("skipped %d neurons: %s", count, reason)
    if len(layers) == 1:
        log.warning("only one layer (%s): clusters are made, but 06_trace will have nothing "
                    "to link", layers[0].layer)

    template = template_words([data.descriptions for data in layers])
    if template:
        log.info("describer wording left out of the keywords: %s", ", ".join(sorted(template)))
    stop_words = frozenset(english_stop_words() | FILLER_WORDS | template
                           | {w.lower() for w in extra_stop_words})
    cluster_rows, metric_rows, ksearch_rows, keyword_rows, category_rows = [], [], [], [], []
    notes: dict[str, str] = {}
    methods_used: dict[str, dict[str, str]] = {}
    progress = tqdm(total=len(layers) * len(KINDS), desc="clustering", unit="map")
    for data in layers:
        results: dict[str, Clustering] = {}
        coords: dict[str, np.ndarray] = {}
        methods_used[data.layer] = {}
        for kind in KINDS:
            res = cluster_layer(data.vectors[kind], k_min, k_max, seed, n_init, grid_points)
            if res.note:
                notes[f"{data.layer}/{kind}"] = res.note
                log.warning("%s (%s): %s", data.layer, kind, res.note)
            results[kind] = res
            coords[kind], methods_used[data.layer][kind] = project_2d(data.vectors[kind],
                                                                      projection, seed)
            progress.update()
        ari = float(adjusted_rand_score(results["text"].labels, results["fused"].labels))
        log.info("%s: %d neurons, k text=%d fused=%d, ARI=%.3f", data.layer, len(data.channels),
                 results["text"].k, results["fused"].k, ari)

        layer_terms, rows = keyword_table(data, results, stop_words, n_keywords, cluster_terms)
        keyword_rows += rows
        wins, better = metric_wins(results)
        log.info("%s: %s clusters better (wins of 3 metrics: %s)", data.layer, better,
                 ", ".join(f"{kind} {n}" for kind, n in wins.items()))
        for kind in KINDS:
            res = results[kind]
            metric_rows.append({"layer": data.layer, "kind": kind, "k": res.k,
                                "cohesion": fmt(res.cohesion), "silhouette": fmt(res.silhouette),
                                "davies_bouldin": fmt(res.davies_bouldin),
                                "ari_text_fused": fmt(ari), "wins": wins[kind],
                                "better": better})
            ksearch_rows += [{"layer": data.layer, "kind": kind, "k": k, "silhouette": fmt(s),
                              "inertia": fmt(i), "chosen": int(k == res.k)}
                             for k, (s, i) in sorted(res.curve.items())]
            cluster_rows += [{"layer": data.layer, "channel": int(ch), "kind": kind,
                              "cluster": int(c), "x": fmt(xy[0]), "y": fmt(xy[1])}
                             for ch, c, xy in zip(data.channels, res.labels, coords[kind])]
        if plots:
            stem = layer_slug(data.layer)
            plot_k_selection(data.layer, results, plot_dir / f"{stem}_k.png")
            plot_maps(data.layer, coords, results, methods_used[data.layer],
                      plot_dir / f"{stem}_map.png")
            plot_keywords(data.layer, layer_terms, plot_dir / f"{stem}_keywords.png")
            plot_wordcloud(layer_terms, plot_dir / f"{stem}_wordcloud.png", seed)
    progress.close()

    best, scores, method = assign_categories(layers, emb, categories, nli_model, classifier,
                                             text_embedder, settings.text_embedder,
                                             settings.device)
    unknown = sorted(set(best) - set(categories))
    if unknown:
        raise StageError(f"the category classifier returned labels that are not categories: {unknown}")
    log.info("categories assigned by %s", method)
    shares: dict[str, dict[str, float]] = {}
    pos = 0
    for data in layers:
        n = len(data.channels)
        layer_best = best[pos:pos + n]
        category_rows += [{"layer": data.layer, "channel": int(ch), "category": cat,
                           "score": fmt(score), "method": method}
                          for ch, cat, score in zip(data.channels, layer_best, scores[pos:pos + n])]
        shares[data.layer] = {name: layer_best.count(name) / n for name in categories}
        pos += n
    if plots:
        plot_categories(shares, list(categories), method, plot_dir / "categories.png")

    outputs = {
        run.clusters: (cluster_rows, ClusterRow),
        run.metrics: (metric_rows, MetricRow),
        run.ksearch: (ksearch_rows, KSearchRow),
        run.keywords: (keyword_rows, KeywordRow),
        run.categories: (category_rows, CategoryRow),
    }
    for path, (rows, row_type) in outputs.items():
        write_csv(path, rows, columns(row_type))
    args = {"descriptions": str(descriptions_path), "embeddings": str(embeddings_path),
            "activations": str(activations_path) if activations_path else None,
            "k_min": k_min, "k_max": k_max, "n_init": n_init, "grid_points": grid_points,
            "seed": seed, "projection": projection, "n_keywords": n_keywords,
            "cluster_terms": cluster_terms, "categories": categories,
            "extra_stop_words": list(extra_stop_words), "nli_model": nli_model}
    return write_meta(run.meta("05_cluster"), "05_cluster", args,
                      list(outputs), inputs=input_metas,
                      category_method=method, projection_used=methods_used,
                      describer_wording=sorted(template),
                      degenerate=notes, skipped=skipped)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the stage: ``--run`` and the fields of ``Settings``."""
    p = stage_parser(__doc__.split("\n\n")[0])
    add_run(p, "03_descriptions.csv, 04_embeddings.npz (and 01's layer order)",
            "05_clusters.csv, 05_metrics.csv, 05_ksearch.csv, 05_keywords.csv, "
            "05_categories.csv and 05_plots/")
    add_settings(p, Settings)
    return p


@exit_on_stage_error
def main(argv=None):
    """Parse arguments and run the stage."""
    args = start_stage(build_parser(), argv)
    run(Run(args.run), settings_from(Settings, args))


if __name__ == "__main__":
    main()
