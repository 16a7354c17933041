"""Stage 01: streaming top-k, hooks, and the real script on the fake model."""
import csv

import numpy as np
import pytest
import torch

from common.activations import StreamingTopK
from common.artefacts import read_activations, read_images, read_predictions, read_stats
from common.hooks import ablate_channels, record_outputs, reduce_outputs
from conftest import FAKE_MODEL, load_stage

extract = load_stage("01_extract")
LAYERS = "relu1,pool,conv2"


def run_extract(image_folder, out, *extra):
    """Run 01's main on the fake model with a 32-px input."""
    extract.main(["--images", str(image_folder), "--run", str(out), "--model", FAKE_MODEL,
                  "--layers", LAYERS, "--input-size", "32", "--topk", "5", "--batch-size", "4",
                  "--device", "cpu", *extra])


def test_streaming_topk_equals_brute_force():
    """Batched updates (with ties and uneven batch sizes) must equal one global sort."""
    rng = np.random.default_rng(1)
    n, channels, k = 203, 6, 7
    values = rng.integers(0, 20, size=(n, channels)).astype(np.float32)  # many ties
    ys = rng.integers(0, 9, size=(n, channels))
    xs = rng.integers(0, 9, size=(n, channels))
    top = StreamingTopK(channels, k)
    start = 0
    for size in [1, 17, 64, 3, 118]:
        ids = np.arange(start, start + size)
        top.update(values[ids], ids, ys[ids], xs[ids])
        start += size
    assert start == n
    for c in range(channels):
        order = sorted(range(n), key=lambda i: (-values[i, c], i))[:k]
        assert top.image_ids[c].tolist() == order
        assert top.values[c].tolist() == values[order, c].tolist()
        assert top.y[c].tolist() == ys[order, c].tolist()


def test_topk_maps_follow_their_entries():
    """Activation maps stored by slot come out in rank order, after updates and after a merge."""
    rng = np.random.default_rng(3)
    n, channels, k = 60, 4, 5
    values = rng.normal(size=(n, channels)).astype(np.float32)
    maps = rng.normal(size=(n, channels, 2, 3)).astype(np.float16)
    pos = np.zeros((n, channels), np.int32)
    a, b = StreamingTopK(channels, k, (2, 3)), StreamingTopK(channels, k, (2, 3))
    for start in range(0, 30, 7):
        ids = np.arange(start, min(start + 7, 30))
        a.update(values[ids], ids, pos[ids], pos[ids], maps[ids])
    b.update(values[30:], np.arange(30, n), pos[30:], pos[30:], maps[30:])
    for top in (a, b):
        got = top.ranked_maps()
        for c in range(channels):
            np.testing.assert_array_equal(got[c], maps[top.image_ids[c], c])
    a.merge(b)
    got = a.ranked_maps()
    for c in range(channels):
        assert a.image_ids[c].tolist() == np.argsort(-values[:, c], kind="stable")[:k].tolist()
        np.testing.assert_array_equal(got[c], maps[a.image_ids[c], c])


def test_topk_merge_is_order_independent():
    """Shard buffers merged in any order give the arrays of a single stream, bit for bit: with
    ties across shards (the lower image id ranks first whichever shard holds it), positions and
    the activation maps that travel with each entry (each shard streamed in batches, so that its
    maps are stored out of rank order)."""
    rng = np.random.default_rng(2)
    n, channels, k = 60, 3, 6
    values = rng.integers(0, 4, size=(n, channels)).astype(np.float32)  # ties in every shard
    ys, xs = rng.integers(0, 3, size=(2, n, channels)).astype(np.int32)
    maps = rng.normal(size=(n, channels, 2, 3)).astype(np.float16)
    single = StreamingTopK(channels, k, (2, 3))
    single.update(values, np.arange(n), ys, xs, maps)
    shards = [np.arange(0, 20), np.arange(20, 45), np.arange(45, n)]
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        parts = []
        for s in order:
            part = StreamingTopK(channels, k, (2, 3))
            for ids in np.array_split(shards[s], 4):  # batches: the maps' storage slots shuffle
                part.update(values[ids], ids, ys[ids], xs[ids], maps[ids])
            parts.append(part)
        merged = parts[0]
        for part in parts[1:]:
            merged.merge(part)
        for name in ("image_ids", "values", "y", "x"):
            np.testing.assert_array_equal(getattr(merged, name), getattr(single, name), name)
        np.testing.assert_array_equal(merged.ranked_maps(), single.ranked_maps())
    for c in range(channels):  # the single stream itself ranks by value, then by image id
        ranked = sorted(range(n), key=lambda i: (-values[i, c], i))
        assert single.image_ids[c].tolist() == ranked[:k]
        np.testing.assert_array_equal(single.ranked_maps()[c], maps[single.image_ids[c], c])
    assert any(len(set(single.values[c].tolist())) < k for c in range(channels))  # ties kept


def test_image_zero_is_saved_with_its_value_and_empty_slots_as_nan():
    """Image id 0 (the first image of every run) is a real entry: its value is saved, not taken for
    the −1 that marks a slot no image filled. Two images into a top-3: channel 0 ranks image 0
    (5.0) over image 1 (2.0); channel 1 image 1 (4.0) over image 0 (−1.5, negative but real); the
    third slot of each stays empty: NaN on disk, −inf and id −1 when read back."""
    top = StreamingTopK(2, 3)
    top.update([[5.0, -1.5], [2.0, 4.0]], [0, 1], [[1, 0], [2, 3]], [[0, 2], [1, 1]])
    arrays = top.arrays("L")
    assert arrays["L/image_ids"].tolist() == [[0, 1, -1], [1, 0, -1]]
    values = arrays["L/values"]
    assert values[:, :2].tolist() == [[5.0, 2.0], [4.0, -1.5]] and np.isnan(values[:, 2]).all()
    back = StreamingTopK.from_arrays(arrays, "L")
    assert back.values.tolist() == [[5.0, 2.0, -np.inf], [4.0, -1.5, -np.inf]]
    assert back.image_ids.tolist() == [[0, 1, -1], [1, 0, -1]]
    assert back.y.tolist() == [[1, 2, 0], [3, 0, 0]] and back.x.tolist() == [[0, 1, 0], [1, 2, 0]]


def test_topk_with_maps_read_back_from_its_arrays_keeps_and_merges_its_maps():
    """01's shards are saved with ``arrays`` and read back with ``from_arrays``: the maps come back
    in rank order with their entries (stored out of order by batched updates), and merging another
    top-k into the copy read back gives what merging it into the live buffers gives."""
    rng = np.random.default_rng(4)
    n, channels, k = 24, 2, 4
    values = rng.normal(size=(n, channels)).astype(np.float32)
    maps = rng.normal(size=(n, channels, 2, 3)).astype(np.float16)
    pos = rng.integers(0, 3, size=(n, channels)).astype(np.int32)
    live, other = StreamingTopK(channels, k, (2, 3)), StreamingTopK(channels, k, (2, 3))
    for ids in np.array_split(np.arange(12), 3):
        live.update(values[ids], ids, pos[ids], pos[ids], maps[ids])
    other.update(values[12:], np.arange(12, n), pos[12:], pos[12:], maps[12:])
    back = StreamingTopK.from_arrays(live.arrays("L"), "L")
    np.testing.assert_array_equal(back.ranked_maps(), live.ranked_maps())
    back.merge(other)
    live.merge(other)
    for name in ("image_ids", "values", "y", "x"):
        np.testing.assert_array_equal(getattr(back, name), getattr(live, name), name)
    np.testing.assert_array_equal(back.ranked_maps(), live.ranked_maps())
    for c in range(channels):
        np.testing.assert_array_equal(back.ranked_maps()[c], maps[back.image_ids[c], c])


def test_reducer_stores_the_peak_row_and_column_of_a_wide_map():
    """On a 3 × 5 map (not square) a peak at row 1, column 4 is stored as y = 1, x = 4 (a peak off
    the diagonal: swapping y and x, or dividing by the height, cannot pass), with the max and
    mean of the map, and the map kept when it is small enough."""
    from common.hooks import Layout
    out = torch.zeros(2, 2, 3, 5)
    out[0, 0, 1, 4] = 7.0   # image 0, channel 0: row 1, column 4
    out[0, 1, 2, 0] = 3.0   # image 0, channel 1: row 2, column 0
    out[1, 0, 0, 3] = 1.0   # image 1, channel 0: row 0, column 3
    out[1, 1, 2, 3] = 5.0   # image 1, channel 1: row 2, column 3
    reduced = extract.make_reducer(8, Layout("grid", channels=2, grid=(3, 5)))(out)
    assert reduced["y"].tolist() == [[1, 2], [0, 2]]
    assert reduced["x"].tolist() == [[4, 0], [3, 3]]
    assert reduced["max"].tolist() == [[7.0, 3.0], [1.0, 5.0]]
    np.testing.assert_allclose(reduced["mean"], [[7 / 15, 3 / 15], [1 / 15, 5 / 15]], rtol=1e-6)
    assert reduced["shape"] == (2, 3, 5) and reduced["map"].shape == (2, 2, 3, 5)
    assert extract.make_reducer(4, Layout("grid", channels=2, grid=(3, 5)))(out)["map"] is None


def test_hook_sees_output_before_inplace_relu(fake_bundle):
    """conv1 is followed by ReLU(inplace=True): the hook must keep its negative values."""
    model = fake_bundle.model
    x = torch.randn(2, 3, 32, 32)
    with record_outputs(model, ["conv1"]) as out, torch.no_grad():
        model(x)
        expected = model.conv1(x)
    assert (out["conv1"] < 0).any()
    torch.testing.assert_close(out["conv1"], expected)
    assert not model.conv1._forward_hooks and not model._forward_pre_hooks


def test_hook_sees_output_before_inplace_residual_add():
    """ResNet's BasicBlock adds the skip path in place onto bn2's output (``out += identity``):
    the recorded bn2 output must be the value bn2 returned, not the sum."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        block = model.layer1[0]
        expected = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
        with record_outputs(model, ["layer1.0.bn2", "layer1.0"]) as out:
            model(x)
    torch.testing.assert_close(out["layer1.0.bn2"], expected)
    torch.testing.assert_close(out["layer1.0"], torch.relu(expected + stem))


def test_hooks_removed_after_error(fake_bundle):
    """A failing forward pass must not leave hooks behind."""
    model = fake_bundle.model
    with pytest.raises(RuntimeError):
        with reduce_outputs(model, ["conv2"], lambda o: o.sum()):
            model(torch.zeros(1, 5, 8, 8))  # wrong channel count
    assert not model.conv2._forward_hooks


def test_ablate_channels_zeroes_only_those(fake_bundle):
    """Ablating conv2 channel 0 (red) removes the red logit's input and nothing else."""
    model = fake_bundle.model
    x = torch.zeros(1, 3, 32, 32)
    x[:, 0] = 1.0  # red only: conv1 channel 0 computes R − (G + B) / 2 = 1
    with torch.no_grad():
        base = model(x)
        with ablate_channels(model, {"conv2": [0]}):
            ablated = model(x)
        again = model(x)
    assert base[0, 0] > ablated[0, 0]
    torch.testing.assert_close(base[0, 1], ablated[0, 1])
    torch.testing.assert_close(base, again)


def test_extract_end_to_end(image_folder, tmp_path):
    """The fake model's neurons find what they were built for; bad files are listed, not fatal."""
    out = tmp_path / "run"
    run_extract(image_folder, out)
    images = read_images(out / "01_images.csv")
    assert len(images) == 31
    broken = [r for r in images if r.path.endswith("broken.jpg")]
    assert broken[0].status == "skipped" and broken[0].reason
    assert sum(r.status == "ok" for r in images) == 30

    layers, input_size, tops = read_activations(out / "01_activations.npz")
    assert layers == LAYERS.split(",") and input_size == (32, 32)
    kind = {r.image_id: r.path.split("/")[-1].split("_")[0] for r in images}
    red_top = [kind[i] for i in tops["relu1"].image_ids[0]]
    assert red_top == ["red"] * 5
    edge_top = [kind[i] for i in tops["relu1"].image_ids[1]]
    assert edge_top == ["edges"] * 5
    assert tops["relu1"].fmap.tolist() == [4, 32, 32] and tops["pool"].fmap.tolist() == [4, 16, 16]
    assert (np.diff(tops["relu1"].values, axis=1) <= 0).all()

    stats = read_stats(out / "01_stats", "relu1", "max")
    assert stats.shape == (31, 4)
    broken_id = broken[0].image_id
    assert np.isnan(stats[broken_id]).all()
    # The top-1 value of each channel is the maximum of that channel's per-image maxima.
    np.testing.assert_allclose(tops["relu1"].values[:, 0], np.nanmax(stats, axis=0), rtol=1e-6)

    preds = read_predictions(out / "01_predictions.csv")
    assert len(preds) == 30
    red_preds = [p.pred_idx for p in preds if "red_" in p.path]
    assert red_preds == [0] * 10
    assert all(p.correct is True for p in preds if "red_" in p.path)


def test_same_inputs_same_bytes(image_folder, tmp_path):
    """Two runs write byte-identical data files."""
    run_extract(image_folder, tmp_path / "a")
    run_extract(image_folder, tmp_path / "b")
    for name in ["01_activations.npz", "01_images.csv", "01_predictions.csv",
                 "01_stats/pool.mean.npy"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_shards_merge_to_single_run(image_folder, tmp_path):
    """Three shards merged give exactly the files of one run."""
    run_extract(image_folder, tmp_path / "single")
    for i in range(3):
        run_extract(image_folder, tmp_path / "sharded", "--shard", f"{i}/3")
    assert not (tmp_path / "sharded" / "01_activations.npz").exists()
    run_extract(image_folder, tmp_path / "sharded", "--merge", "3")
    for name in ["01_activations.npz", "01_images.csv", "01_predictions.csv",
                 "01_stats/relu1.max.npy", "01_stats/conv2.mean.npy"]:
        assert ((tmp_path / "single" / name).read_bytes()
                == (tmp_path / "sharded" / name).read_bytes()), name
    assert not (tmp_path / "sharded" / "01_parts").exists()


def test_merge_refuses_missing_shard(image_folder, tmp_path):
    """Merging before every shard has run is a clear error."""
    run_extract(image_folder, tmp_path / "s", "--shard", "0/2")
    with pytest.raises(SystemExit) as exc:
        run_extract(image_folder, tmp_path / "s", "--merge", "2")
    assert exc.value.code == 2


def test_unknown_layer_lists_valid_names(image_folder, tmp_path, capfd):
    """A typo in a layer name stops the run and shows the names to choose from."""
    with pytest.raises(SystemExit):
        extract.main(["--images", str(image_folder), "--run", str(tmp_path / "x"), "--model",
                      FAKE_MODEL, "--layers", "conv9", "--device", "cpu"])
    err = capfd.readouterr().err
    assert "conv9" in err and "conv1" in err and "relu1" in err


def test_no_usable_image_fails(tmp_path, capfd):
    """A folder of broken files ends with a non-zero exit and the reason."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exc:
        extract.main(["--images", str(folder), "--run", str(tmp_path / "r"), "--model", FAKE_MODEL,
                      "--input-size", "32", "--device", "cpu"])
    assert exc.value.code == 2
    assert "none of the 2 images" in capfd.readouterr().err
    rows = read_images(tmp_path / "r" / "01_images.csv")
    assert [r.status for r in rows] == ["skipped", "skipped"]


GREY_MODEL = FAKE_MODEL.replace("fake_model.py", "fake_grey_model.py")


def run_grey(images, out, size="32", *extra):
    """Run 01 on the grey stripe model with its normalisation and class file."""
    extract.main(["--images", str(images), "--run", str(out), "--model", GREY_MODEL,
                  "--layers", "relu1,bands", "--input-size", size, "--mean", "0.2", "--std", "0.25",
                  "--classes", str(images.parent / "classes.txt"), "--topk", "4", "--device", "cpu",
                  *extra])


def test_wrong_input_size_gives_the_accuracy_warning(stripe_folder, tmp_path, capfd):
    """At its own 32 px the grey model is right on its 32 well-labelled images; at 64 px it is near
    chance, and 01 warns, naming INPUT_SIZE, MEAN and STD and the size that works, and records it
    in its metadata."""
    import json
    run_grey(stripe_folder, tmp_path / "right")
    right = json.loads((tmp_path / "right" / "01_extract.meta.json").read_text())["accuracy"]
    assert right["n_labelled"] == 36 and right["n_correct"] == 32 and right["warning"] == ""
    run_grey(stripe_folder, tmp_path / "wrong", "64")
    wrong = json.loads((tmp_path / "wrong" / "01_extract.meta.json").read_text())["accuracy"]
    assert wrong["accuracy"] < 0.4 and all(v in wrong["warning"] for v in
                                           ("INPUT_SIZE (now 64)", "MEAN", "STD"))
    # Trying other sizes on a sample finds the images' own 32 px, and the warning says so.
    assert wrong["better"]["input_size"] == 32 and "INPUT_SIZE=32 MEAN=0.2 STD=0.25" in \
        wrong["warning"]
    err = capfd.readouterr().err
    assert "WARNING: " + "!" * 78 in err and "INPUT_SIZE (now 64)" in err


def test_random_weights_are_not_judged_by_accuracy(tmp_path, monkeypatch):
    """A model at chance gets the warning, but not when its weights are random on request (the
    random-init benchmarks and test runs): no alarm about preprocessing, and no probing run."""
    from types import SimpleNamespace
    rows = [{"image_id": i, "path": f"{i}.png", "label": "a", "label_idx": i % 4,
             "pred_idx": (i + 1) % 4, "pred_name": "", "prob": 0.3, "correct": 0,
             "top5_idx": "", "top5_prob": ""} for i in range(40)]
    predictions = tmp_path / "01_predictions.csv"
    with open(predictions, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    probed = []
    monkeypatch.setattr(extract, "probe_preprocessing", lambda *a: probed.append(1))
    bundle = SimpleNamespace(n_outputs=4, input_size=32, mean=(0.5,), std=(0.5,),
                             spec={"random_init": False})
    assert "right on only 0.0%" in extract.check_accuracy(predictions, bundle)["warning"]
    assert probed == [1]
    bundle.spec["random_init"] = True
    result = extract.check_accuracy(predictions, bundle)
    assert result["accuracy"] == 0 and result["warning"] == "" and probed == [1]


def test_other_preprocessings_are_screened_on_a_few_images_first(tmp_path):
    """The probe takes the current setting's answers from 01's predictions and runs every other
    setting on PROBE_SCREEN images only, unless it does clearly better there: a model no setting
    helps costs (settings − 1) × PROBE_SCREEN forward images, not settings × PROBE_IMAGES."""
    from types import SimpleNamespace
    from PIL import Image
    labelled = []
    for i in range(40):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (48, 40), (i, 2 * i, 3 * i)).save(path)
        labelled.append((1, 0, str(path)))  # label 1; 01 predicted 0
    seen = []

    def model(batch):
        """Always answers class 0; counts the images."""
        seen.append(len(batch))
        return torch.tensor([[1.0, 0.0]]).repeat(len(batch), 1)
    bundle = SimpleNamespace(channels=3, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                             model=model, device="cpu")
    best = extract.probe_preprocessing(bundle, labelled)
    settings = 3 * 3  # sizes 32, 40 (the images' own), 224; norms 0.5 (current), none, ImageNet's
    assert sum(seen) == (settings - 1) * extract.PROBE_SCREEN
    assert best["accuracy"] == best["current"] == 0 and best["n"] == extract.PROBE_IMAGES


def test_a_1000_class_head_maps_imagenet_synset_folders_whatever_its_class_names():
    """An ImageNet-sized head (exactly 1000 outputs) whose class names are its own, not the
    ImageNet table's, still maps folders named by synset id: n01443537 (goldfish) is output 1.
    A 999-class head is not ImageNet's: a synset id there is left unmapped, not guessed. Without
    class names only decimal indices map."""
    names = [f"kind {i}" for i in range(1000)]
    labels = ["n01443537", "kind 7", "n99999999", ""]
    assert extract.label_indices(labels, names) == ({"n01443537": 1, "kind 7": 7}, ["n99999999"])
    assert extract.label_indices(labels, names[:999]) == ({"kind 7": 7},
                                                          ["n01443537", "n99999999"])
    assert extract.label_indices(["12", "goldfish", ""], None) == ({"12": 12}, ["goldfish"])


def test_prediction_rows_judge_only_images_whose_label_maps_to_a_class():
    """A batch of two images of a 3-class head. Image 4 (label "b", class 1) has logits (0, 2, 1):
    softmax e² / (1 + e + e²) = 0.665241 for class 1, then class 2, then 0 — right. Image 0 (the
    first image id) has a label no class matches: label_idx −1 and no verdict, neither right nor
    wrong, although its prediction is class 0. Without class names a class is named by its index;
    an output that is not one score per class (a feature map) gives no rows."""
    from types import SimpleNamespace
    entries = {0: SimpleNamespace(path="z.png", label="zebra"),
               4: SimpleNamespace(path="b.png", label="b")}
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    rows = extract.prediction_rows(logits, [4, 0], entries, {"b": 1}, ["a", "b", "c"])
    e = np.e
    assert rows[0] == {"image_id": 4, "path": "b.png", "label": "b", "label_idx": 1,
                       "pred_idx": 1, "pred_name": "b", "prob": "0.665241", "correct": 1,
                       "top5_idx": "1 2 0",
                       "top5_prob": " ".join(f"{p:.6f}" for p in np.array([e * e, e, 1])
                                             / (1 + e + e * e))}
    assert rows[1]["label_idx"] == -1 and rows[1]["correct"] == ""
    assert rows[1]["pred_idx"] == 0 and rows[1]["pred_name"] == "a"
    wrong = extract.prediction_rows(logits[1:], [4], entries, {"b": 1}, None)
    assert wrong[0]["correct"] == 0 and wrong[0]["pred_name"] == "0"
    assert extract.prediction_rows(torch.zeros(2, 3, 4, 4), [4, 0], entries, {}, None) == []


def test_shard_outputs_join_in_order_long_ones_whole_and_empty_ones_as_nan(tmp_path):
    """Shards' statistics stacked in order: a shard of 5000 images (more than one 4096-row block
    read at a time) comes through row for row, a shard whose 3 images were all unusable (no file)
    becomes 3 NaN rows, and the last shard follows it. Its CSVs are joined under one header,
    counting records, not lines (a quoted path may hold a newline)."""
    long = np.arange(5000 * 2, dtype=np.float32).reshape(5000, 2)
    short = -np.arange(8, dtype=np.float32).reshape(4, 2)
    np.save(tmp_path / "a.npy", long)
    np.save(tmp_path / "c.npy", short)
    dest = tmp_path / "stats.npy"
    extract.concat_stats([tmp_path / n for n in ("a.npy", "b.npy", "c.npy")], [5000, 3, 4], dest,
                         5007, 2)
    stacked = np.load(dest)
    assert stacked.shape == (5007, 2) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked[:5000], long)
    assert np.isnan(stacked[5000:5003]).all()
    np.testing.assert_array_equal(stacked[5003:], short)
    (tmp_path / "1.csv").write_bytes(b'path,label\r\n"new\nline.png",a\r\nb.png,b\r\n')
    (tmp_path / "2.csv").write_bytes(b"path,label\r\n")
    (tmp_path / "3.csv").write_bytes(b"path,label\r\nc.png,c\r\n")
    joined = tmp_path / "images.csv"
    assert extract.concat_csv([tmp_path / f"{i}.csv" for i in (1, 2, 3)], joined) == 3
    assert joined.read_bytes() == b'path,label\r\n"new\nline.png",a\r\nb.png,b\r\nc.png,c\r\n'
    assert extract.count_rows(joined) == 3


def test_folder_names_name_the_classes_when_they_match_the_outputs(stripe_folder, tmp_path):
    """Without CLASSES, four sorted folder names name the four outputs (ImageFolder's rule)."""
    for name in ("classes.txt",):
        (stripe_folder.parent / name).unlink()
    extract.main(["--images", str(stripe_folder), "--run", str(tmp_path / "r"), "--model",
                  GREY_MODEL, "--input-size", "32", "--mean", "0.2", "--std", "0.25",
                  "--device", "cpu", "--layers", "relu1"])
    preds = read_predictions(tmp_path / "r" / "01_predictions.csv")
    assert {p.pred_name for p in preds} <= {"Pin_Stripe", "WIDE band", "broad_band", "narrow-band"}


def test_csv_duplicates_are_counted_once_and_newlines_survive(image_folder, tmp_path):
    """The same path twice in a CSV list is recorded as a skipped duplicate; a file name with a
    newline in it is one record, not two."""
    weird = image_folder / "0" / "red\nsquare.png"
    (image_folder / "0" / "red_00.png").rename(weird)
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([[str(weird), "0"], [str(image_folder / "1" / "edges_00.png"), "1"],
                          [str(image_folder / "1" / "edges_00.png"), "1"]])
    run_extract(listing, tmp_path / "r")
    rows = read_images(tmp_path / "r" / "01_images.csv")
    assert [r.status for r in rows] == ["ok", "ok", "skipped"]
    assert rows[0].path == str(weird) and "same file" in rows[2].reason
    assert len(read_predictions(tmp_path / "r" / "01_predictions.csv")) == 2


def test_merge_refuses_shards_of_other_images(image_folder, tmp_path):
    """A shard made before an image was replaced is not merged with shards made after."""
    run_extract(image_folder, tmp_path / "s", "--shard", "0/2")
    with open(image_folder / "0" / "red_03.png", "ab") as fh:
        fh.write(b"\0")  # another version of the file (trailing bytes: the image still decodes)
    run_extract(image_folder, tmp_path / "s", "--shard", "1/2")
    with pytest.raises(SystemExit) as exc:
        run_extract(image_folder, tmp_path / "s", "--merge", "2")
    assert exc.value.code == 2
