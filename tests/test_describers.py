"""Stage 14: two describers on the same mosaics, each sentence verified as 09 verifies it.

The run is the fake model's (01 and 02 for real, 04 with the fake conv1 feature, as in
test_score.py): channel 0 is redness, channel 1 vertical edges, so which sentence fits which
neuron is known on paper. A "true" describer says so; a "wrong" one says another neuron's
pattern, and must lose the comparison.
"""
import json

import numpy as np
import pytest

from common.artefacts import (Run, read_describer_neurons, read_describer_summary,
                              read_descriptions)
from common.cli import StageError
from common.describers import DescriberSettings
from common.matchers import OfflineMatcher
from conftest import FAKE_MODEL, load_stage, make_image
from test_score import SENTENCES, WordsText, described_run

stage = load_stage("14_describers")
TRUE = SENTENCES
WRONG = ["Vertical edges.", "Red patches.", "Red patches.", "Vertical edges."]
BASE = f"--backend offline --analysed-model {FAKE_MODEL} --device cpu"  # the run's 03 flags


class Saying:
    """A describer that answers each channel with a fixed sentence."""

    backend = "fake"
    batch_size = 4

    def __init__(self, label, sentences):
        """``sentences``: the answer for channel 0, 1, …"""
        self.model_label, self.sentences = label, sentences

    def describe(self, neurons):
        """One (answer, error) per neuron."""
        return [(self.sentences[n.channel], "") for n in neurons]


N_IMAGES = 60  # 20 per class: 09's test half (30) less a mosaic (9) leaves enough to verify


@pytest.fixture
def fake_run(tmp_path):
    """01, 02 and 04 of the fake model (one layer, 4 neurons, 60 usable images); 03's file says
    the true sentences (test_score.py's run)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label, kind in enumerate(["red", "edges", "plain"]):
        (root / str(label)).mkdir(parents=True)
        for i in range(N_IMAGES // 3):
            make_image(kind, 48, rng).save(root / str(label) / f"{kind}_{i:02d}.png")
    return described_run(tmp_path, root)


def matcher():
    """09's offline matcher with the bag-of-words text embedder (no class names matter)."""
    none = np.full((N_IMAGES, 5), -1)
    return OfflineMatcher(WordsText(), ["a", "b", "c"], none, np.zeros((N_IMAGES, 5)))


def test_describers_are_parsed_from_one_word_each(tmp_path):
    base = DescriberSettings()
    prompts = tmp_path / "short.yaml"
    prompts.write_text("x")
    a, b = stage.parse_describers(f"offline:reference {prompts}", base)
    assert (a.name, a.settings.backend, a.settings.namer) == ("offline-reference", "offline",
                                                              "reference")
    assert (b.name, b.settings.prompts, b.settings.backend) == ("short", str(prompts), "offline")
    a, b = stage.parse_describers("hf:/models/llava-1.5-7b-hf/ openai:qwen2-vl", base)
    assert (a.name, a.settings.backend, a.settings.model) == ("hf-llava-1.5-7b-hf", "hf",
                                                              "/models/llava-1.5-7b-hf/")
    assert (b.name, b.settings.backend, b.settings.model) == ("openai-qwen2-vl", "openai",
                                                              "qwen2-vl")
    with pytest.raises(StageError, match="needs two describers"):
        stage.parse_describers("offline", base)
    with pytest.raises(StageError, match="same describer"):
        stage.parse_describers("offline offline:model", base)
    with pytest.raises(StageError, match="names no describer"):
        stage.parse_describers("offline llava", base)
    with pytest.raises(StageError, match="not found"):
        stage.parse_describers(f"offline {tmp_path / 'missing.yaml'}", base)


def test_winner_by_verify_corr():
    nan = float("nan")
    assert [stage.winner(0.5, 0.2), stage.winner(0.1, 0.3), stage.winner(0.2, 0.2),
            stage.winner(nan, 0.0), stage.winner(nan, nan)] == ["a", "b", "tie", "b", ""]


def test_true_sentences_win_and_offline_describers_run_side_by_side(fake_run, tmp_path):
    run = Run(fake_run)
    prompts = tmp_path / "other_prompts.yaml"  # a second prompt file: the shipped one, copied
    prompts.write_text(open(DescriberSettings().prompts, encoding="utf-8").read())
    settings = stage.Settings(describers=f"offline:model {prompts}", describe_args=BASE)
    result = stage.run(run, settings, matcher_obj=matcher(),
                       describer_objs=[Saying("true", TRUE), Saying("wrong", WRONG)])
    folder = fake_run / "14_describers"
    for name, sentences in (("offline-model", TRUE), ("other_prompts", WRONG)):
        rows = read_descriptions(folder / name / "03_descriptions.csv")
        assert [r.description for r in rows] == sentences  # each describer's own file
    neurons = read_describer_neurons(run.describer_neurons)
    assert [(r.layer, r.channel) for r in neurons] == [("relu1", c) for c in range(4)]
    assert [r.sentence_a for r in neurons] == TRUE and [r.sentence_b for r in neurons] == WRONG
    red, edges = neurons[0], neurons[1]
    # Channel 0 is redness and 1 vertical edges: the true sentence verifies better for both.
    assert red.verify_corr_a > red.verify_corr_b and red.winner == "offline-model"
    assert edges.verify_corr_a > edges.verify_corr_b and edges.winner == "offline-model"
    summary = {(r.layer, r.describer): r for r in read_describer_summary(run.describer_summary)}
    for layer in ("relu1", "all"):
        a, b = summary[(layer, "offline-model")], summary[(layer, "other_prompts")]
        assert a.wins == sum(r.winner == "offline-model" for r in neurons) >= 2
        assert b.wins == sum(r.winner == "other_prompts" for r in neurons) < a.wins
        assert a.ties == b.ties == sum(r.winner == "tie" for r in neurons)
        assert a.mean_verify_corr == pytest.approx(
            np.mean([r.verify_corr_a for r in neurons if np.isfinite(r.verify_corr_a)]), abs=1e-3)
    # 09's verification, reused: the true sentences score as 09 scores them on the same run
    # (without refinement, which would replace them by better candidates).
    score = load_stage("09_score")
    scored = score.run(run, score.Settings(poly_threshold=2.0, refine=0), matcher_obj=matcher())
    by_channel = {r["channel"]: r for r in scored["scores"] if r["subconcept"] == ""}
    for r in neurons:
        assert r.verify_corr_a == pytest.approx(float(by_channel[r.channel]["verify_corr"] or
                                                      "nan"), nan_ok=True)
    report = (folder / "report.md").read_text()
    assert "offline-model wins" in report and (folder / "report.html").is_file()
    meta = json.loads((folder / "14_describers.meta.json").read_text())
    assert set(meta["describer_runs"]) == {"offline-model", "other_prompts"}
    assert meta["describers"] == {
        "offline-model": "offline:model", "other_prompts": str(prompts)}

    # The real offline describer with the two configurations, end to end (no fakes): both write
    # 03's format; the same sentences from both are ties, never wins.
    result = stage.run(run, settings, matcher_obj=matcher())
    for name in ("offline-model", "other_prompts"):
        rows = read_descriptions(folder / name / "03_descriptions.csv")
        assert len(rows) == 4 and {r.backend for r in rows} == {"offline"}
    for r in result["neurons"]:
        if r["sentence_a"] == r["sentence_b"] and r["verify_corr_a"] != "":
            assert r["winner"] == "tie"


def test_a_tiny_hf_vlm_against_the_offline_describer(fake_run, tmp_path):
    """The hf path: a tiny random LLaVA (tests/tiny_vlms.py, nothing downloaded) describes the same
    mosaics as the offline describer; its answers are its own file and are verified like any."""
    import tiny_vlms
    folder = tiny_vlms.llava(tmp_path / "llava")
    run = Run(fake_run)
    result = stage.run(run, stage.Settings(describers=f"hf:{folder} offline", describe_args=BASE),
                       matcher_obj=matcher())
    rows = read_descriptions(fake_run / "14_describers" / "hf-llava" / "03_descriptions.csv")
    assert len(rows) == 4 and {r.backend for r in rows} == {"hf"}
    assert {r["describer_a"] for r in result["neurons"]} == {"hf-llava"}
    summary = {(r["layer"], r["describer"]): r for r in result["summary"]}
    assert summary[("all", "hf-llava")]["wins"] + summary[("all", "offline-model")]["wins"] + \
        summary[("all", "hf-llava")]["ties"] <= 4
