"""Tests of stage 03 (describe): prompts, post-processing, the offline describer on planted
images, resuming after a kill, shards, a real HTTP round trip to a loopback server; the hf
backend's families are tested in test_vlm_families.py."""
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from common.artefacts import Description, Prediction, Run, columns, read_descriptions
from common.cli import StageError
from common.imagenet import class_names
from common.io import save_npz, write_csv
from common.provenance import write_meta
from common import appearance, describers as D, offline_describer as O
from conftest import load_stage


STAGE03 = load_stage("03_describe")
TILE, GRID, SIZE = 32, 2, 64          # tiny mosaics: 2 × 2 tiles of 32 px; 64 px network input
TERRIERS = [185, 187, 189, 199]       # Norfolk, Yorkshire, Lakeland, Scotch terrier
LAYERS = ["early", "mid", "deep"]


def stripes(angle_deg, period=8, phase=0.0, c1=(0, 0, 0), c2=(255, 255, 255)):
    """A TILE × TILE tile of two-colour stripes whose bars run at ``angle_deg`` (0 = horizontal)."""
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    a = np.radians(angle_deg + 90)  # the intensity varies across the bars
    on = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period + phase) > 0
    return np.where(on[..., None], np.array(c1, np.uint8), np.array(c2, np.uint8))


def mosaic(tiles):
    """Paste tiles row by row into a GRID × GRID mosaic image."""
    out = np.full((GRID * TILE, GRID * TILE, 3), 128, np.uint8)
    for rank, tile in enumerate(tiles):
        r, c = divmod(rank, GRID)
        out[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = tile
    return Image.fromarray(out)


def make_run(tmp_path, channels=3, tiles_of=None, deep_top5=None):
    """A planted run folder: 01 activations/predictions + metas, 02 mosaics + index + meta.

    Layer ``early`` has a 3-px receptive field, ``mid`` 20 px, ``deep`` one larger than the input.
    ``tiles_of(layer, channel)`` gives the tiles of a mosaic (default: diagonal stripes).
    ``deep_top5[i]`` are the reference classifier's top-5 (indices, probs) of image i.
    """
    run = tmp_path / "run"
    run.mkdir()
    n_images = GRID * GRID
    arrays = {"layers": np.array(LAYERS), "input_size": np.array([SIZE, SIZE])}
    rfs = {"early": [3, 3, 1, 1, 0, 0], "mid": [20, 20, 4, 4, 2, 2], "deep": [400, 400, 32, 32, 16, 16]}
    for layer in LAYERS:
        arrays[f"{layer}/values"] = np.tile(np.arange(n_images, 0, -1, dtype=np.float32), (channels, 1))
        arrays[f"{layer}/image_ids"] = np.tile(np.arange(n_images, dtype=np.int64), (channels, 1))
        arrays[f"{layer}/y"] = np.ones((channels, n_images), np.int32)
        arrays[f"{layer}/x"] = np.ones((channels, n_images), np.int32)
        arrays[f"{layer}/fmap"] = np.array([channels, 4, 4])
        arrays[f"{layer}/rf"] = np.array(rfs[layer], np.float64)
    save_npz(run / "01_activations.npz", arrays)
    deep_top5 = deep_top5 or [([TERRIERS[i % 4], 207, 281, 1, 2], [0.8, 0.1, 0.05, 0.03, 0.02])
                              for i in range(n_images)]
    write_csv(run / "01_predictions.csv",
              [{"image_id": i, "path": f"img{i}.png", "label": "", "label_idx": -1,
                "pred_idx": t[0][0], "pred_name": "", "prob": t[1][0], "correct": "",
                "top5_idx": " ".join(map(str, t[0])), "top5_prob": " ".join(map(str, t[1]))}
               for i, t in enumerate(deep_top5)], columns(Prediction))
    write_meta(run / "01_extract.meta.json", "01_extract", {},
               [run / "01_activations.npz", run / "01_predictions.csv"],
               model={"name": "efficientnet_lite0", "weights": None, "random_init": False})
    tiles_of = tiles_of or (lambda layer, ch: [stripes(45, phase=i) for i in range(n_images)])
    rows = []
    for layer in LAYERS:
        for ch in range(channels):
            rel = f"02_mosaics/{layer}/{ch}.png"
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            mosaic(tiles_of(layer, ch)).save(run / rel)
            rows.append({"layer": layer, "channel": ch, "path": rel, "n_tiles": n_images,
                         "grid": GRID, "tile_px": TILE, "crop": "rf"})
    write_csv(run / "02_mosaics.csv", rows, ["layer", "channel", "path", "n_tiles", "grid",
                                             "tile_px", "crop"])
    write_meta(run / "02_mosaics.meta.json", "02_mosaics", {}, [run / "02_mosaics.csv"],
               inputs=[json.loads((run / "01_extract.meta.json").read_text())])
    return run


class FakeVLM:
    """Answers every neuron with a fixed text naming it; counts calls; can be made to fail."""

    backend = "fake"
    model_label = "fake-vlm"
    batch_size = 2

    def __init__(self, crash_after=None, fail=()):
        """``crash_after``: raise on that batch number (0-based); ``fail``: (layer, ch) to fail."""
        self.described = []
        self.batches = 0
        self.crash_after = crash_after
        self.fail = set(fail)

    def describe(self, neurons):
        """Record the neurons and answer, like a VLM with role prefixes and quotes."""
        if self.crash_after is not None and self.batches == self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.batches += 1
        self.described += [(n.layer, n.channel) for n in neurons]
        return [(None, "server said no") if (n.layer, n.channel) in self.fail else
                (f'ASSISTANT: "{n.layer} neuron {n.channel}, level {n.level}"', "")
                for n in neurons]


OPTIONS = ("describer", "shard", "merge_only", "skip_dead", "args")  # the rest: describer settings


def run_stage(run, **kw):
    """Run stage 03 on a planted run folder; keyword arguments that are not ``describe``'s own
    options are describer settings."""
    settings = D.DescriberSettings(**{k: v for k, v in kw.items() if k not in OPTIONS})
    return STAGE03.run(Run(run), settings, **{k: v for k, v in kw.items() if k in OPTIONS})


# --- prompts and levels ---------------------------------------------------------------------

def test_levels_follow_relative_depth_or_explicit_setting():
    """5 layers → levels 1..5; 3 layers spread over 5 levels; one layer the middle level;
    explicit pairs win."""
    five = [f"l{i}" for i in range(5)]
    assert D.assign_levels(five, 5) == {f"l{i}": i + 1 for i in range(5)}
    assert D.assign_levels(["a", "b", "c"], 5) == {"a": 1, "b": 3, "c": 5}
    assert D.assign_levels(["a", "b", "c"], 5, D.parse_levels("b=2")) == {"a": 1, "b": 2, "c": 5}
    # A single layer has no relative depth: it gets the middle level, (n + 1) // 2 (an odd n tells
    # it from n // 2), unless set explicitly.
    assert D.assign_levels(["only"], 5) == {"only": 3}
    assert D.assign_levels(["only"], 3) == {"only": 2}
    assert D.assign_levels(["only"], 1) == {"only": 1}
    # An even number of levels has no middle one: the lower of the two, a whole level number.
    assert D.assign_levels(["only"], 4) == {"only": 2} and D.assign_levels(["only"], 2) == {"only": 1}
    assert isinstance(D.assign_levels(["only"], 5)["only"], int)
    assert D.assign_levels(["only"], 5, {"only": 5}) == {"only": 5}
    # Explicit levels run from 1 to n, both ends included.
    assert D.assign_levels(["a", "b"], 5, {"a": 1, "b": 5}) == {"a": 1, "b": 5}
    for wrong in (0, 6):
        with pytest.raises(StageError, match="levels run from 1 to 5"):
            D.assign_levels(["a", "b"], 5, {"a": wrong})
    with pytest.raises(StageError):
        D.assign_levels(["a"], 5, {"a": 9})
    with pytest.raises(StageError):
        D.parse_levels("a:2")


def test_a_layer_between_two_levels_takes_the_nearest_by_relative_depth():
    """Relative depths that fall between levels are rounded to the nearest one, not down: four
    layers over 3 levels sit at 1, 1 + 2/3, 1 + 4/3, 3 → levels 1, 2, 2, 3; over 5 levels at
    1, 2.33, 3.67, 5 → 1, 2, 4, 5."""
    four = ["a", "b", "c", "d"]
    assert D.assign_levels(four, 3) == {"a": 1, "b": 2, "c": 2, "d": 3}
    assert D.assign_levels(four, 5) == {"a": 1, "b": 2, "c": 4, "d": 5}


def test_levels_setting_takes_dotted_names_and_refuses_half_pairs():
    """``--levels`` pairs: dotted module names and spaces are fine, and the level is after the
    last "=" (a layer name may hold one); a pair without its layer, its level or a whole number
    is refused, naming the pair."""
    assert D.parse_levels(" _blocks.3 = 2, head=5,,") == {"_blocks.3": 2, "head": 5}
    assert D.parse_levels("a=b=3") == {"a=b": 3}
    for bad in ("=2", "a=", "a=x", "a=2.5", "a"):
        with pytest.raises(StageError, match=re.escape(repr(bad.strip()))):
            D.parse_levels(f"ok=1,{bad}")


def test_the_journal_answer_used_is_the_last_good_one_for_the_task():
    """Of a neuron's journal records, the one used for a task is its latest usable answer; a later
    failure or refusal does not undo it; with no usable answer the latest attempt stands (its
    reason is reported) and the task is not done; records of another task (an old prompt or
    model) never count."""
    old = {"key": "k", "raw": "red dots"}
    new = {"key": "k", "raw": "red and white dots"}
    failed = {"key": "k", "raw": None, "error": "timeout"}
    refused = {"key": "k", "raw": "I'm sorry, I cannot help."}
    other = {"key": "old-prompt", "raw": "stripes"}
    assert D.pick([old, new, failed, refused, other], "k") is new
    assert D.is_done([old, new, failed, refused, other], "k")
    assert D.pick([failed, refused], "k") is refused and not D.is_done([failed, refused], "k")
    assert D.pick([refused, failed], "k") is failed and not D.is_done([refused, failed], "k")
    assert D.pick([other], "k") is None and not D.is_done([other], "k")
    assert D.is_done([other], "old-prompt")


def test_prompt_per_level_with_domain_and_keywords(tmp_path):
    """Each level gets its own prompt; the domain is in all; keywords only where allowed."""
    prompts = D.load_prompts(D.DEFAULT_PROMPTS)
    texts = [D.build_prompt(prompts, lv, "chest X-rays", "nodule, rib")
             for lv in range(1, len(prompts["levels"]) + 1)]
    assert len(set(texts)) == len(texts)
    assert all("chest X-rays" in t for t in texts)
    assert "nodule" not in texts[0] and "nodule" in texts[-1]
    assert "objects" in texts[0].lower()            # early prompt forbids naming objects
    assert prompts["domain"]["default"] in D.build_prompt(prompts, 1)
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"domain": {"default": "cells", "context": "From {domain}.",
                                          "keywords": "Use {keywords}."},
                               "levels": [{"role": "R1", "describe": "D1", "avoid": "A1",
                                           "answer": "F1"},
                                          {"role": "R2", "describe": "D2", "avoid": "A2",
                                           "answer": "F2", "keywords": True}]}))
    mine = D.load_prompts(own)
    assert D.build_prompt(mine, 2, "", "mitosis") == "R2 From cells. D2 A2 F2 Use mitosis."
    assert D.build_prompt(mine, 1, "", "mitosis") == "R1 From cells. D1 A1 F1"  # no keywords key: none
    (tmp_path / "bad.yaml").write_text("levels: []\n")
    with pytest.raises(StageError):
        D.load_prompts(tmp_path / "bad.yaml")


def test_run_uses_the_prompt_of_each_layers_level(tmp_path):
    """Neurons of the first and last layer get the first and last level's prompt."""
    run = make_run(tmp_path, channels=1)
    fake = FakeVLM()
    seen = {}
    original = fake.describe
    fake.describe = lambda ns: (seen.update({n.layer: (n.level, n.prompt) for n in ns}),
                                original(ns))[1]
    run_stage(run, describer=fake, domain="satellite images")
    prompts = D.load_prompts(D.DEFAULT_PROMPTS)
    assert seen["early"] == (1, D.build_prompt(prompts, 1, "satellite images"))
    assert seen["deep"][0] == len(prompts["levels"])
    assert "satellite images" in seen["mid"][1]


# --- post-processing -------------------------------------------------------------------------

@pytest.mark.parametrize("raw, text", [
    ('ASSISTANT: "Black and white diagonal stripes."', "Black and white diagonal stripes."),
    ("  Answer:   red\n dots  ", "red dots"),
    ("assistant: 'Dogs on grass'", "Dogs on grass"),
    ("[/INST] Green dots", "Green dots"),
    ("ASSISTANT: Answer: Description: red dots", "red dots"),  # three stacked prefixes
    ("Answer the call of stripes", "Answer the call of stripes"),
])
def test_clean_answer_strips_prefixes_quotes_and_spaces(raw, text):
    """Role prefixes, quotes and extra whitespace go; the content stays."""
    assert D.clean_answer(raw) == (text, "")


def test_long_answers_are_cut_at_their_last_sentence_end_within_400_characters():
    """An answer over MAX_ANSWER_CHARS (400) is cut at its last sentence end within the limit; one
    of 400 characters or fewer is kept whole, several sentences included; a long answer without a
    sentence end keeps its first 400 characters."""
    assert D.MAX_ANSWER_CHARS == 400
    assert D.clean_answer("Red dots. Blue stripes.") == ("Red dots. Blue stripes.", "")
    exactly = "A. " + "b" * 397
    assert D.clean_answer(exactly) == (exactly, "")
    assert D.clean_answer(exactly + "b") == ("A.", "")
    sentence = "Red dots on a grey ground."   # 26 characters, 27 with the space after it
    # 14 sentences end at character 377; the 15th would end at 404, past the limit.
    assert D.clean_answer(" ".join([sentence] * 20)) == (" ".join([sentence] * 14), "")
    words = "stripes " * 60
    assert D.clean_answer(words) == (words[:400], "")


def test_predictions_reused_only_for_the_reference_model(tmp_path):
    """01's predictions stand for the reference classifier only when 01 ran that very model."""
    run = make_run(tmp_path, channels=1)
    assert D.is_reference_model({"model": {"name": "efficientnet_lite0"}})
    assert not D.is_reference_model({"model": {"name": "resnet50"}})
    assert not D.is_reference_model({"model": {"name": "efficientnet_lite0", "random_init": True}})
    settings = D.DescriberSettings(device="cpu", classify_crops=4)
    ref = D.make_describer(settings, 5, run / "01_predictions.csv", True)
    other = D.make_describer(settings, 5, run / "01_predictions.csv", False)
    assert len(ref.predictions) == GRID * GRID and other.predictions == {}


@pytest.mark.parametrize("raw", ["", "   ", '""', "ASSISTANT:", None,
                                 "I'm sorry, I cannot help with that.", "Sorry, no."])
def test_empty_or_refused_answers_are_failures(raw):
    """An empty or refused answer gives no text and a reason."""
    text, reason = D.clean_answer(raw)
    assert text == "" and reason


# --- offline describer ------------------------------------------------------------------------

def test_offline_names_colours_orientation_and_stripes(tmp_path):
    """Black/white diagonal stripes → all four words; red/green vertical → red, green, vertical."""
    def tiles(layer, ch):
        """Channel 0: black/white diagonal stripes; channel 1: red/green vertical ones."""
        if ch == 0:
            return [stripes(45, phase=i) for i in range(4)]
        return [stripes(90, phase=i, c1=(220, 20, 20), c2=(20, 180, 40)) for i in range(4)]
    run = make_run(tmp_path, channels=2, tiles_of=tiles)
    off = O.OfflineDescriber(5, D.read_predictions(run / "01_predictions.csv"),
                             class_names(), classify=lambda ims: pytest.fail("no crops"))
    rows = run_stage(run, describer=off, levels="early=1,mid=1,deep=5")
    early = {int(r["channel"]): r for r in rows if r["layer"] == "early"}
    assert early[0]["status"] == "ok" and early[0]["backend"] == "offline"
    words = early[0]["description"].lower()
    for word in ("black", "white", "diagonal", "stripes"):
        assert word in words, words
    assert "vertical" not in words and "horizontal" not in words
    other = early[1]["description"].lower()
    assert all(w in other for w in ("red", "green", "vertical", "stripes")), other
    assert "dog" not in words                       # early levels name no objects


def test_offline_uniform_and_edge_tiles():
    """A uniform tile is called uniform; one straight boundary is an edge, not stripes."""
    flat = [np.full((TILE, TILE, 3), (30, 60, 200), np.uint8)] * 4
    assert appearance.appearance_phrase(appearance.measure_tiles(flat)) == "uniform blue areas"
    edge = np.zeros((TILE, TILE, 3), np.uint8)
    edge[:, TILE // 2:] = 255
    text = appearance.appearance_phrase(appearance.measure_tiles([edge] * 4))
    assert "vertical edges" in text and "stripes" not in text


def test_offline_ignores_padding_and_its_border():
    """Tiles of fields past the image border: a grey band (02's padding) above vertical stripes
    must not add a horizontal edge, nor its grey, nor lower the stripes' contrast."""
    stripes = np.zeros((TILE, TILE, 3), np.uint8)
    stripes[:] = (20, 20, 110)                                     # dark and light blue
    stripes[:, (np.arange(TILE) // 4) % 2 == 1] = (70, 70, 230)
    padded = stripes.copy()
    padded[: TILE // 2 - 2] = 128   # the border runs close to the tile's centre
    alone, with_pad = appearance.measure_tiles([stripes] * 4), appearance.measure_tiles([padded] * 4)
    assert appearance.orientation_word(with_pad["orientation_deg"]) == "vertical"
    assert with_pad["agreement"] > 0.9
    assert "gray" not in with_pad["colours"]
    assert abs(with_pad["contrast"] - alone["contrast"]) < 0.05
    assert "vertical" in appearance.appearance_phrase(with_pad) and "stripes" in appearance.appearance_phrase(with_pad)


def test_offline_deep_layer_reuses_predictions_and_groups_kinds(tmp_path):
    """Whole-image receptive fields: 01's predictions are reused (no classifier call) and four
    different terriers become 'dogs, mostly terriers'."""
    run = make_run(tmp_path, channels=1)
    off = O.OfflineDescriber(5, D.read_predictions(run / "01_predictions.csv"),
                             class_names(),
                             classify=lambda ims: pytest.fail("deep layer must reuse 01"))
    rows = run_stage(run, describer=off, levels="early=1,mid=1,deep=5")
    deep = next(r for r in rows if r["layer"] == "deep")
    assert "dogs, mostly terriers" in deep["description"], deep["description"]
    assert "stripes" not in deep["description"]     # deep levels state labels only


def test_part_of_a_neurons_crops_names_the_images_of_its_tiles(tmp_path):
    """An index row made of some of a neuron's crops (09's sub-concepts: ``<layer>#<s>`` with
    the tiles' ranks in its top-k list) gets those images' ids: its whole-image tiles reuse 01's
    predictions of exactly those images, and the journal key changes with them."""
    cat, fish = ([281, 282, 285, 1, 2], [0.9, 0.04, 0.03, 0.02, 0.01]), \
        ([1, 2, 3, 4, 5], [0.9, 0.04, 0.03, 0.02, 0.01])
    run = make_run(tmp_path, channels=1, deep_top5=[fish, cat, fish, cat])
    sub = run / "sub"
    sub.mkdir()
    mosaic([stripes(45)] * 2).save(sub / "0_1.png")
    write_csv(sub / "09_mosaics.csv",
              [{"layer": "deep#1", "channel": 0, "path": "0_1.png", "n_tiles": 2, "grid": 2,
                "tile_px": TILE, "crop": "subconcept", "ranks": "3 1"}],
              ["layer", "channel", "path", "n_tiles", "grid", "tile_px", "crop", "ranks"])
    write_meta(sub / "09_mosaics.meta.json", "09_subconcepts", {}, [sub / "09_mosaics.csv"],
               inputs=[json.loads((run / "02_mosaics.meta.json").read_text())])
    prompts = D.load_prompts(D.DEFAULT_PROMPTS)
    neurons, _ = D.make_neurons(sub / "09_mosaics.csv", prompts, "deep#1=5", "", "",
                                run / "01_activations.npz")
    assert neurons[0].top_ids.tolist() == [3, 1] and neurons[0].whole.all()
    off = O.OfflineDescriber(5, D.read_predictions(run / "01_predictions.csv"), class_names(),
                             classify=lambda ims: pytest.fail("whole-image tiles reuse 01"))
    text = off.describe(neurons)[0][0]
    assert "cat" in text and "fish" not in text, text
    other = neurons[0]._replace(top_ids=np.array([0, 2]))
    assert D.task_key(neurons[0], "offline", "m", "", "") != D.task_key(other, "offline", "m",
                                                                         "", "")


def test_offline_middle_layer_classifies_crops_once(tmp_path):
    """Crops smaller than the image are classified (by the injected classifier), each distinct
    crop once; a clear majority kind is added to the measured appearance."""
    calls = []

    def classify(images):
        """Every crop is a big cat; the batch sizes are recorded."""
        calls.append(len(images))
        return [([291, 292, 290, 1, 2], [0.7, 0.1, 0.1, 0.05, 0.05])] * len(images)  # big cats
    run = make_run(tmp_path, channels=2)
    off = O.OfflineDescriber(5, {}, class_names(), classify=classify)
    rows = run_stage(run, describer=off, levels="early=1,mid=3,deep=5")
    mid = [r for r in rows if r["layer"] == "mid"]
    assert all("cats" in r["description"] and "stripes" in r["description"] for r in mid)
    # Both mid neurons show the same four crops, and so does the deep layer (no predictions):
    # four distinct crops in all, classified once.
    assert sum(calls) == 4


def test_whole_input_receptive_field_per_position():
    """A 339-px field spans a 224-px input from a central cell; from a corner it still covers
    68% of it (counted as whole); a 67-px field covers 9% (a crop)."""
    big = np.array([339, 339, 16, 16, 15, 15], float)
    assert D.covers_whole_input(big, np.array([0, 6]), np.array([0, 6]), (224, 224)).all()
    small = np.array([67, 67, 8, 8, 7, 7], float)
    assert not D.covers_whole_input(small, np.array([13]), np.array([13]), (224, 224)).any()
    edge = np.array([200, 200, 16, 16, 15, 15], float)  # corner cell: 115² / 224² = 26%
    assert D.covers_whole_input(edge, np.array([0, 6]), np.array([0, 6]), (224, 224)).tolist() \
        == [False, True]


def test_whole_input_on_a_wide_input_counts_a_field_covering_exactly_60_percent():
    """A 40 × 100 input (area 4000; 60 % is 2400 px) and a 60 × 120 field, jump 1, start (20, 0).
    Cell (0, 0) is centred on (20, 0): rows −10..50 clip to 0..40 (all 40), cols −60..60 to
    0..60, 40 × 60 = 2400: exactly 60 %, whole. Cell (0, 20) covers 40 × 80 (whole); cell (30, 0)
    rows 20..40 only, 20 × 60 (a crop). A field 118 px wide at cell (0, 0) covers 40 × 59 = 2360
    (a crop). The same on the input turned on its side (100 × 40, rows and columns swapped),
    where a 40 × 40 field low in the image (rows 60..100) covers 40 % (a crop), as one far right
    in the wide input does (columns 60..100)."""
    wide = np.array([60, 120, 1, 1, 20, 0], float)
    ys, xs = np.array([0, 0, 30]), np.array([0, 20, 0])
    assert D.covers_whole_input(wide, ys, xs, (40, 100)).tolist() == [True, True, False]
    narrower = np.array([60, 118, 1, 1, 20, 0], float)
    assert not D.covers_whole_input(narrower, ys[:1], xs[:1], (40, 100)).any()
    tall, taller = wide[[1, 0, 3, 2, 5, 4]], narrower[[1, 0, 3, 2, 5, 4]]
    assert D.covers_whole_input(tall, xs, ys, (100, 40)).tolist() == [True, True, False]
    assert not D.covers_whole_input(taller, xs[:1], ys[:1], (100, 40)).any()
    # a 40 × 40 field centred on row 80 of the tall input: rows 60..100, 40 % of it (a crop)
    low = np.array([40, 40, 1, 1, 80, 20], float)
    assert not D.covers_whole_input(low, np.array([0]), np.array([0]), (100, 40)).any()
    # and a 40 × 40 field centred on column 80 of the wide input: columns 60..100, 40 %
    right = np.array([40, 40, 1, 1, 20, 80], float)
    assert not D.covers_whole_input(right, np.array([0]), np.array([0]), (40, 100)).any()
    # an odd size: a 7-row field centred on row 2.5 reaches row 6 (half of 7 is 3.5), so with
    # every column it covers 60 % of a 10 × 10 input exactly (whole)
    odd = np.array([7, 20, 1, 1, 2.5, 5], float)
    assert D.covers_whole_input(odd, np.array([0]), np.array([0]), (10, 10)).all()


def test_objects_phrase_mixed_and_confidence():
    """No majority kind → 'a mix of'; low top-1 probabilities are flagged."""
    names = class_names()
    mixed = [([151, 1, 2, 3, 4], [0.9, 0.025, 0.025, 0.025, 0.025]),
             ([281, 1, 2, 3, 4], [0.9, 0.025, 0.025, 0.025, 0.025]),
             ([980, 1, 2, 3, 4], [0.9, 0.025, 0.025, 0.025, 0.025])]
    text, share = O.objects_phrase(mixed, names)
    assert text.startswith("a mix of") and share < 0.5
    unsure = [([207, 208, 1, 2, 3], [0.1, 0.05, 0.05, 0.05, 0.05])] * 3
    assert "low classifier confidence" in O.objects_phrase(unsure, names)[0]


# --- long runs: resume, retry, shards ---------------------------------------------------------

def test_kill_and_resume_redescribes_nothing(tmp_path):
    """A kill after two batches keeps their answers; the rerun describes only the rest."""
    run = make_run(tmp_path, channels=3)           # 9 neurons, batches of 2
    first = FakeVLM(crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_stage(run, describer=first)
    assert len(first.described) == 4
    assert not (run / "03_descriptions.csv").exists()
    second = FakeVLM()
    rows = run_stage(run, describer=second)
    assert len(second.described) == 5
    assert not set(first.described) & set(second.described)
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows)
    assert rows[0]["description"] == "early neuron 0, level 1"   # cleaned
    third = FakeVLM()
    run_stage(run, describer=third)
    assert third.described == []


def test_torn_journal_keeps_its_complete_records_and_resumes(tmp_path):
    """A kill mid-write leaves the journal's last line cut mid-record: the complete records before
    it are read back, and the rerun describes the torn record's neuron and the rest, no other."""
    from common.journal import journal_path, read_journals
    run = make_run(tmp_path, channels=3)           # 9 neurons, batches of 2
    first = FakeVLM(crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_stage(run, describer=first)
    out = run / "03_descriptions.csv"
    journal = journal_path(out, (0, 1))
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    torn = lines[-1][:len(lines[-1]) // 2]
    journal.write_bytes(b"".join(lines[:3]) + torn)  # the fourth record cut halfway, no newline
    kept = read_journals(out)
    assert sorted(kept) == sorted(first.described[:3])
    second = FakeVLM()
    rows = run_stage(run, describer=second)
    assert sorted(second.described) == sorted(set(all_neurons(run)) - set(first.described[:3]))
    assert first.described[3] in second.described
    assert len(rows) == 9 and all(r["status"] == "ok" and r["description"] for r in rows)
    records = [json.loads(line) for line in journal.read_bytes().splitlines()]  # no torn line left
    assert len(records) == 9


def all_neurons(run):
    """Every (layer, channel) of a planted run's mosaics."""
    from common.io import read_csv
    return [(r["layer"], int(r["channel"])) for r in read_csv(run / "02_mosaics.csv")]


def test_failed_neurons_are_listed_then_retried(tmp_path):
    """A failed neuron is a failed row with its reason; the next run retries only it."""
    run = make_run(tmp_path, channels=2)
    rows = run_stage(run, describer=FakeVLM(fail=[("mid", 1)]))
    bad = [r for r in rows if r["status"] == "failed"]
    assert [(r["layer"], r["channel"], r["reason"]) for r in bad] == [("mid", 1, "server said no")]
    assert bad[0]["description"] == ""
    retry = FakeVLM()
    rows = run_stage(run, describer=retry)
    assert retry.described == [("mid", 1)]
    assert all(r["status"] == "ok" for r in rows)


def test_changed_prompt_is_described_again(tmp_path):
    """A journal entry made with another domain (another prompt) is not reused."""
    run = make_run(tmp_path, channels=1)
    run_stage(run, describer=FakeVLM())
    again = FakeVLM()
    run_stage(run, describer=again, domain="microscopy")
    assert len(again.described) == 3


def test_shards_then_merge(tmp_path):
    """Shard 0/2 writes no CSV; shard 1/2 completes the set; --merge rebuilds the same CSV."""
    run = make_run(tmp_path, channels=3)
    a, b = FakeVLM(), FakeVLM()
    assert run_stage(run, describer=a, shard=(0, 2)) is None
    assert not (run / "03_descriptions.csv").exists()
    rows = run_stage(run, describer=b, shard=(1, 2))
    assert len(a.described) + len(b.described) == 9 and not set(a.described) & set(b.described)
    first = (run / "03_descriptions.csv").read_text()
    (run / "03_descriptions.csv").unlink()
    run_stage(run, describer=FakeVLM(), merge_only=True)
    assert (run / "03_descriptions.csv").read_text() == first
    assert len(rows) == 9


def test_merge_with_missing_shard_fails_clearly(tmp_path):
    """--merge before all shards ran: a StageError, not a partial CSV."""
    run = make_run(tmp_path, channels=2)
    run_stage(run, describer=FakeVLM(), shard=(0, 2))
    with pytest.raises(StageError, match="shard"):
        run_stage(run, describer=FakeVLM(), merge_only=True)


def test_main_offline_end_to_end(tmp_path, monkeypatch):
    """The CLI writes the CSV with the contract's columns and a meta with the lineage."""
    run = make_run(tmp_path, channels=1)
    monkeypatch.setattr(O, "reference_classify",
                        lambda *a, **k: lambda ims: [([1, 2, 3, 4, 5], [.9, .04, .03, .02, .01])]
                        * len(ims))
    STAGE03.main(["--run", str(run)])
    assert D.FIELDS == columns(Description)  # what 03 writes is what the reader reads
    rows = read_descriptions(run / "03_descriptions.csv")
    assert {r.backend for r in rows} == {"offline"} and all(r.ok for r in rows)
    meta = json.loads((run / "03_describe.meta.json").read_text())
    assert {"01_extract", "02_mosaics", "03_describe"} <= set(meta["lineage"])


# --- openai backend: real HTTP round trip on loopback ----------------------------------------

# What real servers answer (recorded shapes, trimmed): mode → (HTTP status, JSON body).
SERVER_SHAPES = {
    "vllm": (200, {"id": "chatcmpl-9f2", "object": "chat.completion", "created": 1765000000,
                   "model": "tiny-vlm", "prompt_logprobs": None,
                   "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                "stop_reason": None,
                                "message": {"role": "assistant", "reasoning_content": None,
                                            "content": "Red and white diagonal stripes.",
                                            "tool_calls": []}}],
                   "usage": {"prompt_tokens": 612, "total_tokens": 620,
                             "completion_tokens": 8}}),
    "ollama": (200, {"id": "chatcmpl-412", "object": "chat.completion", "created": 1765000000,
                     "model": "tiny-vlm", "system_fingerprint": "fp_ollama",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant",
                                              "content": "<think>\nStripes, so texture.\n"
                                                         "</think>\n\nFine black stripes."}}],
                     "usage": {"prompt_tokens": 40, "completion_tokens": 12,
                               "total_tokens": 52}}),
    "vllm-reasoning-cut": (200, {"object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": "length",
        "message": {"role": "assistant", "reasoning_content": "Let me look at the",
                    "content": None}}]}),
    "ollama-404": (404, {"error": {"message": "model \"tiny-vlm\" not found, try pulling it first",
                                   "type": "api_error", "param": None, "code": None}}),
    "vllm-400": (400, {"object": "error", "message": "The model `tiny-vlm` does not exist.",
                       "type": "NotFoundError", "param": None, "code": 404}),
}


class _Handler(BaseHTTPRequestHandler):
    """A small OpenAI-compatible chat-completions endpoint whose behaviour the test sets."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        """Answer according to ``self.server.mode``; record each request."""
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        srv.requests.append({"body": body, "auth": self.headers.get("Authorization")})
        mode = srv.modes.pop(0) if srv.modes else srv.mode
        if mode == "sleep":
            time.sleep(1.0)
            mode = "ok"
        if mode == "500":
            self.send_response(500)
            self.end_headers()
            return
        text = body["messages"][0]["content"][0]["text"]
        status, reply = 200, ({"choices": [{"message": {
            "role": "assistant", "content": f"ASSISTANT: 'answer to {len(text)}'"}}]}
            if mode == "ok" else {"unexpected": True})
        if mode in SERVER_SHAPES:
            status, reply = SERVER_SHAPES[mode]
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:
            pass  # the client timed out and left, which is what the timeout case tests

    def log_message(self, *args):
        """Keep the test output quiet."""


@pytest.fixture
def server():
    """A threaded HTTP server on 127.0.0.1 (free port), shut down after the test."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests, srv.modes, srv.mode = [], [], "ok"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _openai(srv, **kw):
    """An OpenAI describer pointed at the test server with quick retries."""
    settings = dict(api_key_env="ATLAS_TEST_KEY", concurrency=2, timeout=0.5, retries=1)
    settings.update(kw)
    return D.OpenAIDescriber(f"http://127.0.0.1:{srv.server_address[1]}/v1", "tiny-vlm",
                             **settings)


def test_openai_round_trip_sends_image_and_key_but_never_logs_it(tmp_path, server, monkeypatch,
                                                                 caplog):
    """Answers come back cleaned; the mosaic travels as a PNG data URL; the key only in the
    Authorization header, never in the CSV, journal, meta or log."""
    secret = "sk-test-123456789"
    monkeypatch.setenv("ATLAS_TEST_KEY", secret)
    run = make_run(tmp_path, channels=1)
    caplog.set_level(logging.DEBUG)
    rows = run_stage(run, describer=_openai(server), args={"api_key_env": "ATLAS_TEST_KEY"})
    assert all(r["status"] == "ok" and r["description"].startswith("answer to") for r in rows)
    req = server.requests[0]
    assert req["auth"] == f"Bearer {secret}"
    content = req["body"]["messages"][0]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert req["body"]["model"] == "tiny-vlm" and req["body"]["temperature"] == 0.8
    for path in run.iterdir():
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path
    assert secret not in caplog.text


def test_openai_retries_500_and_records_malformed_and_timeout(tmp_path, server):
    """A 500 then success is retried into an answer; malformed replies and timeouts are failed
    rows with their reason."""
    run = make_run(tmp_path, channels=1)
    neurons, _ = D.make_neurons(run / "02_mosaics.csv", D.load_prompts(D.DEFAULT_PROMPTS), "", "",
                                "", run / "01_activations.npz")
    desc = _openai(server, concurrency=1)
    server.modes = ["500", "ok"]
    assert desc.describe(neurons[:1])[0][0].startswith("ASSISTANT: 'answer")
    assert len(server.requests) == 2
    server.mode = "bad"
    raw, err = desc.describe(neurons[:1])[0]
    assert raw is None and err == ("the server's answer is not a chat completion (no choices[0]."
                                   "message.content): {\"unexpected\": true}")
    server.mode, server.modes = "ok", ["sleep", "sleep"]
    raw, err = desc.describe(neurons[:1])[0]
    assert raw is None and ("timeout" in err.lower() or "timed out" in err.lower()), err
    server.mode = "500"
    raw, err = desc.describe(neurons[:1])[0]
    assert raw is None and err == "HTTP 500"


@pytest.mark.parametrize("mode, raw, error", [
    ("vllm", "Red and white diagonal stripes.", ""),
    ("ollama", "<think>\nStripes, so texture.\n</think>\n\nFine black stripes.", ""),
    ("vllm-reasoning-cut", None, "the answer was cut at --max-new-tokens 57 before any text "
                                 "(a reasoning model needs more)"),
    ("ollama-404", None, 'HTTP 404: model "tiny-vlm" not found, try pulling it first'),
    ("vllm-400", None, "HTTP 400: The model `tiny-vlm` does not exist."),
])
def test_openai_answer_shapes_of_vllm_and_ollama(tmp_path, server, mode, raw, error):
    """Each server's answer shape is read: vLLM's and Ollama's full completions, an answer a
    reasoning model spent on thinking, and each server's error body, whose message becomes
    the reason."""
    run = make_run(tmp_path, channels=1)
    neurons, _ = D.make_neurons(run / "02_mosaics.csv", D.load_prompts(D.DEFAULT_PROMPTS), "", "",
                                "", run / "01_activations.npz")
    server.mode = mode
    assert _openai(server, retries=0).describe(neurons[:1]) == [(raw, error)]


def test_thinking_is_dropped_from_answers():
    """A reasoning model's notes before its answer are not part of the description; notes cut
    off before any answer leave none."""
    assert D.clean_answer("<think>\nStripes, so texture.\n</think>\n\nFine black stripes.") == (
        "Fine black stripes.", "")
    assert D.clean_answer("<think>The tiles show")[1] == "empty answer"


def test_openai_model_the_server_lacks_stops_the_stage_in_one_line(tmp_path, server):
    """Ollama without the model pulled answers 404 to every neuron: the stage stops with one
    line naming the model and the server's own words."""
    run = make_run(tmp_path, channels=1)
    server.mode = "ollama-404"
    with pytest.raises(StageError) as err:
        run_stage(run, describer=_openai(server, retries=0))
    assert str(err.value).startswith('tiny-vlm (openai) failed on all 3 neurons tried so far (3 '
                                     '× HTTP 404: model "tiny-vlm" not found, try pulling it')


def test_openai_unreachable_server_stops_with_advice_and_keeps_progress(tmp_path, server):
    """After some neurons are done, a refused connection ends the run with a clear message;
    the done neurons stay in the journal and are not asked for again."""
    run = make_run(tmp_path, channels=2)
    port = server.server_address[1]
    desc = _openai(server)
    desc.batch_size = 2
    calls = {"n": 0}
    real = desc.describe_as_completed

    def describe(neurons):
        """Point the describer at a closed port from the second batch on."""
        calls["n"] += 1
        if calls["n"] == 2:
            desc.client.base_url = "http://127.0.0.1:9/v1"  # discard port: refused
            desc.base_url = "http://127.0.0.1:9/v1"
        return real(neurons)
    desc.describe_as_completed = describe
    with pytest.raises(StageError, match="cannot reach"):
        run_stage(run, describer=desc)
    desc.client.base_url = f"http://127.0.0.1:{port}/v1"
    before = len(server.requests)
    desc.describe_as_completed = real
    rows = run_stage(run, describer=desc)
    assert len(rows) == 6 and len(server.requests) - before == 4


# --- hf backend (each family on a tiny random model: tests/test_vlm_families.py) -------------

def test_hf_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    """A model that is neither a folder nor in the cache: StageError saying how to get it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError, match="download"):
        D.HFDescriber(str(tmp_path / "no-such-model"), device="cpu")


OWN = ["pin stripe", "narrow band", "wide band", "broad band"]


def own_model_run(tmp_path, labels, classes=OWN, preds=None):
    """A planted run whose 01 ran a 4-class model of the user's: image i has label ``labels[i]``
    (-1: unlabelled) and the model predicts ``preds[i]`` (default: class 3)."""
    run = make_run(tmp_path, channels=1)
    rewrite_01(run, labels, classes, preds or [3] * len(labels))
    return run


def rewrite_01(run, labels, classes, preds, model=None):
    """Re-write 01's predictions and meta (as a re-run of 01 would), then 02's meta after it."""
    write_csv(run / "01_predictions.csv",
              [{"image_id": i, "path": f"img{i}.png", "label": classes[lab] if lab >= 0 else "",
                "label_idx": lab, "pred_idx": p, "pred_name": classes[p], "prob": 0.9,
                "correct": int(lab == p) if lab >= 0 else "", "top5_idx": f"{p} 0 1 2",
                "top5_prob": "0.9 0.05 0.03 0.02"}
               for i, (lab, p) in enumerate(zip(labels, preds))], columns(Prediction))
    write_meta(run / "01_extract.meta.json", "01_extract", {},
               [run / "01_activations.npz", run / "01_predictions.csv"],
               model=model or {"name": "net.py:build", "weights": None, "random_init": False},
               classes=classes)
    write_meta(run / "02_mosaics.meta.json", "02_mosaics", {}, [run / "02_mosaics.csv"],
               inputs=[json.loads((run / "01_extract.meta.json").read_text())])


def test_offline_names_the_user_models_classes_from_labels_then_predictions(tmp_path):
    """Deep neurons of a non-ImageNet model are named in its own classes: the labels of the top
    images where they have one, the model's predictions for the others; no ImageNet word."""
    run = own_model_run(tmp_path, labels=[1, 1, 1, -1])
    settings = dict(device="cpu", classify_crops=4, temperature=0.8, top_p=0.95,
                    max_new_tokens=57, seed=0, base_url="", api_key_env="", concurrency=1,
                    timeout=1, retries=0)
    rows = run_stage(run, backend="offline", levels="early=1,mid=1,deep=5", **settings)
    deep = next(r for r in rows if r["layer"] == "deep")
    assert "mostly narrow band (75%); also broad band (25%)" in deep["description"], deep
    assert "efficientnet_lite0" not in deep["model"] and "net.py:build" in deep["model"]
    asked = run_stage(run, backend="offline", levels="early=1,mid=1,deep=5", namer="reference",
                      **settings)
    assert "asked for" in next(r for r in asked if r["layer"] == "deep")["model"]


def test_journal_redescribes_when_the_model_or_its_classes_change(tmp_path):
    """Unchanged inputs describe nothing twice; new class names, or another model's 01 run with
    byte-identical mosaics, describe every neuron again."""
    run = own_model_run(tmp_path, labels=[0, 1, 2, 3])
    first = FakeVLM()
    run_stage(run, describer=first)
    again = FakeVLM()
    run_stage(run, describer=again)
    assert len(first.described) == 3 and again.described == []
    rewrite_01(run, [0, 1, 2, 3], OWN[:3] + ["BROAD"], [3] * 4)
    renamed = FakeVLM()
    run_stage(run, describer=renamed)
    assert len(renamed.described) == 3
    rewrite_01(run, [0, 1, 2, 3], OWN[:3] + ["BROAD"], [2] * 4)  # other predictions
    other = FakeVLM()
    run_stage(run, describer=other)
    assert len(other.described) == 3
    mosaic([stripes(90, phase=i) for i in range(4)]).save(run / "02_mosaics" / "deep" / "0.png")
    last = FakeVLM()
    run_stage(run, describer=last)
    assert last.described == [("deep", 0)]


def test_middle_layer_crops_are_classified_by_the_analysed_model(tmp_path):
    """A middle layer's crops go through the user's own (grey) model, prepared with the input size,
    mean and std 01 recorded, and are named in its classes."""
    from conftest import ROOT
    run = make_run(tmp_path, channels=1)
    spec = {"name": f"{ROOT / 'tests' / 'fake_grey_model.py'}:build", "weights": None,
            "random_init": False, "input_size": 32, "mean": [0.2], "std": [0.25]}
    rewrite_01(run, [-1] * 4, OWN, [0] * 4, model=spec)
    settings = dict(device="cpu", classify_crops=4, temperature=0.8, top_p=0.95,
                    max_new_tokens=57, seed=0, base_url="", api_key_env="", concurrency=1,
                    timeout=1, retries=0)
    with pytest.raises(StageError, match="pass --model"):  # a file named by the meta alone
        run_stage(run, backend="offline", levels="early=1,mid=3,deep=5", **settings)
    settings["analysed_model"] = spec["name"]
    rows = run_stage(run, backend="offline", levels="early=1,mid=3,deep=5", **settings)
    mid = next(r for r in rows if r["layer"] == "mid")["description"]
    # 32-px tiles of period-8 diagonal stripes, seen at 32 px: the model's "wide band" density
    assert "stripes" in mid and "wide band" in mid, mid


def test_skip_dead_leaves_out_the_neurons_the_triage_flags(tmp_path):
    """--skip-dead: a neuron that never changes from image to image is not described; the others
    are."""
    run = make_run(tmp_path, channels=3)
    (run / "01_stats").mkdir()
    rng = np.random.default_rng(0)
    for layer in LAYERS:
        stats = rng.random((GRID * GRID * 3, 3)).astype(np.float32)
        if layer == "mid":
            stats[:, 1] = 0.5  # constant: dead
        np.save(run / "01_stats" / f"{layer}.max.npy", stats)
    vlm = FakeVLM()
    rows = run_stage(run, describer=vlm, skip_dead=True)
    assert ("mid", 1) not in vlm.described and ("mid", 0) in vlm.described
    assert len(rows) == 3 * len(LAYERS) - 1


# --- 03 on a mosaic index from another stage (common/describing.py) ---------------------------


def test_describing_in_a_fork_or_a_new_process_gives_the_same_sentences(tmp_path, monkeypatch):
    """09 and 11 describe their own mosaic indexes with common.describers.Describing: in a fork
    of the calling process where it can (the child then skips importing torch again), else in a
    fresh interpreter. Both give the same sentences and keep the describer's log beside them; a
    failure names the index and shows the end of that log; --describe-args that are not 03's
    describer flags are refused before anything starts."""
    from common.io import read_csv
    run = make_run(tmp_path)
    rows = [r for r in read_csv(run / "02_mosaics.csv") if r["layer"] != "mid"]
    index = run / "index.csv"
    write_csv(index, rows, list(rows[0]))
    write_meta(run / "index.meta.json", "index", {}, [index],
               inputs=[json.loads((run / "02_mosaics.meta.json").read_text())])
    inputs = (run / "01_activations.npz", run / "01_predictions.csv")
    settings = D.parse_describe_args("--backend offline --device cpu")
    forked = D.Describing(index, tmp_path / "fork" / "03.csv", settings, {}, *inputs)
    assert forked.method == "fork"
    got_fork = forked.result()
    monkeypatch.setattr(D, "_can_fork", lambda: False)
    spawned = D.Describing(index, tmp_path / "new" / "03.csv", settings, {}, *inputs)
    assert spawned.method == "spawn"
    got_new = spawned.result()
    assert set(got_fork) == {(r["layer"], int(r["channel"])) for r in rows}
    assert got_fork == got_new and all(got_fork.values())
    for folder in ("fork", "new"):
        assert "descriptions →" in (tmp_path / folder / "03_describe.log").read_text()
    missing = D.parse_describe_args(f"--prompts {tmp_path / 'nope.yaml'}")
    for can_fork in (True, False):
        monkeypatch.setattr(D, "_can_fork", lambda: can_fork)
        failing = D.Describing(index, tmp_path / f"bad{can_fork}" / "03.csv", missing, {},
                               *inputs)
        with pytest.raises(StageError,
                           match=r"index\.csv failed: .*prompt file .*nope\.yaml not found"):
            failing.result()
    for wrong in ("--backend nonsense", "--mosaics x.csv", "--nope"):
        with pytest.raises(StageError, match="describe-args"):
            D.parse_describe_args(wrong)


def test_offline_sentences_are_keyed_on_all_of_the_describers_code(monkeypatch):
    """An edit of the offline describer, of the appearance measures it words, or of the module
    holding the prompts and answer cleaning changes the key of every offline sentence (they are
    written again); nothing else does."""
    from pathlib import Path
    before, real = D.code_version(), Path.read_bytes
    assert D.code_version() == before
    for module in (O, appearance, D):
        edited = str(Path(module.__file__))
        monkeypatch.setattr(Path, "read_bytes",
                            lambda self, e=edited: real(self) + (b"#" if str(self) == e else b""))
        assert D.code_version() != before, module.__name__
