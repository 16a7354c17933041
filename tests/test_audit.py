"""Stage 13 (relevance and audit) on the fake model, whose planted neurons make every figure
computable on paper.

relu2 channel 0 is the red detector, channel 1 the edge detector; the head is a global average
pool then logits 4·mean(red), 4·mean(edges), 0.5 − 2·(both). For a linear head after global
average pooling, activation × gradient summed over space is exact: the relevance of channel c for
class k is W[k, c] × the channel's spatial mean.
"""
import json
import numpy as np
import pytest
import torch
from markdown_it import MarkdownIt
from PIL import Image

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


class RedShare:
    """A concept matcher that looks at the whole image, as CLIP does: every concept's score of an
    image is the share of its pixels that are strongly red, measured on the file (not by the
    model)."""

    name = "red-share"

    def score(self, sentences_by_layer, paths, input_size, layer_geometry=None,
              progress=lambda items: items, **_):
        """Per layer: images × sentences, each column the images' red shares."""
        shares = []
        for path in progress(paths):
            pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
            shares.append(((pixels[..., 0] > 200) & (pixels[..., 1] < 60)).mean())
        return {layer: np.repeat(np.array(shares)[:, None], len(texts), axis=1)
                for layer, texts in sentences_by_layer.items()}


@pytest.fixture
def audited_run(tmp_path, image_folder):
    """01 on the fake model, its relevance, and 03 / 04 files whose sentences name each neuron's
    planted preference."""
    return build_run(tmp_path, image_folder)


def build_run(tmp_path, image_folder):
    """``audited_run`` on the images of ``image_folder``: (run folder, fake model)."""
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


RED_SPURIOUS = "  '0':\n    valid: [edge]\n    spurious: [red]\n"  # class 0: red is spurious


def audit_classes(run, tmp_path, classes: str, matcher=None, **settings) -> dict:
    """``run_audit`` on the fake run ``run`` (folder, model) of the concepts ``classes`` (the YAML
    under ``classes:``), layer relu2, top 5, with the word-count embedder."""
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text("classes:\n" + classes)
    return audit.run_audit(Run(run[0]), concepts, audit.Settings(layer="relu2", top=5, **settings),
                           text_embedder=WordsText(), bundle=run[1], matcher_obj=matcher)


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
        bundle=bundle, matcher_obj=RedShare())
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
    result = audit_classes(audited_run, tmp_path, "  '0':\n    valid: [red]\n    spurious: [red]\n",
                           RedShare(), controls=1, images_per_class=10)
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
                    text_embedder=WordsText(), bundle=bundle, matcher_obj=RedShare())
    html = (out / "0" / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<img src=x" not in html and "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img src=y" not in html and "&lt;img src=y onerror=alert(2)&gt;" in html
    md = MarkdownIt("commonmark").enable("table").render((out / "0" / "report.md").read_text())
    assert "<a " not in md and "<img src=x" not in md and "<script" not in md
    assert "javascript:alert(1)" in md  # shown, as text


@pytest.mark.parametrize("text, message", [
    ("classes: []\n", "top-level 'classes:' mapping"),
    ("classes: [cat, dog]\n", "top-level 'classes:' mapping"),
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


# ---------------------------------------------------------------------------------------------
# The model test: reliance on a spurious concept, and its correction


def test_reliance_is_sklearns_auc_and_a_hand_count():
    """With-concept logits 3 and 1 against without-concept 2 and 0: of the four (with, without)
    pairs, three put the with-image higher, so AUC = 3/4; the gap of the means is 2 − 1 = 1. A tie
    counts one half: with 1 against without 1 and 0 gives (0.5 + 1) / 2."""
    from sklearn.metrics import roc_auc_score
    scores, shows = np.array([3.0, 1.0, 2.0, 0.0]), np.array([True, True, False, False])
    assert audit.reliance(scores, shows) == pytest.approx((0.75, 1.0))
    assert audit.reliance(scores, shows)[0] == roc_auc_score(shows, scores)
    assert audit.reliance(np.array([1.0, 1.0, 0.0]), np.array([True, False, False]))[0] == 0.75


def test_concept_images_are_the_top_quarter_and_bottom_half_of_the_class():
    """Of a class's 8 images scored 0 … 7 the top quarter (6, 7) shows the concept, the bottom
    half (0 … 3) does not; images of other classes and unusable (NaN) ones never count; tied
    scores (a concept the matcher sees nowhere) show it nowhere."""
    scores = np.array([np.nan, 7, 6, 5, 4, 3, 2, 1, 0, 100.0])
    with_ids, without_ids = audit.concept_image_ids(scores, np.arange(9))
    assert with_ids.tolist() == [1, 2] and sorted(without_ids.tolist()) == [5, 6, 7, 8]
    flat = np.zeros(10)
    assert audit.concept_image_ids(flat, np.arange(10))[0].tolist() == []


@pytest.fixture
def planted_run(tmp_path):
    """The fake model's run on 20 'red' images whose red squares grow from 6 to 25 px (so the
    red neuron, and class 0's logit, grow with the share of red), 10 edge and 10 plain images."""
    from conftest import make_image
    rng = np.random.default_rng(3)
    root = tmp_path / "planted"
    for label in range(3):
        (root / str(label)).mkdir(parents=True)
    for i, side in enumerate(range(6, 26)):
        arr = np.full((48, 48, 3), 120, np.uint8)
        top, left = rng.integers(0, 48 - side, size=2)
        arr[top:top + side, left:left + side] = (230, 20, 20)
        Image.fromarray(arr).save(root / "0" / f"red_{i:02d}.png")
    for label, kind in ((1, "edges"), (2, "plain")):
        for i in range(10):
            make_image(kind, 48, rng).save(root / str(label) / f"{kind}_{i:02d}.png")
    return build_run(tmp_path, root)


def class_logits(bundle, paths, k):
    """Class k's logit of each image, from a plain forward pass of the fake model."""
    from common.images import load_rgb, network_input, to_tensor
    batch = torch.stack([to_tensor(network_input(load_rgb(p)[0], 32), bundle.mean, bundle.std)
                         for p in paths])
    with torch.no_grad():
        return bundle.model(batch)[:, k].numpy()


def test_zeroing_a_planted_spurious_neuron_removes_the_reliance_random_sets_do_not(planted_run,
                                                                                  tmp_path):
    """Class 0 declares red spurious: its images with the most red (the top 5 of 20) get a
    higher class-0 logit than the 10 with the least, AUC 1 — sklearn's AUC of a plain forward pass
    on the same images. Zeroing the red neuron (labelled spurious) leaves every class-0 logit at
    the bias: AUC 0.5, gap 0. The random control of the same size (the edge neuron) leaves the
    reliance as it was. reliance.csv reads back with the same figures."""
    from sklearn.metrics import roc_auc_score
    from common.artefacts import read_predictions, read_reliance
    run_dir, bundle = planted_run
    result = audit_classes(planted_run, tmp_path, RED_SPURIOUS, RedShare(), controls=2,
                           images_per_class=20)
    (row,) = result["reliance"]
    assert result["summary"][0]["zeroed"] == "0"
    assert (row["concept"], row["status"], row["n_with"], row["n_without"]) == ("red", "ok", 5, 10)
    assert row["matcher"] == "red-share" and row["n_zeroed"] == 1
    red = sorted((r for r in read_predictions(run_dir / "01_predictions.csv")
                  if r.label_idx == 0), key=lambda r: r.path)  # red_00 (6 px) … red_19 (25 px)
    paths = [r.path for r in red[-5:] + red[:10]]
    shows = np.arange(15) < 5
    logits = class_logits(bundle, paths, 0)
    assert row["auc_before"] == pytest.approx(roc_auc_score(shows, logits), abs=1e-4)
    assert row["auc_before"] == 1.0 and row["gap_before"] > 0.1
    assert row["gap_before"] == pytest.approx(logits[:5].mean() - logits[5:].mean(), abs=1e-4)
    assert row["auc_zeroed"] == 0.5 and row["gap_zeroed"] == 0.0
    assert row["auc_control"] == row["auc_before"] and row["auc_control_sd"] == 0.0
    assert row["gap_control"] == pytest.approx(row["gap_before"], abs=1e-4)
    assert row["gap_before"] - row["gap_zeroed"] > row["gap_before"] - row["gap_control"] + 0.1
    (back,) = read_reliance(run_dir / "13_audit" / "reliance.csv")
    assert back.auc_before == 1.0 and back.auc_zeroed == 0.5 and back.n_with == 5
    html = (run_dir / "13_audit" / "0" / "report.html").read_text()
    assert "Reliance on the spurious concepts" in html and "1.0 ± 0.0" in html


def test_too_few_images_of_a_concept_are_skipped_with_the_reason(audited_run, tmp_path,
                                                                 monkeypatch):
    """A matcher that scores the run's images 0, 1, 2 … in order: of class 0's 10 images, the top
    quarter (3) show the concept and the bottom half (5) do not — under the 5 each an AUC needs,
    so the concept is skipped, saying why, and no AUC is written. The matcher is the one
    ``common.verification.load_matcher`` gives for the settings, on the run's image table."""
    import common.verification as verification
    from common.artefacts import read_reliance
    run_dir = audited_run[0]
    asked = []

    class Ranked(RedShare):
        """Each image's score is its place in the list."""

        name = "ranked"

        def score(self, sentences_by_layer, paths, *args, **kwargs):
            """Per layer: images × sentences, each column 0, 1, 2 …"""
            return {layer: np.repeat(np.arange(len(paths), dtype=float)[:, None], len(texts), 1)
                    for layer, texts in sentences_by_layer.items()}

    def load_matcher(name, table, text_model, device, workers):
        """Record the request; answer with the ranking matcher."""
        asked.append((name, type(table).__name__, text_model, workers))
        return Ranked()
    monkeypatch.setattr(verification, "load_matcher", load_matcher)
    result = audit_classes(audited_run, tmp_path, RED_SPURIOUS, controls=1,
                           images_per_class=10, workers=1)
    assert asked == [("offline", "ImageTable", "all-MiniLM-L6-v2", 1)]
    (row,) = result["reliance"]
    assert row["status"] == "skipped" and (row["n_with"], row["n_without"]) == (3, 5)
    assert row["reason"] == "too few images: 3 with the concept, 5 without (at least 5 each)"
    (back,) = read_reliance(run_dir / "13_audit" / "reliance.csv")
    assert back.status == "skipped" and np.isnan(back.auc_before) and np.isnan(back.auc_zeroed)


def test_rendered_images_of_the_spurious_concept_stand_for_the_images_with_it(planted_run,
                                                                             tmp_path,
                                                                             monkeypatch):
    """GENERATOR=diffusers (SemanticLens's generated images): the images with the concept are the
    ones rendered for it — here planted full-frame red squares, one pipeline (a tiny random one)
    loaded from its folder — against the class's own images without it (the matcher's bottom
    half). The AUC and gap equal sklearn's and a hand mean on a plain forward pass of those
    images; zeroing the red neuron takes the reliance away; the meta says the images were
    rendered."""
    from sklearn.metrics import roc_auc_score
    from common.artefacts import read_predictions
    from common.generation import Renderer, model_inputs
    from tiny_vlms import tiny_diffusion
    run_dir, bundle = planted_run
    made = []

    def planted(self, concepts, count, seed=0, batch=8):
        """``count`` images per concept: a red square on grey, growing."""
        made.append(list(concepts))
        out = {}
        for c in concepts:
            out[c] = []
            for k in range(count):
                arr = np.full((48, 48, 3), 120, np.uint8)
                arr[8:20 + 3 * k, 8:20 + 3 * k] = (230, 20, 20)
                out[c].append(Image.fromarray(arr))
        return out
    monkeypatch.setattr(Renderer, "render", planted)
    result = audit_classes(planted_run, tmp_path, RED_SPURIOUS, RedShare(), controls=1,
                           images_per_class=20, generator="diffusers",
                           generator_model=str(tiny_diffusion(tmp_path / "sd")), generate_n=6)
    (row,) = result["reliance"]
    assert made == [["red"]]
    assert (row["status"], row["n_with"], row["n_without"]) == ("ok", 6, 10)
    assert row["matcher"] == "red-share, with: rendered"
    red = sorted((r for r in read_predictions(run_dir / "01_predictions.csv")
                  if r.label_idx == 0), key=lambda r: r.path)
    without = class_logits(bundle, [r.path for r in red[:10]], 0)
    with torch.no_grad():
        rendered = bundle.model(model_inputs(bundle, planted(None, ["red"], 6)["red"]))[:, 0]
    logits = np.concatenate([rendered.numpy(), without])
    shows = np.arange(16) < 6
    assert row["auc_before"] == pytest.approx(roc_auc_score(shows, logits), abs=1e-4)
    assert row["gap_before"] == pytest.approx(logits[:6].mean() - logits[6:].mean(), abs=1e-4)
    assert row["auc_zeroed"] == 0.5 and row["gap_zeroed"] == 0.0
    meta = json.loads(Run(run_dir).audit_meta.read_text())
    assert meta["model_test"]["with_images"]["images"] == "generated"


def test_concepts_classes_resolve_by_label_index_or_model_name_of_labelled_classes_only():
    """A class of the concepts file is found by its dataset label, its index or the model's name
    for it (case, spaces, '_' and '-' ignored), but only among labelled classes; an unknown one is
    an error listing the first twelve known names, sorted."""
    from types import SimpleNamespace as Row
    from common.cli import StageError
    predictions = [Row(label="Tabby_Cat", label_idx=281), Row(label="dog", label_idx=3),
                   Row(label="", label_idx=-1)]
    names = [f"name {i}" for i in range(300)]
    names[3], names[281] = "big dog", "tabby"
    concepts = {"tabby cat": {}, "BIG-dog": {}, "281": {}, "Tabby": {}}
    assert audit.resolve_classes(concepts, predictions, names) == \
        {"tabby cat": 281, "BIG-dog": 3, "281": 281, "Tabby": 281}
    with pytest.raises(StageError, match="name 5"):  # the model names class 5, no image has it
        audit.resolve_classes({"name 5": {}}, predictions, names)
    many = [Row(label=f"class {chr(97 + i)}", label_idx=i) for i in range(14)]
    with pytest.raises(StageError) as err:
        audit.resolve_classes({"zebra": {}}, many, None)
    listed = [f"class {chr(97 + i)}" for i in range(12)]
    assert str(err.value).endswith(f"{listed})")
