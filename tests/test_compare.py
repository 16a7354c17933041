"""Stage 12 (compare two runs): a run compared with itself matches neuron to neuron, a copy with
its channels shuffled is matched back, and a concept only one run has is reported as such.

The runs are written here: 04 embeddings of planted unit vectors (one direction per neuron),
05 clusters, 03 sentences and 09 summaries, each artefact (but 03's) with its stage's meta.
"""
import numpy as np
import pytest

from common.artefacts import Run, SummaryRow, columns
from common.compare import alignment_matrix, best_matches
from common.io import save_npz, write_csv
from common.provenance import write_meta
from conftest import load_stage

stage = load_stage("12_compare")

LAYERS = {"early": 6, "deep": 8}


def planted_vectors(seed=0, dim=32):
    """Per layer, one random unit vector per neuron (distinct with probability 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer, n in LAYERS.items():
        v = rng.normal(size=(n, dim))
        out[layer] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def write_run(folder, vectors, clusters, text_model="words"):
    """A run folder with 03, 04, 05 and 09 files for ``vectors`` ({layer: n × d}) and
    ``clusters`` ({layer: label per neuron})."""
    folder.mkdir(parents=True)
    layer = np.concatenate([[name] * len(v) for name, v in vectors.items()])
    channel = np.concatenate([np.arange(len(v)) for v in vectors.values()])
    stacked = np.concatenate(list(vectors.values())).astype(np.float32)
    save_npz(folder / "04_embeddings.npz", {
        "layer": layer, "channel": channel, "text": stacked, "image": stacked, "fused": stacked,
        "text_model": np.array(text_model), "image_model": np.array("img"),
        "fusion": np.array("test")})
    write_meta(folder / "04_embed.meta.json", "04_embed", {}, [folder / "04_embeddings.npz"])
    write_csv(folder / "03_descriptions.csv",
              [{"layer": ly, "channel": c, "level": 1, "description": f"{ly} neuron {c}",
                "backend": "test", "model": "test", "status": "ok"}
               for ly, c in zip(layer, channel)],
              ["layer", "channel", "level", "description", "backend", "model", "status", "reason"])
    write_csv(folder / "05_clusters.csv",
              [{"layer": ly, "channel": c, "kind": "fused", "cluster": clusters[ly][c], "x": 0,
                "y": 0} for ly, c in zip(layer, channel)],
              ["layer", "channel", "kind", "cluster", "x", "y"])
    write_meta(folder / "05_cluster.meta.json", "05_cluster", {}, [folder / "05_clusters.csv"])
    write_csv(folder / "09_summary.csv",
              [{"layer": ly, "neurons": len(v), "dead": 0, "mean_clarity": 0.5}
               for ly, v in vectors.items()], columns(SummaryRow))
    write_meta(folder / "09_score.meta.json", "09_score", {}, [folder / "09_summary.csv"])


def clusters_of(vectors):
    """Two clusters per layer: the first half of its neurons and the second."""
    return {ly: [int(i >= len(v) // 2) for i in range(len(v))] for ly, v in vectors.items()}


def test_best_matches_and_alignment_by_hand():
    """Cosines and the mean best match computed by hand on 2-d vectors."""
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 1.0], [0.0, -1.0], [3.0, 0.1]])
    best, cos = best_matches(a, b)
    assert best.tolist() == [2, 0]
    assert cos[1] == pytest.approx(1 / np.sqrt(2))
    assert cos[0] == pytest.approx(3 / np.hypot(3, 0.1))
    m = alignment_matrix({"x": a}, {"y": b})
    assert m[0, 0] == pytest.approx((cos[0] + cos[1]) / 2)


def test_a_match_is_mutual_only_when_each_neuron_is_the_others_best():
    """By hand on 2-d vectors: A's neurons (1, 0) and (0.6, 0.8) both match B's single neuron
    (0.8, 0.6), whose own best match in A is (0.6, 0.8) (cosine 0.96 against 0.8): only that
    pair is mutual."""
    from types import SimpleNamespace
    a = SimpleNamespace(vectors={"L": np.array([[1.0, 0.0], [0.6, 0.8]])}, channels={"L": [0, 1]},
                        sentences={})
    b = SimpleNamespace(vectors={"M": np.array([[0.8, 0.6]])}, channels={"M": [0]}, sentences={})
    rows = stage.neuron_matches(a, b)
    assert [(r["side"], r["channel"], r["match_layer"], r["match_channel"], r["mutual"])
            for r in rows] == [("A", 0, "M", 0, 0), ("A", 1, "M", 0, 1), ("B", 0, "L", 1, 1)]
    assert [r["cosine"] for r in rows] == [0.8, 0.96, 0.96]


def test_a_run_compared_with_itself_matches_neuron_to_neuron(tmp_path):
    """Every neuron's best match is itself, mutual, at cosine 1; the alignment matrix has 1 on its
    diagonal and less elsewhere; every concept has its counterpart."""
    vectors = planted_vectors()
    write_run(tmp_path / "a", vectors, clusters_of(vectors))
    result = stage.run(Run(tmp_path / "a"), Run(tmp_path / "a"))
    for r in result["matches"]:
        assert (r["match_layer"], r["match_channel"]) == (r["layer"], r["channel"])
        assert r["mutual"] == 1 and r["cosine"] == pytest.approx(1.0)
    ab = result["a_to_b"]
    assert np.allclose(np.diag(ab), 1.0) and ab[0, 1] < 1 and ab[1, 0] < 1
    assert all(r["counterpart"] == 1 for r in result["concepts"])
    for name in ("12_matches.csv", "12_alignment.csv", "12_alignment.png", "12_concepts.csv",
                 "12_scores.csv", "12_report.md", "12_compare.meta.json"):
        assert (tmp_path / "a" / "12_compare__a" / name).is_file()
    report = (tmp_path / "a" / "12_compare__a" / "12_report.md").read_text()
    assert "matched to the same layer and channel 14" in report


def test_a_channel_permuted_copy_is_matched_back(tmp_path):
    """B holds A's neurons with the channels of each layer shuffled (B's channel c is A's
    perm[c]) and a little noise: every A neuron is matched to the B channel that carries it."""
    vectors = planted_vectors()
    rng = np.random.default_rng(3)
    perms = {ly: rng.permutation(len(v)) for ly, v in vectors.items()}
    shuffled = {ly: v[perms[ly]] + 0.01 * rng.normal(size=v.shape) for ly, v in vectors.items()}
    write_run(tmp_path / "a", vectors, clusters_of(vectors))
    write_run(tmp_path / "b", shuffled, clusters_of(shuffled))
    result = stage.run(Run(tmp_path / "a"), Run(tmp_path / "b"))
    for r in result["matches"]:
        if r["side"] == "A":
            assert r["match_layer"] == r["layer"]
            assert perms[r["layer"]][r["match_channel"]] == r["channel"]
            assert r["mutual"] == 1


def test_a_concept_only_one_run_has_is_reported(tmp_path):
    """Both runs hold the same neurons, none using axis 0; A's 'deep' layer has two more neurons
    on axis 0 forming a third concept: it (and only it) has no counterpart in B (cosine 0)."""
    vectors = planted_vectors()
    shared = {}
    for ly, v in vectors.items():
        v = v.copy()
        v[:, 0] = 0
        shared[ly] = v / np.linalg.norm(v, axis=1, keepdims=True)
    extra = np.zeros((2, 32))
    extra[:, 0] = 1.0
    a_vectors = dict(shared, deep=np.concatenate([shared["deep"], extra]))
    a_clusters = clusters_of(vectors)
    a_clusters["deep"] = a_clusters["deep"] + [2, 2]
    write_run(tmp_path / "a", a_vectors, a_clusters)
    write_run(tmp_path / "b", shared, clusters_of(vectors))
    result = stage.run(Run(tmp_path / "a"), Run(tmp_path / "b"))
    alone = [(r["side"], r["layer"], r["cluster"], r["cosine"]) for r in result["concepts"]
             if not r["counterpart"]]
    assert len(alone) == 1 and alone[0][:3] == ("A", "deep", 2)
    assert alone[0][3] == pytest.approx(0.0, abs=1e-6)
    assert sum(r["side"] == "B" for r in result["concepts"]) == 4


def test_runs_embedded_differently_are_refused(tmp_path, capsys):
    """Vectors from different embedders are not comparable: a clear error names both."""
    vectors = planted_vectors()
    write_run(tmp_path / "a", vectors, clusters_of(vectors))
    write_run(tmp_path / "b", vectors, clusters_of(vectors), text_model="other")
    with pytest.raises(SystemExit):
        stage.main(["--run", str(tmp_path / "a"), "--other", str(tmp_path / "b")])
    assert "embedded differently" in capsys.readouterr().err


def concept_run(layers, clusters, sentences, keywords=None):
    """The parts of 12's RunVectors that concepts are compared by, written by hand: ``layers``
    maps a layer to (channels, vectors), ``clusters`` a (layer, channel) to its cluster."""
    import types
    return types.SimpleNamespace(
        vectors={ly: np.asarray(v, float) for ly, (_, v) in layers.items()},
        channels={ly: np.asarray(c) for ly, (c, _) in layers.items()},
        clusters=[types.SimpleNamespace(layer=ly, channel=c, cluster=k)
                  for (ly, c), k in clusters.items()],
        sentences=sentences, keywords=keywords or {})


def test_concepts_by_hand_with_interleaved_clusters_and_a_threshold_met_exactly():
    """A's layer l has clusters 5 (channels 10 and 12, centroid (1, 0)) and 2 (11 and 13, (0, 1))
    interleaved, plus a clustered channel without a vector (left out); its layer k, with the same
    channel numbers, one cluster (1, 0). B has (1, 0) and (1, 2)/√5. Each concept gets its size
    (of its own layer), the sentence of its first member and five keywords; a cosine equal to the
    threshold is a counterpart; ties go to the first concept."""
    a = concept_run({"k": ([10, 11], [[1, 0], [3, 0]]),
                     "l": ([10, 11, 12, 13], [[2, 0], [0, 3], [4, 0], [0, 1]])},
                    {("k", 10): 0, ("k", 11): 0, ("l", 10): 5, ("l", 11): 2, ("l", 12): 5,
                     ("l", 13): 2, ("l", 99): 2},
                    {**{("l", c): f"sentence {c}" for c in (10, 11, 12, 13)}, ("k", 10): "k ten"},
                    {("l", 5): list("abcdef")})
    b = concept_run({"m": ([0, 1], [[5, 0], [1, 2]])}, {("m", 0): 0, ("m", 1): 1},
                    {("m", 0): "b zero", ("m", 1): "b one"})
    rows = stage.concept_rows(a, b, "fused", threshold=1.0)
    got = [(r["side"], r["layer"], r["cluster"], r["size"], r["match_layer"], r["match_cluster"],
            r["cosine"], r["counterpart"], r["keywords"], r["example"]) for r in rows]
    assert got == [
        ("A", "k", 0, 2, "m", 0, 1.0, 1, "", "k ten"),
        ("A", "l", 2, 2, "m", 1, round(2 / np.sqrt(5), 4), 0, "", "sentence 11"),
        ("A", "l", 5, 2, "m", 0, 1.0, 1, "a b c d e", "sentence 10"),
        ("B", "m", 0, 1, "k", 0, 1.0, 1, "", "b zero"),
        ("B", "m", 1, 1, "l", 2, round(2 / np.sqrt(5), 4), 0, "", "b one")]
    lonely = concept_run({"m": ([0], [[1, 0]])}, {}, {})
    assert stage.concept_rows(a, lonely, "fused", 0.9) == []  # B has no clusters: nothing to match


def test_alignment_with_an_empty_layer_is_undefined_either_way():
    """A layer without vectors has no best matches: its cells of the alignment matrix are NaN,
    whether it is A's layer or B's."""
    a, empty = np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros((0, 2))
    m = alignment_matrix({"x": a, "e": empty}, {"y": a, "f": empty})
    assert m[0, 0] == pytest.approx(1.0)
    assert np.isnan(m[0, 1]) and np.isnan(m[1, 0]) and np.isnan(m[1, 1])
