"""Stage 13 (relevance and audit) on the fake model, whose planted neurons make every figure
computable on paper.

relu2 channel 0 is the red detector, channel 1 the edge detector; the head is a global average
pool then logits 4·mean(red), 4·mean(edges), 0.5 − 2·(both). For a linear head after global
average pooling, activation × gradient summed over space is exact: the relevance of channel c for
class k is W[k, c] × the channel's spatial mean.
"""
import numpy as np
import pytest
import torch
from markdown_it import MarkdownIt

from common.artefacts import Run
from common.concepts import best_alignment
from common.io import save_npz, write_csv
from common.provenance import read_meta, write_meta
from conftest import FAKE_MODEL, load_stage

audit = load_stage("13_audit")


class WordsText:
    """A text embedder that counts a few words (a constant keeps the empty text non-zero)."""

    name, dim = "words", 4
    VOCAB = ["red", "edge", "sky", "cat"]

    def encode(self, texts):
        """Unit bag-of-words vectors."""
        out = np.array([[t.lower().count(w) for w in self.VOCAB] for t in texts], np.float32) + 0.01
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture
def audited_run(tmp_path, image_folder):
    """01 on the fake model, its relevance, and 03 / 04 files whose sentences name each neuron's
    planted preference."""
    from common.models import load_model
    run_dir = tmp_path / "run"
    load_stage("01_extract").main([
        "--images", str(image_folder), "--run", str(run_dir), "--model", FAKE_MODEL,
        "--layers", "relu1,relu2", "--input-size", "32", "--topk", "8", "--batch-size", "8",
        "--device", "cpu", "--workers", "1"])
    bundle = load_model(FAKE_MODEL, device="cpu", input_size=32)
    audit.run_relevance(Run(run_dir), audit.RelevanceSettings(batch_size=8, device="cpu"),
                        bundle=bundle)
    sentences = {("relu2", 0): "red patches", ("relu2", 1): "edge stripes",
                 ("relu1", 0): "red", ("relu1", 1): "edge", ("relu1", 2): "edge",
                 ("relu1", 3): "sky"}
    rows = [{"layer": ly, "channel": c, "level": 1, "description": t, "backend": "test",
             "model": "test", "status": "ok"} for (ly, c), t in sentences.items()]
    write_csv(run_dir / "03_descriptions.csv", rows,
              ["layer", "channel", "level", "description", "backend", "model", "status", "reason"])
    meta01 = read_meta(run_dir / "01_activations.npz")
    write_meta(run_dir / "03_describe.meta.json", "03_describe", {},
               [run_dir / "03_descriptions.csv"], [meta01])
    text = WordsText().encode([r["description"] for r in rows])
    save_npz(run_dir / "04_embeddings.npz", {
        "layer": np.array([r["layer"] for r in rows]),
        "channel": np.array([r["channel"] for r in rows]), "text": text, "fused": text,
        "text_model": np.array("words")})
    write_meta(run_dir / "04_embed.meta.json", "04_embed", {}, [run_dir / "04_embeddings.npz"],
               [read_meta(run_dir / "03_descriptions.csv")])
    return run_dir, bundle


def test_relevance_is_weight_times_spatial_mean(audited_run):
    """relu2's relevance for class k is W[k, c] × the mean over the class's images of the
    channel's spatial mean (computed here with a plain forward hook)."""
    from common.images import load_rgb, network_input, to_tensor
    from common.io import load_npz, read_csv
    run_dir, bundle = audited_run
    rel = load_npz(run_dir / "13_relevance.npz")
    assert rel["classes"].tolist() == [0, 1, 2] and rel["n_images"].tolist() == [10, 10, 10]
    rows = [r for r in read_csv(run_dir / "01_predictions.csv") if int(r["label_idx"]) >= 0]
    kept = {}
    hook = bundle.model.relu2.register_forward_hook(lambda m, i, o: kept.update(out=o))
    weight = bundle.model.fc.weight.detach().numpy()
    for k in range(3):
        paths = [r["path"] for r in rows if int(r["label_idx"]) == k]
        batch = torch.stack([to_tensor(network_input(load_rgb(p)[0], 32), bundle.mean,
                                       bundle.std) for p in paths])  # float32, as 01 fed the model
        with torch.no_grad():
            bundle.model(batch)
        means = kept["out"].mean(dim=(2, 3)).numpy().mean(axis=0)
        np.testing.assert_allclose(rel["relu2/relevance"][k], weight[k] * means, rtol=1e-5,
                                   atol=1e-7)
    hook.remove()
    assert rel["relu2/relevance"][0, 0] > 0 and rel["relu2/relevance"][0, 1] == 0


def test_audit_labels_shares_and_causal_check(audited_run, tmp_path):
    """Class 0 ('red') declares edges valid and red spurious: the red neuron is labelled
    spurious, carries all of the class's positive relevance, and zeroing it breaks the class while
    zeroing a random neuron of the same layer (the edge one) does not. Class 1 declares edges
    valid: its edge neuron is labelled valid and nothing is zeroed."""
    run_dir, bundle = audited_run
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text("classes:\n  '0':\n    valid: [edge]\n    spurious: [red]\n"
                        "  '1':\n    valid: [edge]\n    spurious: [sky]\n")
    out = run_dir / "13_audit"
    result = audit.run_audit(Run(run_dir), concepts, audit.Settings(
        layer="relu2", top=5, controls=1, images_per_class=10), text_embedder=WordsText(),
        bundle=bundle)
    labels = {(r["class_name"], r["channel"]): r["label"] for r in result["audit"]}
    assert labels == {("0", 0): "spurious", ("0", 1): "valid", ("1", 0): "unexpected",
                      ("1", 1): "valid"}
    red, edgy = result["summary"]
    assert red["spurious_share"] == 1.0 and red["valid_share"] == 0.0
    assert red["zeroed"] == "0" and red["n_spurious"] == 1
    assert red["accuracy_before"] == 1.0 and red["accuracy_zeroed"] == 0.0
    assert red["accuracy_control"] == 1.0 and red["controls"] == "1"
    assert edgy["zeroed"] == "" and edgy["spurious_share"] == 0.0 and edgy["valid_share"] == 1.0
    for name in ("audit.csv", "summary.csv", "13_audit.meta.json", "0/report.md",
                 "0/report.html", "1/report.html"):
        assert (out / name).is_file()
    assert "red patches" in (out / "0" / "report.html").read_text()


def test_a_neuron_labelled_both_is_zeroed_like_a_spurious_one(audited_run, tmp_path):
    """Class 0 declares red both valid and spurious: its red neuron is labelled 'both', counts in
    both shares, and, as it carries a spurious concept, is zeroed in the causal check (which
    breaks the class)."""
    run_dir, bundle = audited_run
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text("classes:\n  '0':\n    valid: [red]\n    spurious: [red]\n")
    result = audit.run_audit(Run(run_dir), concepts, audit.Settings(
        layer="relu2", top=5, controls=1, images_per_class=10), text_embedder=WordsText(),
        bundle=bundle)
    labels = {r["channel"]: r["label"] for r in result["audit"]}
    assert labels == {0: "both", 1: "unexpected"}
    (red,) = result["summary"]
    assert red["n_both"] == 1 and red["zeroed"] == "0"
    assert red["spurious_share"] == red["valid_share"] == 1.0
    assert red["accuracy_before"] == 1.0 and red["accuracy_zeroed"] == 0.0


def test_hostile_sentence_is_escaped_in_reports(audited_run, tmp_path):
    """A description carrying HTML and a Markdown link shows as text in both reports."""
    from common.io import read_csv
    run_dir, bundle = audited_run
    rows = read_csv(run_dir / "03_descriptions.csv")
    rows[0]["description"] = ("red <script>alert(1)</script> [x](javascript:alert(1)) "
                              "\"><img src=x onerror=alert(1)>")
    write_csv(run_dir / "03_descriptions.csv", rows, list(rows[0]))
    concepts = tmp_path / "c.yaml"
    concepts.write_text("classes:\n  '0':\n    valid: [red]\n"
                        "    spurious: ['\"><img src=y onerror=alert(2)>']\n")
    out = run_dir / "13_audit"
    audit.run_audit(Run(run_dir), concepts, audit.Settings(layer="relu2", top=5, controls=1,
                                                           images_per_class=3),
                    text_embedder=WordsText(), bundle=bundle)
    html = (out / "0" / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<img src=x" not in html and "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img src=y" not in html and "&lt;img src=y onerror=alert(2)&gt;" in html
    md = MarkdownIt("commonmark").enable("table").render((out / "0" / "report.md").read_text())
    assert "<a " not in md and "<img src=x" not in md and "<script" not in md
    assert "javascript:alert(1)" in md  # shown, as text


@pytest.mark.parametrize("text, message", [
    ("classes: []\n", "top-level 'classes:' mapping"),
    ("classes:\n  a:\n    valid: [1, 2]\n", "list of non-empty texts"),
    ("classes:\n  a:\n    vaild: [x]\n", "must map to 'valid' and/or 'spurious'"),
    ("classes:\n  a: {}\n", "lists no concept"),
    ("classes: {a: [x\n", "not valid YAML"),
])
def test_bad_concepts_files_are_explained(tmp_path, text, message):
    """Each malformed concepts file gets an error that names what is wrong."""
    from common.cli import StageError
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(StageError, match=message.replace("(", r"\(")):
        audit.read_concepts(path)


def test_alignment_subtracts_the_empty_text_baseline():
    """a = max over concepts of cos(v, c) − cos(v, empty), by hand on 2-d vectors."""
    v = np.array([[1.0, 0.0], [0.0, 1.0]])
    concepts = np.array([[1.0, 1.0], [0.0, 2.0]])
    empty = np.array([1.0, 0.0])
    best = best_alignment(v, concepts, empty)
    assert best.score[0] == pytest.approx(1 / np.sqrt(2) - 1) and best.index[0] == 0
    assert best.score[1] == pytest.approx(1.0) and best.index[1] == 1
    assert audit.label_of(0.2, -0.1, 0.0) == "valid"
    assert audit.label_of(0.2, 0.1, 0.0) == "both"
    assert audit.label_of(-0.2, 0.1, 0.0) == "spurious"
    assert audit.label_of(0.05, 0.0, 0.1) == "unexpected"


def test_an_alignment_exactly_at_the_margin_does_not_count():
    """MARGIN is the alignment a concept must exceed: exactly at it, the neuron is not aligned."""
    assert audit.label_of(0.1, 0.1, 0.1) == "unexpected"
    assert audit.label_of(0.1, np.nextafter(0.1, 1.0), 0.1) == "spurious"
    assert audit.label_of(np.nextafter(0.1, 1.0), 0.1, 0.1) == "valid"
    assert audit.label_of(0.0, 0.0, 0.0) == "unexpected"
