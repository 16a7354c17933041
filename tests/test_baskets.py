"""Stage 11 (baskets): the paper's baskets (FINCH image groups, the filters, Eq. 1–5), the
correlation baskets, joint images, union / difference and the pruning test.

Planted structure: image groups with their own feature centres are the clusters FINCH must find;
neurons planted high on a group's images are the ones Eq. 2–4 must put in its basket; channels
driven by a shared hidden factor co-activate (the corr baskets). Pruning runs the fake model,
whose relu2 channel 0 alone carries the "red" class.
"""
import csv
import json

import numpy as np
import pytest
import torch

from common import baskets as B
from common.artefacts import Run
from conftest import FAKE_MODEL, load_stage

stage = load_stage("11_baskets")


def planted_stats(n=400, seed=0):
    """N × 9 per-image maxima: channels 0–3 follow factor f, 4–6 factor g (independent of f),
    7 is its own noise, 8 is constant (dead); one skipped image is a NaN row."""
    rng = np.random.default_rng(seed)
    f, g = rng.normal(size=n), rng.normal(size=n)
    cols = [f + 0.3 * rng.normal(size=n) for _ in range(4)]
    cols += [g + 0.3 * rng.normal(size=n) for _ in range(3)]
    cols += [rng.normal(size=n), np.full(n, 2.0)]
    stats = np.stack(cols, axis=1).astype(np.float32) + 5
    stats[17] = np.nan
    return stats


def test_correlation_matches_numpy_in_blocks():
    """The blockwise correlation equals numpy's corrcoef on the usable rows; a constant column
    correlates 0 with the others."""
    stats = planted_stats()
    got = B.correlation(stats, block=7)
    usable = stats[np.isfinite(stats).all(axis=1)].astype(np.float64)
    want = np.corrcoef(usable[:, :8], rowvar=False)
    np.testing.assert_allclose(got[:8, :8], want, atol=1e-6)
    assert got[8, :8].tolist() == [0.0] * 8 and got[8, 8] == 1.0
    # Values within float noise of zero (±7e-13) count as constant, also when every neuron's
    # mean is near 0 (the floor is relative to the largest mean, but never under 1e-12).
    sign = np.where(np.arange(40) % 2 == 0, 1.0, -1.0)
    noise = np.stack([7e-13 * sign, sign], axis=1)
    assert B.correlation(noise).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_planted_groups_become_baskets():
    """Factor f's channels form basket 1, factor g's basket 2; noise and dead channels join none.
    Cohesion is the mean off-diagonal correlation; the two baskets meet at their mean cross
    correlation (average linkage), near 0 since f and g are independent."""
    corr = B.correlation(planted_stats())
    tree, found = B.cluster(corr, min_corr=0.5)
    assert [b.members for b in found] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [b.number for b in found] == [1, 2]
    sub = corr[np.ix_([4, 5, 6], [4, 5, 6])]
    assert found[1].cohesion == pytest.approx((sub.sum() - 3) / 6)
    assert found[0].cohesion > 0.8
    for b in found:
        assert b.parent >= 0 and b.depth >= 1
        assert set(b.sibling_members).isdisjoint(b.members)
    # A cut above every within-group correlation leaves no basket.
    assert B.cluster(corr, min_corr=0.99)[1] == []


def test_joint_images_rank_images_where_members_fire_together():
    """Images where every member is high come first; joint hits count images where ≥ 75 % of the
    members are in their own top 10 %."""
    rng = np.random.default_rng(1)
    cols = rng.uniform(0, 1, size=(100, 4))
    cols[[5, 50, 77]] = 10.0            # all four members high
    cols[60, :2] = 10.0                 # only half of them: not a joint hit by itself
    ids, scores, hits = B.joint_images(cols, 3)
    assert sorted(ids.tolist()) == [5, 50, 77]
    assert np.all(np.diff(scores) <= 0)
    threshold = np.quantile(cols, 0.9, axis=0)
    assert hits == int(((cols >= threshold).mean(axis=1) >= 0.75).sum())


def test_joint_images_by_hand_with_a_skipped_image_and_a_hit_exactly_at_the_share():
    """Four members, each a permutation of 0 … 9 over ten images (so each member's mean is 4.5
    and its sd √8.25) plus one skipped image (NaN): an image's joint score is
    (row sum / 4 − 4.5) / √8.25, the images come by that score, the skipped one never, even
    when more are asked for. Each member's top 10 % is its 9; image 3 holds the 9 of three
    members (3 / 4 = JOINT_SHARE exactly: a joint hit), image 7 that of one (no hit)."""
    cols = np.array([[4, 2, 5, 4], [6, 6, 4, 5], [2, 3, 0, 7], [9, 9, 9, 6], [3, 0, 8, 2],
                     [5, 4, 2, 3], [7, 8, 1, 1], [0, 7, 6, 9], [8, 5, 7, 0], [1, 1, 3, 8],
                     [np.nan] * 4])
    assert B.JOINT_SHARE == 0.75
    ids, scores, hits = B.joint_images(cols, 20)
    sums = np.nansum(cols, axis=1)
    assert ids[:7].tolist() == [3, 7, 1, 8, 6, 0, 5]          # sums 33, 22, 21, 20, 17, 15, 14
    assert sorted(ids[7:9].tolist()) == [4, 9] and ids[9] == 2  # 13, 13, 12; no image 10
    np.testing.assert_allclose(scores, (sums[ids] / 4 - 4.5) / np.sqrt(8.25), atol=1e-12)
    assert hits == 1
    assert B.joint_images(cols, 3)[0].tolist() == [3, 7, 1]


def test_random_baskets_are_seeded_and_exclude_members():
    """Same seed, same controls; never a member of the pruned basket."""
    a = B.random_baskets(20, 3, 4, seed=5, exclude=[0, 1, 2])
    assert a == B.random_baskets(20, 3, 4, seed=5, exclude=[0, 1, 2])
    assert all(len(c) == 3 and not set(c) & {0, 1, 2} for c in a)


def planted_hierarchy(seed=0, per_group=30, channels=64, noise=0.08):
    """Per-image channel means of 6 planted image groups in 3 pairs: the two groups of a pair
    share 12 raised channels and each has 4 of its own; every group has one typical image (its
    centre) and noisy others. Returns (features, group of each image)."""
    rng = np.random.default_rng(seed)
    centres = np.full((6, channels), 0.5)
    for pair in range(3):
        shared = rng.choice(channels, 12, replace=False)
        for g in (2 * pair, 2 * pair + 1):
            centres[g, shared] += 1.0
            centres[g, rng.choice(channels, 4, replace=False)] += 1.0
    groups = np.repeat(np.arange(6), per_group)
    feats = centres[groups] + rng.normal(0, noise, size=(len(groups), channels))
    feats[::per_group] = centres
    return np.clip(feats, 0, None), groups


def planted_images(n_groups=5, per_group=40, channels=64, seed=0):
    """Per-image channel means (N × C, non-negative like post-ReLU means) of ``n_groups`` image
    groups, each with neurons 2g and 2g+1 planted far above μ + 3σ of the image's neurons on
    ~90 % of its images (never the group's first) and ordinary on the rest. Returns (features, group of each
    image, planted neurons of each group)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, size=(n_groups, channels)) ** 3 + 0.05
    feats, groups, planted = [], [], []
    for g in range(n_groups):
        block = centres[g] * rng.uniform(0.9, 1.1, size=(per_group, channels))
        mine = [2 * g, 2 * g + 1]
        hot = rng.random(per_group) < 0.9
        hot[0] = False  # at least one image where they stay quiet
        block[:, mine] = np.where(hot[:, None], 6.0, 0.5) + rng.uniform(0, 0.5, (per_group, 2))
        feats.append(block)
        groups += [g] * per_group
        planted.append(mine)
    return np.concatenate(feats), np.array(groups), planted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finch_recovers_planted_image_groups(seed):
    """FINCH's first level is the 6 planted groups and its second the 3 pairs (adjusted Rand
    index by scikit-learn ≥ 0.9 each); the same call on the neurons (the transposed table)
    finds no such groups."""
    from sklearn.metrics import adjusted_rand_score
    feats, groups = planted_hierarchy(seed)
    parts = B.image_hierarchy(feats)
    assert parts.shape == (len(feats), 2)
    assert adjusted_rand_score(groups, parts[:, 0]) >= 0.9
    assert adjusted_rand_score(groups // 2, parts[:, 1]) >= 0.9
    assert adjusted_rand_score(groups, parts[:, 1]) < 0.9  # the levels differ


def test_finch_on_the_smallest_image_sets():
    """Three images already get FINCH's first level, worked by hand: 0 and 1 are each other's
    first neighbour and 2's first neighbour is one of them, so the three form one group (and
    there is no coarser level). Two images get no level at all (FINCH needs three)."""
    three = np.array([[1.0, 0.05], [1.0, 0.0], [0.0, 1.0]])
    assert B.image_hierarchy(three).tolist() == [[0], [0], [0]]
    assert B.image_hierarchy(three[:2]).shape == (2, 0)


def test_planted_neurons_fill_their_basket_by_eq_2_to_4():
    """Eq. 2 equals a hand loop over images; Eq. 3–4 put exactly the planted neurons of a group
    in its basket at β = 0.75 (they are active on ~90 % of its images, the others on none);
    at β = 1 the neurons silent on a few of the group's images drop out."""
    feats, groups, planted = planted_images()
    active = B.active_neurons(feats, alpha=3.0)
    for x in (0, 57, 199):
        row = feats[x].astype(np.float64)
        want = row >= row.mean() + 3.0 * row.std()
        assert active[x].tolist() == want.tolist()
    for g, mine in enumerate(planted):
        members, share = B.neuron_set(active[groups == g], beta=0.75)
        assert members == mine
        assert share[mine[0]] == pytest.approx(active[groups == g, mine[0]].mean())
        assert B.neuron_set(active[groups == g], beta=1.0)[0] == []


def test_consistency_and_davies_bouldin_match_independent_computations():
    """Eq. 5 is the mean off-diagonal cosine (scikit-learn's cosine_similarity); the mean of the
    simplified R_i is scikit-learn's Davies–Bouldin score; silhouettes are scikit-learn's."""
    from sklearn.metrics import davies_bouldin_score
    from sklearn.metrics.pairwise import cosine_similarity
    feats, groups, planted = planted_images()
    profiles = feats[groups == 1][:, [0, 3, 4, 5, 9]]
    cos = cosine_similarity(profiles.T)
    assert B.consistency(profiles) == pytest.approx(cos[~np.eye(5, dtype=bool)].mean())
    assert np.isnan(B.consistency(profiles[:, :1]))
    # two neurons: their one cosine, not "too few"
    assert B.consistency(profiles[:, :2]) == pytest.approx(cos[0, 1])
    ratios = B.davies_bouldin_ratios(feats, groups)
    assert np.mean(list(ratios.values())) == pytest.approx(davies_bouldin_score(feats, groups))
    assert B.purity(np.ones((4, 3))) == pytest.approx(1.0)
    assert B.outliers([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 9], high_is_bad=True).tolist() == \
        [False] * 10 + [True]
    assert not B.outliers([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 9], high_is_bad=False).any()


def test_basket_tree_places_by_hand():
    """Average linkage on five channels, worked by hand: {0, 3} join at r 0.9, {1, 2} at 0.8,
    channel 4 joins {1, 2} at its mean r (0.3 + 0.3) / 2, and the root joins {0, 3} with
    {1, 2, 4} at the mean of their six cross correlations, 0.4 / 6. At min_corr 0.5 the baskets
    are {0, 3} (join 0.4 / 6 with sibling {1, 2, 4}, depth 1) and {1, 2} (join 0.3 with sibling
    {4}, depth 2): equal sizes, so the one with the lowest channel is number 1."""
    corr = np.array([[1.0, 0.1, 0.2, 0.9, 0.0],
                     [0.1, 1.0, 0.8, 0.1, 0.3],
                     [0.2, 0.8, 1.0, 0.0, 0.3],
                     [0.9, 0.1, 0.0, 1.0, 0.0],
                     [0.0, 0.3, 0.3, 0.0, 1.0]])
    tree, baskets = B.cluster(corr, 0.5)
    np.testing.assert_allclose(tree[:, 2], [0.1, 0.2, 0.7, 1 - 0.4 / 6])
    got = [(b.number, b.members, b.cohesion, b.join_corr, b.sibling_members, b.depth)
           for b in baskets]
    assert got == [(1, [0, 3], pytest.approx(0.9), pytest.approx(0.4 / 6), [1, 2, 4], 1),
                   (2, [1, 2], pytest.approx(0.8), pytest.approx(0.3), [4], 2)]
    assert baskets[0].parent == 8 and baskets[1].parent == 7  # scipy's node ids: root = 2n − 2
    root = B.cluster(np.full((2, 2), 1.0), 0.5)[1][0]  # the whole tree: no parent, no sibling
    assert np.isnan(root.join_corr) and root.parent == -1 and root.sibling_members == []
    assert root.members == [0, 1] and root.depth == 0


def test_loners_joined_above_the_cut_do_not_hide_a_basket():
    """Five channels: {0, 1} correlate 0.9 (a basket at min_corr 0.5); 2 and 3 correlate only 0.4
    and 4 joins {0, 1} at 0.3, so all three stay alone — and scipy numbers the loners 2 and 3
    before the basket. The basket is still found, joined at 0.3 with sibling {4}, depth 2."""
    corr = np.eye(5)
    corr[0, 1] = corr[1, 0] = 0.9
    corr[2, 3] = corr[3, 2] = 0.4
    corr[4, [0, 1]] = corr[[0, 1], 4] = 0.3
    _, baskets = B.cluster(corr, 0.5)
    assert [(b.members, b.join_corr, b.sibling_members, b.depth) for b in baskets] == \
        [([0, 1], pytest.approx(0.3), [4], 2)]


def test_image_silhouettes_by_hand_and_undefined_partitions():
    """Cosine silhouettes of images: two images along x and two along y are perfectly separated
    (a = 0, b = 1: silhouette 1 each); an image alone in its cluster gets 0 (scikit-learn's
    convention); one cluster, or every image alone, has no silhouette (NaN for all)."""
    x, y = [1.0, 0.0], [0.0, 1.0]
    feats = np.array([x, [2.0, 0.0], y, [0.0, 3.0]])
    assert B.silhouettes(feats, np.array([0, 0, 1, 1])).tolist() == pytest.approx([1.0] * 4)
    assert B.silhouettes(feats[:3], np.array([0, 0, 1])).tolist() == pytest.approx([1, 1, 0])
    assert np.isnan(B.silhouettes(feats, np.zeros(4, int))).all()
    lone = B.silhouettes(feats[:3], np.array([0, 1, 2]))
    assert lone.shape == (3,) and np.isnan(lone).all()


def test_eq_1_to_4_and_the_outlier_filter_exactly_on_their_thresholds():
    """By hand. Eq. 2 on an image with activations 0, 0, 3, 3 (μ 1.5, σ 1.5, α 1): the two
    neurons exactly at μ + ασ = 3 are active; on 0, 0, 2, 4 the 2 is below μ + σ but above
    μ + σ / 4. Eq. 3–4 with β 0.75: neurons active on exactly
    3 of the basket's 4 images belong to it, one active on 1 of 4 does not; a basket without
    images gives every neuron share 0 and no member. The filter at
    0.5 sd: of two finite scores 0 and 1 (mean 0.5, sd 0.5) the bad side's one lies beyond
    0.75 (or below 0.25), while at 1 sd both lie exactly on the bound and are kept; a NaN is
    never an outlier, nor is a lone finite score."""
    assert B.active_neurons(np.array([[0.0, 0.0, 3.0, 3.0]]), 1.0).tolist() == \
        [[False, False, True, True]]
    # 0, 0, 2, 4: μ 1.5, σ √2.75 ≈ 1.66, so μ + σ ≈ 3.16 and the 2 lies between μ and the bound;
    # at α 0.25 the bound is ≈ 1.91 and the 2 is active
    assert B.active_neurons(np.array([[0.0, 0.0, 2.0, 4.0]]), 1.0).tolist() == \
        [[False, False, False, True]]
    assert B.active_neurons(np.array([[0.0, 0.0, 2.0, 4.0]]), 0.25).tolist() == \
        [[False, False, True, True]]
    active = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 1, 1]], bool)
    members, share = B.neuron_set(active, 0.75)
    assert members == [0, 1] and share.tolist() == [0.75, 0.75, 0.25]
    # a basket without images: each of the 3 neurons has share 0, and none is a member
    members, share = B.neuron_set(np.zeros((0, 3), bool), 0.75)
    assert members == [] and share.tolist() == [0.0, 0.0, 0.0]
    assert B.outliers([0.0, 1.0], high_is_bad=True, n_sd=0.5).tolist() == [False, True]
    assert B.outliers([0.0, 1.0, np.nan], high_is_bad=False, n_sd=0.5).tolist() == \
        [True, False, False]
    assert not B.outliers([0.0, np.nan], high_is_bad=True, n_sd=0.1).any()
    for high_is_bad in (True, False):  # at 1 sd both scores lie exactly on the bound: kept
        assert not B.outliers([0.0, 1.0], high_is_bad=high_is_bad, n_sd=1.0).any()


def test_purity_correlation_and_z_scores_on_the_smallest_inputs_by_hand():
    """Purity of two descriptions at right angles is cos 45°; it is undefined (NaN, without a
    0 / 0 warning) when one image has no description vector or the two cancel. Two usable images
    correlate ±1 (one is too few: an error); z-scores use the standard deviation over the finite
    rows (1, 2, 3 → ∓√1.5, 0), a constant column is 0 and a skipped image stays NaN."""
    import warnings
    assert B.purity(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(np.sqrt(0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said, not computed as 0 / 0
        assert np.isnan(B.purity(np.array([[1.0, 0.0], [0.0, 0.0]])))
        assert np.isnan(B.purity(np.array([[1.0, 0.0], [-1.0, 0.0]])))
    two = B.correlation(np.array([[1.0, 2.0], [2.0, 1.0], [np.nan, 0.0]]))
    np.testing.assert_allclose(two, [[1.0, -1.0], [-1.0, 1.0]], atol=1e-12)
    with pytest.raises(ValueError, match="fewer than two usable images"):
        B.correlation(np.array([[1.0, 2.0], [np.nan, 1.0]]))
    z = B.standardise(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [np.nan, np.nan]]))
    np.testing.assert_allclose(z[:3], [[-np.sqrt(1.5), 0], [0, 0], [np.sqrt(1.5), 0]], atol=1e-12)
    assert np.isnan(z[3]).all()


def test_davies_bouldin_ratios_of_close_clusters_by_hand():
    """Three clusters on a line, centroids closer than 1 apart: {0, 0.2} (centroid 0.1, spread
    0.1), {0.5, 0.7} (0.6, 0.1) and {0.45, 0.55} (0.5, 0.05). R_0 = max(0.2 / 0.5, 0.15 / 0.4)
    = 0.4; R_1 = R_2 = max(…, 0.15 / 0.1) = 1.5; their mean is scikit-learn's score. Clusters
    sharing a centroid are not compared with each other."""
    from sklearn.metrics import davies_bouldin_score
    feats = np.array([[0.0], [0.2], [0.5], [0.7], [0.45], [0.55]])
    groups = np.array([0, 0, 1, 1, 2, 2])
    ratios = B.davies_bouldin_ratios(feats, groups)
    assert ratios == pytest.approx({0: 0.4, 1: 1.5, 2: 1.5})
    assert np.mean(list(ratios.values())) == pytest.approx(davies_bouldin_score(feats, groups))
    # two clusters with one centroid (0): like scikit-learn, that pair is left out, not a
    # division by 0; each is compared with {9, 11} only: R = (1 + 1) / 10, (2 + 1) / 10
    feats = np.array([[-1.0], [1.0], [-2.0], [2.0], [9.0], [11.0]])
    ratios = B.davies_bouldin_ratios(feats, groups)
    assert ratios == pytest.approx({0: 0.2, 1: 0.3, 2: 0.3})
    assert np.mean(list(ratios.values())) == pytest.approx(davies_bouldin_score(feats, groups))


@pytest.fixture
def fake_run(tmp_path, image_folder):
    """01 run for real on the fake model (layers relu1 and relu2) over the labelled folder."""
    run_dir = tmp_path / "run"
    load_stage("01_extract").main([
        "--images", str(image_folder), "--run", str(run_dir), "--model", FAKE_MODEL,
        "--layers", "relu1,relu2", "--input-size", "32", "--topk", "8", "--batch-size", "8",
        "--device", "cpu", "--workers", "1"])
    return run_dir


def test_consistency_table_beats_random_index_sets_on_planted_baskets():
    """Table 1 on planted data: on each of 3 image groups, 3 planted neurons follow one shared
    factor while the layer's other neurons vary independently; the groups' baskets are far more
    consistent (Eq. 5) than random-index sets of their size on the same images. With a single
    basket every draw is that basket: the table gives its Eq. 5 exactly, std 0. Seeded."""
    rng = np.random.default_rng(3)
    acts = rng.uniform(0, 1, size=(90, 30))
    groups = np.repeat(np.arange(3), 30)
    baskets = []
    for g in range(3):
        rows, mine = np.flatnonzero(groups == g), [3 * g, 3 * g + 1, 3 * g + 2]
        factor = rng.uniform(0, 1, size=len(rows))
        acts[np.ix_(rows, mine)] = 5 * factor[:, None] + rng.normal(0, 0.05, (len(rows), 3))
        baskets.append({"layer": "L", "channel_list": mine, "rows": rows,
                        "consistency": B.consistency(acts[np.ix_(rows, mine)])})
    table = stage.consistency_table(baskets, {"L": acts}, {"L": 30}, 5, seed=0)
    assert [r["layer"] for r in table] == ["L"]
    row = table[0]
    assert row["n_baskets"] == 3 and row["mean_size"] == 3 and row["repeats"] == 5
    assert row["consistency"] > 0.95 and row["random_index"] < 0.85
    assert row["consistency"] > row["random_index"] + 3 * row["random_index_sd"]
    assert stage.consistency_table(baskets, {"L": acts}, {"L": 30}, 5, seed=0) == table
    one = stage.consistency_table(baskets[:1], {"L": acts}, {"L": 30}, 5, seed=0)[0]
    assert one["consistency"] == round(baskets[0]["consistency"], 4)
    assert one["consistency_sd"] == 0.0


def fake_describe(index, out, args, levels):
    """Stand-in for 03: a sentence naming each mosaic's pseudo-layer and number."""
    with open(index, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {(r["layer"], int(r["channel"])): f"{r['layer']} {r['channel']}" for r in rows}


def test_build_and_set_operations_on_the_fake_model(fake_run, capsys):
    """11 (the paper's method) writes its contract files; every basket is an image cluster of a
    kept FINCH level with the neurons of Eq. 2–4, a mosaic, a name from its images' labels and a
    sentence; parents are baskets of the next level holding the same images; union and
    difference of two baskets give the set algebra of their members, with what the set's
    images are."""
    from common.artefacts import read_basket_tree, read_baskets, read_consistency, read_pruning
    from common.models import load_model
    bundle = load_model(FAKE_MODEL, device="cpu", input_size=32)
    # 4 and 2 channels per layer: μ + 3σ is out of reach of 4 numbers, hence α = 0.5
    small = stage.Settings(alpha=0.5, beta=0.6, min_images=2, grid=3, tile=16, prune=1,
                           repeats=2, prune_images=5)
    result = stage.build(Run(fake_run), small, describe=fake_describe, bundle=bundle)
    for name in ("11_baskets.csv", "11_tree.npz", "11_consistency.csv", "11_pruning.csv",
                 "11_baskets.meta.json"):
        assert (fake_run / name).is_file()
    rows = read_baskets(fake_run / "11_baskets.csv")
    assert len(rows) == len(result["baskets"]) >= 4
    tree = read_basket_tree(fake_run / "11_tree.npz")
    images = read_images_csv(fake_run)
    from common.artefacts import read_stats
    for row in rows:
        parts, ids = tree[f"{row.layer}/partitions"], tree[f"{row.layer}/image_ids"]
        mine = np.flatnonzero(parts[:, row.level - 1] == row.cluster)
        assert row.method == "finch" and row.n_images == len(mine) >= 2
        assert set(row.top_images) <= set(ids[mine].tolist())
        means = np.asarray(read_stats(fake_run / "01_stats", row.layer, "mean"))[ids[mine]]
        assert list(row.members) == B.neuron_set(B.active_neurons(means, 0.5), 0.6)[0] != []
        labels = [images[i] for i in ids[mine]]
        top = min(set(labels), key=lambda k: (-labels.count(k), k))
        assert row.name.startswith(f"labelled {top} ({labels.count(top)} of {len(labels)})")
        assert row.description == f"{row.layer}:basket {row.number}"
        assert (fake_run / row.mosaic).is_file()
        if row.parent > 0:
            parent = next(r for r in rows if r.layer == row.layer and r.number == row.parent)
            assert parent.level == row.level + 1
            assert set(mine) <= set(np.flatnonzero(parts[:, parent.level - 1] == parent.cluster))
    assert any(r.parent > 0 for r in rows)
    assert read_consistency(fake_run / "11_consistency.csv") == []  # no basket of 2 neurons
    table2 = read_pruning(fake_run / "11_pruning.csv")
    assert [r.class_idx for r in table2] == [0, 1, 2, -1]
    assert all(r.repeats == 2 and r.n_baskets >= 1 for r in table2)
    a, b = rows[0].basket, next(r.basket for r in rows if r.layer != rows[0].layer)
    union = stage.set_operation(Run(fake_run), "union", a, b, small, describe=fake_describe)
    want = sorted([f"{rows[0].layer}:{c}" for c in rows[0].members] +
                  [f"{r.layer}:{c}" for r in rows if r.basket == b for c in r.members])
    assert union["members"] == want and union["description"] == "set 1"
    assert union["name"].startswith("labelled ") and len(union["images"]) == 9
    diff = stage.set_operation(Run(fake_run), "difference", a, b, small, describe=fake_describe)
    assert diff["members"] == [f"{rows[0].layer}:{c}" for c in rows[0].members]
    assert "the set's images: labelled" in stage.format_set(diff)
    empty = stage.set_operation(Run(fake_run), "difference", a, a, describe=fake_describe)
    assert empty["members"] == [] and "empty" in stage.format_set(empty)
    with pytest.raises(SystemExit):
        stage.main(["--run", str(fake_run), "--union", a, "nope:b9"])
    assert "no basket 'nope:b9'" in capsys.readouterr().err


def read_images_csv(run_dir):
    """Image id → label text of 01_images.csv."""
    from common.artefacts import read_images
    return {r.image_id: r.label for r in read_images(run_dir / "01_images.csv")}


def test_correlation_baskets_stay_available(fake_run, capsys):
    """--method corr: relu1's edge and brightness channels peak together (r ≥ 0.98) and form
    the one basket; its tree's nodes can be named in a set operation; an edited artefact is
    refused until its meta vouches for it."""
    small = stage.Settings(method="corr", min_corr=0.3, grid=3, tile=16, prune=0, repeats=2)
    result = stage.build(Run(fake_run), small, describe=fake_describe)
    assert [(b["basket"], b["channel_list"]) for b in result["baskets"]] == [("relu1:b1",
                                                                               [1, 2, 3])]
    b = result["baskets"][0]
    assert b["method"] == "corr" and b["cohesion"] > 0.9 and b["level"] == 0
    assert result["pruning"] == [] and result["consistency"][0]["n_baskets"] == 1
    root = 2 * 4 - 2  # relu1's root holds all four channels; minus the basket leaves red
    rest = stage.set_operation(Run(fake_run), "difference", f"relu1:n{root}", "relu1:b1",
                               small, describe=fake_describe)
    assert rest["members"] == ["relu1:0"] and rest["a_description"] == ""
    saved = json.loads((fake_run / "11_sets" / f"difference__relu1_n{root}__relu1_b1" /
                        "set.json").read_text())
    assert saved["members"] == rest["members"]
    with open(fake_run / "11_baskets.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    table[0]["members"] = "0 1"
    with open(fake_run / "11_baskets.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    with pytest.raises(SystemExit):
        stage.main(["--run", str(fake_run), "--union", "relu1:b1", f"relu1:n{root}"])
    assert "differs from what 11_baskets wrote" in capsys.readouterr().err


def test_pruning_a_planted_class_basket_drops_that_class_more_than_random_baskets(fake_run):
    """Table 2 on the fake model: the basket named after class 0 (red) holds relu2's red
    channel, the model's only carrier of that class; zeroing it drops p(red) on red images far
    more than zeroing a random other basket (the edge channel, or relu1's brightness) — and the
    row's figures are the hand-computed mean change of p(red) on those images."""
    from common.artefacts import read_predictions
    from common.models import load_model
    from common.rerun import labelled_images, predict
    bundle = load_model(FAKE_MODEL, device="cpu", input_size=32)
    baskets = [
        {"basket": "relu2:b1", "layer": "relu2", "channel_list": [0],
         "name": "labelled 0 (9 of 10)", "description": "red squares"},
        {"basket": "relu2:b2", "layer": "relu2", "channel_list": [1],
         "name": "labelled 1 (10 of 10)", "description": "stripes"},
        {"basket": "relu1:b1", "layer": "relu1", "channel_list": [3],
         "name": "labelled 2 (8 of 10)", "description": "plain grey"}]
    settings = stage.Settings(prune=1, repeats=3, prune_images=10, seed=0, device="cpu",
                              batch_size=8)
    rows = stage.prune_by_class(baskets, {"relu1": 4, "relu2": 2}, Run(fake_run), settings,
                                bundle=bundle)
    red = next(r for r in rows if r.get("class_idx") == 0)
    assert red["pruned"] == "relu2:b1" and red["n_baskets"] == 1 and red["repeats"] == 3
    assert red["delta_basket"] < -0.3
    assert red["delta_basket"] < red["delta_random_basket"] - 0.2
    assert red["delta_basket_sd"] == 0.0  # the one named basket, every repeat
    images = labelled_images(read_predictions(fake_run / "01_predictions.csv"), bundle, 10, 0)
    mask = images.labels == 0
    before = predict(bundle, images.select(mask))[:, 0]
    after = predict(bundle, images.select(mask), {"relu2": [0]})[:, 0]
    assert red["delta_basket"] == pytest.approx(float((after - before).mean()), abs=1e-4)
    assert rows[-1]["class_idx"] == -1
    assert rows[-1]["delta_basket"] == pytest.approx(np.mean([r["delta_basket"]
                                                              for r in rows[:-1]]), abs=1e-3)


def test_the_rerun_gives_the_model_the_input_01_gave_it(fake_run, tmp_path):
    """common.rerun, which 08, 11 and 13 predict with, loads images in float32 as 01 did: every
    image's top-5 probabilities equal 01's to the 6 decimals 01 writes; streamed batches hold the
    same tensors; an image that no longer loads is left out, not fatal."""
    from common.artefacts import read_predictions
    from common.provenance import read_meta
    from common.rerun import image_batches, load_images, load_run_model, predict
    bundle = load_run_model(read_meta(fake_run / "01_activations.npz"), model=FAKE_MODEL,
                            device="cpu")
    rows = read_predictions(fake_run / "01_predictions.csv")
    items = [(r.image_id, r.path, r.label_idx) for r in rows]
    images = load_images(bundle, items, {})
    assert images.tensors.dtype == torch.float32 and images.ids == [r.image_id for r in rows]
    probs = predict(bundle, images, batch_size=7)
    for r, p in zip(rows, probs):
        assert list(np.argsort(-p)[:5]) == list(r.top5_idx)
        np.testing.assert_allclose(np.sort(p)[::-1][:5], r.top5_prob, atol=6e-7)
    streamed = list(image_batches(bundle, items, batch_size=4))
    assert [len(ids) for ids, _, _ in streamed][:2] == [4, 4]
    assert torch.equal(torch.cat([t for _, _, t in streamed]), images.tensors)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    some = load_images(bundle, items[:2] + [(999, str(broken), 0)], {})
    assert some.ids == [items[0][0], items[1][0]]
    assert some.select([items[1][0]]).ids == [items[1][0]]


def test_the_model_file_is_loaded_only_when_named_again(fake_run):
    """01 ran a model file: its meta alone does not make 11 import that code; naming it does."""
    from common.cli import StageError
    from common.provenance import read_meta
    from common.rerun import load_run_model
    meta = read_meta(fake_run / "01_activations.npz")
    with pytest.raises(StageError, match="pass --model"):
        load_run_model(meta, device="cpu")
    bundle = load_run_model(meta, model=FAKE_MODEL, device="cpu")
    assert bundle.input_size == 32


def test_davies_bouldin_ratios_of_two_baskets_by_hand():
    """Two baskets are enough for the ratio: {0, 2} and {10, 12} (centroids 1 and 11, spreads 1)
    give R = (1 + 1) / 10 = 0.2 each, scikit-learn's score; one basket alone has none (NaN)."""
    from sklearn.metrics import davies_bouldin_score
    feats, groups = np.array([[0.0], [2.0], [10.0], [12.0]]), np.array([0, 0, 1, 1])
    assert B.davies_bouldin_ratios(feats, groups) == pytest.approx({0: 0.2, 1: 0.2})
    assert davies_bouldin_score(feats, groups) == pytest.approx(0.2)
    assert np.isnan(B.davies_bouldin_ratios(feats, np.zeros(4, int))[0])
