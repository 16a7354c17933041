"""The atlas's glossary (common/glossary.py) and the verdict a neuron page opens with: the margin's
interval against a hand computation and scipy, each verdict level at its boundary, and an entry
for every score the atlas shows."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from common.artefacts import ScoreRow, SummaryRow, columns
from common.glossary import (GROUPS, SOURCES, TERMS, Z_95, glossary, term, trust_key,
                             verdict)
from common.scores import correlation_interval, margin_interval

TEMPLATES = Path(__file__).resolve().parents[1] / "common" / "templates"


def test_margin_interval_matches_a_hand_computation():
    """r = 0.5 and control r = 0.1 on 100 images, worked on paper (4 decimals):
    atanh 0.5 = 0.5493, atanh 0.1 = 0.1003, 1.96/√97 = 0.1990;
    r: tanh(0.3503) = 0.3366 … tanh(0.7483) = 0.6341; control: tanh(−0.0987) = −0.0984 …
    tanh(0.2993) = 0.2907;
    low = 0.4 − √(0.1634² + 0.1907²) = 0.1489, high = 0.4 + √(0.1341² + 0.1983²) = 0.6394."""
    assert correlation_interval(0.5, 100, Z_95) == pytest.approx((0.3366, 0.6341), abs=1e-4)
    assert correlation_interval(0.1, 100, Z_95) == pytest.approx((-0.0984, 0.2907), abs=1e-4)
    d, low, high = margin_interval(0.5, 0.1, 100, Z_95)
    assert d == pytest.approx(0.4) and low == pytest.approx(0.1489, abs=1e-4)
    assert high == pytest.approx(0.6394, abs=1e-4)
    # Equal correlations: the interval is symmetric around a margin of 0.
    d, low, high = margin_interval(0.3, 0.3, 50, Z_95)
    assert d == 0 and low == pytest.approx(-high) and low < 0


def test_each_correlation_interval_is_scipys_fisher_interval():
    """Z_95 is the normal quantile, and a sample's r gets the interval scipy's pearsonr gives."""
    assert Z_95 == pytest.approx(scipy.stats.norm.ppf(0.975), abs=1e-12)
    rng = np.random.default_rng(0)
    for n in (10, 37, 400):
        x = rng.normal(size=n)
        y = 0.6 * x + rng.normal(size=n)
        result = scipy.stats.pearsonr(x, y)
        ci = result.confidence_interval(0.95)
        assert correlation_interval(result.statistic, n, Z_95) == pytest.approx(
            (ci.low, ci.high), abs=1e-9)


def test_verdict_levels_and_when_there_is_none():
    """Reliably: interval above 0 and r > 0; weakly: margin above 0, interval reaching 0; chance:
    margin 0 or below; no verdict without a verified or control r or with < 4 images; none at
    all (None) without a 09 row."""
    def level(r, rc, n):
        return verdict({"verify_corr": r, "control_corr": rc, "n_held_out": n})["level"]

    assert level(0.5, 0.1, 200) == "reliable"
    assert level(0.5, 0.1, 12) == "weak"  # the same margin on 12 images: interval reaches 0
    assert level(0.5, 0.6, 200) == "chance" and level(0.4, 0.4, 1000) == "chance"
    assert level(-0.1, -0.6, 200) == "weak"  # beats its control, but predicts nothing positive
    # The boundary n between reliable and weak for 0.5 vs 0.1, found by the rule itself.
    n = next(n for n in range(4, 500) if margin_interval(0.5, 0.1, n, Z_95)[1] > 0)
    assert level(0.5, 0.1, n) == "reliable" and level(0.5, 0.1, n - 1) == "weak"
    assert level(None, 0.1, 200) == level(0.5, None, 200) == level(0.5, 0.1, 3) == "none"
    assert level(0.5, 0.1, None) == "none"
    assert "could not verify" in verdict({"verify_corr": None, "clarity": 0.3})["why"]
    assert verdict({}) is None
    v = verdict({"verify_corr": 0.5, "control_corr": 0.1, "n_held_out": 100})
    assert v["headline"] == "Described reliably" and v["margin"] == pytest.approx(0.4)
    assert (v["low"], v["high"]) == pytest.approx(margin_interval(0.5, 0.1, 100, Z_95)[1:])


def test_trust_order_puts_verdicts_first_then_the_surer_margin():
    """The trust order of the glossary's ``trust`` entry, on hand-set neurons: a reliable margin
    known to be above 0.1489 (r 0.5, control 0.1, 100 images: the hand computation above) comes
    before a larger but less certain reliable one (r 0.6, control 0.1, 40 images: low 0.1133 by
    the same rule), a weak neuron with a large margin after both, then chance, no verdict, not
    scored; a dead neuron last whatever its verdict."""
    def scores(r, rc, n, dead=0):
        return {"verify_corr": r, "control_corr": rc, "n_held_out": n, "dead": dead}
    neurons = {
        "sure": scores(0.5, 0.1, 100), "larger": scores(0.6, 0.1, 40),
        "weak": scores(0.7, 0.2, 8), "chance": scores(0.2, 0.3, 100),
        "none": {"verify_corr": None, "control_corr": None, "n_held_out": None, "dead": 0},
        "unscored": {}, "dead": scores(0.9, 0.0, 500, dead=1)}
    assert margin_interval(0.6, 0.1, 40, Z_95)[1] == pytest.approx(0.1133, abs=1e-3)
    assert verdict(neurons["weak"])["level"] == "weak"
    order = sorted(neurons, key=lambda k: trust_key(neurons[k]))
    assert order == ["sure", "larger", "weak", "chance", "none", "unscored", "dead"]


def test_every_score_the_atlas_shows_has_one_entry():
    """09's numeric columns, its summary's, 05's shown figures and 10's per-pair columns all
    resolve to an entry with a one-line tooltip; every entry cites a seed or the atlas and sits
    in a glossary section; the texts exist once (no template repeats a tooltip)."""
    numeric = [f.name for f in dataclasses.fields(ScoreRow)
               if f.type in ("float", "int | None") and f.name not in ("channel", "subconcept")]
    assert "verify_corr" in numeric and "control_channel" in numeric
    summary = [c for c in columns(SummaryRow) if c not in ("layer", "matcher", "embedder")]
    shown = [*numeric, *summary, "k", "silhouette", "top_activation", "margin",
             "z red→edgy", "relevance red→edgy", "dead_neurons"]
    for key in shown:
        t = term(key)
        assert t["tip"] and "\n" not in t["tip"] and len(t["tip"]) < 160, key
        assert t["anchor"] in TERMS and t["name"], key
    assert term("z red→edgy")["name"] == "shift on errors (z), red→edgy"
    assert term("mean_dnr")["anchor"] == "dnr_score"
    assert term("layer") == {"key": "layer", "name": "layer", "short": "layer", "tip": "",
                             "anchor": ""}
    assert all(t.source in SOURCES and t.group in dict(GROUPS) for t in TERMS.values())
    assert sum(len(g["terms"]) for g in glossary()) == len(TERMS)
    texts = "".join(p.read_text(encoding="utf-8") for p in TEMPLATES.iterdir() if p.is_file())
    for t in TERMS.values():
        assert t.tip not in texts and t.measures not in texts
