"""Stage 08: confusion table, pair selection, planted differential neurons, the behaviour of the
|z| ≥ 2 rule and of the FDR flag on pure noise, and an ablation that undoes a planted error.

Runs are built by hand: 01's predictions and per-image statistics are written directly, so the
differences between OK and KO images are known exactly.
"""
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.artefacts import (Description, Mosaic, Prediction, Run, columns, read_ablation,
                              read_causal, read_confusion, read_debug_neurons, read_pairs,
                              read_report_blocks, read_why)
from common.cli import StageError
from common.differential import chance_rate, compare_groups, layer_stats
from common.io import save_npz, write_csv
from common.provenance import write_meta
from conftest import load_stage


debug = load_stage("08_debug")

NAMES = ["palace", "castle", "monastery"]


def write_run(run_dir, labels, preds, stats, descriptions=None, mosaic_for=()):
    """Write 01 (predictions, stats, activations, meta), 03 and optionally 02 artefacts.

    ``stats`` maps layer → (N × C) per-image values, used for both max and mean (max + 1 for max,
    so that the two aggregations differ). Images are 8×8 grey PNGs so that reports can show them.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "img").mkdir(exist_ok=True)
    rows = []
    for i, (lab, pred) in enumerate(zip(labels, preds)):
        path = run_dir / "img" / f"{i}.png"
        Image.new("RGB", (8, 8), (40 + 5 * (i % 40),) * 3).save(path)
        rows.append({"image_id": i, "path": str(path), "label": NAMES[lab], "label_idx": lab,
                     "pred_idx": pred, "pred_name": NAMES[pred], "prob": 0.9,
                     "correct": int(lab == pred), "top5_idx": pred, "top5_prob": 0.9})
    write_csv(run_dir / "01_predictions.csv", rows, columns(Prediction))
    (run_dir / "01_stats").mkdir(exist_ok=True)
    arrays = {"layers": np.array(list(stats)), "input_size": np.array([8, 8])}
    for layer, values in stats.items():
        values = np.asarray(values, np.float32)
        np.save(run_dir / "01_stats" / f"{layer}.mean.npy", values)
        np.save(run_dir / "01_stats" / f"{layer}.max.npy", values + 1)
        c = values.shape[1]
        order = np.argsort(-values, axis=0)[:4].T  # top 4 images per channel
        arrays.update({f"{layer}/values": np.take_along_axis(values.T, order, 1),
                       f"{layer}/image_ids": order.astype(np.int64),
                       f"{layer}/y": np.zeros((c, 4), np.int32),
                       f"{layer}/x": np.zeros((c, 4), np.int32),
                       f"{layer}/fmap": np.array([c, 1, 1]),
                       f"{layer}/rf": np.array([8.0, 8.0, 8.0, 8.0, 3.5, 3.5])})
    save_npz(run_dir / "01_activations.npz", arrays)
    m1 = write_meta(run_dir / "01_extract.meta.json", "01_extract", {},
                    [run_dir / "01_predictions.csv", run_dir / "01_activations.npz",
                     *(run_dir / "01_stats").glob("*.npy")],
                    model={"name": "fake", "weights": None, "random_init": False,
                           "unsafe_pickle": False, "input_size": 8})
    descriptions = descriptions or {}
    desc_rows = [{"layer": layer, "channel": ch, "level": 1, "description": text,
                  "backend": "fake", "model": "fake", "status": "ok", "reason": ""}
                 for (layer, ch), text in descriptions.items()]
    write_csv(run_dir / "03_descriptions.csv", desc_rows, columns(Description))
    write_meta(run_dir / "03_describe.meta.json", "03_describe", {},
               [run_dir / "03_descriptions.csv"], inputs=[m1])
    if mosaic_for:
        mrows = []
        for layer, ch in mosaic_for:
            rel = f"02_mosaics/{layer}/{ch}.png"
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (200, 30, 30)).save(run_dir / rel)
            mrows.append({"layer": layer, "channel": ch, "path": rel, "n_tiles": 1, "grid": 1,
                          "tile_px": 16, "crop": "rf"})
        write_csv(run_dir / "02_mosaics.csv", mrows, columns(Mosaic))
        write_meta(run_dir / "02_mosaics.meta.json", "02_mosaics", {},
                   [run_dir / "02_mosaics.csv"], inputs=[m1])


# 30 palace OK, 12 palace→castle (KO), 4 palace→monastery, 10 castle OK.
LABELS = [0] * 30 + [0] * 12 + [0] * 4 + [1] * 10
PREDS = [0] * 30 + [1] * 12 + [2] * 4 + [1] * 10
KO = slice(30, 42)
PLANTED = {("deep", 5): +1, ("deep", 33): +1, ("deep", 17): -1, ("early", 3): +1}
EVIL = "<script>alert('x')</script> water\"><img src=x onerror=alert(1)> and sky"


def planted_run(tmp_path, mosaics=True):
    """A run where exactly the PLANTED neurons differ between KO and OK (by 3.5 σ)."""
    rng = np.random.default_rng(7)
    stats = {"early": rng.normal(size=(len(LABELS), 20)),
             "deep": rng.normal(size=(len(LABELS), 40))}
    for (layer, ch), sign in PLANTED.items():
        stats[layer][KO, ch] += sign * 3.5
    run_dir = tmp_path / "run"
    write_run(run_dir, LABELS, PREDS, stats,
              descriptions={("deep", 5): EVIL, ("deep", 33): "birds over a lake"},
              mosaic_for=[("deep", 5), ("deep", 33)] if mosaics else ())
    return run_dir


def run_main(run_dir, *extra):
    """Call 08's main on ``run_dir`` without the causal check unless ``extra`` asks for it."""
    debug.main(["--run", str(run_dir), "--ablate-top", "0", *extra])


def test_confusion_table_and_automatic_selection(tmp_path):
    run_dir = planted_run(tmp_path)
    run_main(run_dir)
    conf = read_confusion(run_dir / "08_confusion.csv")
    assert [r.class_ for r in conf] == ["palace", "castle"]  # palace has all the errors
    palace = conf[0]
    assert (palace.rank, palace.n, palace.correct, palace.errors) == (1, 46, 30, 16)
    assert palace.accuracy == pytest.approx(30 / 46, abs=1e-4)
    assert palace.top_confused == "castle:12; monastery:4"
    assert palace.top1_share == pytest.approx(12 / 16)
    pairs = {(r.true, r.pred): r for r in read_pairs(run_dir / "08_debug" / "pairs.csv")}
    assert pairs[("palace", "castle")].status == "selected"
    assert pairs[("palace", "castle")].folder == "palace__castle"
    assert pairs[("palace", "monastery")].status == "skipped"
    assert "--min-errors" in pairs[("palace", "monastery")].reason
    assert (run_dir / "08_debug" / "palace__castle" / "report.html").exists()
    assert not (run_dir / "08_debug" / "palace__monastery").exists()
    assert (run_dir / "08_debug.meta.json").exists()


def test_planted_neurons_are_recovered(tmp_path):
    run_dir = planted_run(tmp_path)
    run_main(run_dir, "--true", "palace", "--pred", "1")  # a name and an index
    folder = run_dir / "08_debug" / "palace__castle"
    rows = read_debug_neurons(folder / "neurons.csv")
    assert len(rows) == 60 and [r.rank for r in rows] == list(range(1, 61))
    top = {(r.layer, r.channel): r for r in rows[:len(PLANTED)]}
    assert set(top) == set(PLANTED)
    for key, sign in PLANTED.items():
        row = top[key]
        assert np.sign(row.mean_z) == sign and np.sign(row.max_delta_mu) == sign
        assert row.mean_flag_fdr == 1 and row.mean_flag_z == 1
        assert row.mean_delta_mu == pytest.approx(row.max_delta_mu)
    others = [r for r in rows if (r.layer, r.channel) not in PLANTED]
    assert sum(r.mean_flag_fdr for r in others) <= 3  # BH lets a few through
    assert sum(r.mean_flag_z + r.max_flag_z for r in others) == 0  # |Δμ| ≥ 2σ: not by chance
    assert top[("deep", 33)].description == "birds over a lake"
    for name in ("delta_mu.png", "z_heatmaps.png", "ko_examples.jpg", "ok_examples.jpg",
                 "report.md", "report.html"):
        assert (folder / name).stat().st_size > 0
    page = (folder / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<img src=x" not in page and "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "data:image/jpeg;base64," in page and "data:image/png;base64," in page
    md = (folder / "report.md").read_text()
    assert "<script>" not in md and "../../02_mosaics/deep/5.png" in md


def test_crops_from_01_when_there_are_no_mosaics(tmp_path):
    run_dir = planted_run(tmp_path, mosaics=False)
    run_main(run_dir, "--true", "palace", "--pred", "castle", "--show-top", "2")
    strips = sorted(p.name for p in (run_dir / "08_debug" / "palace__castle" / "neurons").iterdir())
    assert len(strips) == 2 and all(s.endswith(".jpg") for s in strips)


def test_fallback_when_no_pair_passes(tmp_path):
    run_dir = planted_run(tmp_path)
    run_main(run_dir, "--min-errors", "50")
    pairs = {(r.true, r.pred): r for r in read_pairs(run_dir / "08_debug" / "pairs.csv")}
    assert pairs[("palace", "castle")].status == "fallback"
    assert "Fallback" in (run_dir / "08_debug" / "palace__castle" / "report.md").read_text()
    # A later run on another pair adds its folder; the first pair's report, made from the same
    # inputs, stays (`make debug TRUE=a PRED=b` adds a pair).
    run_main(run_dir, "--true", "palace", "--pred", "monastery")
    assert sorted(p.name for p in (run_dir / "08_debug").iterdir() if p.is_dir()) == \
        ["palace__castle", "palace__monastery"]
    # A report made from other inputs is removed by the next run.
    stale = run_dir / "08_debug" / "palace__castle" / "pair.json"
    stale.write_text(json.dumps({"upstream": {"01_extract": "another run"}}))
    run_main(run_dir, "--true", "palace", "--pred", "monastery")
    assert sorted(p.name for p in (run_dir / "08_debug").iterdir() if p.is_dir()) == \
        ["palace__monastery"]


def test_too_few_images_is_a_clear_error(tmp_path):
    run_dir = planted_run(tmp_path)
    with pytest.raises(StageError, match=r"palace → monastery: OK has 30 images and KO 4"):
        debug.run(Run(run_dir), debug.Settings(true="palace", pred="monastery", min_images=5,
                                               ablate_top=0))
    with pytest.raises(StageError, match="matches no class"):
        debug.run(Run(run_dir), debug.Settings(true="cathedral", ablate_top=0))


def test_noise_thesis_z_rule_and_fdr_flag_nothing_while_t_rule_fires_5_percent(tmp_path):
    # 4000 neurons, no real difference. The thesis's |z| ≥ 2 (Δμ two pooled standard deviations
    # away) needs |t| ≥ 2/√(1/15 + 1/40) ≈ 6.6 here, so it flags nothing; a rule on the t
    # statistic, |t| ≥ 2, would flag about 2·P(t_53 ≥ 2) ≈ 5 %; the Benjamini–Hochberg flag controls
    # the false discovery rate and flags (almost) nothing.
    rng = np.random.default_rng(0)
    n_ok, n_ko = 40, 15
    stats_dir = tmp_path / "01_stats"
    stats_dir.mkdir()
    for layer in ("a", "b"):
        values = rng.normal(size=(n_ok + n_ko, 2000)).astype(np.float32)
        np.save(stats_dir / f"{layer}.mean.npy", values)
        np.save(stats_dir / f"{layer}.max.npy", values)
    ok_ids, ko_ids = np.arange(n_ok), np.arange(n_ok, n_ok + n_ko)
    res = layer_stats(stats_dir, ["a", "b"], ok_ids, ko_ids, 3, "noise", 0.05, 2.0)
    flag_z = np.concatenate([res[la]["mean"]["flag_z"] for la in "ab"])
    t = np.concatenate([res[la]["mean"]["t"] for la in "ab"])
    flag_fdr = np.concatenate([res[la]["mean"]["flag_fdr"] for la in "ab"])
    assert chance_rate(n_ok, n_ko, 2.0) < 1e-6 and flag_z.sum() == 0
    from scipy import stats as sps
    expected_t = 2 * sps.t.sf(2.0, n_ok + n_ko - 2)
    assert 0.045 < expected_t < 0.055
    assert abs((np.abs(t) >= 2).mean() - expected_t) < 0.015  # binomial sd ≈ 0.0035
    assert flag_fdr.mean() <= 0.05
    assert flag_fdr.sum() <= 4
    # With a shift of 2.5 standard deviations on half the neurons, the thesis's rule finds most.
    values = rng.normal(size=(n_ok + n_ko, 200))
    values[n_ok:, :100] += 2.5
    np.save(stats_dir / "c.mean.npy", values.astype(np.float32))
    np.save(stats_dir / "c.max.npy", values.astype(np.float32))
    res = layer_stats(stats_dir, ["c"], ok_ids, ko_ids, 3, "shift", 0.05, 2.0)
    flag_z = res["c"]["mean"]["flag_z"]
    assert flag_z[:100].mean() > 0.8 and flag_z[100:].sum() == 0


def test_chance_rate_of_the_z_rule_in_closed_form():
    """With 4 images in all, t has 2 degrees of freedom, whose two-sided tail has the closed form
    P(|t| ≥ x) = 1 − x / √(x² + 2). |z| ≥ c is |t| ≥ c / √(1/n_KO + 1/n_OK): for 2 + 2 images and
    c = 1, x = 1 → 1 − 1/√3; for 3 + 1 images and c = 2·√(4/3), x = 2 → 1 − 2/√6."""
    assert chance_rate(2, 2, 1.0) == pytest.approx(1 - 1 / math.sqrt(3), rel=1e-12)
    assert chance_rate(3, 1, 2 * math.sqrt(4 / 3)) == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-12)
    assert chance_rate(1, 3, 2 * math.sqrt(4 / 3)) == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-12)


def test_flags_include_values_exactly_on_their_thresholds_and_q_spans_all_layers(tmp_path):
    """Two layers of 3 neurons, 4 OK and 4 KO images (one KO image skipped: a NaN row). With the
    z threshold set to one neuron's |z| exactly, and the FDR level to one neuron's q exactly,
    both flags include that neuron (|z| ≥ threshold, q ≤ FDR) and nothing below it; the q-values
    are Benjamini–Hochberg's over the 6 neurons of both layers together, per aggregation (scipy's
    false_discovery_control). The minimum of images counts usable rows and is inclusive: 3 KO
    images pass min_images 3; min_images 4 is an error naming the pair and the fix."""
    from scipy import stats as sps
    rng = np.random.default_rng(6)
    stats_dir = tmp_path / "01_stats"
    stats_dir.mkdir()
    for layer, shift in (("a", [0.0, 1.0, 3.0]), ("b", [0.5, 2.0, 0.1])):
        for agg in ("max", "mean"):
            values = rng.normal(size=(8, 3))
            values[4:] += shift
            values[7] = np.nan  # a skipped KO image
            np.save(stats_dir / f"{layer}.{agg}.npy", values.astype(np.float32))
    ok_ids, ko_ids = np.arange(4), np.arange(4, 8)
    first = layer_stats(stats_dir, ["a", "b"], ok_ids, ko_ids, 3, "x → y", 0.05, 2.0)
    assert first["_n"] == {"a": (4, 3), "b": (4, 3)}
    for agg in ("max", "mean"):
        p = np.concatenate([first[la][agg]["p"] for la in "ab"])
        q = np.concatenate([first[la][agg]["q"] for la in "ab"])
        np.testing.assert_allclose(q, sps.false_discovery_control(p, method="bh"), rtol=1e-12)
    z = np.abs(first["a"]["max"]["z"])
    q = first["b"]["mean"]["q"]
    z_cut, q_cut = float(np.sort(z)[1]), float(np.sort(q)[1])  # the middle neuron of each
    res = layer_stats(stats_dir, ["a", "b"], ok_ids, ko_ids, 3, "x → y", q_cut, z_cut)
    assert res["a"]["max"]["flag_z"].tolist() == (z >= z_cut).tolist()
    assert res["a"]["max"]["flag_z"].sum() == 2
    assert res["b"]["mean"]["flag_fdr"].tolist() == (q <= q_cut).tolist()
    assert res["b"]["mean"]["flag_fdr"].sum() >= 2
    with pytest.raises(StageError, match=r"pair x → y: OK has 4 usable images and KO 3 .*at "
                                         r"least 4 .*--min-images"):
        layer_stats(stats_dir, ["a", "b"], ok_ids, ko_ids, 4, "x → y", 0.05, 2.0)


def test_classes_never_predicted_get_their_imagenet_name():
    # 01 names predicted classes; a true class the model never predicts only has its dataset
    # label (here a synset id), so 08 looks the name up when the model's names are ImageNet's.
    rows = [{"image_id": 0, "path": "a", "label": "n02123045", "label_idx": 281, "pred_idx": 285,
             "pred_name": "Egyptian cat"}]
    assert debug.class_names(rows) == {285: "Egyptian cat", 281: "tabby"}
    rows[0]["pred_name"] = "my class"  # not ImageNet's names: keep the dataset label
    assert debug.class_names(rows)[281] == "n02123045"
    # a model with more outputs than ImageNet's 1000, predicting one past them: its names are
    # not ImageNet's (and looking index 1005 up there must not fail)
    rows[0]["pred_name"] = "Egyptian cat"
    rows.append({"image_id": 1, "path": "b", "label": "extra", "label_idx": 1005,
                 "pred_idx": 1005, "pred_name": "extra"})
    assert debug.class_names(rows) == {285: "Egyptian cat", 1005: "extra", 281: "n02123045"}
    # ImageNet's first class (index 0, "tench") predicted: still ImageNet's names
    rows[1].update(label="n01440764", label_idx=0, pred_idx=0, pred_name="tench")
    assert debug.class_names(rows) == {285: "Egyptian cat", 0: "tench", 281: "tabby"}


def test_statistics_agree_with_scipy_and_a_hand_computed_fdr():
    """z is the thesis's Δμ / σ with σ the pooled standard deviation, computed here by hand;
    t is Student's pooled two-sample t and p Welch's (scipy); the q-values are
    Benjamini–Hochberg's step-up, computed here by hand from its definition."""
    from scipy import stats as sps

    from common.differential import bh_qvalues
    rng = np.random.default_rng(5)
    ko, ok = rng.normal(0.4, 1.0, size=(9, 6)), rng.normal(0.0, 2.0, size=(17, 6))
    res = compare_groups(ko, ok)
    for c in range(ko.shape[1]):  # the thesis's z, by hand from its definition
        a, b = [float(v) for v in ko[:, c]], [float(v) for v in ok[:, c]]
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        ssa, ssb = sum((v - ma) ** 2 for v in a), sum((v - mb) ** 2 for v in b)
        sigma = math.sqrt((ssa + ssb) / (len(a) + len(b) - 2))
        assert res["sigma"][c] == pytest.approx(sigma, rel=1e-12)
        assert res["z"][c] == pytest.approx((ma - mb) / sigma, rel=1e-12)
    # A worked example: KO 1, 2, 3 (mean 2), OK 0, 0, 0, 0 (mean 0); pooled variance
    # (2 + 0) / (3 + 4 − 2) = 0.4, so z = 2 / √0.4 ≈ 3.162 and t = z / √(1/3 + 1/4) ≈ 4.140.
    worked = compare_groups(np.array([[1.0], [2.0], [3.0]]), np.zeros((4, 1)))
    assert worked["z"][0] == pytest.approx(3.16227766) and worked["t"][0] == pytest.approx(4.14039336)
    np.testing.assert_allclose(res["t"], sps.ttest_ind(ko, ok, equal_var=True).statistic)
    np.testing.assert_allclose(res["p"], sps.ttest_ind(ko, ok, equal_var=False).pvalue)
    p = np.array([0.01, 0.04, 0.03, 0.5, 0.001])
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    expected = np.empty_like(p)
    expected[order] = np.minimum.accumulate(ranked[::-1])[::-1]
    np.testing.assert_allclose(bh_qvalues(p), expected)
    assert bh_qvalues(np.zeros(0)).shape == (0,)  # no tests, no q-values


def test_constant_neurons_do_not_divide_by_zero():
    ko = np.zeros((5, 3))
    ok = np.zeros((7, 3))
    ok[:, 1] = 1.0
    ko[:, 2] = 1.0
    res = compare_groups(ko, ok)
    assert res["z"][0] == 0 and res["t"][0] == 0 and res["p"][0] == 1.0  # identical constants
    assert res["z"][1] == -np.inf and res["t"][1] == -np.inf and res["p"][1] == 0.0  # differ
    assert res["z"][2] == np.inf and res["t"][2] == np.inf and res["p"][2] == 0.0  # either way


def test_the_default_fdr_level_is_five_percent():
    """Neurons are flagged at a false discovery rate of 5 % unless FDR says otherwise (the level the
    report and the noise test above are written for)."""
    assert debug.Settings().fdr == 0.05


def test_the_random_control_never_includes_a_suspect():
    """Over 300 seeds the control has as many channels as there are suspects, all distinct, none
    of them a suspect, and every other channel is drawn; with fewer non-suspects than suspects it
    takes all of them."""
    suspects = [1, 4, 5]
    seen = set()
    for seed in range(300):
        control = debug.control_of(8, suspects, seed)
        assert len(control) == len(set(control)) == 3 and not set(control) & set(suspects)
        assert control == sorted(control)
        seen.update(control)
    assert seen == {0, 2, 3, 6, 7}
    assert debug.control_of(4, [0, 1, 3], 0) == [2]
    assert debug.control_of(7, [1, 4, 5], 11) == debug.control_of(7, [1, 4, 5], 11)  # seeded


class PlantedModel(nn.Module):
    """Three channels → three classes. Channel 1 drives class 1 (castle): logit1 = 3·c1 − 1,
    logit0 = c0, logit2 = 0.1·c2 − 5. A palace image with c1 ≈ 1 is therefore called castle."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 3, 1, bias=False)
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.head.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 3.0, 0], [0, 0, 0.1]]))
            self.head.bias.copy_(torch.tensor([0.0, -1.0, -5.0]))

    def forward(self, x):
        return self.head(self.feat(x).mean(dim=(2, 3)))


def planted_inputs():
    """Three channels of 26 images (8 × 8, constant): 12 palace OK (c1 low), 8 palace KO (c1
    high), 6 castle OK (c0 low, c1 high); returns c0, c1, c2, their N × 3 values, the inputs."""
    rng = np.random.default_rng(3)
    c0 = np.r_[rng.uniform(0.9, 1.1, 20), rng.uniform(0.0, 0.2, 6)]
    c1 = np.r_[rng.uniform(0.0, 0.2, 12), rng.uniform(0.8, 1.2, 8), rng.uniform(0.8, 1.2, 6)]
    c2 = rng.uniform(0, 1, 26)
    values = np.stack([c0, c1, c2], axis=1).astype(np.float32)
    return c0, c1, c2, values, \
        torch.from_numpy(values)[:, :, None, None].expand(-1, -1, 8, 8).contiguous()


def test_ablation_of_the_planted_neuron_flips_the_errors(tmp_path):
    _, _, _, values, inputs = planted_inputs()
    model = PlantedModel().eval()
    with torch.no_grad():
        preds = model(inputs).argmax(1).tolist()
    labels = [0] * 20 + [1] * 6
    assert preds == [0] * 12 + [1] * 14  # the planted error is real
    run_dir = tmp_path / "run"
    write_run(run_dir, labels, preds, {"feat": values})
    tensors = {str(run_dir / "img" / f"{i}.png"): inputs[i] for i in range(26)}
    bundle = types.SimpleNamespace(model=model, name="planted", input_size=8, mean=(0, 0, 0),
                                   std=(1, 1, 1), class_names=NAMES, device=torch.device("cpu"))
    settings = debug.Settings(true="palace", pred="castle", ablate_top=1, ablation_sample=0)
    summary = debug.run(Run(run_dir), settings, bundle=bundle, image_tensor=tensors.__getitem__)
    cc = summary["causal"]["palace__castle"]
    assert read_causal(run_dir / "08_debug" / "palace__castle") == cc
    assert cc["suspects"] == [1] and cc["control"] != [1]
    assert cc["rerun_agreement"] == 1.0
    assert (cc["n_ko"], cc["ko_base_pred"]) == (8, 8)
    assert cc["before"]["ko_to_true"] == 0
    assert cc["ablated"]["ko_to_true"] == 8 and cc["control_ablated"]["ko_to_true"] == 0
    assert cc["before"]["ok_accuracy"] == cc["ablated"]["ok_accuracy"] == 1.0
    # On all 26 images: 18 right before; after, 8 KO become right and 6 castle images wrong.
    assert cc["before"]["all_accuracy"] == pytest.approx(18 / 26)
    assert cc["ablated"]["all_accuracy"] == pytest.approx(20 / 26)
    per_image = read_ablation(run_dir / "08_debug" / "palace__castle" / "ablation.csv")
    ko_rows = [r for r in per_image if r.group == "KO"]
    assert len(ko_rows) == 8 and all(r.pred_ablated == 0 and r.pred_base == 1 for r in ko_rows)
    assert all(r.pred_control == 1 for r in ko_rows)  # the random control changes nothing
    report = (run_dir / "08_debug" / "palace__castle" / "report.md").read_text()
    assert "suspects zeroed" in report



class SplitModel(nn.Module):
    """PlantedModel's error with two layers: ``feat`` (identity 1×1 conv) then ``mix``, which copies
    feat's channel 1 into two channels (m1 = m2 = f1; m0 = f0, m3 = f2); the head reads
    logit0 = m0, logit1 = 1.5·m1 + 1.5·m2 − 1, logit2 = 0.1·m3 − 5 of their spatial means. Planted
    neuron: feat #1, the only way from the image to class 1 (castle)."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 3, 1, bias=False)
        self.mix = nn.Conv2d(3, 4, 1, bias=False)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.mix.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]])
                                  .view(4, 3, 1, 1))
            self.head.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.5, 1.5, 0],
                                                 [0, 0, 0, 0.1]]))
            self.head.bias.copy_(torch.tensor([0.0, -1.0, -5.0]))

    def forward(self, x):
        return self.head(self.mix(self.feat(x)).mean(dim=(2, 3)))


def test_why_ranks_the_planted_neuron_first_across_layers_as_a_hand_computation(tmp_path):
    """why.npz ranks, for every misclassified image, the neurons of both layers together by
    activation × gradient of (logit castle − logit palace) over their layer's absolute total. By
    hand (everything after feat is linear, so the relevance is exact): mix gives
    (W_castle − W_palace)·mean(m) = (−f0, 1.5·f1, 1.5·f1, 0), feat gives (−f0, 3·f1, 0); divided
    by the layer's Σ|·| the planted feat #1 has twice the share of each of mix's two copies of it,
    so it ranks first although every layer carries the same push. Its map is where it fires: the
    left half of the image, where channel 1 was painted."""
    c0, c1, c2, values, inputs = planted_inputs()
    inputs[:, 1, :, :4] *= 2  # channel 1 on the left half only, with the same mean
    inputs[:, 1, :, 4:] = 0
    model = SplitModel().eval()
    with torch.no_grad():
        preds = model(inputs).argmax(1).tolist()
    assert preds == [0] * 12 + [1] * 14
    labels = [0] * 20 + [1] * 6
    mix = np.stack([c0, c1, c1, c2], axis=1).astype(np.float32)
    run_dir = tmp_path / "run"
    write_run(run_dir, labels, preds, {"feat": values, "mix": mix},
              descriptions={("feat", 1): EVIL})
    tensors = {str(run_dir / "img" / f"{i}.png"): inputs[i] for i in range(26)}
    bundle = types.SimpleNamespace(model=model, name="split", input_size=8, mean=(0, 0, 0),
                                   std=(1, 1, 1), class_names=NAMES, device=torch.device("cpu"))
    settings = debug.Settings(true="palace", pred="castle", ablate_top=0, attribute_images=5,
                              why_neurons=8)
    debug.run(Run(run_dir), settings, bundle=bundle, image_tensor=tensors.__getitem__)
    folder = Run(run_dir).pair("palace__castle")
    why = read_why(folder.why)
    assert why.layers == ["feat", "mix"]
    assert list(why.image_ids) == list(range(12, 17))  # the first 5 KO images by id
    for i in why.image_ids:
        f0, f1 = float(c0[i]), float(c1[i])
        by_hand = {"feat": np.array([-f0, 3 * f1, 0.0]), "mix": np.array([-f0, 1.5 * f1,
                                                                         1.5 * f1, 0.0])}
        expected = sorted(((v / np.abs(r).sum(), k, L, c) for k, (L, r) in
                           enumerate(by_hand.items()) for c, v in enumerate(r) if v > 0),
                          key=lambda e: (-e[0], e[1], e[3]))  # ties: layer order, channel
        ranked = why.of(int(i))
        assert [(r["layer"], r["channel"]) for r in ranked] == [(L, c) for _, _, L, c in expected]
        assert ranked[0]["layer"] == "feat" and ranked[0]["channel"] == 1
        assert [r["share"] for r in ranked] == pytest.approx([s for s, *_ in expected], abs=1e-5)
        assert ranked[0]["share"] == pytest.approx(3 * f1 / (f0 + 3 * f1), abs=1e-5)
        assert ranked[0]["relevance"] == pytest.approx(3 * f1, abs=1e-5)
        planted_map = ranked[0]["map"]
        assert planted_map.shape == (28, 28)
        assert planted_map[:, :10].mean() == pytest.approx(2 * f1, rel=0.05)
        assert planted_map[:, 18:].max() < 0.05 * f1
        assert (folder.why_strips / f"{int(i)}.jpg").exists()
    # The report shows it, and its blocks (for the atlas's copy) link the neuron to its page.
    report = (folder.folder / "report.md").read_text()
    assert "Why these images were called castle" in report and "why/12.jpg" in report
    blocks = read_report_blocks(folder.blocks)
    linked = [row for b in blocks if b["kind"] == "table" and b.get("link") == "channel"
              for row in b["rows"]]
    assert {"layer": "feat", "channel": 1, "_href": "neurons/feat/1.html"}.items() <= \
        linked[0].items()
    assert all(Path(b["path"]).is_file() for b in blocks if b["kind"] == "figure")
    assert "<script>" not in (folder.folder / "report.html").read_text()


def test_rank_contributions_divides_each_layer_by_its_absolute_total():
    """Two layers with contributions on different scales: each is divided by its own Σ|·| before
    they are ranked together; negative shares and zero layers never rank."""
    from common.attribution import contribution_shares, rank_contributions
    wrong = {"a": np.array([10.0, -30.0, 60.0]), "b": np.array([0.2, 0.1, 0.1, 0.0]),
             "c": np.zeros(2)}
    right = {"a": np.zeros(3), "b": np.array([0.0, 0.0, 0.2, 0.0]), "c": np.zeros(2)}
    shares = contribution_shares(wrong, right)
    assert shares["a"] == pytest.approx([0.1, -0.3, 0.6])
    assert shares["b"] == pytest.approx([0.5, 0.25, -0.25, 0.0])
    assert np.all(shares["c"] == 0)
    assert rank_contributions(wrong, right, 3) == [("a", 2, pytest.approx(0.6), 60.0),
                                                   ("b", 0, pytest.approx(0.5), 0.2),
                                                   ("b", 1, pytest.approx(0.25), 0.1)]
    assert len(rank_contributions(wrong, right, 10)) == 4


def labelled_rows(*groups):
    """Prediction rows from (true class, predicted class, how many) groups, ids in order."""
    rows = []
    for t, p, n in groups:
        for _ in range(n):
            rows.append({"image_id": len(rows), "label_idx": t, "pred_idx": p,
                         "label": f"c{t}", "pred_name": f"c{p}"})
    return rows


# Class 0: 4 OK, 3 → 1, 2 → 2, 1 → 3 (6 errors); class 4: 3 OK, 3 → 1, 2 → 2 (5 errors);
# class 5: 10 OK, 4 → 1, 3 → 2, 3 → 3 (10 errors); class 6: 1 OK, 5 → 2.
SELECTION_ROWS = labelled_rows((0, 0, 4), (0, 1, 3), (0, 2, 2), (0, 3, 1),
                               (4, 4, 3), (4, 1, 3), (4, 2, 2),
                               (5, 5, 10), (5, 1, 4), (5, 2, 3), (5, 3, 3),
                               (6, 6, 1), (6, 2, 5))
SELECTION_NAMES = {i: f"c{i}" for i in range(7)}


def test_pair_selection_thresholds_are_inclusive_and_share_is_of_the_class_errors():
    """KO ≥ min errors, share ≥ min share and min(OK, KO) ≥ min images all pass when equal; the
    share is KO over the true class's errors (n − correct), by hand; the best pairs by KO count
    are selected, the rest say why not."""
    out = debug.select_pairs(SELECTION_ROWS, SELECTION_NAMES, min_errors=3, min_share=0.5,
                             min_images=3, max_pairs=1)
    pairs = {(r["true_idx"], r["pred_idx"]): r for r in out}
    assert [(r["true_idx"], r["pred_idx"]) for r in out] == [
        (6, 2), (5, 1), (0, 1), (4, 1), (5, 2), (5, 3), (0, 2), (4, 2), (0, 3)]  # by KO, then key
    first = pairs[(0, 1)]  # KO 3 = min errors, share 3/6 = min share, OK 4 and KO 3 ≥ 3
    assert (first["n_true"], first["ok"], first["ko"], first["share"]) == (10, 4, 3, 0.5)
    assert first["status"] == "selected" and first["reason"] == "passes the thresholds"
    assert pairs[(4, 1)]["share"] == 0.6 and pairs[(4, 1)]["status"] == "skipped"
    assert "--max-pairs 1" in pairs[(4, 1)]["reason"]
    assert pairs[(5, 1)]["share"] == 0.4 and "--min-share 0.5" in pairs[(5, 1)]["reason"]
    assert pairs[(6, 2)]["share"] == 1.0 and "OK 1 / KO 5" in pairs[(6, 2)]["reason"]
    assert pairs[(0, 2)]["reason"] == "2 errors < --min-errors 3"
    assert pairs[(0, 2)]["share"] == 0.3333  # 2 of 6, to four places
    assert [r["status"] for r in out].count("selected") == 1
    both = debug.select_pairs(SELECTION_ROWS, SELECTION_NAMES, 3, 0.5, 3, max_pairs=2)
    assert [(r["true_idx"], r["pred_idx"]) for r in both if r["status"] == "selected"] == \
        [(0, 1), (4, 1)]
    # One more than each threshold: the pair fails it.
    assert debug.select_pairs(SELECTION_ROWS, SELECTION_NAMES, 4, 0.5, 3, 1)[2]["status"] == "skipped"
    assert debug.select_pairs(SELECTION_ROWS, SELECTION_NAMES, 3, 0.51, 3, 1)[2]["status"] == "skipped"
    assert debug.select_pairs(SELECTION_ROWS, SELECTION_NAMES, 3, 0.5, 4, 1)[2]["status"] == "skipped"


def test_fallback_is_the_most_frequent_confusion_with_enough_images_on_both_sides():
    """No pair reaches 100 errors: the most frequent pair with min(OK, KO) ≥ 4 is analysed (6 → 2
    has more errors but one OK image), and only it."""
    out = debug.select_pairs(SELECTION_ROWS, SELECTION_NAMES, min_errors=100, min_share=0.5,
                             min_images=4, max_pairs=3)
    assert [(r["true_idx"], r["pred_idx"]) for r in out if r["status"] != "skipped"] == [(5, 1)]
    fallback = out[1]
    assert fallback["status"] == "fallback" and "at least 4 OK and KO images" in fallback["reason"]
    assert fallback["reason"].endswith("images (4 errors < --min-errors 100)")
    assert not any(r["status"] == "fallback" for r in debug.select_pairs(
        SELECTION_ROWS, SELECTION_NAMES, 100, 0.5, 11, 3))  # none has 11 on both sides


def test_explicit_pair_counts_and_its_default_confusion():
    """--true alone takes the class's most frequent confusion (ties: lower index); the pair
    carries its OK and KO counts and KO's share of the class's errors."""
    pair = debug.explicit_pair(SELECTION_ROWS, SELECTION_NAMES, "c5", None)
    assert (pair["true_idx"], pair["pred_idx"], pair["ok"], pair["ko"], pair["share"]) == \
        (5, 1, 10, 4, 0.4)
    tied = labelled_rows((0, 0, 2), (0, 3, 2), (0, 2, 2))
    assert debug.explicit_pair(tied, {0: "a", 2: "b", 3: "c"}, "0", None)["pred_idx"] == 2
    frequent = labelled_rows((0, 0, 1), (0, 1, 2), (0, 3, 5))  # the most frequent, not the lowest
    assert debug.explicit_pair(frequent, {0: "a", 1: "b", 3: "c"}, "0", None)["pred_idx"] == 3
    assert debug.explicit_pair(SELECTION_ROWS, SELECTION_NAMES, "0", "3")["share"] == \
        pytest.approx(1 / 6, abs=1e-4)
    with pytest.raises(StageError, match="same class"):
        debug.explicit_pair(SELECTION_ROWS, SELECTION_NAMES, "c0", "c0")
    with pytest.raises(StageError, match="no error to debug"):
        debug.explicit_pair(labelled_rows((1, 1, 3), (0, 0, 1)), {0: "a", 1: "b"}, "b", None)
    ok, ko = debug.split_ok_ko(SELECTION_ROWS, pair)
    assert ok.tolist() == list(range(18, 28)) and ko.tolist() == list(range(28, 32))
    ok, ko = debug.split_ok_ko(SELECTION_ROWS, {"true_idx": 0, "pred_idx": 1})
    assert ok.tolist() == [0, 1, 2, 3] and ko.tolist() == [4, 5, 6]  # not classes 4 and 5's
    # OK is the true class read right: images of class 1 predicted as 0 are not OK for class 0
    ok, ko = debug.split_ok_ko(labelled_rows((0, 0, 2), (1, 0, 3), (0, 1, 1)),
                               {"true_idx": 0, "pred_idx": 1})
    assert ok.tolist() == [0, 1] and ko.tolist() == [5]
    single = labelled_rows((3, 1, 1), (1, 1, 2))  # a class with one labelled image, misread
    assert debug.explicit_pair(single, {1: "b", 3: "d"}, "3", None)["ko"] == 1
    # a pair asked for on a class without any error: no KO image, a share of 0 (not of all)
    flawless = debug.explicit_pair(labelled_rows((1, 1, 3), (0, 0, 1)), {0: "a", 1: "b"}, "b", "a")
    assert (flawless["ok"], flawless["ko"], flawless["share"]) == (3, 0, 0.0)
    with pytest.raises(StageError, match="no labelled image of class 2"):
        debug.explicit_pair(labelled_rows((0, 2, 1)), {0: "a", 2: "c"}, "2", None)


def test_imagenet_sized_class_indices_are_compared_by_value():
    """Indices read from a CSV are distinct int objects above 256: OK/KO, the confusion table
    and the pair counts still group them by value."""
    rows = [{"image_id": i, "label_idx": int(str(t)), "pred_idx": int(str(p)), "label": "x",
             "pred_name": "y"} for i, (t, p) in enumerate([(281, 281), (281, 285), (281, 285),
                                                          (281, 281), (281, 283)])]
    pair = {"true_idx": int("281"), "pred_idx": int("285")}
    ok, ko = debug.split_ok_ko(rows, pair)
    assert ok.tolist() == [0, 3] and ko.tolist() == [1, 2]
    (table,) = debug.confusion_table(rows, {281: "tabby", 283: "persian", 285: "egyptian"})
    assert (table["n"], table["correct"], table["errors"]) == (5, 2, 3)
    assert table["top_confused"] == "egyptian:2; persian:1"
    pairs, n_true, correct = debug.pair_counts(rows)
    assert (n_true[281], correct[281]) == (5, 2)
    assert pairs == {(281, 285): 2, (281, 283): 1}


def test_confusion_table_by_hand_ranks_by_errors_then_accuracy():
    """Per true class: n, correct, errors, accuracy and the top confusion's share of the errors
    (rounded to 4 places), ranked by errors, ties by lower accuracy; a class without errors has
    no top confusion."""
    rows = labelled_rows((0, 0, 1), (0, 1, 1), (0, 2, 2),  # 3 errors of 4
                         (1, 1, 7), (1, 0, 1), (1, 2, 2),  # 3 errors of 10
                         (2, 2, 2))
    table = debug.confusion_table(rows, {0: "a", 1: "b", 2: "c"})
    got = [(r["rank"], r["class"], r["n"], r["correct"], r["errors"], r["accuracy"],
            r["top1_pred"], r["top1_count"], r["top1_share"]) for r in table]
    assert got == [(1, "a", 4, 1, 3, 0.25, "c", 2, 0.6667), (2, "b", 10, 7, 3, 0.7, "c", 2, 0.6667),
                   (3, "c", 2, 2, 0, 1.0, "", 0, "")]
    assert table[1]["top_confused"] == "c:2; a:1"
    never = debug.confusion_table(labelled_rows((0, 1, 2), (1, 1, 1)), {0: "a", 1: "b"})
    assert [(r["class"], r["correct"], r["errors"], r["accuracy"]) for r in never] == \
        [("a", 0, 2, 0.0), ("b", 1, 0, 1.0)]  # a class never predicted right: 0 correct
    three = debug.confusion_table(labelled_rows((0, 0, 1), (0, 1, 3)), {0: "a", 1: "b"})
    assert (three[0]["top1_pred_idx"], three[0]["top1_pred"], three[0]["top1_count"]) == (1, "b", 3)


def test_unknown_class_lists_at_most_40_valid_names_and_says_how_many():
    """A name matching no class lists the valid names, cut after 40 with the total; exactly 40
    are listed whole. Names match case- and separator-blind, indices and dataset labels too."""
    rows = labelled_rows((0, 0, 1))
    names = {i: f"kind{i:02d}" for i in range(41)}
    with pytest.raises(StageError) as many:
        debug.resolve_class("qqqq", rows, names, "--true")
    assert "kind39 … (41 in all)" in str(many.value) and "kind40" not in str(many.value)
    names.pop(40)
    with pytest.raises(StageError) as forty:
        debug.resolve_class("qqqq", rows, names, "--true")
    assert "kind39 (or a class index)" in str(forty.value) and "in all" not in str(forty.value)
    assert debug.resolve_class("KIND07", rows, names, "--true") == 7
    assert debug.resolve_class("12", rows, names, "--true") == 12
    assert debug.resolve_class("c0", rows, names, "--true") == 0  # the dataset's label
    assert debug.resolve_class("c0", labelled_rows((0, 0, 1), (3, 3, 1)), names, "--true") == 0
    with pytest.raises(StageError, match="no labelled image"):
        debug.resolve_class("77", rows, names, "--true")
    with pytest.raises(StageError, match="names several classes: 1 .*, 2 "):
        debug.resolve_class("big cat", rows, {1: "Big_Cat", 2: "big-cat"}, "--pred")


def test_suspects_are_the_largest_positive_z_in_order():
    """The n channels of largest positive z, ties kept in channel order, never a z ≤ 0."""
    stats = {"l": {"mean": {"z": np.array([0.5, 2.0, -3.0, 2.0, 0.0, 1.0])}}}
    assert debug.suspects_of(stats, "l", "mean", 3) == [1, 3, 5]
    assert debug.suspects_of(stats, "l", "mean", 10) == [1, 3, 5, 0]
