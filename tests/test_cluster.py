"""Tests of 05_cluster: k search on planted clusters, hand-checked metrics, TF-IDF, categories, edges."""
import math
import sys
import types
import zlib

import numpy as np
import pytest

from sklearn.metrics import silhouette_score
from sklearn.metrics.pairwise import cosine_distances, cosine_similarity

from common.artefacts import (Description, Embeddings, Run, columns, read_categories, read_clusters,
                              read_keywords, read_ksearch, read_metrics, write_embeddings)
from common.io import read_json, save_npz, write_csv
from common.provenance import write_meta
from conftest import load_stage


stage = load_stage("05_cluster")


class BagOfWordsEmbedder:
    """Stand-in for a sentence embedder: the normalised sum of one fixed random vector per word."""
    name = "fake-bow"
    dim = 64

    def encode(self, texts):
        """Embed each text as the normalised sum of its words' fixed random vectors."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().replace(",", " ").split():
                rng = np.random.default_rng(zlib.crc32(word.encode()))
                out[i] += rng.normal(size=self.dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def planted(n_per, k, dim=32, noise=0.05, seed=0):
    """Unit vectors around ``k`` random centres; returns (vectors, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] / np.linalg.norm(centres[labels], axis=1, keepdims=True)
    x = x + noise * rng.normal(size=x.shape)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


WORDS = ["yellow lemon", "striped zebra", "blue truck", "round wheel", "furry dog", "red brick"]


def write_inputs(tmp_path, layers, failed=()):
    """Write 03_descriptions.csv and 04_embeddings.npz (with metas) for ``layers``.

    ``layers`` maps a layer name to (descriptions, text vectors, fused vectors); ``failed`` lists
    (layer, channel) rows written as failed descriptions without an embedding.
    """
    rows, names, channels, text, fused = [], [], [], [], []
    for layer, (descs, t, f) in layers.items():
        for ch, d in enumerate(descs):
            rows.append({"layer": layer, "channel": ch, "level": 1, "description": d,
                         "backend": "fake", "model": "fake", "status": "ok", "reason": ""})
            names.append(layer)
            channels.append(ch)
        text.append(t)
        fused.append(f)
    for layer, ch in failed:
        rows.append({"layer": layer, "channel": ch, "level": 1, "description": "",
                     "backend": "fake", "model": "fake", "status": "failed", "reason": "timeout"})
    desc = tmp_path / "03_descriptions.csv"
    write_csv(desc, rows, columns(Description))
    meta03 = write_meta(tmp_path / "03_describe.meta.json", "03_describe", {}, [desc])
    emb = tmp_path / "04_embeddings.npz"
    write_embeddings(emb, Embeddings(layer=np.array(names), channel=np.array(channels),
                                     text=np.vstack(text), image=np.vstack(fused),
                                     fused=np.vstack(fused), text_model="fake-bow",
                                     image_model="fake", fusion="mean"))
    write_meta(tmp_path / "04_embed.meta.json", "04_embed", {}, [emb], inputs=[meta03])
    return desc, emb


def planted_layer(n_per, k, seed):
    """Descriptions and vectors of one layer with ``k`` planted concepts (text and fused agree)."""
    x, labels = planted(n_per, k, seed=seed)
    descs = [f"{WORDS[c]} pattern number {i}" for i, c in enumerate(labels)]
    return descs, x, x, labels


def test_planted_clusters_found_with_ari_one():
    x, truth = planted(12, 4, seed=1)
    res = stage.cluster_layer(x, k_min=2, k_max=20, seed=0, n_init=3, points=8)
    from sklearn.metrics import adjusted_rand_score
    assert res.k == 4
    assert adjusted_rand_score(truth, res.labels) == 1.0
    assert res.cohesion > 0.9 and res.silhouette > 0.8


@pytest.mark.parametrize("noise, planted_k", [(0.05, 7), (0.15, None)])
def test_search_matches_exhaustive_sweep_with_fewer_fits(noise, planted_k):
    # at noise 0.15 the silhouette curve has two peaks (k = 6 and 8): the search must still
    # find the higher one, which a search refining only around its best fit so far misses
    x, _ = planted(10, 7, seed=2, noise=noise)
    dist, data = cosine_distances(x), stage.deduplicate(x)
    best, _, curve = stage.search_k(data, dist, 2, 40, seed=0, n_init=2, points=6)
    sweep = {k: stage.silhouette(dist, stage.fit_kmeans(data, k, 0, 2)[0]) for k in range(2, 41)}
    assert best == max(sweep, key=lambda k: (sweep[k], -k))
    if planted_k:
        assert best == planted_k
    assert len(curve) < len(sweep) / 2
    assert all(curve[k][0] == pytest.approx(sweep[k]) for k in curve)


def test_a_falling_silhouette_curve_is_refined_at_its_start_only(monkeypatch):
    # every k lies within SEARCH_TOLERANCE of the best and the curve only falls: its one local
    # peak is k = 2, so only the bracket 2..4 of round one (2, 4, 7, 12, 22, 40) is refined; a
    # point on the slope is no peak, however close to the best
    monkeypatch.setattr(stage, "fit_kmeans", lambda data, k, seed, n_init: (np.full(3, k), 0.0))
    monkeypatch.setattr(stage, "silhouette", lambda dist, labels: 0.5 - 1e-4 * labels[0])
    best, labels, curve = stage.search_k(None, None, 2, 40, seed=0, n_init=1, points=6)
    assert best == 2 and labels.tolist() == [2, 2, 2]
    assert sorted(curve) == [2, 3, 4, 7, 12, 22, 40]


def test_near_identical_rows_merge_and_distinct_ones_do_not():
    x, _ = planted(1, 3, seed=9)
    turn = np.zeros_like(x[0])
    turn[np.argmin(np.abs(x[0]))] = 1.0
    near = x[0] + 0.005 * turn  # cosine with x[0] ≈ 0.99999: the same sentence, rounded
    apart = x[0] + 0.05 * turn  # cosine ≈ 0.999: a different sentence
    rows = np.vstack([x, near / np.linalg.norm(near), apart / np.linalg.norm(apart), x[2]])
    data = stage.deduplicate(rows)
    assert data.inverse.tolist() == [0, 1, 2, 0, 3, 2]
    assert data.weights.tolist() == [2, 1, 2, 1]
    np.testing.assert_array_equal(data.points[1], rows[1])  # a group of one keeps its row exactly
    # a chain a ≈ b ≈ c with a and c apart: b stays in the group of a, the first row that took it
    angles = np.array([0.0, 0.01, 0.02])  # cosines 0.99995 (neighbours) and 0.9998 (a, c)
    chain = stage.deduplicate(np.stack([np.cos(angles), np.sin(angles)], axis=1))
    assert chain.inverse.tolist() == [0, 0, 1] and chain.weights.tolist() == [2, 1]


def test_duplicated_layer_is_clustered_as_its_distinct_points(monkeypatch):
    # 512 neurons, 500 of which say one of four sentences: KMeans sees 16 weighted points only
    x, _ = planted(1, 16, seed=10, noise=0.0)
    rng = np.random.default_rng(0)
    which = np.concatenate([rng.integers(0, 4, size=500), np.arange(4, 16)])
    layer = x[which]
    sizes = []
    fit = stage.fit_kmeans
    monkeypatch.setattr(stage, "fit_kmeans", lambda data, *a: sizes.append(len(data.points))
                        or fit(data, *a))
    res = stage.cluster_layer(layer, k_min=2, k_max=512, seed=0, n_init=2, points=8)
    assert set(sizes) == {16} and max(res.curve) == 16  # k is capped at the distinct points
    for sentence in range(4):  # each repeated sentence lies in a single cluster
        assert len(set(res.labels[which == sentence])) == 1
    # the figures are those of all 512 neurons, each counting once
    assert res.silhouette == pytest.approx(silhouette_score(layer, res.labels, metric="cosine"))
    assert res.cohesion == pytest.approx(stage.cohesion(layer, res.labels))


def test_weighted_kmeans_equals_kmeans_on_every_row():
    # exact duplicates: the weighted fit optimises the same objective as the fit on every row
    x, truth = planted(5, 3, seed=11)
    rows = np.repeat(x, np.arange(1, 16) % 4 + 1, axis=0)
    labels, inertia = stage.fit_kmeans(stage.deduplicate(rows), 3, seed=0, n_init=3)
    from sklearn.cluster import KMeans
    full = KMeans(n_clusters=3, n_init=3, random_state=0).fit(rows)
    assert inertia == pytest.approx(full.inertia_, rel=1e-4)
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(full.labels_, labels) == 1.0


def test_kmeans_sees_the_points_in_coordinates_of_their_own_span():
    # 60 unit rows in a 5-dimensional subspace of a 40-d space, and 5 far fewer rows than dims
    rng = np.random.default_rng(12)
    basis = np.linalg.qr(rng.normal(size=(40, 5)))[0]
    low = rng.normal(size=(60, 5)) @ basis.T
    low /= np.linalg.norm(low, axis=1, keepdims=True)
    data = stage.deduplicate(low)
    assert data.coords.shape == (60, 5)  # not 40: the 5 dimensions the rows fill
    assert data.coords.dtype == np.float32
    # every distance is kept (so KMeans' objective is), up to float32 rounding
    from scipy.spatial.distance import pdist
    np.testing.assert_allclose(pdist(data.coords), pdist(low), atol=1e-5)
    few = stage.deduplicate(np.eye(40)[:5])  # 5 corners of a simplex: their differences fill 4
    assert few.coords.shape == (5, 4)
    np.testing.assert_allclose(pdist(few.coords), np.sqrt(2), atol=1e-6)
    # one distinct point: a single coordinate, zero
    one = stage.deduplicate(np.tile(low[:1], (3, 1)))
    assert one.coords.shape == (1, 1) and not one.coords.any()
    # the fit on those coordinates is the fit on the rows themselves
    from sklearn.cluster import KMeans
    labels, inertia = stage.fit_kmeans(data, 4, seed=0, n_init=3)
    full = KMeans(n_clusters=4, n_init=3, random_state=0).fit(low)
    assert inertia == pytest.approx(full.inertia_, rel=1e-4)
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(full.labels_, labels) == 1.0


def test_cohesion_and_silhouette_by_hand():
    # two clusters of two unit vectors, each pair at cosine 0.8
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    labels = np.array([0, 0, 1, 1])
    assert stage.cohesion(x, labels) == pytest.approx(0.8)
    # cosine distances: within 0.2; a1-b1 1.0, a1-b2 1.6, a2-b1 0.4, a2-b2 1.0
    far, near = (1.1 / 1.3), (0.5 / 0.7)
    expected = (far + near + near + far) / 4
    assert stage.silhouette(cosine_distances(x), labels) == pytest.approx(expected)
    # a singleton has no pairs: it must not pull the cohesion towards 0 or 1
    x3 = np.vstack([x, [[-1.0, 0.0]]])
    assert stage.cohesion(x3, np.array([0, 0, 1, 1, 2])) == pytest.approx(0.8)
    # … nor stop the average when its label comes first
    assert stage.cohesion(x3, np.array([1, 1, 2, 2, 0])) == pytest.approx(0.8)


def test_tfidf_tiny_corpus_by_hand():
    docs = ["Yellow dots on a neuron patch", "yellow stripes in the image", "a dog"]
    stop = stage.english_stop_words() | stage.FILLER_WORDS
    matrix, vocab = stage.tfidf_matrix(docs, stop)
    assert sorted(vocab) == ["dog", "dots", "stripes", "yellow"]
    idf = lambda df: math.log(4 / (1 + df)) + 1  # smoothed idf over 3 documents
    norm = math.hypot(idf(2), idf(1))
    expected = {"dog": 1 / 3, "yellow": 2 * idf(2) / norm / 3, "dots": idf(1) / norm / 3,
                "stripes": idf(1) / norm / 3}
    terms = stage.top_terms(matrix, None, vocab, 3)
    assert [t for t, _ in terms] == sorted(expected, key=lambda t: (-expected[t], t))[:3]
    for term, weight in terms:
        assert weight == pytest.approx(expected[term])
    cluster = stage.top_terms(matrix, np.array([2]), vocab, 5)
    assert cluster == [("dog", pytest.approx(1.0))]


def test_template_words_are_those_most_descriptions_of_two_layers_share():
    early = ["the unit fires on red stripes", "the unit fires on blue dots",
             "the unit fires on red dots", "the unit fires on red stripes"]
    deep = ["the unit fires on cats", "the unit fires on cats and dogs", "the unit fires on cars",
            "the unit fires on cats"]
    # "red" and "cats" fill 3 of 4 descriptions of one layer each: concepts, not wording
    assert stage.template_words([early, deep]) == {"the", "unit", "fires", "on"}
    assert stage.template_words([early]) == frozenset()  # one layer cannot tell them apart
    assert stage.template_words([["", "—"], ["?"]]) == frozenset()  # no word in any sentence
    # wording most descriptions of three layers share is template too, not only of exactly two
    late = ["the unit fires on wheels", "the unit fires on doors", "the unit fires on wheels",
            "the unit fires on sky"]
    assert stage.template_words([early, deep, late]) == {"the", "unit", "fires", "on"}
    # a describer that starts its sentences with a capital writes the same template
    capital = [d[0].upper() + d[1:] for d in deep]
    assert stage.template_words([early, capital]) == {"the", "unit", "fires", "on"}


def test_embedding_fallback_picks_the_matching_phrase():
    emb = BagOfWordsEmbedder()
    cats = {"animals": "dogs cats birds", "colours": "yellow red blue", "vehicles": "truck car bus"}
    descs = ["dogs and cats", "yellow and red", "a blue truck and a car"]
    vectors = emb.encode(descs).astype(np.float64)
    best, scores = stage.classify_embedding(vectors, cats, emb)
    assert best == ["animals", "colours", "vehicles"]
    # each score is the cosine with the winning phrase, i.e. the best over all phrases
    phrases = emb.encode([stage.PHRASE_TEMPLATE.format(p) for p in cats.values()])
    np.testing.assert_allclose(scores, cosine_similarity(vectors, phrases).max(axis=1), atol=1e-6)


def test_nli_path_with_fake_classifier():
    calls = []

    def fake(texts, candidate_labels, hypothesis_template):
        calls.append((len(texts), hypothesis_template))
        out = []
        for t in texts:
            label = "animals" if "dog" in t else "colours"
            rest = [c for c in candidate_labels if c != label]
            out.append({"labels": [label, *rest], "scores": [0.9] + [0.1 / len(rest)] * len(rest)})
        return out

    best, scores = stage.classify_nli(["a dog", "pale yellow", "dog ears"] * 7,
                                      stage.DEFAULT_CATEGORIES, fake, batch_size=8)
    assert best[:3] == ["animals", "colours", "animals"] and len(best) == 21
    assert [n for n, _ in calls] == [8, 8, 5] and "{}" in calls[0][1]
    assert scores[0] == pytest.approx(0.9)


def test_nli_path_with_tiny_random_transformer(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "this", "neuron",
                                "responds", "to", "yellow", "dog", "animals", "colours", "."]))
    config = transformers.BertConfig(vocab_size=14, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     label2id={"contradiction": 0, "neutral": 1, "entailment": 2},
                                     id2label={0: "contradiction", 1: "neutral", 2: "entailment"})
    model = transformers.BertForSequenceClassification(config).eval()
    clf = transformers.pipeline("zero-shot-classification", model=model,
                                tokenizer=transformers.BertTokenizer(str(vocab)), device="cpu")
    cats = {"animals": "animals", "colours": "colours"}
    texts = ["yellow dog", "yellow", "dog"]
    best, scores = stage.classify_nli(texts, cats, clf, batch_size=2)
    # batched answers stay with their texts and use the stage's hypothesis template: each equals
    # the pipeline's own answer for that text alone
    for text, label, score in zip(texts, best, scores):
        alone = clf(text, candidate_labels=list(cats), hypothesis_template=stage.NLI_TEMPLATE)
        assert (label, score) == (alone["labels"][0], pytest.approx(alone["scores"][0], abs=1e-6))


def fake_embedders_module(monkeypatch):
    """Install a fake ``common.embedders`` so the stage's lazy import gets the bag-of-words embedder."""
    module = types.ModuleType("common.embedders")
    module.load_text_embedder = lambda name=None, device="auto": BagOfWordsEmbedder()
    monkeypatch.setitem(sys.modules, "common.embedders", module)


def test_end_to_end_two_layers(tmp_path, monkeypatch):
    d1, x1, f1, truth1 = planted_layer(10, 3, seed=3)
    d2, x2, f2, truth2 = planted_layer(8, 5, seed=4)
    desc, emb = write_inputs(tmp_path, {"late": (d2, x2, f2), "early": (d1, x1, f1)},
                             failed=[("early", 99)])
    acts = tmp_path / "01_activations.npz"
    save_npz(acts, {"layers": np.array(["early", "late"])})
    write_meta(tmp_path / "01_extract.meta.json", "01_extract", {}, [acts])
    fake_embedders_module(monkeypatch)
    out = tmp_path  # the run folder: 05 reads 03's and 04's files there and writes beside them
    stage.main(["--run", str(out), "--k-max", "12", "--projection", "pca"])

    metrics = read_metrics(out / "05_metrics.csv")
    assert [(m.layer, m.kind) for m in metrics] == [
        ("early", "text"), ("early", "fused"), ("late", "text"), ("late", "fused")]
    assert [m.k for m in metrics] == [3, 3, 5, 5]
    assert all(m.ari_text_fused == pytest.approx(1.0) for m in metrics)
    clusters = read_clusters(out / "05_clusters.csv")
    assert len(clusters) == 2 * (30 + 40)  # the failed row is skipped
    keywords = read_keywords(out / "05_keywords.csv")
    early_all = [k.term for k in keywords if k.layer == "early" and k.cluster is None]
    assert {"yellow", "lemon", "striped", "zebra", "blue", "truck"} <= set(early_all)
    # "pattern number" is the wording of every description in both layers: the describer's template
    assert not {"pattern", "number", "neuron"} & set(early_all)
    by_cluster = {}
    for k in keywords:
        if k.layer == "early" and k.kind == "fused" and k.rank <= 2:
            by_cluster.setdefault(k.cluster, set()).add(k.term)
    assert sorted(map(sorted, by_cluster.values())) == [["blue", "truck"], ["lemon", "yellow"],
                                                        ["striped", "zebra"]]
    categories = read_categories(out / "05_categories.csv")
    assert len(categories) == 70 and categories[0].method == "embedding:fake-bow"
    ksearch = read_ksearch(out / "05_ksearch.csv")
    assert sum(r.chosen for r in ksearch) == 4
    for name in ("early_k.png", "early_map.png", "early_keywords.png", "late_map.png",
                 "early_wordcloud.png", "categories.png"):
        assert (out / "05_plots" / name).stat().st_size > 1000
    from PIL import Image
    cloud = np.asarray(Image.open(out / "05_plots" / "early_wordcloud.png").convert("L"))
    assert cloud.shape == (400, 800) and (cloud < 128).mean() > 0.01  # words drawn, not blank
    assert {m.better for m in metrics} <= {"text", "fused", "tie"}
    for layer in ("early", "late"):
        pair = [m for m in metrics if m.layer == layer]
        assert pair[0].better == pair[1].better and pair[0].wins + pair[1].wins <= 3
    meta = read_json(out / "05_cluster.meta.json")
    assert set(meta["lineage"]) == {"01_extract", "03_describe", "04_embed", "05_cluster"}
    assert meta["category_method"] == "embedding:fake-bow"
    assert meta["describer_wording"] == ["number", "pattern"]
    assert meta["skipped"]["failed description"] == 1


def test_metric_wins_counts_each_metric_once_and_names_the_majority():
    c = stage.Clustering
    labels = np.zeros(3, dtype=int)
    text = c(3, labels, cohesion=0.80, silhouette=0.30, davies_bouldin=1.5)
    fused = c(3, labels, cohesion=0.90, silhouette=0.25, davies_bouldin=1.2)
    assert stage.metric_wins({"text": text, "fused": fused}) == ({"text": 1, "fused": 2}, "fused")
    text = c(3, labels, cohesion=0.95, silhouette=0.35, davies_bouldin=1.5)
    assert stage.metric_wins({"text": text, "fused": fused}) == ({"text": 2, "fused": 1}, "text")
    # undefined metrics (k = 1) count for neither; a single win is no majority
    one = c(1, labels, cohesion=0.7, silhouette=float("nan"), davies_bouldin=float("nan"))
    assert stage.metric_wins({"text": one, "fused": fused}) == ({"text": 0, "fused": 1}, "tie")


def test_degenerate_layers_do_not_crash(tmp_path):
    one = (["a lonely neuron of red"], *planted(1, 1, seed=5)[0:1] * 2)
    same_vec = np.tile(planted(1, 1, seed=6)[0], (6, 1))
    same = (["yellow dots"] * 6, same_vec, same_vec)
    desc, emb = write_inputs(tmp_path, {"tiny": one, "same": same})
    out = tmp_path
    meta = stage.run(Run(out), stage.Settings(k_min=2, k_max=8, projection="pca"),
                     text_embedder=BagOfWordsEmbedder())
    metrics = {(m.layer, m.kind): m for m in read_metrics(out / "05_metrics.csv")}
    assert metrics[("tiny", "text")].k == 1 and math.isnan(metrics[("tiny", "text")].silhouette)
    assert metrics[("same", "fused")].k == 1
    assert metrics[("same", "fused")].cohesion == pytest.approx(1.0)
    assert "identical" in meta["degenerate"]["same/text"]
    assert "too few" in meta["degenerate"]["tiny/fused"]
    assert [k.term for k in read_keywords(out / "05_keywords.csv")
            if k.layer == "same" and k.cluster is None] == ["dots", "yellow"]


def test_single_layer_and_stop_word_only_descriptions(tmp_path):
    descs, x, f, _ = planted_layer(6, 2, seed=7)
    descs = ["the neuron responds to image patches"] * len(descs)
    desc, emb = write_inputs(tmp_path, {"only": (descs, x, f)})
    out = tmp_path
    stage.run(Run(out), stage.Settings(k_max=5, projection="pca", no_plots=True),
              text_embedder=BagOfWordsEmbedder())
    assert [m.k for m in read_metrics(out / "05_metrics.csv")] == [2, 2]
    assert read_keywords(out / "05_keywords.csv") == []


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        stage.main(["--run", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "03_descriptions.csv does not exist" in err and "Traceback" not in err


def test_umap_map_and_small_layer_fallback():
    x, _ = planted(10, 3, seed=8)
    coords, method = stage.project_2d(x, "umap", seed=0)
    again, _ = stage.project_2d(x, "umap", seed=0)
    assert method == "umap" and coords.shape == (30, 2) and np.isfinite(coords).all()
    np.testing.assert_allclose(coords, again)
    small, method_small = stage.project_2d(x[:3], "umap", seed=0)
    assert method_small == "pca" and small.shape == (3, 2)


def test_map_puts_identical_sentences_on_one_point_and_repeats_itself():
    """Neurons with the same sentence (identical rows: a layer of 12 sentences said by 48
    neurons) share one point of the map, and the seeded map is the same on a second run —
    UMAP's layout of exact duplicates was not."""
    x, _ = planted(4, 3, seed=2)
    rows = np.random.default_rng(1).integers(0, len(x), 48)
    rows[:len(x)] = np.arange(len(x))  # every sentence at least once
    coords, method = stage.project_2d(x[rows], "umap", seed=0)
    assert method == "umap"
    np.testing.assert_array_equal(coords, stage.project_2d(x[rows], "umap", seed=0)[0])
    for r in range(len(x)):
        same = coords[rows == r]
        assert (same == same[0]).all()
    assert len(np.unique(coords, axis=0)) == len(x)


def test_parse_categories():
    cats = stage.parse_categories("animals; tools=hammers, saws and drills;colours")
    assert cats == {"animals": stage.DEFAULT_CATEGORIES["animals"],
                    "tools": "hammers, saws and drills",
                    "colours": stage.DEFAULT_CATEGORIES["colours"]}
    # an empty item (a doubled or trailing separator) is skipped, not the end of the list
    assert stage.parse_categories(";animals;; tools=hammers;") == \
        {"animals": stage.DEFAULT_CATEGORIES["animals"], "tools": "hammers"}
    with pytest.raises(stage.StageError):
        stage.parse_categories("animals")


def test_k_range_caps_and_the_reason_when_no_k_can_be_tried():
    """k runs from max(k_min, 2) to min(k_max, n − 1, distinct points); an empty range says why:
    identical embeddings, too few distinct ones, or too few neurons."""
    assert stage.k_range(5, 5, 2, 10) == (2, 4, "")  # the silhouette needs k ≤ n − 1
    assert stage.k_range(6, 3, 1, 10) == (2, 3, "")  # no more clusters than distinct points
    assert stage.k_range(9, 9, 3, 4) == (3, 4, "")
    assert stage.k_range(6, 1, 2, 8)[2] == "all 6 embeddings are (nearly) identical (identical " \
                                           "descriptions?)"
    assert stage.k_range(6, 2, 3, 8)[2] == "only 2 distinct embeddings among 6 neurons"
    assert stage.k_range(2, 2, 2, 8)[2].startswith("2 neurons are too few for k ≥ 2")
    assert stage.k_range(1, 1, 2, 8)[2].startswith("1 neurons are too few")


def test_equal_silhouettes_go_to_the_smaller_k_even_when_it_is_fitted_later(monkeypatch):
    """k = 12 (fitted in round one) and k = 5 (found by refining the runner-up peak at 4) have
    the same silhouette: the smaller k wins."""
    monkeypatch.setattr(stage, "fit_kmeans", lambda data, k, seed, n_init: (np.full(3, k), 0.0))
    score = {5: 0.5, 12: 0.5, 4: 0.495}
    monkeypatch.setattr(stage, "silhouette", lambda dist, labels: score.get(int(labels[0]), 0.4))
    best, _, curve = stage.search_k(None, None, 2, 40, seed=0, n_init=1, points=6)
    assert list(curve)[:6] == [2, 4, 7, 12, 22, 40] and 5 in curve
    assert best == 5


def test_two_clusters_get_sklearns_davies_bouldin():
    """At k = 2 the Davies–Bouldin index is defined and is sklearn's on every row."""
    from sklearn.metrics import davies_bouldin_score
    x, truth = planted(6, 2, seed=1)
    res = stage.cluster_layer(x, k_min=2, k_max=2, seed=0, n_init=2, points=4)
    assert res.k == 2 and len(set(res.labels)) == 2
    assert res.davies_bouldin == pytest.approx(davies_bouldin_score(x, res.labels))


def test_an_undefined_silhouette_is_never_the_best_k(monkeypatch):
    """A k whose silhouette is undefined (NaN: KMeans found one cluster, or one per point) ranks
    below every defined one, whatever its place in the curve, and is no peak to refine: only
    the bracket of k = 7 is (round one 2, 4, 7, 12, 22, 40; then 9, 6, 8)."""
    monkeypatch.setattr(stage, "fit_kmeans", lambda data, k, seed, n_init: (np.full(3, k), 0.0))
    score = {2: float("nan"), 7: 0.5}
    monkeypatch.setattr(stage, "silhouette", lambda dist, labels: score.get(int(labels[0]), 0.4))
    best, _, curve = stage.search_k(None, None, 2, 40, seed=0, n_init=1, points=6)
    assert best == 7 and np.isnan(curve[2][0])
    assert sorted(curve) == [2, 4, 6, 7, 8, 9, 12, 22, 40]
    # the same when every defined silhouette is negative (a layer without cluster structure):
    # the NaN is still below them all, not a 0 that would top the curve and be refined (k = 3)
    score = {2: float("nan"), 7: -0.05}
    monkeypatch.setattr(stage, "silhouette", lambda dist, labels: score.get(int(labels[0]), -0.1))
    best, _, curve = stage.search_k(None, None, 2, 40, seed=0, n_init=1, points=6)
    assert best == 7 and sorted(curve) == [2, 4, 6, 7, 8, 9, 12, 22, 40]
