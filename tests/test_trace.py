"""Tests of 06_trace: best matches on hand-made clusters, threshold, --follow, Sankey HTML and PNG."""
import re
import sys
import types
import zlib

import numpy as np
import pytest

from common.artefacts import ClusterRow, KeywordRow, Run, TraceLink, columns, read_trace
from common.io import read_json, save_npz, write_csv
from common.provenance import write_meta
from conftest import load_stage


stage = load_stage("06_trace")


class BagOfWordsEmbedder:
    """Deterministic stand-in for a sentence embedder: normalised sum of one random vector per word.

    In 4096 dimensions random word vectors are nearly orthogonal, so the cosine of two keyword
    lists is close to (shared words) / sqrt(len(a) · len(b)).
    """
    name = "fake-bow"
    dim = 4096

    def encode(self, texts):
        """Embed each text as the normalised sum of its words' fixed random vectors."""
        out = np.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):
            for word in text.lower().replace(",", " ").split():
                out[i] += np.random.default_rng(zlib.crc32(word.encode())).normal(size=self.dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


# layer -> cluster -> keywords; rows are written with "c" first so that the order must come
# from 01_activations.npz
CLUSTERS = {
    "c": {0: ["lemon", "fruit", "yellow"], 1: ["zebra", "stripe"]},
    "a": {0: ["yellow", "dot"], 1: ["stripe", "black"], 2: ["dog", "fur"]},
    "b": {0: ["black", "stripe", "zebra"], 1: ["yellow", "lemon"], 2: ["car", "wheel"]},
}


def write_inputs(tmp_path, clusters=CLUSTERS, order=("a", "b", "c"), empty=()):
    """Write 05_clusters.csv, 05_keywords.csv (+ meta) and, if ``order``, 01_activations.npz.

    Cluster ``c`` of layer ``l`` gets ``c + 1`` neurons; clusters in ``empty`` get no keywords.
    """
    rows, kw = [], []
    for layer, cs in clusters.items():
        channel = 0
        for c, words in cs.items():
            for _ in range(c + 1):
                for kind in ("text", "fused"):
                    rows.append({"layer": layer, "channel": channel, "kind": kind, "cluster": c,
                                 "x": 0, "y": 0})
                channel += 1
            if (layer, c) in empty:
                continue
            for r, w in enumerate(words, 1):
                kw.append({"layer": layer, "kind": "fused", "cluster": c, "rank": r, "term": w,
                           "weight": 1 / r})
        kw.append({"layer": layer, "kind": "all", "cluster": "all", "rank": 1, "term": "ignored",
                   "weight": 1})
    clusters_csv, keywords_csv = tmp_path / "05_clusters.csv", tmp_path / "05_keywords.csv"
    write_csv(clusters_csv, rows, columns(ClusterRow))
    write_csv(keywords_csv, kw, columns(KeywordRow))
    acts = None
    inputs = []
    if order:
        acts = tmp_path / "01_activations.npz"
        save_npz(acts, {"layers": np.array(order)})
        inputs = [write_meta(tmp_path / "01_extract.meta.json", "01_extract", {}, [acts])]
    write_meta(tmp_path / "05_cluster.meta.json", "05_cluster", {}, [clusters_csv, keywords_csv],
               inputs=inputs)
    return clusters_csv, keywords_csv, acts


def test_best_matches_threshold_and_layer_order(tmp_path):
    clusters_csv, keywords_csv, acts = write_inputs(tmp_path)
    stage.run(Run(tmp_path), stage.Settings(threshold=0.3), text_embedder=BagOfWordsEmbedder())
    trace = read_trace(tmp_path / "06_trace.csv")
    links = {(r.source_layer, r.source_cluster): (r.target_layer, r.target_cluster) for r in trace}
    # dog/fur and car/wheel share no word with the next layer: dropped by the threshold
    assert links == {("a", 0): ("b", 1), ("a", 1): ("b", 0), ("b", 0): ("c", 1), ("b", 1): ("c", 0)}
    sims = {(r.source_layer, r.source_cluster): r.similarity for r in trace}
    assert sims[("a", 1)] == pytest.approx(2 / np.sqrt(6), abs=0.05)  # 2 shared of 2 and 3
    assert sims[("a", 0)] == pytest.approx(0.5, abs=0.05)  # 1 shared of 2 and 2
    assert trace[0].source_keywords == "yellow, dot"
    assert trace[0].target_keywords == "yellow, lemon"


def test_threshold_drops_weak_links(tmp_path):
    clusters_csv, keywords_csv, acts = write_inputs(tmp_path)
    stage.run(Run(tmp_path), stage.Settings(threshold=0.7), text_embedder=BagOfWordsEmbedder())
    kept = {(r.source_layer, r.source_cluster) for r in read_trace(tmp_path / "06_trace.csv")}
    assert kept == {("a", 1), ("b", 0), ("b", 1)}


def test_a_link_exactly_at_the_threshold_is_kept():
    """THRESHOLD is the lowest cosine kept: a best match at exactly 0.5 stays, one a hair below
    goes. Vectors (1, 0) and (0.5, √0.75) have a cosine of exactly 0.5 in floating point; the
    largest float below 1 in place of the 1 gives the largest cosine below it."""
    cluster = lambda layer, i: stage.Cluster(layer, i, 1, [f"w{i}"])  # noqa: E731
    layers = {"a": [cluster("a", 0), cluster("a", 1)], "b": [cluster("b", 0)]}
    vectors = {("a", 0): np.array([1.0, 0.0]), ("a", 1): np.array([np.nextafter(1.0, 0.0), 0.0]),
               ("b", 0): np.array([0.5, np.sqrt(0.75)])}
    assert vectors[("a", 0)] @ vectors[("b", 0)] == 0.5
    assert vectors[("a", 1)] @ vectors[("b", 0)] == np.nextafter(0.5, 0.0)
    links = stage.best_links(layers, vectors, 0.5)
    assert [(link.source.key, link.target.key, link.similarity) for link in links] == \
        [(("a", 0), ("b", 0), 0.5)]


def test_follow_prints_and_highlights_the_path(tmp_path, monkeypatch, capsys):
    clusters_csv, keywords_csv, _ = write_inputs(tmp_path, order=None)
    module = types.ModuleType("common.embedders")
    module.load_text_embedder = lambda name=None, device="auto": BagOfWordsEmbedder()
    monkeypatch.setitem(sys.modules, "common.embedders", module)
    stage.main(["--run", str(tmp_path), "--follow", "lemon"])
    printed = capsys.readouterr().out
    assert "best path for 'lemon'" in printed
    meta = read_json(tmp_path / "06_trace.meta.json")
    # without 01_activations.npz the order is that of 05_clusters.csv: c, a, b
    assert [(s["layer"], s["cluster"]) for s in meta["followed"]] == [("c", 0), ("a", 0), ("b", 1)]
    assert "lemon, fruit, yellow" in printed
    page = (tmp_path / "06_sankey.html").read_text()
    assert page.count(stage.PATH_RED) >= 1  # the red of the path is in the figure


def test_follow_path_is_the_optimum_of_all_paths():
    emb = BagOfWordsEmbedder()
    layers = {name: [stage.Cluster(name, c, 1, words) for c, words in CLUSTERS[name].items()]
              for name in ("a", "b", "c")}
    vectors = stage.embed_clusters(layers, emb, 5)
    query = emb.encode(["yellow lemon"])[0]
    path = stage.follow_concept(query, layers, vectors)

    def score(keys):
        """Path score by brute force: query relevance plus consecutive similarity."""
        vs = [vectors[k] for k in keys]
        return sum(v @ query for v in vs) + sum(a @ b for a, b in zip(vs, vs[1:]))

    every = [((("a", i)), ("b", j), ("c", k)) for i in range(3) for j in range(3) for k in range(2)]
    best = max(every, key=score)
    assert [s["cluster"].key for s in path] == list(best) == [("a", 0), ("b", 1), ("c", 0)]
    assert np.isnan(path[0]["link_similarity"]) and path[1]["link_similarity"] > 0.4


def test_sankey_html_is_self_contained_and_escaped(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    clusters = {evil: {0: ["yellow", "dot"]}, "b": {0: ["yellow", "lemon"]}}
    clusters_csv, keywords_csv, _ = write_inputs(tmp_path, clusters=clusters, order=None)
    stage.run(Run(tmp_path), stage.Settings(threshold=0.3, follow="yellow"),
              text_embedder=BagOfWordsEmbedder())
    page = (tmp_path / "06_sankey.html").read_text()
    assert "<img src=x" not in page
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js is inlined, not fetched
    assert "Plotly.newPlot" in page and len(page) > 1_000_000
    layers = stage.load_clusters(clusters_csv, keywords_csv, "fused", [])
    vectors = stage.embed_clusters(layers, BagOfWordsEmbedder(), 5)
    links = stage.best_links(layers, vectors, 0.3)
    fig, _, _ = stage.build_figure(layers, links, [], 5, "t")
    assert fig.layout.annotations[0].text == "<b>&lt;img src=x onerror=alert(1)&gt;</b>"
    assert list(fig.data[0].node.label)[0] == "#0: yellow, dot"
    assert (tmp_path / "06_sankey.png").stat().st_size > 5000


def test_single_layer_and_cluster_without_keywords(tmp_path):
    clusters_csv, keywords_csv, _ = write_inputs(tmp_path, clusters={"a": CLUSTERS["a"]},
                                                 order=None, empty={("a", 2)})
    stage.run(Run(tmp_path), stage.Settings(follow="black stripe"),
              text_embedder=BagOfWordsEmbedder())
    assert read_trace(tmp_path / "06_trace.csv") == []
    assert (tmp_path / "06_trace.csv").read_text() == ",".join(columns(TraceLink)) + "\n"
    assert (tmp_path / "06_sankey.html").exists() and (tmp_path / "06_sankey.png").exists()
    meta = read_json(tmp_path / "06_trace.meta.json")
    assert [s["cluster"] for s in meta["followed"]] == [1]
    assert meta["followed"][0]["query_similarity"] == pytest.approx(1.0)


def test_missing_inputs_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        stage.main(["--run", str(tmp_path)])
    assert exc.value.code == 2
    assert "run 05_cluster first" in capsys.readouterr().err


def long_label_layers(n_layers, per_layer=4):
    """``n_layers`` layers of clusters whose keywords fill a label to its cut, all linked."""
    words = ["yellowish", "stripes", "wheels", "textures"]
    return {f"layer{i}": [stage.Cluster(f"layer{i}", c, 1, [f"{w}{c}{i}" for w in words])
                          for c in range(per_layer)] for i in range(n_layers)}


def test_png_labels_do_not_overlap_however_many_layers():
    for n_layers in (2, 5, 12):
        layers = long_label_layers(n_layers)
        names = list(layers)
        links = [stage.Link(a, b, 0.9) for n, m in zip(names, names[1:])
                 for a, b in zip(layers[n], layers[m])]
        pos = stage.layout(layers, links)
        fig = stage.png_figure(layers, links, pos, [], "t")
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts
                 if t.get_text().startswith("#")]
        assert len(boxes) == 4 * n_layers
        overlapping = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
        assert not overlapping, n_layers
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_html_columns_leave_room_for_their_labels():
    x, plot_px = stage.column_positions([10, 30, 20])
    gaps = [(b - a) * plot_px for a, b in zip(x, x[1:])]
    px = [n * stage.LABEL_CHAR_PX for n in (10, 30, 20)]
    assert x[0] == pytest.approx(0.001) and x[-1] == pytest.approx(0.999)  # spread edge to edge
    assert gaps[0] >= px[0]
    assert gaps[1] >= px[1] + px[2]  # the last column's labels sit on the left of its nodes
    assert stage.column_positions([25]) == ([0.5], 0)
    layers = long_label_layers(3)
    fig, _, _ = stage.build_figure(layers, [], [{"cluster": cs[0], "link_similarity": 0.9}
                                                for cs in layers.values()], 5, "t")
    assert [a.text for a in fig.layout.annotations] == [f"<b>{n}</b>" for n in layers]
    assert fig.layout.width > plot_px  # the page is as wide as its labels need


# --- the trace by connections -----------------------------------------------------------------


def test_connection_strength_is_weight_times_mean_activation():
    """On the fake CNN, conv2 is a 1×1 convolution of pool with hand-set weights W (conv2's
    channel 0 copies pool's red channel 0; its channel 1 sums the edge channels 1 and 2). With
    y_j the spatial mean of conv2's channel j, ∂y_j/∂pool_i = W[j, i] / cells at every cell, so
    activation × gradient summed over the cells is W[j, i] · mean(pool_i): exactly, by hand."""
    import torch
    from common.attribution import connection_strengths
    from fake_model import FakeNet
    model = FakeNet().eval()
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    got = connection_strengths(model, ["pool", "conv2"], images)[("pool", "conv2")]
    with torch.no_grad():
        pooled = model.pool(model.relu1(model.conv1(images)))
    weight = model.conv2.weight[:, :, 0, 0].detach().double().numpy()  # 2 × 4
    expected = weight.T * pooled.mean((2, 3)).sum(0).double().numpy()[:, None]
    assert got.shape == (4, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert got[0, 0] > 0 and got[3, 0] == 0 and got[0, 1] == 0  # the wiring, and nothing else
    # layers asked in any order are paired in the order they run
    assert list(connection_strengths(model, ["conv2", "pool"], images)) == [("pool", "conv2")]


def test_vit_connections_equal_a_finite_difference():
    """On a tiny ViT (token outputs: class token + 4 × 4 patches), Σ a_i · ∂y_j/∂a_i is the
    derivative of y_j (the later block's channel j averaged over its patch tokens) when channel i
    of the earlier block is scaled by (1 + ε) in every token: measured here without autograd, by
    a central difference of two forward passes (float64), for every i and j."""
    import torch
    from common.attribution import connection_strengths
    from test_transformers import tiny_vit
    model = tiny_vit().double().eval()
    a, b = "encoder.layers.encoder_layer_0.mlp", "encoder.layers.encoder_layer_1.mlp"
    modules = dict(model.named_modules())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    got = connection_strengths(model, [a, b], images)[(a, b)]
    kept, eps = {}, 1e-5

    def later_means(channel: int, scale: float) -> np.ndarray:
        """y (images × channels of b) with channel ``channel`` of a scaled by ``scale``."""
        def scaled(_m, _i, out):
            out = out.clone()
            out[..., channel] *= scale
            return out
        handles = [modules[a].register_forward_hook(scaled),
                   modules[b].register_forward_hook(lambda _m, _i, out: kept.update(b=out))]
        with torch.no_grad():
            model(images)
        for h in handles:
            h.remove()
        return kept["b"][:, 1:].mean(1).sum(0).numpy()

    expected = np.stack([(later_means(i, 1 + eps) - later_means(i, 1 - eps)) / (2 * eps)
                         for i in range(got.shape[0])])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert np.abs(got).max() > 1e-3


def test_planted_link_ranks_first_and_round_trips(tmp_path):
    """06_connections.npz read back lists a neuron's planted strongest input and output first."""
    from common.artefacts import read_connections, write_connections
    first = np.full((3, 4), 0.1)
    first[2, 1] = 5.0  # a2 drives b1 most
    second = np.full((4, 2), 0.2)
    second[1, 0] = -3.0  # b1 holds c0 back: strong, by absolute value
    write_connections(tmp_path / "06_connections.npz", ["a", "b", "c"],
                      {"a": first, "b": second}, 7, "mean")
    got = read_connections(tmp_path / "06_connections.npz")
    assert got.layers == ["a", "b", "c"] and got.n_images == 7 and got.aggregate == "mean"
    near = got.strongest("b", 1, 2)
    assert near["inputs"][0] == ("a", 2, 5.0)
    assert near["outputs"][0] == ("c", 0, -3.0)
    assert got.strongest("a", 0, 3)["inputs"] == [] and got.strongest("c", 0, 3)["outputs"] == []


def test_connection_trace_links_planted_clusters():
    """Two layers of two clusters each, wired crosswise (a's cluster 0 drives b's cluster 1 and
    a's cluster 1 drives b's cluster 0): the trace by connections follows the wiring, whatever
    the keywords say. Strength = the pair's share of the positive drive over its share of the
    neuron pairs, computed by hand below; a link under the threshold is dropped."""
    from common.artefacts import Connections
    a = [stage.Cluster("a", 0, 2, ["red"], [0, 1]), stage.Cluster("a", 1, 2, ["stripe"], [2, 3])]
    b = [stage.Cluster("b", 0, 1, ["zebra"], [0]), stage.Cluster("b", 1, 2, ["apple"], [1, 2])]
    matrix = np.zeros((4, 3))
    matrix[np.ix_([0, 1], [1, 2])] = 1.0  # red → apple
    matrix[np.ix_([2, 3], [0])] = 2.0  # stripe → zebra
    matrix[0, 0] = -9.0  # inhibition is no drive
    wiring = Connections(layers=["a", "b"], to_next={"a": matrix}, n_images=1, aggregate="mean")
    links = stage.connection_links({"a": a, "b": b}, wiring, 1.5)
    assert [(link.source.key, link.target.key) for link in links] == \
        [(("a", 0), ("b", 1)), (("a", 1), ("b", 0))]
    # red → apple: 4 of the drive 8, over 4 of 12 pairs: (4 / 8) / (4 / 12) = 1.5
    assert links[0].similarity == pytest.approx(1.5)
    assert links[1].similarity == pytest.approx((4 / 8) / (2 / 12))
    assert [link.source.key for link in stage.connection_links({"a": a, "b": b}, wiring, 2.0)] \
        == [("a", 1)]


def test_a_target_layer_wider_than_its_source_keeps_its_clusters_and_unknown_channels_are_left_out():
    """Connections from a layer of 2 neurons into one of 4 (a 2 × 4 matrix): the target cluster
    on channels 2-3 exists in the matrix and takes the whole drive, strength (4 / 4) / (4 / 8)
    = 2, by hand; clusters naming a channel past the matrix's side (source 2, target 4) are left
    out instead of failing, wherever past it they are."""
    from common.artefacts import Connections
    a = [stage.Cluster("a", 0, 2, ["red"], [0, 1]), stage.Cluster("a", 1, 1, ["old"], [2])]
    b = [stage.Cluster("b", 0, 2, ["zebra"], [0, 1]), stage.Cluster("b", 1, 2, ["apple"], [2, 3]),
         stage.Cluster("b", 2, 1, ["stale"], [4]), stage.Cluster("b", 3, 2, ["older"], [5, 7])]
    matrix = np.zeros((2, 4))
    matrix[:, [2, 3]] = 1.0
    wiring = Connections(layers=["a", "b"], to_next={"a": matrix}, n_images=1, aggregate="mean")
    links = stage.connection_links({"a": a, "b": b}, wiring, 0.0)
    assert [(link.source.key, link.target.key) for link in links] == [(("a", 0), ("b", 1))]
    assert links[0].similarity == pytest.approx(2.0)


def test_connections_to_a_layer_that_is_not_the_next_clustered_one_link_nothing():
    """06 measured connections a → m, but m has no clusters, so the next clustered layer is c: the
    a → m matrix says nothing about c and no link is drawn (whatever the layers' names)."""
    from common.artefacts import Connections
    a = [stage.Cluster("a", 0, 2, ["red"], [0, 1])]
    c = [stage.Cluster("c", 0, 2, ["apple"], [0, 1])]
    wiring = Connections(layers=["a", "m", "c"], to_next={"a": np.ones((2, 2)), "m": np.ones((2, 2))},
                         n_images=1, aggregate="mean")
    assert stage.connection_links({"a": a, "c": c}, wiring, 0.0) == []
    renamed = Connections(layers=["a", "z", "c"], to_next={"a": np.ones((2, 2)), "z": np.ones((2, 2))},
                          n_images=1, aggregate="mean")
    assert stage.connection_links({"a": a, "c": c}, renamed, 0.0) == []
    before = Connections(layers=["a", "b", "c"], to_next={"a": np.ones((2, 2)), "b": np.ones((2, 2))},
                         n_images=1, aggregate="mean")  # measured into b, named before c
    assert stage.connection_links({"a": a, "c": c}, before, 0.0) == []


def test_connection_link_p_value_is_the_share_of_random_clusterings_that_do_as_well():
    """The p-value of a link by connections against every relabelling of a tiny layer: six
    neurons in clusters of 2, 2 and 2 have 90 labellings, enumerated here; the p-value of 999
    seeded draws must be the exact share within sampling error (binomial sd ≤ 0.016), and a
    seed gives the same p-values every time."""
    import itertools
    from common.artefacts import Connections
    rng = np.random.default_rng(3)
    matrix = rng.gamma(1.0, size=(6, 4))
    matrix[np.ix_([0, 1], [0, 1])] += 1.5  # cluster 0 drives b's cluster 0 somewhat
    a = [stage.Cluster("a", k, 2, [f"w{k}"], [2 * k, 2 * k + 1]) for k in range(3)]
    b = [stage.Cluster("b", 0, 2, ["x"], [0, 1]), stage.Cluster("b", 1, 2, ["y"], [2, 3])]
    wiring = Connections(layers=["a", "b"], to_next={"a": matrix}, n_images=1, aggregate="mean")
    links = stage.connection_links({"a": a, "b": b}, wiring, 0.0, seed=5)
    assert len(links) == 3

    def best_lifts(owner):
        into = np.stack([matrix[:, [0, 1]].sum(1), matrix[:, [2, 3]].sum(1)], axis=1)
        summed = np.array([into[owner == k].sum(0) for k in range(3)])
        return (summed / matrix.sum() / (4 / 24)).max(1)

    observed = best_lifts(np.array([0, 0, 1, 1, 2, 2]))
    labellings = {perm for perm in itertools.permutations([0, 0, 1, 1, 2, 2])}
    assert len(labellings) == 90
    everyone = np.array([best_lifts(np.array(perm)) for perm in labellings])
    for k, link in enumerate(links):
        assert link.similarity == pytest.approx(observed[k])
        exact = float(np.mean(everyone[:, k] >= observed[k] - 1e-12))
        assert link.p_value == pytest.approx(exact, abs=0.05)
    assert [link.p_value for link in stage.connection_links({"a": a, "b": b}, wiring, 0.0, seed=5)] \
        == [link.p_value for link in links]


def test_planted_wiring_is_significant_and_random_wiring_mostly_is_not():
    """Clusters of 8 neurons whose wiring is planted get the smallest p-value (1 / 1000); on
    twenty layers of random wiring the share of links with p ≤ 0.05 stays near 5 % (≤ 20 %), and
    those links are the ones drawn faint (``weak``)."""
    from common.artefacts import Connections
    rng = np.random.default_rng(0)
    a = [stage.Cluster("a", k, 8, [f"w{k}"], list(range(8 * k, 8 * k + 8))) for k in range(3)]
    b = [stage.Cluster("b", k, 8, [f"v{k}"], list(range(8 * k, 8 * k + 8))) for k in range(3)]
    planted = rng.gamma(1.0, size=(24, 24))
    for k in range(3):
        planted[8 * k:8 * k + 8, 8 * ((k + 1) % 3):8 * ((k + 1) % 3) + 8] += 2.0
    wiring = Connections(layers=["a", "b"], to_next={"a": planted}, n_images=1, aggregate="mean")
    links = stage.connection_links({"a": a, "b": b}, wiring, 1.0)
    assert [(link.source.cluster, link.target.cluster) for link in links] == [(0, 1), (1, 2), (2, 0)]
    assert all(link.p_value == pytest.approx(1 / 1000) and not link.weak for link in links)
    small = []
    for trial in range(20):
        noise = rng.gamma(1.0, size=(24, 24))
        wiring = Connections(layers=["a", "b"], to_next={"a": noise}, n_images=1, aggregate="mean")
        for link in stage.connection_links({"a": a, "b": b}, wiring, 0.0, seed=trial):
            small.append(link.p_value <= 0.05)
            assert link.weak == (link.p_value > 0.05)
    assert len(small) == 60 and np.mean(small) <= 0.2


def test_follow_matches_a_brute_force_search_on_random_layers():
    """On 30 random sets of three layers (unit vectors in 4-d), the followed path is the one of
    highest Σ query cosine + Σ consecutive cosine among all paths, and each step's link similarity
    is the cosine with the previous step's cluster."""
    import itertools
    rng = np.random.default_rng(4)
    for _ in range(30):
        layers = {name: [stage.Cluster(name, c, 1, []) for c in range(n)]
                  for name, n in (("a", 3), ("b", 4), ("c", 2))}
        vectors = {}
        for cs in layers.values():
            for c in cs:
                v = rng.normal(size=4)
                vectors[c.key] = v / np.linalg.norm(v)
        query = rng.normal(size=4)
        query /= np.linalg.norm(query)
        path = stage.follow_concept(query, layers, vectors)
        keys = [s["cluster"].key for s in path]

        def score(ks):
            """Query relevance plus consecutive similarity of one path."""
            vs = [vectors[k] for k in ks]
            return sum(v @ query for v in vs) + sum(x @ y for x, y in zip(vs, vs[1:]))
        every = itertools.product(*[[c.key for c in cs] for cs in layers.values()])
        assert score(keys) == pytest.approx(max(score(ks) for ks in every))
        for step in (1, 2):
            assert path[step]["link_similarity"] == pytest.approx(
                vectors[keys[step - 1]] @ vectors[keys[step]])
            assert path[step]["query_similarity"] == pytest.approx(vectors[keys[step]] @ query)


def test_column_positions_by_hand():
    """Four columns of 10, 30, 20 and 8 characters: each gap is its column's label (7.5 px a
    character + 40 px), the last gap also the last column's label; x spreads 0.001..0.999 in
    proportion."""
    px = [10 * 7.5 + 40, 30 * 7.5 + 40, 20 * 7.5 + 40, 8 * 7.5 + 40]
    gaps = [px[0], px[1], px[2] + px[3]]
    total = sum(gaps)
    x, width = stage.column_positions([10, 30, 20, 8])
    assert width == int(total) == 670  # 115 + 265 + (190 + 100)
    assert x == pytest.approx([0.001, 0.001 + 0.998 * gaps[0] / total,
                               0.001 + 0.998 * (gaps[0] + gaps[1]) / total, 0.999])
    assert stage.column_positions([]) == ([], 0)


def test_clusters_with_no_drive_between_them_link_nothing_without_a_warning():
    """A layer whose clustered neurons do not drive the next layer's at all (all weights 0, or
    only inhibitory ones, which 06 clips to 0) links nothing even at threshold 0, and quietly:
    no strength is computed from a total drive of 0 (no division by zero in the user's log)."""
    import warnings
    from common.artefacts import Connections
    a = [stage.Cluster("a", 0, 2, ["red"], [0, 1]), stage.Cluster("a", 1, 1, ["blue"], [2])]
    b = [stage.Cluster("b", 0, 2, ["apple"], [0, 1])]
    for weights in (np.zeros((3, 2)), -np.ones((3, 2))):
        wiring = Connections(layers=["a", "b"], to_next={"a": weights}, n_images=1,
                             aggregate="mean")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert stage.connection_links({"a": a, "b": b}, wiring, 0.0, permutations=9) == []
