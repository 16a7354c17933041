"""Stage 15 (labels and gaps, SemanticLens) on the fake model's run, with sentences and vectors
planted so that every label and every missing concept is known in advance.

The text embedder (test_audit's) counts four words ("red", "edge", "sky", "cat") plus a
constant, so each cosine can be computed on paper; the empty text is the constant alone.
"""
import numpy as np
import pytest

from common.artefacts import (CropVectors, Run, read_label_concepts, read_labels,
                              write_crop_vectors)
from common.concepts import SHIPPED, alignments, best_alignment, read_concepts
from common.io import save_npz
from common.provenance import read_meta, write_meta
from conftest import FAKE_MODEL, load_stage
from test_audit import WordsText  # counts red, edge, sky, cat (+ a constant)

label = load_stage("15_label")

SENTENCES = {("relu1", 0): "red", ("relu1", 1): "edge", ("relu1", 2): "edge",
             ("relu1", 3): "sky", ("relu2", 0): "red patches", ("relu2", 1): "edge stripes"}
CONCEPTS = ["red", "edge", "sky", "cat"]  # "cat": planted, no neuron's sentence names it


@pytest.fixture
def labelled_run(tmp_path, image_folder):
    """01 on the fake model and a 04_embeddings.npz of the planted sentences' word vectors."""
    run_dir = tmp_path / "run"
    load_stage("01_extract").main([
        "--images", str(image_folder), "--run", str(run_dir), "--model", FAKE_MODEL,
        "--layers", "relu1,relu2", "--input-size", "32", "--topk", "4", "--batch-size", "8",
        "--device", "cpu", "--workers", "1"])
    text = WordsText().encode(list(SENTENCES.values()))
    save_npz(run_dir / "04_embeddings.npz", {
        "layer": np.array([k[0] for k in SENTENCES]), "text": text, "fused": text,
        "channel": np.array([k[1] for k in SENTENCES]), "text_model": np.array("words")})
    write_meta(run_dir / "04_embed.meta.json", "04_embed", {}, [run_dir / "04_embeddings.npz"],
               [read_meta(run_dir / "01_activations.npz")])
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("# planted\n" + "\n".join(CONCEPTS) + "\n", encoding="utf-8")
    return Run(run_dir), concepts


def test_labels_and_missing_concepts_of_a_small_run(labelled_run):
    """Each neuron gets the concept its sentence names; a planted concept that no sentence names
    ("cat") is missing in every layer, "sky" only in relu2; the typed readers read it all back."""
    run, concepts = labelled_run
    label.run(run, label.Settings(concepts=str(concepts), device="cpu"), text_embedder=WordsText())
    labels = {(r.layer, r.channel): r for r in read_labels(run.labels)}
    assert set(labels) == set(SENTENCES)
    assert {k: r.label for k, r in labels.items()} == {
        ("relu1", 0): "red", ("relu1", 1): "edge", ("relu1", 2): "edge", ("relu1", 3): "sky",
        ("relu2", 0): "red", ("relu2", 1): "edge"}
    assert all(r.labelled == 1 and r.margin == pytest.approx(r.score - label.MARGIN, abs=2e-4)
               for r in labels.values())
    rows = {(r.layer, r.concept): r for r in read_label_concepts(run.label_concepts)}
    assert len(rows) == 2 * len(CONCEPTS)
    missing = {k for k, r in rows.items() if r.missing}
    assert missing == {("relu1", "cat"), ("relu2", "cat"), ("relu2", "sky")}
    assert rows[("relu1", "edge")].labelled == 2 and rows[("relu1", "edge")].aligned == 2
    assert rows[("relu1", "sky")].best_channel == 3
    meta = read_meta(run.labels, run.meta("15_label"))
    assert meta["vectors"] == "text" and meta["n_concepts"] == 4 and meta["n_labelled"] == 6


def test_a_high_margin_leaves_neurons_unlabelled_and_every_concept_missing(labelled_run):
    """Above every score, no neuron is labelled, yet each row keeps its best concept."""
    run, concepts = labelled_run
    out = label.run(run, label.Settings(concepts=str(concepts), margin=1.5, device="cpu"),
                    text_embedder=WordsText())
    assert {r["label"] for r in out["labels"]} == {label.UNLABELLED}
    assert [r["concept"] for r in out["labels"]][:4] == ["red", "edge", "edge", "sky"]
    assert all(r["missing"] for r in out["concepts"])


def test_a_neuron_whose_crop_vectors_match_a_concept_is_labelled_with_it(labelled_run):
    """When 04 fused text and image as one space (CLIP), the neuron vector is the mean of its
    crops' image vectors (Eq. 2), not its sentence: relu1 #2, described "edge", has crops whose
    vectors lie on "cat" and is labelled cat; "cat" is then no longer missing in relu1."""
    run, concepts = labelled_run
    emb = dict(np.load(run.embeddings))
    emb["fusion"] = np.array("mean")
    save_npz(run.embeddings, emb)
    write_meta(run.meta("04_embed"), "04_embed", {}, [run.embeddings],
               [read_meta(run.activations)])
    words = WordsText()
    keys = list(SENTENCES)
    # every neuron's two crops: its sentence's vector, slightly tilted; relu1 #2's: "cat" ones
    crops = [words.encode([SENTENCES[k]] * 2) for k in keys]
    crops[2] = words.encode(["cat", "cat cat red"])
    vectors = np.concatenate(crops)
    write_crop_vectors(run.crop_vectors, CropVectors.build(
        keys, [2] * len(keys), vectors, np.arange(len(vectors)), "clip-image", "clip"))
    out = label.run(run, label.Settings(concepts=str(concepts), device="cpu"),
                    text_embedder=words)
    labels = {(r["layer"], r["channel"]): r["label"] for r in out["labels"]}
    assert labels[("relu1", 2)] == "cat" and labels[("relu1", 1)] == "edge"
    missing = {(r["layer"], r["concept"]) for r in out["concepts"] if r["missing"]}
    assert ("relu1", "cat") not in missing and ("relu2", "cat") in missing
    assert read_meta(run.labels, run.meta("15_label"))["vectors"] == "image"


def test_baseline_subtraction_matches_a_hand_computation(labelled_run):
    """score = cos(v, c) − cos(v, empty), by hand on 2-d vectors, and in the stage's file for
    relu2 #0 ("red patches" against "red", with the words embedder)."""
    v = np.array([[3.0, 4.0], [0.0, 2.0]])
    concepts = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    empty = np.array([1.0, 1.0])
    scores, baseline = alignments(v, concepts, empty)
    assert baseline == pytest.approx([7 / 5 / np.sqrt(2), 1 / np.sqrt(2)])
    assert scores[0] == pytest.approx([0.6 - 1.4 / np.sqrt(2), 0.8 - 1.4 / np.sqrt(2), 0.0])
    best = best_alignment(v, concepts, empty)
    # (3, 4): no concept beats the empty text, (1, 1) ties it (0) and is best; (0, 2): (0, 1)
    assert list(best.index) == [2, 1]
    assert best.cosine == pytest.approx([1.4 / np.sqrt(2), 1.0])
    assert best.score == pytest.approx(best.cosine - best.baseline)

    run, concepts_file = labelled_run
    label.run(run, label.Settings(concepts=str(concepts_file), device="cpu"),
              text_embedder=WordsText())
    row = next(r for r in read_labels(run.labels) if (r.layer, r.channel) == ("relu2", 0))
    # "red patches" counts "red" once: (1.01, .01, .01, .01); "red" the same; empty (.01, ...)
    neuron = np.array([1.01, 0.01, 0.01, 0.01])
    cosine = 1.0
    base = neuron.sum() * 0.01 / np.linalg.norm(neuron) / 0.02
    assert row.cosine == pytest.approx(cosine, abs=1e-4)
    assert row.baseline == pytest.approx(base, abs=1e-4)
    assert row.score == pytest.approx(cosine - base, abs=1e-4)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"# only a comment\n\n", "lists no phrase"),
    (b"\xff\xfe red\n", "not UTF-8"),
])
def test_a_bad_concepts_file_is_one_clear_error(labelled_run, tmp_path, capsys, content, message):
    """A missing, empty or non-text CONCEPTS file stops the stage with one line naming the file
    and the fix, no traceback, and writes nothing."""
    run, _ = labelled_run
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        label.main(["--run", str(run.folder), "--concepts", str(path), "--device", "cpu"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err
    assert not run.labels.exists()


def test_the_shipped_list_is_a_few_hundred_distinct_phrases():
    """common/concepts.txt reads through the one reader: a few hundred phrases, none repeated,
    colours, textures and objects among them."""
    phrases = read_concepts(SHIPPED)
    assert 200 <= len(phrases) <= 600
    assert len({p.casefold() for p in phrases}) == len(phrases)
    assert {"red", "stripes", "wood", "wheel", "dog", "sky"} <= set(phrases)


def test_no_concept_to_align_gives_no_best_concept():
    """With an empty concept list every neuron's best alignment is −∞ at index −1 (no concept),
    its cosine undefined, its baseline still the cosine with the empty text."""
    v = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    best = best_alignment(v, np.zeros((0, 2)), np.array([1.0, 0.0]))
    assert best.score.tolist() == [-np.inf] * 3 and best.index.tolist() == [-1] * 3
    assert np.isnan(best.cosine).all() and best.baseline == pytest.approx([0.6, 0.0, 1.0])
