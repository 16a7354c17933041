"""Stage 11 (baskets): co-activation, the cut rule, joint images, union / difference and pruning.

Planted statistics: channels driven by a shared hidden factor co-activate, so which neurons share
a basket is known in advance; pruning runs the fake model, whose conv2 channel 0 alone carries
the "red" class.
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


def test_random_baskets_are_seeded_and_exclude_members():
    """Same seed, same controls; never a member of the pruned basket."""
    a = B.random_baskets(20, 3, 4, seed=5, exclude=[0, 1, 2])
    assert a == B.random_baskets(20, 3, 4, seed=5, exclude=[0, 1, 2])
    assert all(len(c) == 3 and not set(c) & {0, 1, 2} for c in a)


@pytest.fixture
def fake_run(tmp_path, image_folder):
    """01 run for real on the fake model (layers relu1 and relu2) over the labelled folder."""
    run_dir = tmp_path / "run"
    load_stage("01_extract").main([
        "--images", str(image_folder), "--run", str(run_dir), "--model", FAKE_MODEL,
        "--layers", "relu1,relu2", "--input-size", "32", "--topk", "8", "--batch-size", "8",
        "--device", "cpu", "--workers", "1"])
    return run_dir


def fake_describe(index, out, args, levels):
    """Stand-in for 03: a sentence naming each mosaic's pseudo-layer and number."""
    with open(index, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {(r["layer"], int(r["channel"])): f"{r['layer']} {r['channel']}" for r in rows}


def test_build_and_set_operations_on_the_fake_model(fake_run, capsys):
    """11 writes its contract files; every basket has members, a mosaic and a sentence; union
    and difference of two baskets give the set algebra of their members."""
    from common.models import load_model
    bundle = load_model(FAKE_MODEL, device="cpu", input_size=32)
    small = stage.Settings(min_corr=0.3, grid=3, tile=16, prune=1, controls=2, prune_images=5)
    result = stage.build(Run(fake_run), small, describe=fake_describe, bundle=bundle)
    for name in ("11_baskets.csv", "11_tree.npz", "11_pruning.csv", "11_baskets.meta.json"):
        assert (fake_run / name).is_file()
    baskets = result["baskets"]
    # On these images relu1's edge and brightness channels peak together (bars and borders are
    # bright and edgy at once: r ≥ 0.98) and the red channel goes against them (r ≤ −0.3); relu2's
    # two channels anti-correlate (r = −0.4), so relu2 has no basket.
    assert [(b["basket"], b["channel_list"]) for b in baskets] == [("relu1:b1", [1, 2, 3])]
    b = baskets[0]
    assert (fake_run / b["mosaic"]).is_file() and b["cohesion"] > 0.9
    assert b["random_cohesion"] < b["cohesion"]  # random triples of relu1 include the red channel
    assert b["description"] == "relu1:basket 1" and b["sibling_members"] == "0"
    rows = result["pruning"]
    assert {r["class_idx"] for r in rows} == {0, 1, 2}
    assert all(r["n_images"] == 5 and r["basket"] == "relu1:b1" for r in rows)
    # A second basket, of another layer, written by hand: sets may cross layers.
    with open(fake_run / "11_baskets.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    table.append(dict(table[0], basket="relu2:b1", layer="relu2", members="0 1",
                      description="red or edges"))
    with open(fake_run / "11_baskets.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    with pytest.raises(SystemExit):  # an edited artefact is refused …
        stage.main(["--run", str(fake_run), "--union", "relu1:b1", "relu2:b1"])
    from common.provenance import read_meta, write_meta
    write_meta(fake_run / "11_baskets.meta.json", "11_baskets", {},  # … until its meta vouches
               [fake_run / n for n in ("11_baskets.csv", "11_tree.npz", "11_pruning.csv")],
               [read_meta(fake_run / "01_activations.npz")])
    union = stage.set_operation(Run(fake_run), "union", "relu1:b1", "relu2:b1", small,
                                describe=fake_describe)
    assert union["members"] == ["relu1:1", "relu1:2", "relu1:3", "relu2:0", "relu2:1"]
    assert union["description"] == "set 1" and len(union["images"]) == 9
    assert union["b_description"] == "red or edges"
    diff = stage.set_operation(Run(fake_run), "difference", "relu1:b1", "relu2:b1", small,
                               describe=fake_describe)
    assert diff["members"] == ["relu1:1", "relu1:2", "relu1:3"]
    empty = stage.set_operation(Run(fake_run), "difference", "relu1:b1", "relu1:b1",
                                describe=fake_describe)
    assert empty["members"] == [] and "empty" in stage.format_set(empty)
    # A tree node: relu1's root holds all four channels; minus the basket leaves the red one.
    root = 2 * 4 - 2
    rest = stage.set_operation(Run(fake_run), "difference", f"relu1:n{root}", "relu1:b1",
                               describe=fake_describe)
    assert rest["members"] == ["relu1:0"] and rest["a_description"] == ""
    saved = json.loads((fake_run / "11_sets" / "union__relu1_b1__relu2_b1" / "set.json")
                       .read_text())
    assert saved["members"] == union["members"]
    a = "relu1:b1"
    with pytest.raises(SystemExit):
        stage.main(["--run", str(fake_run), "--union", a, "nope:b9"])
    err = capsys.readouterr().err
    assert "differs from what 11_baskets wrote" in err and "no basket 'nope:b9'" in err


def test_pruning_the_red_channel_breaks_the_red_class_only(fake_run):
    """Zeroing relu2 channel 0 (the fake model's red detector, weight 4 on class 'red') makes red
    images lose their class while the edge class keeps its accuracy; its size-matched random
    control (relu2's only other channel, the edge detector) does the opposite."""
    from common.models import load_model
    bundle = load_model(FAKE_MODEL, device="cpu", input_size=32)
    basket = {"basket": "relu2:b1", "layer": "relu2", "number": 1, "channel_list": [0]}
    rows = stage.prune_baskets([basket], {"relu2": 2}, Run(fake_run), stage.Settings(
        prune=1, controls=1, prune_images=10, seed=0, device="cpu", batch_size=8), bundle=bundle)
    by_class = {r["class_idx"]: r for r in rows}
    assert by_class[0]["accuracy_before"] == 1.0 and by_class[0]["accuracy_pruned"] == 0.0
    assert by_class[0]["delta_pruned"] == -1.0
    assert by_class[1]["accuracy_pruned"] == by_class[1]["accuracy_before"]
    assert by_class[1]["accuracy_random"] < by_class[1]["accuracy_before"]
    assert by_class[0]["controls"] == "1"


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
