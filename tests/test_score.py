"""Stage 09: triage, interpretability, sub-concepts and verification on planted neurons.

Crops and images are made here; the planted neurons are the fake model's hand-set conv1 channels
(0 = redness, 1 = vertical edges), and crops are embedded by that model's own pooled conv1 feature,
so what each neuron prefers — and which crops belong together — is known on paper.
"""
import csv
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from common import scores as S
from common import matchers, verification
from common.artefacts import Run, read_candidates
from common.matchers import OfflineMatcher, appearance_weights, has_object_words
from common.triage import DNR_K, triage_layer
from conftest import FAKE_MODEL, labelled_images, load_stage, make_image
from fake_model import FakeNet

score = load_stage("09_score")


class ConvFeature:
    """The fake model's conv1 + ReLU, mean-pooled, without the brightness channel: a 3-d 'CNN
    feature' (red, vertical edges, horizontal edges) of a crop."""

    name, space, space_id, dim = "fake-conv1", "cnn", "cnn:fake-conv1", 3

    def __init__(self):
        """Build the hand-set network."""
        self.net = FakeNet().eval()

    def encode(self, images, size=None):
        """Unit 3-d vectors of PIL images."""
        batch = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255)
                             .permute(2, 0, 1) for im in images])
        with torch.no_grad():
            out = self.net.relu1(self.net.conv1(batch))[:, :3].mean(dim=(2, 3)).numpy()
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class WordsText:
    """A text embedder that counts a few words (bag of words over a fixed vocabulary)."""

    name, space, space_id, dim = "words", "text", "text:words", 6
    VOCAB = ["red", "edge", "plain", "cat", "dog", "car"]

    def encode(self, texts):
        """Unit bag-of-words vectors (a constant component keeps empty texts non-zero)."""
        out = np.array([[t.lower().count(w) for w in self.VOCAB] for t in texts], np.float32) + 0.01
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def crops(kind, n, seed):
    """``n`` 16-px crops of one planted pattern: red (a noisy red patch filling the crop, as a
    colour neuron's receptive field shows it) or edges (conftest's vertical bars)."""
    rng = np.random.default_rng(seed)
    if kind == "red":
        return [Image.fromarray(np.clip(np.array([220, 25, 25]) + rng.integers(-20, 21, (16, 16, 3)),
                                         0, 255).astype(np.uint8)) for _ in range(n)]
    return [make_image(kind, 16, rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Triage


def test_triage_equals_hand_computation():
    """Selectivity = (p99 − lo) / max(median − lo, 1 % of the range); DnR = mean log(1 + a) of the
    top K; dead = spread p99 − median ≤ 5 % of the layer's median spread — by hand."""
    n = 101  # percentiles of 0 … 100 step 1 fall on the values themselves
    ramp = np.arange(n, dtype=np.float64)            # p99 = 99, median = 50, p1 = 1
    sparse = np.where(np.arange(n) >= 90, 10.0, 0.0)  # silent on 90 % of images: median 0
    negative = ramp - 50                              # p1 = −49: shifted by lo = −49
    flat = np.full(n, 3.0)                            # constant
    tiny = ramp * 0.005                               # spread 0.245 ≤ 5 % of the median 10
    stats = np.stack([ramp, sparse, negative, flat, tiny], axis=1).astype(np.float32)
    stats = np.vstack([stats, np.full((1, 5), np.nan, np.float32)])  # a skipped image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the constant neuron divides nothing by zero
        t = triage_layer(stats, k=DNR_K)
    assert t["selectivity"][0] == pytest.approx(99 / 50)
    assert t["selectivity"][1] == pytest.approx(100.0)  # 10 / max(0, 10 / 100)
    assert t["selectivity"][2] == pytest.approx((49 + 49) / (0 + 49))
    assert t["selectivity"][3] == 1.0
    top20 = np.arange(81, 101, dtype=np.float64)
    assert t["dnr_score"][0] == pytest.approx(np.log1p(top20).mean())
    assert t["dnr_score"][1] == pytest.approx(11 * np.log(11) / 20)  # 11 images at 10, 9 at 0
    assert t["dnr_score"][2] == pytest.approx(np.log1p(np.maximum(top20 - 50, 0)).mean())
    assert t["dead"].tolist() == [False, False, False, True, True]


def test_silent_and_constant_negative_neurons_are_dead_with_selectivity_1_and_no_warning():
    """A ReLU neuron that never fires (0 on every image) and one constant below 0 have no range
    at all (p99 = lo): selectivity 1, dead, and no division by zero on the way; beside them a
    ramp is selective and alive."""
    ramp = np.arange(101, dtype=np.float64)
    stats = np.stack([ramp, np.zeros(101), np.full(101, -2.0)], axis=1).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = triage_layer(stats)
    assert t["selectivity"].tolist() == pytest.approx([99 / 50, 1.0, 1.0])
    assert t["dead"].tolist() == [False, True, True]


def test_triage_read_in_blocks_of_channels_equals_one_pass():
    """A wide layer is read a few channels at a time: blocks of 2 over 5 channels (the last one
    short) give the same numbers, channel by channel, as reading all 5 at once (to rounding)."""
    rng = np.random.default_rng(6)
    stats = np.maximum(rng.normal(size=(60, 5)) * [1, 2, 3, 4, 5], 0.0)
    stats[:, 3] = 0.0  # a silent channel inside the second block
    whole, blocks = triage_layer(stats), triage_layer(stats, block=2)
    for name in ("selectivity", "dnr_score", "dead", "q99", "median", "lo"):
        np.testing.assert_allclose(blocks[name], whole[name], rtol=1e-12, atol=0)
    assert blocks["dead"].tolist() == [False, False, False, True, False]


def test_selectivity_and_dead_flags_do_not_depend_on_the_layers_units():
    """A layer whose values lie in 0 … 0.1 (a sigmoid's or a normalised output) gets the same
    selectivity and dead flags as the same layer × 1000: the ramp 99 / 50, the sparse neuron the
    cap 100, the constant one 1; only the DnR score, a log of raw values, changes."""
    ramp = np.arange(101, dtype=np.float64)
    sparse = np.where(ramp >= 90, 10.0, 0.0)
    layer = np.stack([ramp, sparse, np.full(101, 3.0), ramp * 0.005], axis=1) / 1000
    small, large = triage_layer(layer), triage_layer(layer * 1000)
    assert small["selectivity"] == pytest.approx([99 / 50, 100.0, 1.0, 99 / 50])
    assert small["selectivity"] == pytest.approx(large["selectivity"])
    assert small["dead"].tolist() == large["dead"].tolist() == [False, False, True, True]
    assert small["dnr_score"][0] < large["dnr_score"][0]


def test_one_wide_neuron_does_not_make_its_neighbours_dead():
    """The dead floor is 5 % of the layer's *median* spread: one neuron whose spread is 100 times
    its neighbours' (which would lift a mean-based floor above them all) changes nothing, and only
    the neuron below 5 % of the median is dead. Ramps 0 … 100 × s have spread p99 − median = 49 s."""
    ramp = np.arange(101, dtype=np.float64)
    scales = [1.0, 1.0, 1.0, 100.0, 0.04, 0.06]   # spreads 49 ×: median 49, floor 2.45
    t = triage_layer(np.stack([ramp * s for s in scales], axis=1).astype(np.float32))
    np.testing.assert_allclose(t["q99"] - t["median"], 49 * np.array(scales), rtol=1e-5)
    assert t["dead"].tolist() == [False, False, False, False, True, False]


# ---------------------------------------------------------------------------------------------
# Measures


def test_average_precision_matches_sklearn():
    """AUPRC equals scikit-learn's average_precision_score, ties included."""
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(0)
    for trial in range(20):
        positive = rng.random(200) < 0.1
        positive[trial] = True
        score_ = rng.integers(0, 8, 200).astype(float) + positive * rng.random(200)
        assert S.average_precision(positive, score_) == pytest.approx(
            average_precision_score(positive, score_))
    # A positive and a negative tied at the top count together (precision 1/2 at recall 1),
    # whichever comes first in the input; one more positive below them adds 2/3 × 1/2.
    for positive, score_, expected in (([1, 0], [0.5, 0.5], 0.5), ([0, 1], [0.5, 0.5], 0.5),
                                       ([1, 0, 1], [0.9, 0.9, 0.1], 0.5 * 0.5 + 0.5 * 2 / 3)):
        assert S.average_precision(positive, score_) == pytest.approx(expected)
        assert average_precision_score(positive, score_) == pytest.approx(expected)


def test_pearson_matches_scipy_and_is_nan_for_a_constant():
    """The verification's correlation equals scipy.stats.pearsonr; a constant vector (a neuron that
    never fires on the held-out images) or a single value gives NaN, not a warning or 0."""
    from scipy.stats import pearsonr
    rng = np.random.default_rng(2)
    for _ in range(10):
        x, y = rng.normal(size=50), rng.normal(size=50)
        y[:25] += x[:25]
        assert S.pearson(x, y) == pytest.approx(pearsonr(x, y).statistic, abs=1e-12)
    assert np.isnan(S.pearson(np.ones(5), rng.normal(size=5)))
    assert np.isnan(S.pearson(rng.normal(size=5), np.zeros(5)))
    assert np.isnan(S.pearson([1.0], [2.0]))


def test_pearson_of_yes_no_scores_is_the_point_biserial_correlation():
    """A matcher that answers yes (1) or no (0) per image, against activations that also span
    exactly 1: the correlation is scipy's point-biserial r on either side, not NaN; a constant
    side stays NaN without a warning."""
    from scipy.stats import pointbiserialr
    said = np.array([1, 1, 0, 1, 0, 0, 0, 1], float)
    fired = np.array([0.9, 0.7, 0.2, 1.0, 0.0, 0.4, 0.1, 0.3])  # range exactly 1
    expected = pointbiserialr(said, fired).statistic
    assert S.pearson(said, fired) == pytest.approx(expected, abs=1e-12)
    assert S.pearson(fired, said) == pytest.approx(expected, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(S.pearson(fired, np.full(8, 0.5)))
        assert np.isnan(S.pearson(np.full(8, 0.5), fired))


def test_correlation_interval_by_hand():
    # Fisher z: atanh(0.5) = 0.549306, half width 1.96 / √(28 − 3) = 0.392 → tanh of 0.157306
    # and 0.941306
    low, high = S.correlation_interval(0.5, 28, 1.96)
    assert low == pytest.approx(0.156021, abs=1e-5) and high == pytest.approx(0.735822, abs=1e-5)


def test_a_perfect_correlation_keeps_a_finite_interval():
    """r = ±1 (a sentence ranking the images exactly as the neuron does) is clipped just inside
    ±1 before the Fisher transform: no division by zero, an interval strictly inside ±1 at its
    far end, mirrored for −1, and a finite margin interval."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = S.correlation_interval(1.0, 10, 1.96)
        assert 0.999 < low < 1 and low < high <= 1
        assert S.correlation_interval(-1.0, 10, 1.96) == pytest.approx((-high, -low), abs=1e-15)
        assert np.isfinite(S.margin_interval(1.0, -1.0, 10, 1.96)).all()


def test_margin_interval_is_zous_combination_of_the_two_fisher_intervals():
    """Zou (2007) by hand: r = 0.5 and r_control = 0.2 on 28 images at z = 1.96. Fisher
    intervals (0.156021, 0.735822) and (−0.187039, 0.533291); the margin 0.3 reaches down by
    √((0.5 − 0.156021)² + (0.533291 − 0.2)²) and up by
    √((0.735822 − 0.5)² + (0.2 + 0.187039)²)."""
    d, low, high = S.margin_interval(0.5, 0.2, 28, 1.96)
    assert d == pytest.approx(0.3)
    assert low == pytest.approx(0.3 - np.hypot(0.5 - 0.156021, 0.533291 - 0.2), abs=1e-5)
    assert high == pytest.approx(0.3 + np.hypot(0.735822 - 0.5, 0.2 + 0.187039), abs=1e-5)
    assert low == pytest.approx(-0.178961, abs=1e-5) and high == pytest.approx(0.753223, abs=1e-5)


def test_clarity_closed_form_is_the_mean_pairwise_cosine():
    """SemanticLens eq. 7 (no similarity matrix) equals eq. 6 computed pair by pair."""
    v = np.random.default_rng(1).normal(size=(9, 5))
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    pairs = [unit[i] @ unit[j] for i in range(9) for j in range(9) if i != j]
    assert S.clarity(v) == pytest.approx(np.mean(pairs))


def test_clarity_of_two_crops_is_their_cosine_and_of_one_crop_undefined():
    """Two crops at 60° apart have clarity cos 60° = 0.5 whatever their lengths, and opposite
    ones −1 (the lower end, −1/(n − 1)); a single crop, or none, has no pair: NaN."""
    assert S.clarity(np.array([[2.0, 0.0], [0.5, 0.5 * np.sqrt(3)]])) == pytest.approx(0.5)
    assert S.clarity(np.array([[1.0, 1.0], [-3.0, -3.0]])) == pytest.approx(-1.0)
    assert np.isnan(S.clarity(np.array([[1.0, 2.0]])))
    assert np.isnan(S.clarity(np.zeros((0, 2))))


def test_one_pattern_is_clear_two_patterns_are_polysemantic_and_split_back():
    """A neuron whose top crops all show red squares: high clarity, low polysemanticity. One
    whose crops are red squares and vertical bars: polysemantic, and its two sub-concepts are the
    two planted patterns (ARI ≥ 0.9)."""
    from sklearn.metrics import adjusted_rand_score
    embed = ConvFeature()
    mono = embed.encode(crops("red", 20, 0))
    mixed_imgs = crops("red", 10, 1) + crops("edges", 10, 2)
    truth = np.array([0] * 10 + [1] * 10)
    order = np.random.default_rng(3).permutation(20)  # ranks interleave the two patterns
    mixed = embed.encode([mixed_imgs[i] for i in order])
    assert S.clarity(mono) > 0.9 and S.polysemanticity(mono) < 0.1
    assert S.clarity(mixed) < S.clarity(mono)
    assert S.polysemanticity(mixed) > 0.5
    labels = S.sub_concepts(mixed, max_k=3)
    assert labels is not None
    assert adjusted_rand_score(truth[order], labels) >= 0.9


def test_polysemanticity_is_one_minus_the_cosine_of_the_two_group_sums():
    """Six crops, three near each of two directions 60° apart: Ward splits them in those two
    groups, and polysemanticity = 1 − cos(sum of group 1, sum of group 2), by hand."""
    rng = np.random.default_rng(4)
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.5, np.sqrt(0.75), 0.0])
    crops_ = np.array([a] * 3 + [b] * 3) + rng.normal(scale=0.01, size=(6, 3))
    unit = crops_ / np.linalg.norm(crops_, axis=1, keepdims=True)
    one, two = unit[:3].sum(axis=0), unit[3:].sum(axis=0)
    expected = 1 - one @ two / (np.linalg.norm(one) * np.linalg.norm(two))
    assert expected == pytest.approx(0.5, abs=0.02)
    assert S.polysemanticity(crops_) == pytest.approx(expected, abs=1e-6)  # float32 inside
    assert np.isnan(S.polysemanticity(crops_[:3]))
    # four crops are enough: two near each direction
    four = crops_[[0, 1, 3, 4]]
    one, two = unit[[0, 1]].sum(axis=0), unit[[3, 4]].sum(axis=0)
    assert S.polysemanticity(four) == pytest.approx(
        1 - one @ two / (np.linalg.norm(one) * np.linalg.norm(two)), abs=1e-6)


def test_three_close_patterns_split_into_three():
    """Three tight groups of crops whose directions all share a common part (every cosine > 0.5):
    the silhouette on cosine distances picks three groups, not two."""
    rng = np.random.default_rng(0)
    centres = np.eye(3) + 1.0  # pairwise cosine 5/6
    truth = np.repeat([0, 1, 2], 6)
    vectors = centres[truth] + rng.normal(scale=0.02, size=(18, 3))
    labels = S.sub_concepts(vectors, max_k=3)
    assert labels is not None and len(set(labels.tolist())) == 3
    assert all(len(set(labels[truth == g].tolist())) == 1 for g in range(3))


def test_a_sub_concept_may_hold_exactly_min_group_crops_but_not_fewer():
    """Six crops, three near each of two orthogonal directions: two sub-concepts of exactly
    MIN_GROUP (3) crops each. Four near one direction and two near the other: the pair is an
    outlier, not a sub-concept, so the crops stay one group."""
    assert S.MIN_GROUP == 3
    rng = np.random.default_rng(0)
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    even = np.array([a] * 3 + [b] * 3) + rng.normal(scale=0.05, size=(6, 3))
    assert S.sub_concepts(even, 3).tolist() == [0, 0, 0, 1, 1, 1]
    uneven = np.array([a] * 4 + [b] * 2) + rng.normal(scale=0.05, size=(6, 3))
    assert S.sub_concepts(uneven, 3) is None


def test_sub_concepts_are_at_most_three_unless_asked_for_more():
    """SIEVE's range of sub-concepts is 1 to 3: four planted patterns of 4 crops each are split
    into 3 groups by default (two patterns share one), and into the 4 patterns with max_k 4."""
    rng = np.random.default_rng(0)
    vectors = np.repeat(np.eye(4), 4, axis=0) + rng.normal(scale=0.05, size=(16, 4))
    labels = S.sub_concepts(vectors)
    assert labels is not None and labels.max() == 2
    assert all(len(set(labels[4 * p:4 * p + 4].tolist())) == 1 for p in range(4))
    assert S.sub_concepts(vectors, 4).tolist() == np.repeat(np.arange(4), 4).tolist()


def test_a_reference_no_split_reaches_cannot_veto_a_split():
    """When none of the structureless reference sets can be split (here: no k allowed), the
    reference silhouette is −inf, so whatever split the crops themselves reach stands."""
    rng = np.random.default_rng(0)
    unit = S.l2_normalise(rng.normal(size=(12, 4)).astype(np.float64))
    assert S.reference_silhouette(unit, 1, np.random.default_rng(0)) == -np.inf
    assert np.isfinite(S.reference_silhouette(unit, 2, np.random.default_rng(0)))


def test_reference_sets_have_the_rows_mean_and_sample_covariance():
    """The structureless sets behind the one-group choice are Gaussian with the crops' mean and
    sample covariance (numpy's np.cov, n − 1): pooled over 3000 sets of 8 points, their mean and
    covariance match to within sampling error (n instead of n − 1 would be 12 % off here)."""
    rng = np.random.default_rng(4)
    unit = S.l2_normalise(rng.normal(size=(8, 3)) + [2.0, 0.0, 0.0])
    draws = list(S.reference_sets(unit, np.random.default_rng(5), references=3000))
    assert len(draws) == 3000 and draws[0].shape == (8, 3)
    pooled = np.concatenate(draws)
    expected = np.cov(unit, rowvar=False)
    np.testing.assert_allclose(pooled.mean(axis=0), unit.mean(axis=0),
                               atol=0.03 * np.sqrt(expected.diagonal().max()))
    got = np.cov(pooled, rowvar=False)
    scale = np.sqrt(np.outer(expected.diagonal(), expected.diagonal()))
    np.testing.assert_allclose(got / scale, expected / scale, atol=0.04)


def test_redundancy_is_the_highest_cosine_with_another_neuron():
    """Two identical neurons are fully redundant; a third orthogonal one is not."""
    red = S.redundancy(np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]))
    assert red[:2].tolist() == pytest.approx([1.0, 1.0]) and red[2] == pytest.approx(0.0)


def test_redundancy_of_a_lone_neuron_or_one_without_crops_is_nan():
    """A layer of one neuron has no other neuron to repeat (NaN, one value); a neuron without
    crops (zero mean vector) gets NaN, while one whose mean vector points into the negative
    orthant is an ordinary direction: its redundancy is scikit-learn's highest cosine with another
    neuron."""
    from sklearn.metrics.pairwise import cosine_similarity
    lone = S.redundancy(np.array([[1.0, 2.0, 3.0]]))
    assert lone.shape == (1,) and np.isnan(lone[0])
    means = np.array([[1.0, 0, 0], [2.0, 0.1, 0], [0, 0, 0], [-1.0, -2, -3], [-1.0, -2, -2.5]])
    red = S.redundancy(means)
    assert np.isnan(red[2]) and np.isfinite(red[[0, 1, 3, 4]]).all()
    live = [0, 1, 3, 4]
    cos = cosine_similarity(means[live])
    np.fill_diagonal(cos, -np.inf)
    assert red[live] == pytest.approx(cos.max(axis=1), abs=1e-6)  # float32 inside


def test_description_words():
    """Appearance words weigh their features (negated after "low"); object words are detected."""
    from common.appearance import FEATURES
    w = appearance_weights("Red and black vertical edges, low contrast.")
    assert w[FEATURES.index("red")] > 0 and w[FEATURES.index("contrast")] < 0
    assert np.abs(w).sum() == pytest.approx(1.0)
    assert not has_object_words("Gray and white irregular texture, high contrast.")
    assert has_object_words("Top images classified as cats, mostly Egyptian cat.")


# ---------------------------------------------------------------------------------------------
# Verification


def planted_images(tmp_path, n=60):
    """Images of three kinds (red square, vertical bars, plain) and the per-image spatial max of
    the fake model's conv1 channels 0 (redness) and 1 (vertical edges)."""
    rng = np.random.default_rng(5)
    kinds = ["red", "edges", "plain"]
    paths, arrays = [], []
    for i in range(n):
        img = make_image(kinds[i % 3], 32, rng)
        path = tmp_path / f"{i}.png"
        img.save(path)
        paths.append(str(path))
        arrays.append(np.asarray(img, np.float32) / 255)
    net = FakeNet().eval()
    with torch.no_grad():
        out = net.relu1(net.conv1(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)))
    return paths, out.amax(dim=(2, 3)).numpy()


def test_true_description_beats_its_control_and_a_wrong_one_does_not(tmp_path):
    """Offline matcher on held-out planted images: each neuron's true sentence correlates with its
    activation better than the other neuron's sentence (its control); with the sentences swapped
    (wrong), neither beats its control."""
    paths, act = planted_images(tmp_path)
    none = np.full((len(paths), 5), -1)
    matcher = OfflineMatcher(WordsText(), ["tench", "goldfish", "shark"], none, np.zeros((60, 5)))
    geometry = {"relu1": (np.array([3.0, 3, 1, 1, 0, 0]), (32, 32))}
    true = ["Red patches.", "Vertical edges."]
    scores_ = matcher.score({"relu1": true}, paths, 32, geometry)["relu1"]
    held_out = np.ones(len(paths), bool)
    held_out[:6] = False  # as if these had been in the mosaics
    for neuron, control in ((0, 1), (1, 0)):
        right = verification.verify(scores_[:, neuron], act[:, neuron], held_out)
        wrong = verification.verify(scores_[:, control], act[:, neuron], held_out)
        assert right["corr"] > 0.5 and right["corr"] > wrong["corr"]
        assert right["auprc"] > wrong["auprc"]
        assert right["n"] == 54
        # Swapped sentences: the wrong one is now verified against the true one as its control.
        assert not wrong["corr"] > right["corr"]


def test_object_part_compares_each_named_thing_with_the_class_names():
    """A sentence naming several things is split into phrases (filler words dropped), and an
    image's object score is its classes' best cosine with any phrase, minus the sentence's mean
    over the classes some image is predicted as — so an image of one named thing scores as if the
    sentence named it alone. A class no image is predicted as is never embedded."""
    assert matchers.phrases("Top images classified as dog, cat and car.") == ["dog", "cat", "car"]
    assert matchers.phrases("Top images of the.") == ["Top images of the."]  # nothing left
    assert matchers.phrases("Top images classified as objects such as bell cote, golf ball; "
                            "also food.") == ["bell cote", "golf ball", "food"]
    names = ["cat", "red", "plain"]  # "plain" is in no image's top 5
    idx = np.array([[0, -1, -1, -1, -1], [1, -1, -1, -1, -1]])
    prob = np.array([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0]])
    asked = []

    class Recording(WordsText):
        """WordsText that remembers what it embedded."""

        def encode(self, texts):
            """Record, then embed."""
            asked.extend(texts)
            return super().encode(texts)
    got = OfflineMatcher(Recording(), names, idx, prob)._object_scores(["dog, cat and car."])
    text = WordsText()
    best = (text.encode(["dog", "cat", "car"]) @ text.encode(names[:2]).T).max(axis=0)
    expected = best - best.mean()
    assert got[:, 0] == pytest.approx(expected, abs=1e-6)
    assert got[0, 0] > got[1, 0]  # the cat image, not the red one
    assert "plain" not in asked and {"cat", "red"} <= set(asked)
    # no image with a prediction: no object score at all
    none = OfflineMatcher(Recording(), names, np.full((2, 5), -1), np.zeros((2, 5)))
    assert np.array_equal(none._object_scores(["dog."]), np.zeros((2, 1)))


@pytest.mark.parametrize("kept", [True, False])
def test_sentences_scored_later_score_as_in_one_pass(tmp_path, monkeypatch, kept):
    """score_more (09 scores sub-concept sentences after the neurons') gives each sentence exactly
    what one score() call over all sentences gives: from the kept window features, or, when they
    would not fit in KEEP_BYTES, from a second pass over the images; an unreadable image stays
    NaN."""
    import common.matchers as M
    paths, _ = planted_images(tmp_path, n=12)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths.append(str(tmp_path / "broken.png"))
    if not kept:
        monkeypatch.setattr(M, "KEEP_BYTES", 0)
    none = np.full((len(paths), 5), -1)
    geometry = {"relu1": (np.array([3.0, 3, 1, 1, 0, 0]), (32, 32))}
    first, later = ["Red patches.", "Vertical edges."], ["Plain gray, cat.", "Dark red stripes."]
    def matcher():
        """A fresh offline matcher over the test images."""
        return OfflineMatcher(WordsText(), ["tench", "cat", "shark"], none,
                              np.zeros((len(paths), 5)))
    together = matcher().score({"relu1": first + later}, paths, 32, geometry)["relu1"]
    m = matcher()
    m.score({"relu1": first}, paths, 32, geometry, keep=["relu1"])
    assert bool(m._kept) == kept
    got = m.score_more({"relu1": later})["relu1"]
    assert np.array_equal(got, together[:, 2:], equal_nan=True)
    assert np.isnan(got[-1]).all() and np.isfinite(got[:-1]).all()


def test_worker_processes_score_exactly_as_one_process(tmp_path):
    """Measured by two forked worker processes (shared result arrays), every score, every kept
    window feature and every later sentence's score equal those of one process, bit for bit;
    an unreadable image stays NaN in both."""
    paths, _ = planted_images(tmp_path, n=21)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths.insert(7, str(tmp_path / "broken.png"))
    none = np.full((len(paths), 5), -1)
    geometry = {"relu1": (np.array([3.0, 3, 1, 1, 0, 0]), (32, 32)),
                "relu2": (np.array([9.0, 9, 2, 2, 1, 1]), (16, 16))}
    sentences = {"relu1": ["Red patches.", "Vertical edges, cat."], "relu2": ["Dark stripes."]}
    results = []
    for workers in (1, 2):
        m = OfflineMatcher(WordsText(), ["tench", "cat", "shark"], none,
                           np.zeros((len(paths), 5)), workers=workers)
        first = m.score(sentences, paths, 32, geometry, keep=["relu2"])
        results.append((first, dict(m._kept), m.score_more({"relu2": ["Bright plain gray."]})))
    (one, kept1, more1), (two, kept2, more2) = results
    for layer in sentences:
        assert np.array_equal(one[layer], two[layer], equal_nan=True)
    assert np.array_equal(kept1["relu2"], kept2["relu2"], equal_nan=True)
    assert np.array_equal(more1["relu2"], more2["relu2"], equal_nan=True)
    assert np.isnan(two["relu1"][7]).all() and np.isfinite(two["relu1"][8:]).all()


def test_text_embedder_loads_only_when_the_object_part_needs_it(tmp_path):
    """A loader given instead of an embedder is called once, when sentences are first compared
    with class names; each phrase is embedded once however many sentences name it."""
    encoded, loads = [], []

    class Counting(WordsText):
        """WordsText that records what it embeds."""

        def encode(self, texts):
            """Record, then embed."""
            encoded.extend(texts)
            return super().encode(texts)

    def load():
        """Record the load."""
        loads.append(1)
        return Counting()
    idx = np.array([[0, 1, -1, -1, -1], [1, -1, -1, -1, -1], [-1, -1, -1, -1, -1]])
    prob = np.where(idx >= 0, 0.5, 0.0)
    m = OfflineMatcher(load, ["tench", "cat"], idx, prob)
    assert not loads
    m._object_scores(["cat and dog.", "dog, car."])
    m._object_scores(["red dog."])
    assert len(loads) == 1
    assert encoded[:2] == ["tench", "cat"]  # the class names, once
    assert sorted(encoded[2:]) == ["car", "cat", "dog", "red dog"]


def test_pixel_maps_are_the_named_colours_luminance_and_gradients():
    """pixel_maps (filled in place) equals its definition computed plainly: one-hot colour
    names, luminance, its square and the Sobel structure-tensor products, bit for bit."""
    from scipy.ndimage import sobel
    from common.appearance import PALETTE, colour_codes, pixel_maps
    rgb = np.random.default_rng(3).integers(0, 256, (23, 17, 3), dtype=np.uint8)
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    gx, gy = sobel(lum, axis=1) / 8, sobel(lum, axis=0) / 8
    plain = np.concatenate([np.eye(len(PALETTE))[colour_codes(rgb)],
                            np.stack([lum, lum * lum, gx * gx, gy * gy, gx * gy], -1)], -1)
    assert np.array_equal(pixel_maps(rgb), plain)


def test_one_thread_inside_and_restored_after():
    """Inside ``single_threaded`` BLAS uses one thread, inside ``one_torch_thread`` torch does;
    afterwards the settings are back."""
    from threadpoolctl import threadpool_info
    from common.threads import one_torch_thread, single_threaded
    before = torch.get_num_threads()
    blas_before = [i["num_threads"] for i in threadpool_info()]

    @single_threaded
    def inside():
        """The BLAS/OpenMP thread counts seen inside."""
        return [i["num_threads"] for i in threadpool_info()]
    assert all(n == 1 for n in inside())
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert [i["num_threads"] for i in threadpool_info()] == blas_before


def test_clip_matcher_is_the_cosine_of_the_two_towers(tmp_path):
    """The clip matcher scores image i for sentence j as cos(image tower(i), text tower(j))."""
    from common.embedders import ClipEmbedder
    from common.matchers import ClipMatcher
    from test_embed import _tiny_clip
    model, pre = _tiny_clip()
    text = ClipEmbedder(model, pre, "tiny", "text", torch.device("cpu"))
    image = ClipEmbedder(model, pre, "tiny", "image", torch.device("cpu"))
    paths, _ = planted_images(tmp_path, n=6)
    matcher = ClipMatcher(text, image)
    got = matcher.score({"L": ["a red square", "stripes"]}, paths, 32)["L"]
    expected = image.encode([Image.open(p).convert("RGB") for p in paths]) @ \
        text.encode(["a red square", "stripes"]).T
    assert got.shape == (6, 2)
    assert np.allclose(got, expected, atol=1e-5)
    later = matcher.score_more({"L": ["stripes"]})["L"]  # the same images, not embedded again
    assert np.allclose(later[:, 0], expected[:, 1], atol=1e-5)


def test_integral_image_is_the_summed_area_table():
    """integral_image equals the zero-padded double cumsum bit for bit, and a window's sum read
    from it equals the brute-force sum."""
    from common.appearance import integral_image
    maps = np.random.default_rng(0).random((9, 7, 4))
    table = integral_image(maps)
    reference = np.zeros((10, 8, 4))
    reference[1:, 1:] = maps.cumsum(0).cumsum(1)
    assert np.array_equal(table, reference)
    window = table[6, 5] - table[2, 5] - table[6, 1] + table[2, 1]
    assert np.allclose(window, maps[2:6, 1:5].sum(axis=(0, 1)))


def test_final_layer_eval_and_its_shuffled_control():
    """Each output neuron's sentence against its class name; the shuffled control gives every
    neuron another neuron's sentence (never its own)."""
    names = ["red car", "edge dog", "plain cat"]
    texts = {0: "a red car", 1: "a dog at the edge", 2: "a plain cat"}
    rows = score.final_layer_eval("fc", texts, names, WordsText(), seed=0)
    assert [r["channel"] for r in rows] == [0, 1, 2]
    assert all(r["shuffled_from"] != r["channel"] for r in rows)
    mean = np.mean([r["cosine"] for r in rows])
    assert mean > np.mean([r["shuffled_cosine"] for r in rows])
    report = score.eval_report(rows, "offline", "fc")
    assert "CIRCULAR" in report and "0.459" in report
    assert "no chosen layer" in score.eval_report([], "offline", None)


# ---------------------------------------------------------------------------------------------
# The stage end to end on the fake model


SENTENCES = ["Red patches.", "Vertical edges.", "Horizontal edges.", "Bright gray."]  # true ones


def described_run(tmp_path, image_folder, sentences=SENTENCES):
    """01 and 02 for real on the fake model (relu1, 3 × 3 mosaics), ``sentences`` as 03's file,
    and 04 for real with the fake model's conv1 feature as its image embedder → the run
    folder."""
    from common.io import write_csv
    from common.provenance import read_meta, write_meta
    run_dir = tmp_path / "run"
    load_stage("01_extract").main([
        "--images", str(image_folder), "--run", str(run_dir), "--model", FAKE_MODEL,
        "--layers", "relu1", "--input-size", "32", "--topk", "16", "--batch-size", "8",
        "--device", "cpu", "--workers", "1"])
    load_stage("02_mosaics").main(["--run", str(run_dir), "--grid", "3", "--tile", "16",
                                   "--workers", "1"])
    write_csv(run_dir / "03_descriptions.csv",
              [{"layer": "relu1", "channel": c, "level": 1, "description": t, "backend": "offline",
                "model": "test", "status": "ok"} for c, t in enumerate(sentences)],
              ["layer", "channel", "level", "description", "backend", "model", "status", "reason"])
    write_meta(run_dir / "03_describe.meta.json", "03_describe", {},
               [run_dir / "03_descriptions.csv"], [read_meta(run_dir / "02_mosaics.csv")],
               backend="offline")
    embed = load_stage("04_embed")
    embed.run(Run(run_dir), embed.Settings(crop_vectors=9), text_embedder=WordsText(),
              image_embedder=ConvFeature())
    return run_dir


def test_stage_on_the_fake_model(tmp_path, image_folder, monkeypatch):
    """01 and 02 run for real on the fake model; 03's file is written here and 04 runs for real
    with the fake model's conv1 feature as its image embedder (04_crops.npz); 09 writes the
    contract's columns, splits the neurons' crops and has the real 03 (offline backend, run as
    a process) describe the sub-concept mosaics, with held-out verification beside a control."""
    from common.provenance import read_meta
    run_dir = described_run(tmp_path, image_folder)
    none = np.full((30, 5), -1)  # the matcher sees the 30 usable images (one file is broken)
    # The fake model's neurons are monosemantic, so the silhouette keeps one group each (tested
    # above); here every neuron is split in two, to run the sub-concept path end to end.
    monkeypatch.setattr(S, "sub_concepts", lambda v, k, rng=None, detail=None:
                        S.split_crops(v, 2))

    def run_09():
        """Stage 09 on the run (every neuron split: polysemanticity threshold 0; no refinement,
        so that each sentence is the one it started from)."""
        return score.run(
            Run(run_dir), score.Settings(poly_threshold=0.0, describe_args="--backend offline",
                                         refine=0),
            matcher_obj=OfflineMatcher(WordsText(), ["a", "b", "c"], none, np.zeros((30, 5))))
    result = run_09()
    with open(run_dir / "09_scores.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:len(score.SCORE_FIELDS)] == score.SCORE_FIELDS
    neurons = [r for r in result["scores"] if r["subconcept"] == ""]
    assert [r["channel"] for r in neurons] == [0, 1, 2, 3]
    assert all(r["share"] == 1 and r["embedder"] == "fake-conv1" for r in neurons)
    assert all(r["n_crops"] == 9 for r in neurons)  # 04 kept 9 crops of each 3 × 3 mosaic
    # REFINE=0: every neuron keeps 03's sentence, the chosen one of its candidates
    assert [r["description"] for r in neurons] == [r["first_description"] for r in neurons] \
        == SENTENCES
    chosen = {(c.layer, c.channel, c.subconcept): c.description
              for c in read_candidates(run_dir / "09_candidates.csv") if c.chosen}
    assert {k[1]: t for k, t in chosen.items() if k[2] is None} == dict(enumerate(SENTENCES))
    subs = [r for r in result["scores"] if r["subconcept"] != ""]
    assert subs, "every neuron with enough crops is split"
    described = {(r["layer"], int(r["channel"])): r
                 for r in csv.DictReader(open(run_dir / "09_subconcepts" / "03_descriptions.csv"))}
    for r in subs:
        row = described[(f"relu1#{r['subconcept']}", r["channel"])]
        assert row["backend"] == "offline" and row["level"] == "1"  # 03's level for relu1
        assert r["description"] == row["description"] != ""
        assert (run_dir / r["mosaic"]).is_file()
    for channel in {r["channel"] for r in subs}:
        shares = [r["share"] for r in subs if r["channel"] == channel]
        assert sum(shares) == pytest.approx(1.0, abs=0.01)
    # Verified on the test half (15 of the 30 usable images) minus its mosaic's images there
    # (on so few images, some neurons keep too few to be verified).
    from common.artefacts import read_activations, read_images
    usable = np.array([i for i, r in enumerate(read_images(run_dir / "01_images.csv"))
                       if r.status == "ok"])
    tested = usable[S.test_half(len(usable), 0)]
    tops = read_activations(run_dir / "01_activations.npz")[2]["relu1"]
    for r in neurons:
        assert r["n_held_out"] == len(set(tested) - set(tops.image_ids[r["channel"], :9]))
    summary = result["summary"]
    assert summary[0]["n_selection"] == summary[0]["n_test"] == 15
    assert summary[0]["layer"] == "relu1" and summary[0]["neurons"] == 4
    verified = [r for r in neurons if r.get("verdict", "none") != "none"]
    assert verified
    for r in verified:
        assert r["margin_low"] <= r["margin"] <= r["margin_high"]
        assert r["control_description"] == SENTENCES[r["control_channel"]]
        assert r["verdict"] == S.verdict_level(r["verify_corr"], r["margin"], r["margin_low"])
        assert 0 <= r["activation_rate"] <= 1 and r["crop_clusters"] in (1, 2, 3)
    assert summary[0]["share_beating_control"] == pytest.approx(
        np.mean([r["margin"] > 0 for r in verified]), abs=1e-3)
    assert summary[0]["selected"] == sum(r["selected"] for r in neurons)
    assert summary[0]["hypotheses_kept"] <= summary[0]["hypotheses"]
    assert summary[0]["share_beating_control_auprc"] == pytest.approx(
        np.mean([r["verify_auprc"] > r["control_auprc"] for r in verified]), abs=1e-3)
    assert result["eval"] == []
    meta = read_meta(run_dir / "09_scores.csv")
    assert meta["stage"] == "09_score" and "02_mosaics" in meta["lineage"]

    # Window features too big to keep: 09 waits for 03 and scores every sentence in one pass,
    # with the same results.
    monkeypatch.setattr(matchers, "KEEP_BYTES", 0)
    again = run_09()
    assert again["scores"] == result["scores"]


def test_controls_are_other_neurons_with_other_words():
    """A control is never the neuron itself nor, while another exists, a sentence with the same
    words; the draw is reproducible from the seed."""
    shown = np.zeros(0, np.int64)
    texts = ["red", "red", "blue", "red"]
    def draw(seed):
        """Controls of the four sentences plus a sub-concept of neuron 0."""
        sents = [verification.Sentence("L", c, 0, t, shown) for c, t in enumerate(texts)]
        sents.append(verification.Sentence("L", 0, 1, "blue", shown))
        verification.pick_controls(sents, np.random.default_rng(seed))
        return [(s, sents[s.control]) for s in sents]
    pairs = draw(0)
    for s, control in pairs:
        assert control.subconcept == 0 and control.channel != s.channel
    assert all(control.text == "blue" for s, control in pairs if s.text == "red")
    assert [c.channel for _, c in draw(0)] == [c.channel for _, c in pairs]


def test_a_control_says_something_else_not_the_same_sentence_with_a_clause_added():
    """A sentence that only adds words to another (or is the other less a clause) would tie with
    it, so it is never drawn as its control while a sentence that says something else exists,
    over many seeds; with no such sentence the draw falls back to any different text."""
    shown = np.zeros(0, np.int64)
    texts = ["Top images classified as food, mostly espresso.",
             "Top images classified as food, mostly espresso; also man-made objects.",
             "Top images classified as cats, mostly tabby cat."]
    for seed in range(40):
        sents = [verification.Sentence("L", c, 0, t, shown) for c, t in enumerate(texts)]
        verification.pick_controls(sents, np.random.default_rng(seed))
        assert sents[0].control == 2 and sents[1].control == 2
        assert sents[2].control in (0, 1)
    pair = [verification.Sentence("L", c, 0, t, shown) for c, t in enumerate(texts[:2])]
    verification.pick_controls(pair, np.random.default_rng(0))
    assert [s.control for s in pair] == [1, 0]


# ---------------------------------------------------------------------------------------------
# Issue 21: selection/test halves, SIEVE's clusters and Activation Rate, the margin's interval,
# DnR's semantic consistency and its ranking table


def test_selection_and_test_halves_never_share_an_image():
    """The seeded split puts every usable image in exactly one half, ⌈n/2⌉ in the selection half;
    the same seed gives the same split, another seed another."""
    for n in (1, 2, 15, 30, 1501):
        test = S.test_half(n, 0)
        selection, tested = set(np.flatnonzero(~test)), set(np.flatnonzero(test))
        assert not selection & tested and selection | tested == set(range(n))
        assert len(selection) == (n + 1) // 2
    assert (S.test_half(100, 0) == S.test_half(100, 0)).all()
    assert (S.test_half(100, 0) != S.test_half(100, 1)).any()


def test_silhouette_is_sklearns():
    """The silhouette 09 uses equals scikit-learn's on precomputed distances, singletons
    included."""
    from sklearn.metrics import silhouette_score
    rng = np.random.default_rng(4)
    for _ in range(10):
        x = rng.normal(size=(20, 5))
        distance = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        labels = rng.integers(0, 3, 20)
        labels[0] = 7  # a group of one
        assert S.silhouette(distance, labels) == pytest.approx(
            silhouette_score(distance, labels, metric="precomputed"), abs=1e-12)


def test_silhouette_of_groups_of_one_and_short_distances_warns_nothing():
    """Cosine distances (all below 1 here) with two crops alone in their group, and identical
    crops in two groups: the same values as scikit-learn, and no division by zero along the way
    (09 computes about 40 silhouettes per neuron; a warning each would flood its log)."""
    from sklearn.metrics import silhouette_score
    rng = np.random.default_rng(5)
    x = np.abs(rng.normal(size=(12, 4))) + 1.0  # positive rows: cosine distances well below 1
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    distance = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    assert distance.max() < 0.5
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 3, 0, 1, 0])  # groups 2 and 3 hold one crop each
    expected = silhouette_score(distance, labels, metric="precomputed")
    same = np.zeros((6, 6))  # identical crops split in two groups: a = b = 0, silhouette 0
    halves = np.array([0, 0, 0, 1, 1, 1])
    assert silhouette_score(same, halves, metric="precomputed") == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert S.silhouette(distance, labels) == pytest.approx(expected, abs=1e-12)
        assert S.silhouette(same, halves) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_monosemantic_neuron_keeps_one_cluster_two_patterns_get_two(seed):
    """SIEVE's clustering of a planted neuron's top-20 crops: all red squares → one group (one
    sentence), although a forced split of them reaches a silhouette near 0.5; red squares and
    vertical bars → exactly the two planted groups."""
    embed = ConvFeature()
    rng = np.random.default_rng(seed)
    mono = embed.encode(crops("red", 20, seed))
    detail = {}
    assert S.sub_concepts(mono, 3, rng, detail) is None
    assert detail["silhouette"] > 0.3  # the silhouette alone would have split it
    images = crops("red", 10, seed + 10) + crops("edges", 10, seed + 20)
    labels = S.sub_concepts(embed.encode(images), 3, rng)
    assert labels is not None and labels.max() == 1
    assert len(set(labels[:10])) == len(set(labels[10:])) == 1 and labels[0] != labels[10]


def rare_red_images(tmp_path, n=100, n_red=5):
    """``n`` planted images, of which ``n_red`` red squares (rarer than the top 5 would be by
    chance) and the rest vertical bars or plain grey, with the fake model's conv1 per-image
    maxima."""
    rng = np.random.default_rng(9)
    kinds = ["red"] * n_red + ["edges", "plain"] * ((n - n_red) // 2) + ["plain"] * ((n - n_red) % 2)
    paths, arrays = [], []
    for i, kind in enumerate(kinds):
        img = make_image(kind, 32, rng)
        img.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
        arrays.append(np.asarray(img, np.float32) / 255)
    with torch.no_grad():
        net = FakeNet().eval()
        out = net.relu1(net.conv1(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)))
    return paths, out.amax(dim=(2, 3)).numpy(), np.array(kinds)


def test_activation_rate_of_the_true_concept_is_near_1_and_of_a_wrong_one_near_0(tmp_path):
    """The redness neuron (conv1 channel 0) on 100 images, 5 of them red: the matcher's top
    images for "Red patches." are where it passes its top-1 % threshold (AR 1); for "Vertical
    edges." they are not (AR 0). SIEVE's filter keeps the rates at or above their mean."""
    paths, act, kinds = rare_red_images(tmp_path)
    none = np.full((len(paths), 5), -1)
    matcher = OfflineMatcher(WordsText(), ["tench"], none, np.zeros((len(paths), 5)))
    geometry = {"relu1": (np.array([3.0, 3, 1, 1, 0, 0]), (32, 32))}
    match = matcher.score({"relu1": ["Red patches.", "Vertical edges."]}, paths, 32,
                          geometry)["relu1"]
    positive = S.top_share_positives(act[:, 0], 0.01, 5)
    assert set(kinds[positive]) == {"red"}  # the neuron's top 1 % (5 images) are the red ones
    true, wrong = (S.activation_rate(positive, match[:, j]) for j in (0, 1))
    assert true >= 0.8 and wrong <= 0.2
    mean, kept, mean_kept = S.mean_filter(np.array([true, wrong, np.nan]))
    assert mean == pytest.approx((true + wrong) / 2) and kept.tolist() == [True, False, False]
    assert mean_kept == pytest.approx(true)
    # By hand: the matcher's top 2 of 4 images, one of which is a positive → 0.5.
    assert S.activation_rate(np.array([1, 1, 0, 0], bool), np.array([0.9, 0.1, 0.8, 0.2])) == 0.5


def test_positives_are_the_top_share_with_ties_and_never_a_silent_majority():
    """The positives of a neuron on 10 images, at least 2: a tie at the threshold brings every
    tied image in (4 × 0.4 → 4 positives); when the threshold is the lowest value (9 silent
    images at 0) only the images above it count; as many images as the minimum, or fewer, are
    all positives; on 300 images 2 % (6) exceeds the minimum of 5. The Activation Rate on them:
    the share of positives among the matcher's top k (k = positives), NaN without positives."""
    tied = np.array([5, 4, 4, 4, 1, 0, 0, 0, 0, 0], float)
    assert S.top_share_positives(tied, 0.01, 2).tolist() == [True] * 4 + [False] * 6
    silent = np.r_[np.zeros(9), 1.0]
    assert S.top_share_positives(silent, 0.01, 2).tolist() == [False] * 9 + [True]
    assert S.top_share_positives(np.arange(5.0), 0.01, 5).all()
    assert S.top_share_positives(np.arange(3.0), 0.01, 5).all()
    assert np.flatnonzero(S.top_share_positives(np.arange(300.0), 0.02, 5)).tolist() == \
        list(range(294, 300))
    positive = np.array([1, 1, 0, 0], bool)
    assert S.activation_rate(positive, np.array([0.9, 0.1, 0.8, 0.2])) == 0.5
    assert S.activation_rate(positive, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert np.isnan(S.activation_rate(np.zeros(4, bool), np.arange(4.0)))


def test_the_stages_positives_are_the_top_1_percent_and_at_least_5_images():
    """The positives behind the AUPRC, the refinement's misses and both Activation Rates (09 on
    retrieved and on generated images): on 300 images the top 1 % is 3, so the 5 highest count;
    on 1000 images the 10 highest; on 1001 the top 1 % rounds up to 11; a tie with the 5th
    highest brings its image in; the count ``verify`` reports is the same."""
    rng = np.random.default_rng(0)
    for n, count in ((300, 5), (1000, 10), (1001, 11)):
        activation = rng.permutation(n).astype(np.float64)
        positive = verification.positives(activation)
        assert sorted(activation[positive].tolist()) == list(range(n - count, n))
        pos = verification.verify(rng.normal(size=n), activation, np.ones(n, bool))["pos"]
        assert pos == count
    tied = np.r_[np.arange(300.0), 295.0]  # 295 is the 5th highest of 0 … 299
    assert int(verification.positives(tied).sum()) == 6


def test_verdicts_exactly_on_their_boundaries():
    """A sentence is reliable only when the margin's lower end is above 0 and r above 0: a lower
    end of exactly 0, or r of exactly 0, is weak; a margin of exactly 0 is chance; a missing or
    infinite number gives no verdict."""
    assert S.verdict_level(0.3, 0.2, 0.01) == "reliable"
    assert S.verdict_level(0.3, 0.2, 0.0) == "weak"
    assert S.verdict_level(0.0, 0.2, 0.01) == "weak"
    assert S.verdict_level(0.3, 0.0, -0.2) == "chance"
    assert S.verdict_level(None, 0.2, 0.01) == S.verdict_level(0.3, np.inf, 0.01) == "none"


def test_mean_filter_keeps_the_rates_at_or_above_their_mean_by_hand():
    """SIEVE's filter on rates 0.2, 0.6, NaN, 0.6, 1.0: mean 0.6 (NaN not counted); the two rates
    exactly on the mean are kept, with 1.0; the mean of those kept is 2.2 / 3. No finite rate:
    nothing kept."""
    mean, kept, mean_kept = S.mean_filter(np.array([0.2, 0.6, np.nan, 0.6, 1.0]))
    assert mean == pytest.approx(0.6)
    assert kept.tolist() == [False, True, False, True, True]
    assert mean_kept == pytest.approx(2.2 / 3)
    mean, kept, mean_kept = S.mean_filter(np.array([np.nan, np.nan]))
    assert np.isnan(mean) and np.isnan(mean_kept) and kept.tolist() == [False, False]


def hand_pearson(x, y):
    """Pearson r from its definition, with plain sums."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5


def test_bootstrap_interval_covers_the_hand_computed_margin():
    """The margin is r(sentence) − r(control) computed by hand, and its 95 % bootstrap interval
    contains it; with 10 × the images the interval narrows; a sentence compared with itself has
    margin 0 and a zero-width interval; the draw is reproducible."""
    rng = np.random.default_rng(11)
    activation = rng.normal(size=80)
    sentence = activation + rng.normal(size=80)
    control = 0.3 * activation + rng.normal(size=80)
    d, low, high = S.bootstrap_margin(sentence, control, activation, 1000,
                                      np.random.default_rng(0))
    by_hand = hand_pearson(sentence, activation) - hand_pearson(control, activation)
    assert d == pytest.approx(by_hand, abs=1e-12)
    assert low < by_hand < high
    assert (d, low, high) == S.bootstrap_margin(sentence, control, activation, 1000,
                                                np.random.default_rng(0))
    big = rng.normal(size=800)
    _, low2, high2 = S.bootstrap_margin(big + rng.normal(size=800),
                                        0.3 * big + rng.normal(size=800), big, 1000,
                                        np.random.default_rng(0))
    assert high2 - low2 < (high - low) / 2
    assert S.bootstrap_margin(sentence, sentence, activation, 200,
                              np.random.default_rng(0)) == (0.0, 0.0, 0.0)
    assert S.verdict_level(0.5, by_hand, low) == ("reliable" if low > 0 else "weak")
    assert S.verdict_level(0.5, -0.1, -0.3) == "chance"
    assert S.verdict_level(0.5, 0.2, float("nan")) == "none"


def test_bootstrap_interval_ends_are_the_percentiles_of_the_paired_resamples():
    """The interval at ``level`` is the (1 − level)/2 and (1 + level)/2 percentiles of the
    margins recomputed on the same draws (both correlations on one draw), by hand with numpy's
    corrcoef: 2.5 % and 97.5 % at 0.95, 25 % and 75 % at 0.5 — not the draws' extremes. Fewer
    than 4 images, or an undefined margin, give no interval."""
    rng = np.random.default_rng(12)
    activation = rng.normal(size=30)
    sentence = activation + rng.normal(size=30)
    control = 0.5 * activation + rng.normal(size=30)
    draw = np.random.default_rng(7).integers(0, 30, (400, 30))
    margins = np.array([np.corrcoef(sentence[i], activation[i])[0, 1]
                        - np.corrcoef(control[i], activation[i])[0, 1] for i in draw])
    for level, ends in ((0.95, [2.5, 97.5]), (0.5, [25.0, 75.0])):
        _, low, high = S.bootstrap_margin(sentence, control, activation, 400,
                                          np.random.default_rng(7), level)
        assert [low, high] == pytest.approx(np.percentile(margins, ends), abs=1e-12)
    assert low > margins.min() and high < margins.max()
    # No interval on 3 images (d itself is defined), nor for a control that never varies (d NaN)
    d, low, high = S.bootstrap_margin([1.0, 2, 3], [3.0, 1, 2], [1.0, 2, 4], 100,
                                      np.random.default_rng(0))
    assert np.isfinite(d) and np.isnan(low) and np.isnan(high)
    assert np.isnan(S.bootstrap_margin(np.arange(10.0), np.ones(10), np.arange(10.0) ** 2, 100,
                                       np.random.default_rng(0))).all()


def test_bootstrap_leaves_out_draws_on_which_the_neuron_never_fires():
    """A sparse neuron (firing on 2 of 12 images) is flat on many draws: its correlation is
    undefined there, and those draws are left out — the interval is the percentiles of the other
    draws' margins, by hand with numpy's corrcoef on the same draws (rounding must not turn a
    flat draw into a huge r)."""
    rng = np.random.default_rng(3)
    activation = np.zeros(12)
    activation[[2, 9]] = [4.0, 7.0]
    sentence, control = activation + rng.random(12), rng.random(12)
    draw = np.random.default_rng(5).integers(0, 12, (300, 12))
    with np.errstate(invalid="ignore", divide="ignore"):
        margins = np.array([np.corrcoef(sentence[i], activation[i])[0, 1]
                            - np.corrcoef(control[i], activation[i])[0, 1] for i in draw])
    kept = margins[np.isfinite(margins)]
    assert 20 < len(margins) - len(kept) < 150  # the case is planted: many flat draws
    _, low, high = S.bootstrap_margin(sentence, control, activation, 300,
                                      np.random.default_rng(5))
    assert [low, high] == pytest.approx(np.percentile(kept, [2.5, 97.5]), abs=1e-9)


def test_pearson_from_sums_calls_a_spread_under_1e_9_of_the_mean_square_flat():
    """The bootstrap's r from sums: ten values 5e-6 apart around 1 (variance about 2e-10 of their
    mean square: rounding, for float32 activations) are flat, r NaN, on either side; 1e-3 apart
    they give numpy's r."""
    def from_sums(x, y):
        return float(S._pearson_from_sums(len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(),
                                          (x * y).sum()))
    steps = np.arange(10.0)
    y = np.sin(steps)
    assert np.isnan(from_sums(1 + 5e-6 * steps, y)) and np.isnan(from_sums(y, 1 + 5e-6 * steps))
    for x in (1 + 1e-3 * steps, y ** 2):
        assert from_sums(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)
        assert from_sums(y, x) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)


def test_tree_cut_equals_scipys_maxclust_with_ties_and_duplicates():
    """``cut_tree_into`` gives scipy's ``fcluster(..., criterion="maxclust")`` partition on Ward
    trees of random points and of points on a small grid (duplicates: merges at height 0, and
    merges tied at the cut, where maxclust makes them all and returns fewer groups)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    def same_partition(a, b):
        pairs = set(zip(a.tolist(), b.tolist()))
        return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))
    rng = np.random.default_rng(0)
    fewer = 0
    for trial in range(300):
        n = int(rng.integers(4, 30))
        points = (rng.integers(0, 3, (n, 2)).astype(float) if trial % 2
                  else rng.standard_normal((n, 4)))
        tree = linkage(points, method="ward")
        for k in range(1, min(n, 6) + 2):
            ours, scipys = S.cut_tree_into(tree, k), fcluster(tree, t=k, criterion="maxclust")
            assert same_partition(ours, scipys), (trial, k)
            fewer += len(set(scipys.tolist())) < min(k, n)
    assert fewer > 10  # ties at the cut were met


def test_four_images_are_enough_for_a_bootstrap_interval_without_the_undefined_draws():
    """On 4 images (the fewest with an interval) many resamples repeat one image, or give a
    constant score: those draws are left out, and the ends are the percentiles of the margins of
    the others, by hand with numpy's corrcoef on the same draws."""
    sentence, control = np.array([0.2, 0.9, 0.4, 0.8]), np.array([0.5, 0.1, 0.7, 0.3])
    activation = np.array([1.0, 4.0, 2.0, 3.0])
    draw = np.random.default_rng(3).integers(0, 4, (300, 4))
    margins = []
    for i in draw:
        if np.ptp(activation[i]) > 0 and np.ptp(sentence[i]) > 0 and np.ptp(control[i]) > 0:
            margins.append(np.corrcoef(sentence[i], activation[i])[0, 1]
                           - np.corrcoef(control[i], activation[i])[0, 1])
    assert 2 <= len(margins) < 300
    d, low, high = S.bootstrap_margin(sentence, control, activation, 300, np.random.default_rng(3))
    assert d == pytest.approx(hand_pearson(sentence, activation) - hand_pearson(control, activation))
    assert [low, high] == pytest.approx(np.percentile(margins, [2.5, 97.5]), abs=1e-12)


def test_semantic_consistency_and_dnr_ranking_table_by_hand():
    """DnR's semantic consistency on 5 images (top 2 by activation, layer scale 10, α 0.5) and
    the ranks of three neurons under the five ranking methods, worked by hand."""
    activation = np.array([1.0, 8.0, 3.0, 6.0, 0.0])
    match = np.array([0.1, 0.9, 0.5, 0.3, 0.2])  # percentiles 0, 1, 0.75, 0.5, 0.25
    # top 2 images: 8 and 6 → mean 7 / 10 = 0.7; their match percentiles 1 and 0.5 → 0.75² = 0.5625
    assert S.semantic_consistency(activation, match, 10.0, 0.5, k=2) == pytest.approx(
        0.5 * 0.7 + 0.5 * 0.5625)
    # a layer whose largest maximum is 0 (all silent) has no scale: undefined, not infinite
    assert np.isnan(S.semantic_consistency(activation, match, 0.0, 0.5, k=2))
    assert np.isnan(S.semantic_consistency(activation, match, -0.5, 0.5, k=2))
    stats = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [9.0, 1.0, 0.0], [np.nan] * 3])
    table = S.ranks_by_method(stats, np.array([0.2, 0.9, np.nan]), k=1)
    # neuron 0: one spike (9), otherwise 0; neuron 1: always 1; neuron 2: usually 2
    assert table["top-K log-weighted"][1].tolist() == [1, 3, 2]  # log 10, log 2, log 3
    assert table["mean"][1].tolist() == [1, 3, 2]                # 3, 1, 4/3
    assert table["median"][1].tolist() == [3, 2, 1]              # 0, 1, 2
    assert table["squared mean"][1].tolist() == [1, 3, 2]        # 27, 1, 8/3
    assert table["semantic consistency"][1].tolist() == [2, 1, 3]  # NaN ranks last


def test_09s_semantic_consistency_is_over_the_top_20_held_out_images_by_hand():
    """As 09 measures it (``verification.measure``): DnR's K is 20, so on 30 held-out images the
    10 weakest take no part. Activations 1 … 30 in a shuffled order, the layer's scale 40,
    α 0.5: the top 20 have mean 20.5; the matcher's score is each image's rank (percentile
    (rank − 1) / 29) lowered on the 5 strongest images."""
    order = np.random.default_rng(8).permutation(30)
    activation = (order + 1).astype(np.float64)
    match = activation.copy()
    match[activation > 25] -= 30  # the 5 strongest get the 5 lowest scores
    percentile = (np.argsort(np.argsort(match)) / 29.0)
    top = activation > 10
    by_hand = 0.5 * 20.5 / 40 + 0.5 * percentile[top].mean() ** 2
    _, _, extra = verification.measure(match, None, activation, np.ones(30, bool), scale=40.0,
                                       alpha=0.5, bootstrap=0, rng=np.random.default_rng(0))
    assert extra["consistency"] == pytest.approx(by_hand, abs=1e-12)
    assert S.semantic_consistency(activation, match, 40.0, 0.5) == pytest.approx(by_hand)


def test_one_resample_gives_the_margin_but_no_interval_and_two_give_one():
    """With a single bootstrap resample the margin over the control is reported (numpy's
    r difference) but its interval is not (one resample has no percentiles); with two, the
    interval is the 2.5 and 97.5 percentiles of their two paired margins, by hand."""
    rng = np.random.default_rng(9)
    activation = rng.normal(size=20)
    scores, control = activation + rng.normal(size=20), rng.normal(size=20)
    _, _, extra = verification.measure(scores, control, activation, np.ones(20, bool), 1.0, 0.5,
                                       1, np.random.default_rng(0))
    assert extra["margin"] == pytest.approx(np.corrcoef(scores, activation)[0, 1]
                                            - np.corrcoef(control, activation)[0, 1])
    assert np.isnan(extra["low"]) and np.isnan(extra["high"])
    draw = np.random.default_rng(0).integers(0, 20, (2, 20))
    two = [np.corrcoef(scores[i], activation[i])[0, 1] - np.corrcoef(control[i], activation[i])[0, 1]
           for i in draw]
    _, low, high = S.bootstrap_margin(scores, control, activation, 2, np.random.default_rng(0))
    assert [low, high] == pytest.approx(np.percentile(two, [2.5, 97.5]), abs=1e-12)
    assert low < high


def test_ranking_table_by_numpy_with_ties_and_fewer_images_than_k():
    """DnR's Table 1 on a layer of 4 usable images (K = 20 by default, so the log-weighted score
    is over all 4): each method's scores by numpy, and neurons that tie share the best rank
    (two neurons with the same mean, below a third, both rank 2; the next ranks 4)."""
    stats = np.array([[1.0, 3.0, 0.0, -2.0], [3.0, 1.0, 1.0, 5.0], [2.0, 2.0, 8.0, 0.5],
                      [2.0, 2.0, 0.0, 1.0], [np.nan, 1.0, 1.0, 1.0]])
    consistency = np.array([0.5, 0.5, 0.25, np.nan])
    table = S.ranks_by_method(stats, consistency)
    rows = stats[:4]
    expected = {"top-K log-weighted": np.log1p(np.maximum(rows, 0)).mean(axis=0),
                "mean": rows.mean(axis=0), "median": np.median(rows, axis=0),
                "squared mean": (rows ** 2).mean(axis=0), "semantic consistency": consistency}
    for method, values in expected.items():
        np.testing.assert_allclose(table[method][0], values)
    assert table["mean"][1].tolist() == [2, 2, 1, 4]            # 2, 2, 2.25, 1.125
    assert table["median"][1].tolist() == [1, 1, 4, 3]          # 2, 2, 0.5, 0.75
    assert table["semantic consistency"][1].tolist() == [1, 1, 3, 4]
    top2 = S.ranks_by_method(stats, consistency, k=2)["top-K log-weighted"][0]
    np.testing.assert_allclose(top2, np.log1p([[3.0, 3.0, 8.0, 5.0], [2.0, 2.0, 1.0, 1.0]]).mean(axis=0))
    # 200 images: the mean over each neuron's 20 highest values, by sorting
    many = np.random.default_rng(14).normal(size=(200, 3))
    top20 = np.sort(many, axis=0)[-20:]
    np.testing.assert_allclose(S.ranks_by_method(many, np.zeros(3))["top-K log-weighted"][0],
                               np.log1p(np.maximum(top20, 0)).mean(axis=0))


# ---------------------------------------------------------------------------------------------
# Describe-and-Refine's loop (common/refinement.py)


def test_candidates_are_ranked_on_the_selection_half_only():
    """Two candidates of one neuron on 40 images: A follows the activation on the selection half
    and goes against it on the test half, B the reverse. The loop chooses A, and the score it
    records for each is the Pearson r on the selection half alone (by hand); had it read the
    test half, or all images, it would have chosen B."""
    from common.refinement import Unit, refine
    rng = np.random.default_rng(3)
    act = rng.normal(size=40)
    selection = np.zeros(40, bool)
    selection[::2] = True  # a selection half interleaved with the test half
    noise = rng.normal(scale=0.3, size=40)
    a = np.where(selection, act, -act) + noise
    b = np.where(selection, -act * 0.5, act) + noise
    cache = {"L": {"B": b, "A": a}}
    unit = Unit("L", 0, 0, 1, selection.copy(), "B", [("B", "sentence"), ("A", "user")])
    asked = []
    refine([unit], cache, {"L": act[:, None]}, 2, lambda more: {},
           lambda requests: asked.extend(requests) or [""] * len(requests))
    scores = {r["description"]: r["score"] for r in unit.records}
    assert scores["A"] == pytest.approx(hand_pearson(a[selection], act[selection]), abs=1e-12)
    assert scores["B"] == pytest.approx(hand_pearson(b[selection], act[selection]), abs=1e-12)
    assert unit.records[unit.best]["description"] == "A"
    assert hand_pearson(b, act) > hand_pearson(a, act)  # on all images B would have won
    assert all(not np.isin(np.flatnonzero(~selection), r.rows).any() for r in asked)
    # REFINE=0: the first sentence stays, though A scores higher
    again = Unit("L", 0, 0, 1, selection.copy(), "B", [("B", "sentence"), ("A", "user")])
    refine([again], cache, {"L": act[:, None]}, 0, lambda more: {},
           lambda requests: pytest.fail("no describer call without refinement"))
    assert again.records[again.best]["description"] == "B" and len(again.records) == 2
    # a neuron without any sentence: nothing to score or to refine, and no describer call
    blank = Unit("L", 0, 0, 1, selection.copy(), "", [])
    refine([blank], cache, {"L": act[:, None]}, 2, lambda more: {},
           lambda requests: pytest.fail("no describer call without a sentence"))
    assert blank.best == -1 and blank.records == [] and blank.calls == 0
    # a candidate that cannot be verified (the matcher gives every image the same score: r is
    # NaN) ranks last, below any measured one
    cache["L"]["flat"] = np.ones(40)
    unsure = Unit("L", 0, 0, 1, selection.copy(), "flat", [("flat", "sentence"), ("B", "user")])
    refine([unsure], cache, {"L": act[:, None]}, 1, lambda more: {},
           lambda requests: [""] * len(requests))
    assert np.isnan(unsure.records[0]["score"]) and unsure.records[unsure.best]["description"] == "B"


def test_misses_are_the_positives_the_matcher_ranks_low():
    """By hand on 20 held-out images: the 5 strongest activations are the positives; the matcher
    ranks 2 of them within its top 5 places (max(5 positives, 10 % of 20)), so the other 3 are
    the misses, strongest activation first; images outside ``held_out`` are never misses. On 100
    images the top 10 % (10 places) is wider than the 5 positives and sets the cut."""
    from common.refinement import misses
    act = np.arange(20, dtype=float)         # positives: images 15 … 19
    scores = np.zeros(20)
    scores[[19, 17]] = 1.0                   # the matcher's top 5: 19, 17 and three of 0 … 3
    scores[[0, 1, 2, 3]] = 0.5
    held = np.ones(20, bool)
    assert misses(scores, act, held).tolist() == [18, 16, 15]
    held2 = np.ones(22, bool)
    held2[21] = False                         # an image the unit may not use
    act2, scores2 = np.append(act, [-1, 100.0]), np.append(scores, [0, 0])
    assert 21 not in misses(scores2, act2, held2).tolist()
    # 100 images: still 5 positives (95 … 99), but the matcher's top 10 % is 10 places, so the
    # positive it ranks 10th (97) is no miss; the two it ranks below are.
    act3, scores3 = np.arange(100, dtype=float), np.zeros(100)
    scores3[[99, 98]] = 1.0
    scores3[:7] = 0.5                        # places 3 … 9
    scores3[97] = 0.4                        # place 10
    assert misses(scores3, act3, np.ones(100, bool)).tolist() == [96, 95]
    # too few held-out images to verify (fewer than 2 × 5): no miss at all
    assert misses(scores3, act3, np.arange(100) < 9).tolist() == []


def refine_two_units(first_done_unit_first):
    """Two neurons of one layer on 40 selection images, each starting from a noise sentence: the
    describer has nothing new for neuron 0 (it repeats its sentence) and answers "exact" for
    neuron 1, a sentence the matcher scores as that neuron's own activation. Returns the units
    and the describer's requests, per call."""
    from common.refinement import Unit, refine
    rng = np.random.default_rng(8)
    act = rng.normal(size=(40, 2))
    cache = {"L": {"noise 0": rng.normal(size=40), "noise 1": rng.normal(size=40)}}
    held = np.ones(40, bool)
    units = [Unit("L", c, 0, 1, held.copy(), f"noise {c}", [(f"noise {c}", "sentence")])
             for c in (0, 1)]
    calls = []

    def ask(requests):
        calls.append([r.unit.channel for r in requests])
        return [r.sentence if r.unit.channel == 0 else "exact" for r in requests]
    refine(units if first_done_unit_first else units[::-1], cache, {"L": act}, 3,
           lambda more: {"L": np.stack([act[:, 1]] * len(more["L"]), axis=1)}, ask)
    return units, calls


@pytest.mark.parametrize("first_done_unit_first", [True, False])
def test_a_unit_that_stops_does_not_stop_the_others(first_done_unit_first):
    """Units are refined independently, whatever their order: neuron 0, whose describer has
    nothing new, stops after one call with its first sentence; neuron 1 goes on to "exact",
    scored in the next iteration (Pearson r 1) and chosen."""
    units, calls = refine_two_units(first_done_unit_first)
    zero, one = units
    assert zero.calls == 1 and zero.records[zero.best]["description"] == "noise 0"
    assert [r["description"] for r in zero.records] == ["noise 0"]
    assert one.calls == 1 and [(r["iteration"], r["source"], r["description"])
                               for r in one.records] == [(0, "sentence", "noise 1"),
                                                         (1, "refined", "exact")]
    assert one.records[one.best]["description"] == "exact"
    assert one.records[one.best]["score"] == pytest.approx(1.0)
    assert sorted(calls[0]) == [0, 1] and len(calls) == 1  # "exact" misses nothing: no 2nd call


def test_a_refined_sentence_that_only_ties_the_best_does_not_replace_it():
    """The describer's answer must beat the best by more than GAIN: an answer the matcher scores
    exactly like the current sentence (a tie) leaves the first sentence chosen and ends the
    loop after one describer call."""
    from common.refinement import Unit, refine
    rng = np.random.default_rng(9)
    act = rng.normal(size=40)
    first = act + rng.normal(scale=2.0, size=40)
    cache = {"L": {"first": first}}
    unit = Unit("L", 0, 0, 1, np.ones(40, bool), "first", [("first", "sentence")])
    asked = []
    refine([unit], cache, {"L": act[:, None]}, 3, lambda more: {"L": first[:, None]},
           lambda requests: asked.extend(requests) or ["same scores"] * len(requests))
    assert [r["description"] for r in unit.records] == ["first", "same scores"]
    assert unit.records[0]["score"] == unit.records[1]["score"]
    assert unit.records[unit.best]["description"] == "first"
    assert len(asked) == 1 and unit.calls == 1 and unit.done


def test_a_sentence_that_keeps_improving_is_refined_at_most_iterations_times():
    """A describer whose every answer beats the best (each less noisy): with REFINE 2 the unit
    makes exactly 2 calls, scores both answers (iterations 1 and 2), chooses the second and asks
    no third time; the best's selection score is numpy's r."""
    from common.refinement import Unit, refine
    rng = np.random.default_rng(10)
    act = rng.normal(size=60)
    noise = rng.normal(size=(4, 60))
    column = {f"try {k}": act + noise[k] * (4.0 / (k + 1)) for k in range(4)}
    cache = {"L": {"try 0": column["try 0"]}}
    unit = Unit("L", 0, 0, 1, np.ones(60, bool), "try 0", [("try 0", "sentence")])
    asked = []

    def ask(requests):
        asked.append(requests[0].sentence)
        return [f"try {len(asked)}"]
    refine([unit], cache, {"L": act[:, None]}, 2,
           lambda more: {"L": np.stack([column[t] for t in more["L"]], axis=1)}, ask)
    assert asked == ["try 0", "try 1"] and unit.calls == 2
    assert [(r["iteration"], r["description"]) for r in unit.records] == \
        [(0, "try 0"), (1, "try 1"), (2, "try 2")]
    assert unit.records[unit.best]["description"] == "try 2"
    assert unit.records[unit.best]["score"] == pytest.approx(np.corrcoef(column["try 2"], act)[0, 1])


def test_refine_prompt_is_the_levels_prompt_then_the_refine_part_with_the_sentence():
    """The refinement prompt: the level's prompt, then the prompt file's ``refine`` part with the
    sentence in place of {sentence}; a user's file without that part gets the shipped one."""
    from common.describers import DEFAULT_PROMPTS, build_prompt, load_prompts
    from common.refinement import refine_prompt
    shipped = load_prompts(DEFAULT_PROMPTS)
    own = dict(shipped, refine="  Not   {sentence} then.")
    level_prompt = build_prompt(shipped, 2, "birds")
    assert refine_prompt(own, 2, "Red patches.", "birds") == \
        level_prompt + " Not Red patches. then."
    bare = {k: v for k, v in shipped.items() if k != "refine"}
    text = refine_prompt(bare, 2, "Red patches.", "birds")
    assert text == level_prompt + " " + " ".join(shipped["refine"].split()).replace(
        "{sentence}", "Red patches.")
    assert '"Red patches."' in text


class MissDescriber:
    """A describer that names what most tiles of a mosaic show (red squares, bars or grey), and
    keeps the prompts it was given."""

    backend, model_label, batch_size = "fake", "fake", 8

    def __init__(self):
        """No prompt seen yet."""
        self.prompts = []

    def describe(self, neurons):
        """One answer per neuron, from its mosaic's tiles."""
        from common.mosaics import cut_tiles, load_mosaic
        out = []
        for n in neurons:
            self.prompts.append((n.channel, n.prompt))
            tiles = cut_tiles(load_mosaic(n.mosaic), n.grid, n.tile_px, n.n_tiles)
            red = sum(((t[..., 0].astype(int) - t[..., 1]) > 80).mean() > 0.02 for t in tiles)
            bars = sum(t.std() > 60 for t in tiles)
            out.append(("Red patches." if red > len(tiles) / 2 else
                        "Vertical edges." if bars > len(tiles) / 2 else "Plain grey.", ""))
        return out


@pytest.fixture
def many_images(tmp_path):
    """90 labelled planted images (30 red squares, 30 vertical bars, 30 plain grey)."""
    return labelled_images(tmp_path / "many", 30, 2)


def test_a_neuron_whose_sentence_names_the_wrong_pattern_is_refined_to_its_own(tmp_path,
                                                                              many_images):
    """The redness neuron (conv1 channel 0) starts from 03's "Vertical edges." (pattern B). The
    describer, shown the images where that sentence fails (the neuron fires: red squares), says
    "Red patches." (pattern A), which wins on the selection half: the final sentence within
    REFINE iterations, 03's kept beside it, every candidate in 09_candidates.csv (read back as
    written). With REFINE=0 the first sentence stays; a user concept can supply A too."""
    wrong = ["Vertical edges.", "Vertical edges.", "Horizontal edges.", "Bright gray."]
    run_dir = described_run(tmp_path, many_images, wrong)
    n = 90
    none = np.full((n, 5), -1)

    def run_09(describer, **settings):
        """Stage 09 on the run, no sub-concepts, with ``describer`` for the misses."""
        return score.run(Run(run_dir), score.Settings(poly_threshold=2.0, **settings),
                         matcher_obj=OfflineMatcher(WordsText(), ["a", "b", "c"], none,
                                                    np.zeros((n, 5))),
                         describer_obj=describer)
    describer = MissDescriber()
    result = run_09(describer, refine=3)
    red = next(r for r in result["scores"] if r["channel"] == 0 and r["subconcept"] == "")
    assert red["description"] == "Red patches." and red["first_description"] == "Vertical edges."
    assert red["verify_corr"] > red["first_corr"]  # on the test half, which chose nothing
    mine = [c for c in result["candidates"] if c["channel"] == 0]
    assert [(c["source"], c["description"]) for c in mine if c["chosen"]] == \
        [("refined", "Red patches.")]
    assert max(c["iteration"] for c in mine) <= 3
    assert any(ch == 0 and '"Vertical edges."' in p for ch, p in describer.prompts)
    back = read_candidates(run_dir / "09_candidates.csv")
    assert [(c.layer, c.channel, c.subconcept, c.iteration, c.source, c.description, c.chosen)
            for c in back] == \
        [(c["layer"], c["channel"], c["subconcept"] or None, c["iteration"], c["source"],
          c["description"], c["chosen"]) for c in result["candidates"]]
    assert [c.selection_corr for c in back] == pytest.approx(
        [c["selection_corr"] if c["selection_corr"] != "" else np.nan
         for c in result["candidates"]], nan_ok=True)
    summary = result["summary"][0]
    assert summary["mean_verify_corr"] > summary["mean_first_corr"]
    finals = [r["description"] for r in result["scores"] if r["subconcept"] == ""]
    assert summary["distinct_first"] == 3 and summary["distinct_sentences"] == len(set(finals))

    kept = run_09(MissDescriber(), refine=0)
    assert next(r for r in kept["scores"] if r["channel"] == 0)["description"] == \
        "Vertical edges."

    class Silent(MissDescriber):
        """A describer with nothing to add."""

        def describe(self, neurons):
            """No answer."""
            return [(None, "no answer")] * len(neurons)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("# what a user expects\nRed patches.\n")
    user = run_09(Silent(), refine=3, concepts=str(concepts))
    red = next(r for r in user["scores"] if r["channel"] == 0)
    assert red["description"] == "Red patches."
    assert [c["source"] for c in user["candidates"] if c["channel"] == 0 and c["chosen"]] == \
        ["user"]


def test_generated_activation_rate_by_hand():
    """Share of the rendered images at or above the lowest held-out positive's activation."""
    positive = np.array([0, 1, 1, 0], bool)
    activation = np.array([0.1, 0.9, 0.6, 0.3])
    assert S.generated_activation_rate(positive, activation, np.array([0.6, 0.59, 1.0, 0.0])) \
        == 0.5
    # 0.6 sits on the threshold and counts; 0.59 does not: 2 of 3, not 1 of 3
    assert S.generated_activation_rate(positive, activation, np.array([0.6, 0.59, 1.0])) \
        == pytest.approx(2 / 3)
    assert np.isnan(S.generated_activation_rate(np.zeros(4, bool), activation, np.ones(3)))
    assert np.isnan(S.generated_activation_rate(positive, activation, np.zeros(0)))


def test_generator_diffusers_measures_the_rate_on_rendered_images(tmp_path, many_images,
                                                                 monkeypatch):
    """GENERATOR=diffusers: 09 loads the text-to-image pipeline (a tiny random one, from its
    folder) and the analysed model again, and measures each sentence's Activation Rate on the
    images rendered for it. With the renders planted — red squares for a sentence that says
    red, grey for any other — the redness neuron's "Red patches." rates 1 and a neuron whose
    sentence names no red rates 0 on its planted grey; each sentence is rendered once."""
    from common.generation import Renderer
    from common.provenance import read_meta
    from tiny_vlms import tiny_diffusion
    run_dir = described_run(tmp_path, many_images)
    n = 90
    none = np.full((n, 5), -1)
    asked = []

    def planted(self, concepts, count, seed=0, batch=8):
        """``count`` red-square or grey images per concept, by its words."""
        asked.append(list(concepts))
        rng = np.random.default_rng(seed)
        return {c: [make_image("red" if "red" in c.lower() else "plain", 48, rng)
                    for _ in range(count)] for c in dict.fromkeys(concepts)}
    monkeypatch.setattr(Renderer, "render", planted)
    result = score.run(Run(run_dir), score.Settings(
        poly_threshold=2.0, refine=0, generator="diffusers",
        generator_model=str(tiny_diffusion(tmp_path / "sd")), generate_n=4, model=FAKE_MODEL,
        device="cpu"), matcher_obj=OfflineMatcher(WordsText(), ["a", "b", "c"], none,
                                                  np.zeros((n, 5))))
    rate = {r["description"]: r["activation_rate"] for r in result["scores"]
            if r["subconcept"] == ""}
    assert rate["Red patches."] == 1.0
    assert rate["Horizontal edges."] == 0.0 and rate["Vertical edges."] == 0.0
    assert len(asked) == 1 and sorted(asked[0]) == sorted(set(SENTENCES))
    meta = read_meta(run_dir / "09_scores.csv")
    assert meta["concept_images"]["images"] == "generated"
    assert meta["concept_images"]["per_concept"] == 4


# ---------------------------------------------------------------------------------------------
# 09_score's own functions: SIEVE's filter and the final-layer benchmark, by hand


def test_sieve_filter_keeps_hypotheses_at_or_above_their_layers_mean_rate():
    """Per layer, the hypotheses are the selected neurons' sentences, or their sub-concepts'
    when their crops split (``groups``); rows without a rate take no part. Rates 0.25, 0.75,
    0.5 have mean 0.5: 0.75 and 0.5 (on the mean) are kept, mean kept 0.625. Layer names read from a file are equal
    strings, not the same objects."""
    layer_a, layer_b = "".join(["l", "a"]), "".join(["l", "b"])

    def row(layer, channel, rate, subconcept="", selected=1):
        """One row of 09's table."""
        return {"layer": layer, "channel": channel, "selected": selected, "subconcept": subconcept,
                "activation_rate": rate}
    rows = [row("la", 0, 0.25), row("la", 1, 0.75),
            row("la", 2, 0.9), row("la", 2, 0.5, subconcept="s1"),  # split: its sub-concept
            row("la", 3, 0.0, selected=0), row("la", 4, ""),  # not selected / no rate
            row("la", 5, 0.1, subconcept="s1"),  # a sub-concept of a neuron that did not split
            row("lb", 0, 1.0), row("lb", 1, 0.5)]
    out = score.sieve_filter(rows, {("la", 2): [0, 1]}, [layer_a, layer_b])
    mean, kept, mean_kept = out[layer_a]
    assert mean == 0.5 and kept.tolist() == [False, True, True]
    assert mean_kept == pytest.approx(0.625)
    assert [r.get("ar_kept") for r in rows] == [0, 1, None, 1, None, None, None, 1, 0]
    assert out[layer_b][0] == pytest.approx(0.75) and out[layer_b][2] == pytest.approx(1.0)


def test_final_layer_shuffled_cosine_is_the_donors_sentence_against_the_own_class_name():
    """The shuffled control of neuron i is the cosine of its donor's sentence with i's class name
    (and the plain one of i's own sentence), by hand; underscores in class names read as spaces;
    fewer than two described output neurons give no benchmark."""
    names = ["red_car", "edge dog", "plain cat", "unused"]
    texts = {0: "a red red car", 1: "a dog at the edge of a car", 2: "a plain cat",
             7: "out of range"}
    emb = WordsText()
    rows = score.final_layer_eval("fc", texts, names, emb, seed=3)
    assert [r["class_name"] for r in rows] == ["red car", "edge dog", "plain cat"]
    for r in rows:
        own = emb.encode([r["class_name"]])[0]
        donor = emb.encode([texts[r["shuffled_from"]]])[0]
        # to four places, as the CSV shows them
        assert r["cosine"] == round(float(emb.encode([r["description"]])[0] @ own), 4)
        assert r["shuffled_cosine"] == round(float(donor @ own), 4)
    assert sorted(r["shuffled_from"] for r in rows) == [0, 1, 2]
    assert score.final_layer_eval("fc", {0: "a red car", 1: ""}, names, emb, seed=0) == []


def test_two_described_output_neurons_are_each_others_shuffled_control():
    """The fewest output neurons the benchmark needs is two: each one's shuffled cosine is the
    other's sentence against its own class name, by hand with the embedder."""
    names, texts, emb = ["red car", "plain cat"], {0: "a red car", 1: "a plain cat"}, WordsText()
    rows = score.final_layer_eval("fc", texts, names, emb, seed=1)
    assert [(r["channel"], r["shuffled_from"]) for r in rows] == [(0, 1), (1, 0)]
    vectors, classes = emb.encode([texts[0], texts[1]]), emb.encode(names)
    assert rows[0]["shuffled_cosine"] == round(float(vectors[1] @ classes[0]), 4)
    assert rows[1]["shuffled_cosine"] == round(float(vectors[0] @ classes[1]), 4)


def test_an_output_layer_with_more_channels_than_class_names_scores_only_the_named_ones():
    """Three class names, four described output neurons: channels 0–2 are compared with their
    names; channel 3, the first without a name (index = number of names), is neither scored nor
    a donor of the shuffled control."""
    names = ["red car", "edge dog", "plain cat"]
    texts = {0: "a red car", 1: "a dog", 2: "a plain cat", 3: "a red dog"}
    for seed in range(5):
        rows = score.final_layer_eval("fc", texts, names, WordsText(), seed=seed)
        assert [r["channel"] for r in rows] == [0, 1, 2]
        assert sorted(r["shuffled_from"] for r in rows) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# common/verification.py: controls, class names and the margin, by hand


def test_controls_compare_channels_by_value_and_a_lone_sentence_has_none():
    """Channel numbers above 256 and texts read from a file are distinct objects: a control is
    still never the sentence's own neuron and, while one exists, has other words (over many
    seeds); when all say the same any other neuron is drawn; a lone sentence gets none (-1)."""
    shown = np.zeros(0, np.int64)
    for seed in range(40):
        sents = [verification.Sentence("L", int(str(c)), 0, "".join(t), shown)
                 for c, t in ((300, ["re", "d"]), (301, ["blue"]), (302, ["r", "ed"]))]
        sents.append(verification.Sentence("L", int("300"), 1, "green", shown))
        verification.pick_controls(sents, np.random.default_rng(seed))
        assert all(sents[s.control].channel != s.channel for s in sents)
        assert sents[0].control == sents[2].control == 1  # the one other neuron with other words
        same = [verification.Sentence("L", c, 0, "red", shown) for c in (0, 1)]
        verification.pick_controls(same, np.random.default_rng(seed))
        assert [s.control for s in same] == [1, 0]  # all say the same: any other neuron
    lone = [verification.Sentence("L", 0, 0, "red", shown)]
    verification.pick_controls(lone, np.random.default_rng(0))
    assert lone[0].control == -1


def test_without_a_sentence_of_other_words_the_control_is_one_with_other_text():
    """When every other neuron's sentence has the same words, a control whose text differs (the
    words in another order) is drawn before one that is the very same sentence, whichever sorts
    first; only when all say exactly the same is any other neuron drawn."""
    shown = np.zeros(0, np.int64)
    for texts in (("b red", "b red", "red b"), ("red b", "red b", "b red")):
        for seed in range(20):
            sents = [verification.Sentence("L", c, 0, t, shown) for c, t in enumerate(texts)]
            verification.pick_controls(sents, np.random.default_rng(seed))
            assert sents[0].control == sents[1].control == 2
            assert sents[2].control in (0, 1)


def test_class_names_are_imagenets_only_when_every_predicted_name_is():
    """01's predicted names that are ImageNet's give ImageNet's 1000 names; other names are kept,
    with the index standing for a class never predicted, up to the largest class seen."""
    from common.imagenet import class_names
    imagenet = class_names()
    assert verification.model_class_names({0: imagenet[0], 5: imagenet[5]}, 6) == imagenet
    assert verification.model_class_names({0: "cat", 2: "dog"}, 4) == ["cat", "1", "dog", "3"]
    assert verification.model_class_names({0: imagenet[0], 1: "dog"}, 2) == [imagenet[0], "dog"]
    assert verification.model_class_names({5: "x"}, 2) == ["0", "1", "2", "3", "4", "x"]
    assert verification.model_class_names({}, 3) == ["0", "1", "2"]
    assert verification.model_class_names({}, 0) == []


def test_a_head_wider_than_imagenet_keeps_its_own_class_names():
    """A model with 1001 outputs (ImageNet's 1000 and a background class at index 1000, as some
    TensorFlow checkpoints have) whose predicted names are ImageNet's up to 999 is not named
    with ImageNet's list, which has no class 1000: it keeps the names 01 wrote."""
    from common.imagenet import class_names
    imagenet = class_names()
    names = verification.model_class_names({0: imagenet[0], 999: imagenet[999],
                                            1000: "background"}, 1001)
    assert len(names) == 1001 and names[1000] == "background"
    assert names[0] == imagenet[0] and names[1] == "1"
    # a head of 1,002 outputs whose last class is predicted: named, not read past ImageNet's list
    names = verification.model_class_names({0: imagenet[0], 1001: "extra"}, 1002)
    assert len(names) == 1002 and names[1001] == "extra" and names[1000] == "1000"


def test_margin_is_measured_on_held_out_images_where_both_sentences_have_a_score():
    """The margin over the control and its bootstrap interval use the held-out images where the
    sentence, its control and the activation are all finite: r(score) − r(control) there, by
    numpy, and the interval common.scores.bootstrap_margin gives on them with the same seed."""
    rng = np.random.default_rng(0)
    activation = rng.normal(size=40)
    scores, control = activation + rng.normal(size=40), rng.normal(size=40)
    held_out = np.arange(40) < 30
    control[[3, 7, 35]] = np.nan
    scores[5] = np.nan
    mine, ctrl, extra = verification.measure(scores, control, activation, held_out, scale=1.0,
                                             alpha=0.5, bootstrap=50, rng=np.random.default_rng(1))
    both = held_out & np.isfinite(scores) & np.isfinite(control)
    assert (mine["n"], ctrl["n"], both.sum()) == (29, 28, 27)
    by_hand = np.corrcoef(scores[both], activation[both])[0, 1] - \
        np.corrcoef(control[both], activation[both])[0, 1]
    assert extra["margin"] == pytest.approx(by_hand)
    expected = S.bootstrap_margin(scores[both], control[both], activation[both], 50,
                                  np.random.default_rng(1))
    assert (extra["margin"], extra["low"], extra["high"]) == pytest.approx(expected)
    for resamples in (0, -1):  # no resample (or a negative count): no margin, no failure
        none = verification.measure(scores, control, activation, held_out, 1.0, 0.5, resamples,
                                    np.random.default_rng(1))[2]
        assert np.isnan([none["margin"], none["low"], none["high"]]).all()


def test_pearson_of_two_points_is_plus_or_minus_one():
    """Two points always lie on a line: r is 1 or −1, as numpy's corrcoef gives (not undefined)."""
    assert S.pearson([1.0, 2.0], [3.0, 7.0]) == pytest.approx(1.0)
    assert S.pearson([1.0, 2.0], [7.0, 3.0]) == pytest.approx(-1.0)
    assert S.pearson([1.0, 2.0], [5.0, 5.0]) != S.pearson([1.0, 2.0], [5.0, 5.0])  # NaN: constant


def test_semantic_consistency_of_a_layer_whose_activations_stay_under_one():
    """A layer whose largest activation is 0.5 (scale 0.5) is scored like any other: on 3 images
    (activations 0.5, 0.2, 0.1; the sentence's scores rank them 3rd, 1st, 2nd → percentiles 1, 0,
    0.5), top 2, α 0.5: 0.5 · (0.35 / 0.5) + 0.5 · ((1 + 0) / 2)² = 0.35 + 0.125 = 0.475."""
    value = S.semantic_consistency(np.array([0.5, 0.2, 0.1]), np.array([0.9, 0.1, 0.4]),
                                   0.5, 0.5, k=2)
    assert value == pytest.approx(0.475)


def test_semantic_consistency_is_defined_on_two_images():
    """Two images are enough: activations 0.4 and 0.1 (scale 0.4), the sentence scoring the second
    higher (percentiles 0 and 1), top 1, α 0.5: 0.5 · 0.4 / 0.4 + 0.5 · 0² = 0.5; one image is
    not (NaN)."""
    assert S.semantic_consistency(np.array([0.4, 0.1]), np.array([0.2, 0.9]), 0.4, 0.5,
                                  k=1) == pytest.approx(0.5)
    assert np.isnan(S.semantic_consistency(np.array([0.4]), np.array([0.2]), 0.4, 0.5, k=1))


def test_triage_of_a_layer_with_one_usable_image():
    """One readable image among skipped ones (NaN rows) is still triaged: DnR's top-K score is
    the log of that image's activation (K shrinks to the one image), and its quantiles are that
    value."""
    stats = np.full((4, 2), np.nan)
    stats[2] = [3.0, 0.5]
    t = triage_layer(stats)
    assert t["dnr_score"] == pytest.approx(np.log1p([3.0, 0.5]))
    assert t["q99"] == pytest.approx([3.0, 0.5]) and t["median"] == pytest.approx([3.0, 0.5])
