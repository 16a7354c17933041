"""Stage 07: ranking with known answers, the baseline, image queries, interactive mode, and
HTML escaping.

The embedders are fakes whose vectors can be worked out on paper: the text one is a normalised
bag of words over a tiny vocabulary, the image one the normalised mean colour.
"""
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from common.cli import StageError
from common.artefacts import (Description, Embeddings, Mosaic, Run, ScoreRow, columns,
                              write_embeddings)
from common.io import read_csv, write_csv
from common.provenance import read_meta, write_meta
from common.search import NeuronIndex
from conftest import load_stage


search = load_stage("07_search")

VOCAB = ["dog", "ball", "cat", "stripes", "red", "picture", "various", "things"]
BASELINE = "picture various things"


class BagOfWords:
    """Fake text embedder: counts of VOCAB words, L2-normalised (unknown words are ignored)."""

    name = "fake-bow"
    space_id = "text:fake-bow"
    dim = len(VOCAB)

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                if word in VOCAB:
                    out[i, VOCAB.index(word)] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)


class MeanColour:
    """Fake image embedder: the image's mean RGB, L2-normalised."""

    name = "fake-colour"
    space_id = "cnn:fake-colour"
    dim = 3

    def encode(self, images):
        out = np.stack([np.asarray(im.convert("RGB"), np.float32).mean(axis=(0, 1))
                        for im in images])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


# (layer, channel, description, image colour)
NEURONS = [
    ("L1", 0, "dog ball", (255, 0, 0)),
    ("L1", 1, "cat", (0, 255, 0)),
    ("L2", 0, "red stripes", (0, 0, 255)),
    ("L2", 1, "dog picture various things", (128, 128, 0)),  # generic, mentions a dog
    ("L2", 2, "dog", (0, 128, 128)),
    ("L2", 3, "", (128, 0, 128)),  # description failed: zero text vector
]


def make_run(tmp_path, descriptions=None, image_model="fake-colour"):
    """A run folder with 02/03/04 artefacts (and metas) for NEURONS."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    descriptions = descriptions or [n[2] for n in NEURONS]
    bow = BagOfWords()
    colours = MeanColour()
    text = bow.encode(descriptions)
    image = colours.encode([Image.new("RGB", (4, 4), n[3]) for n in NEURONS])
    write_embeddings(run_dir / "04_embeddings.npz", Embeddings(
        layer=np.array([n[0] for n in NEURONS]), channel=np.array([n[1] for n in NEURONS]),
        text=text, image=image, fused=np.concatenate([text, image], axis=1),
        text_model="fake-bow", image_model=image_model, fusion="concat"))
    mosaic_rows = []
    for layer, ch, _, colour in NEURONS:
        rel = f"02_mosaics/{layer}/{ch}.png"
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(run_dir / rel)
        mosaic_rows.append({"layer": layer, "channel": ch, "path": rel, "n_tiles": 1, "grid": 1,
                            "tile_px": 8, "crop": "rf"})
    write_csv(run_dir / "02_mosaics.csv", mosaic_rows, columns(Mosaic))
    desc_rows = [{"layer": n[0], "channel": n[1], "level": 1, "description": d,
                  "backend": "fake", "model": "fake", "status": "ok" if d else "failed",
                  "reason": "" if d else "no answer"} for n, d in zip(NEURONS, descriptions)]
    write_csv(run_dir / "03_descriptions.csv", desc_rows, columns(Description))
    m2 = write_meta(run_dir / "02_mosaics.meta.json", "02_mosaics", {},
                    [run_dir / "02_mosaics.csv"])
    m3 = write_meta(run_dir / "03_describe.meta.json", "03_describe", {},
                    [run_dir / "03_descriptions.csv"], inputs=[m2])
    write_meta(run_dir / "04_embed.meta.json", "04_embed", {}, [run_dir / "04_embeddings.npz"],
               inputs=[m3])
    return run_dir


def find(run_dir, queries, **kwargs):
    """Stage 07's run on ``run_dir`` with output to a string buffer unless ``stdout`` is given;
    the keywords that are fields of its Settings go there (``layers`` as a list)."""
    kwargs.setdefault("stdout", io.StringIO())
    fields = {f.name for f in dataclasses.fields(search.Settings)}
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    if isinstance(settings.get("layers"), list):
        settings["layers"] = ",".join(settings["layers"])
    return search.run(Run(run_dir), queries, search.Settings(**settings), **kwargs)


def ranked(rows, query):
    """(layer, channel) of the hits of ``query`` in rank order."""
    return [(r["layer"], int(r["channel"])) for r in rows if r["query"] == query]


def test_text_ranking_known_answers(tmp_path):
    # "cat" matches only L1/1 (cosine 1); "dog ball" is exactly L1/0's description.
    run_dir = make_run(tmp_path)
    out = io.StringIO()
    rows = find(run_dir, ["cat", "dog ball"], top_k=3, scoring="cosine", text_embedder=BagOfWords(),
                stdout=out)
    assert ranked(rows, "cat")[0] == ("L1", 1)
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert ranked(rows, "dog ball")[0] == ("L1", 0)
    # L2/2 "dog" (cos 1/√2) beats L2/1 (cos 1/(√2·2)) for "dog ball".
    assert ranked(rows, "dog ball")[1:] == [("L2", 2), ("L2", 1)]
    assert ("L2", 3) not in ranked(rows, "cat") + ranked(rows, "dog ball")  # no description
    # nor when every neuron is asked for: it has no sentence to match
    every = find(run_dir, ["cat"], top_k=50, scoring="cosine", text_embedder=BagOfWords())
    assert ("L2", 3) not in ranked(every, "cat") and ("L2", 2) in ranked(every, "cat")
    printed = out.getvalue()
    assert printed.index("== cat") < printed.index("== dog ball")
    assert "02_mosaics/L1/1.png" in printed


def test_baseline_demotes_generic_neuron(tmp_path):
    # Query "dog picture things": raw cosine puts the generic L2/1 first (0.866 vs 0.577 for L2/2);
    # subtracting the baseline's cosine (0.866 for L2/1, 0 for L2/2) puts the specific one first.
    run_dir = make_run(tmp_path)
    query = "dog picture things"
    raw = find(run_dir, [query], top_k=2, scoring="cosine", text_embedder=BagOfWords())
    adjusted = find(run_dir, [query], top_k=2, scoring="baseline", baseline=BASELINE,
                    text_embedder=BagOfWords())
    assert ranked(raw, query)[0] == ("L2", 1)
    assert ranked(adjusted, query)[0] == ("L2", 2)
    assert adjusted[0]["score"] == pytest.approx(1 / np.sqrt(3), abs=1e-3)
    assert adjusted[0]["cosine"] == adjusted[0]["score"]  # L2/2 shares nothing with the baseline


def test_layer_filter_and_unknown_layer(tmp_path):
    run_dir = make_run(tmp_path)
    rows = find(run_dir, ["dog ball"], top_k=5, layers=["L2"], scoring="cosine",
                text_embedder=BagOfWords())
    assert {layer for layer, _ in ranked(rows, "dog ball")} == {"L2"}
    assert ranked(rows, "dog ball")[0] == ("L2", 2)
    with pytest.raises(StageError, match="L9"):
        find(run_dir, ["dog"], layers=["L9"], text_embedder=BagOfWords())


def test_weak_matches_and_no_good_match(tmp_path):
    # "ball cat red" is (ball + cat + red) / √3: cosine 1/√3 = 0.577 with "cat" (L1/1) and
    # 1/√6 = 0.408 with "dog ball" (L1/0) and "red stripes" (L2/0).
    run_dir = make_run(tmp_path)
    query = "ball cat red"
    out = io.StringIO()
    rows = find(run_dir, [query], top_k=3, weak_below=0.5, text_embedder=BagOfWords(), stdout=out)
    assert [(r["layer"], r["channel"], r["weak"]) for r in rows] == [
        ("L1", 1, False), ("L1", 0, True), ("L2", 0, True)]
    assert rows[1]["cosine"] == pytest.approx(1 / np.sqrt(6), abs=1e-4)
    printed = out.getvalue()
    assert "no good match" not in printed
    assert printed.index("cat") < printed.index("-- weak matches") < printed.index("dog ball")
    out = io.StringIO()
    rows = find(run_dir, [query], top_k=3, weak_below=0.6, text_embedder=BagOfWords(), stdout=out)
    assert all(r["weak"] for r in rows)
    assert "no good match: the best cosine, 0.58, is below" in out.getvalue()
    # The live search's layer filter (07 --serve asks for it per query).
    from common.search import Searcher, load_index
    index = load_index(run_dir / "04_embeddings.npz", run_dir / "03_descriptions.csv",
                       run_dir / "02_mosaics.csv")
    hits = Searcher(index, BagOfWords(), weak_below=0.5).search_text(query, 3, layers=["L2"])
    assert [(h["layer"], h["channel"], h["weak"]) for h in hits][0] == ("L2", 0, True)
    assert {h["layer"] for h in hits} == {"L2"}


def test_a_cosine_exactly_on_the_weak_line_is_not_weak(tmp_path):
    """Weak means strictly below ``weak_below``: the query "dog" has cosine exactly 1 with the
    neuron described "dog" (L2/2), which stays a good match at weak_below 1.0, while "dog ball"
    (cosine 1/√2) is weak. Hits are ranked from 1."""
    from common.search import Searcher, load_index
    run_dir = make_run(tmp_path)
    index = load_index(run_dir / "04_embeddings.npz", run_dir / "03_descriptions.csv",
                       run_dir / "02_mosaics.csv")
    hits = Searcher(index, BagOfWords(), scoring="cosine", weak_below=1.0).search_text("dog", 2)
    assert [(h["rank"], h["layer"], h["channel"], h["cosine"], h["weak"]) for h in hits] == [
        (1, "L2", 2, 1.0, False), (2, "L1", 0, pytest.approx(np.sqrt(0.5), abs=1e-4), True)]


def test_text_embedder_of_another_space_is_refused(tmp_path):
    run_dir = make_run(tmp_path)
    other = BagOfWords()
    other.name, other.space_id = "other-model", "text:other-model"
    with pytest.raises(StageError, match="fake-bow"):
        find(run_dir, ["dog"], text_embedder=other)


def test_a_text_embedder_of_the_same_name_but_fewer_dimensions_is_refused(tmp_path):
    """An embedder that says it is the one 04 used but gives shorter vectors (a truncated or
    other version) is refused with the fix, not compared dimension by dimension."""
    run_dir = make_run(tmp_path)
    short = BagOfWords()
    short.dim -= 1
    with pytest.raises(StageError, match="re-run 04"):
        find(run_dir, ["dog"], text_embedder=short)


def test_embedder_names_recorded_by_04_are_loaded_back():
    assert search.loader_name("all-MiniLM-L6-v2", "text") == "all-MiniLM-L6-v2"
    assert search.loader_name("ViT-B/32", "text") == "clip:ViT-B/32"  # CLIP text tower
    assert search.loader_name("ViT-B/32", "image") == "clip:ViT-B/32"
    assert search.loader_name("efficientnet_lite0", "image") == "cnn"  # reference CNN feature
    # the kind as read from a file or built at run time (not the interned literal)
    assert search.loader_name("all-MiniLM-L6-v2", "".join(["te", "xt"])) == "all-MiniLM-L6-v2"


def test_image_query(tmp_path):
    run_dir = make_run(tmp_path)
    query = tmp_path / "green.png"
    Image.new("RGB", (16, 16), (10, 240, 10)).save(query)
    rows = find(run_dir, [], images=[str(query)], top_k=2, image_embedder=MeanColour())
    assert (rows[0]["layer"], rows[0]["channel"]) == ("L1", 1)  # the green neuron
    assert rows[0]["score"] == rows[0]["cosine"] > 0.99


def test_image_embedder_space_mismatch_is_refused(tmp_path):
    run_dir = make_run(tmp_path, image_model="clip:ViT-B/32")
    query = tmp_path / "q.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(query)
    with pytest.raises(StageError, match="clip:ViT-B/32"):
        find(run_dir, [], images=[str(query)], image_embedder=MeanColour())


def test_interactive_reads_stdin_until_eof(tmp_path, monkeypatch, capsys):
    # Drive main() as a user would: queries on stdin, the embedder loaded once for all of them.
    run_dir = make_run(tmp_path)
    fake = BagOfWords()
    loads = []

    def fake_loader(name=None, device="auto"):
        loads.append(name)
        return fake

    import common.embedders
    monkeypatch.setattr(common.embedders, "load_text_embedder", fake_loader)
    monkeypatch.setattr("sys.stdin", io.StringIO("cat\n\n  red stripes \ndog ball\n"))
    out_csv = tmp_path / "hits" / "hits.csv"
    search.main(["--run", str(run_dir), "--interactive", "--top-k", "1", "--csv", str(out_csv)])
    printed = capsys.readouterr().out
    assert [line[3:].split("   (")[0] for line in printed.splitlines() if line.startswith("== ")] \
        == ["cat", "red stripes", "dog ball"]
    assert loads == ["fake-bow"]
    rows = read_csv(out_csv)
    assert [(r["query"], r["layer"], r["channel"]) for r in rows] == [
        ("cat", "L1", "1"), ("red stripes", "L2", "0"), ("dog ball", "L1", "0")]
    assert (out_csv.parent / "07_search.meta.json").exists()


def test_html_escapes_model_text(tmp_path):
    evil = "<script>alert('x')</script> dog"
    descriptions = [n[2] for n in NEURONS]
    descriptions[4] = evil
    run_dir = make_run(tmp_path, descriptions=descriptions)
    page = tmp_path / "out" / "hits.html"
    find(run_dir, ["dog <b>"], top_k=3, html_path=page, text_embedder=BagOfWords())
    text = page.read_text()
    assert "<script>" not in text and "<b>" not in text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text
    # Mosaics are linked relative to the page, so the page opens from disk.
    assert 'src="../run/02_mosaics/L2/2.png"' in text
    assert (page.parent / "../run/02_mosaics/L2/2.png").exists()


def test_ties_at_the_top_k_cut_keep_04s_row_order(tmp_path):
    # five neurons described alike tie at cosine 1: every cut must keep the first rows of 04
    run_dir = make_run(tmp_path, descriptions=["dog", "dog", "dog", "dog", "dog", ""])
    for k in (1, 2, 3, 4):
        rows = find(run_dir, ["dog"], top_k=k, scoring="cosine", text_embedder=BagOfWords())
        assert ranked(rows, "dog") == [(n[0], n[1]) for n in NEURONS[:k]]


# A labelled case with known answers, written like the offline describer and a VLM would write:
# 48 vague edge neurons, a texture layer and a deep layer whose shoe neuron is described in
# generic words ("various objects …"). (layer, description, concept that a query must find first).
EDGE_COLOURS = ["Gray and white", "Black and white", "Red and black", "Blue and gray",
                "Brown and white", "Gray, black and white", "Yellow and black", "Green and gray"]
EDGE_KINDS = ["vertical edges", "horizontal edges", "diagonal edges", "irregular texture",
              "fine lines", "curved edges"]
LABELLED = ([("early", f"{c} {k}.", "vertical edges" if k == "vertical edges" else "")
             for c in EDGE_COLOURS for k in EDGE_KINDS]
            + [("mid", "Irregular texture in mixed colours.", ""),
               ("mid", "Black and white stripes.", "stripes"),
               ("mid", "Fur-like brown texture.", "fur"),
               ("mid", "Red dots on a white background.", "polka dots"),
               ("mid", "Various shapes and textures.", ""),
               ("mid", "A picture of various things.", ""),
               ("deep", "Various objects in pictures, mostly sneakers and running shoes.", "shoe"),
               ("deep", "Top images classified as cats, mostly Egyptian cat.", "cat"),
               ("deep", "Top images classified as food, mostly espresso; also cup.", "coffee"),
               ("deep", "A dog, often a golden retriever, sometimes with a ball.", "dog"),
               ("deep", "Large stone buildings such as palaces and castles.", "castle"),
               ("deep", "Various objects and animals in different scenes.", ""),
               ("deep", "Top images classified as a mix of man-made objects and food.", ""),
               ("deep", "Birds perched on branches.", "bird")])


def labelled_ranks(scoring: str, embedder, **options) -> dict[str, int]:
    """Per concept of LABELLED: the rank (1 = first) of its best neuron for the concept as query
    (``options``: more of ``Searcher``'s arguments, e.g. ``baseline``)."""
    index = NeuronIndex(np.array([n[0] for n in LABELLED]), np.arange(len(LABELLED)),
                               embedder.encode([n[1] for n in LABELLED]), None, embedder.name,
                               "", [n[1] for n in LABELLED], [None] * len(LABELLED))
    searcher = search.Searcher(index, embedder, scoring=scoring, **options)
    ranks = {}
    for concept in sorted({n[2] for n in LABELLED} - {""}):
        order = [h["channel"] for h in searcher.search_text(concept, len(LABELLED))]
        ranks[concept] = 1 + min(order.index(i) for i, n in enumerate(LABELLED) if n[2] == concept)
    return ranks


def test_default_scoring_ranks_the_right_neuron_first_on_the_labelled_case():
    # with the shipped sentence embedder: the ranking a user gets, not a fake's
    from common.embedders import load_text_embedder
    embedder = load_text_embedder(device="cpu")
    ranks = labelled_ranks(search.DEFAULT_SCORING, embedder)
    assert ranks == {concept: 1 for concept in ranks}
    # the user's defect: the baseline sentence pushed the shoe neuron below edge neurons
    assert labelled_ranks("baseline", embedder)["shoe"] > 1


def test_min_score_keeps_only_verified_neurons(tmp_path):
    """--min-score drops neurons whose 09 verify_corr is below it or missing; without 09's file
    it is a clear error."""
    run_dir = make_run(tmp_path)
    with pytest.raises(StageError, match="09_scores.csv"):
        find(run_dir, ["dog"], min_score=0.2, text_embedder=BagOfWords())
    corr = {("L1", 0): 0.5, ("L2", 0): 0.1, ("L2", 2): 0.3}  # others: no score
    write_csv(run_dir / "09_scores.csv",
              [{"layer": n[0], "channel": n[1], "subconcept": "",
                "verify_corr": corr.get((n[0], n[1]), "")} for n in NEURONS] +
              [{"layer": "L2", "channel": 0, "subconcept": 1, "verify_corr": 0.9}],
              columns(ScoreRow))
    write_meta(run_dir / "09_score.meta.json", "09_score", {}, [run_dir / "09_scores.csv"],
               inputs=[read_meta(run_dir / "04_embeddings.npz")])
    rows = find(run_dir, ["dog ball"], top_k=10, min_score=0.2, scoring="cosine",
                text_embedder=BagOfWords())
    assert set(ranked(rows, "dog ball")) == {("L1", 0), ("L2", 2)}


def test_a_run_without_mosaics_is_searched_without_pictures(tmp_path):
    """02's mosaics are optional: without 02_mosaics.csv the index has every neuron, none with a
    mosaic, and the search still ranks them."""
    from common.search import Searcher, load_index
    run_dir = make_run(tmp_path)
    (run_dir / "02_mosaics.csv").unlink()
    index = load_index(run_dir / "04_embeddings.npz", run_dir / "03_descriptions.csv",
                       run_dir / "02_mosaics.csv")
    assert len(index.mosaics) == len(NEURONS) and set(index.mosaics) == {None}
    hits = Searcher(index, BagOfWords(), scoring="cosine").search_text("cat", 1)
    assert [(h["layer"], h["channel"], h["mosaic"]) for h in hits] == [("L1", 1, "")]


def test_neuron_scoring_is_the_z_of_the_cosine_by_hand(tmp_path):
    """scoring=neuron: (cosine − mean) / std of the neuron's cosines with the 20 generic queries,
    the std floored at 0.001. Of those queries only "a picture" has a word of the fake vocabulary:
    L2/1 ("dog picture various things", cosine 1/2 with it) has mean 0.025 and std
    √(0.0125 − 0.025²); the dog neurons that never mention it have std 0, so 0.001."""
    from common.search import GENERIC_QUERIES, Searcher, load_index
    assert len(GENERIC_QUERIES) == 20
    run_dir = make_run(tmp_path)
    index = load_index(run_dir / "04_embeddings.npz", run_dir / "03_descriptions.csv",
                       run_dir / "02_mosaics.csv")
    hits = Searcher(index, BagOfWords(), scoring="neuron").search_text("dog", 3)
    std = np.sqrt(0.5 ** 2 / 20 - 0.025 ** 2)
    assert [(h["layer"], h["channel"]) for h in hits] == [("L2", 2), ("L1", 0), ("L2", 1)]
    assert [h["score"] for h in hits] == pytest.approx(
        [1 / 0.001, 2 ** -0.5 / 0.001, (0.5 - 0.025) / std], abs=1e-3)
