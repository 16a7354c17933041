"""Tests of stage 04 (embed) and common/embedders.py: shapes, unit rows, the fusion rule, the
CNN fallback over crops (each distinct crop computed once), a tiny CLIP built here, and the
shipped offline text model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common import embedders as E
from common.cli import StageError
from common.artefacts import read_crop_vectors, read_embeddings
from common.io import load_npz, write_csv
from common.provenance import write_meta
from conftest import load_stage


S = load_stage("04_embed")
TILE, GRID = 32, 2
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class FakeText:
    """Bag-of-words text embedder over a fixed vocabulary (dim 6)."""

    name, space, space_id, dim = "fake-text", "text", "text:fake", 6
    VOCAB = ["red", "green", "blue", "stripes", "dogs", "cats"]

    def encode(self, texts):
        """Word counts, normalised."""
        return E.l2_normalise(np.array([[t.lower().count(w) for w in self.VOCAB]
                                        for t in texts], np.float32) + 1e-3)


class FakeCnn:
    """Image embedder: the mean RGB of each crop (dim 3); counts the crops it sees."""

    name, space, space_id, dim = "fake-cnn", "cnn", "cnn:fake", 3

    def __init__(self):
        """No crops seen yet."""
        self.seen = 0
        self.sizes = []

    def encode(self, images, size=None):
        """Mean colour of each image."""
        self.seen += len(images)
        self.sizes.append(size)
        return E.l2_normalise(np.array([np.asarray(im, np.float32).reshape(-1, 3).mean(0) + 1e-3
                                        for im in images]))


class FakeClipImage(FakeCnn):
    """An image tower that claims the text embedder's space (for the mean fusion)."""

    name, space, space_id, dim = "fake-clip", "clip", "text:fake", 6

    def encode(self, images, size=None):
        """Mean colour, padded to the text dimension."""
        rgb = super().encode(images)
        return E.l2_normalise(np.concatenate([rgb, np.zeros((len(rgb), 3), np.float32)], 1))


def make_run(tmp_path, tiles_by_neuron, statuses=None):
    """02 mosaics + 03 descriptions (+ metas) for neurons given as {(layer, ch): [colour names]}."""
    run = tmp_path / "run"
    run.mkdir()
    write_meta(run / "01_extract.meta.json", "01_extract", {}, [])
    meta01 = json.loads((run / "01_extract.meta.json").read_text())
    rows, descs = [], []
    for (layer, ch), colours in tiles_by_neuron.items():
        img = Image.new("RGB", (GRID * TILE, GRID * TILE), (128, 128, 128))
        for k, c in enumerate(colours):
            img.paste(Image.new("RGB", (TILE, TILE), COLOURS[c]), ((k % GRID) * TILE,
                                                                  (k // GRID) * TILE))
        rel = f"02_mosaics/{layer}/{ch}.png"
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(run / rel)
        rows.append({"layer": layer, "channel": ch, "path": rel, "n_tiles": len(colours),
                     "grid": GRID, "tile_px": TILE, "crop": "rf"})
        status = (statuses or {}).get((layer, ch), "ok")
        descs.append({"layer": layer, "channel": ch, "level": 1,
                      "description": " ".join(colours) + " stripes" if status == "ok" else "",
                      "backend": "fake", "model": "fake", "status": status,
                      "reason": "" if status == "ok" else "empty answer"})
    write_csv(run / "02_mosaics.csv", rows, ["layer", "channel", "path", "n_tiles", "grid",
                                             "tile_px", "crop"])
    write_meta(run / "02_mosaics.meta.json", "02_mosaics", {}, [run / "02_mosaics.csv"], [meta01])
    meta02 = json.loads((run / "02_mosaics.meta.json").read_text())
    write_csv(run / "03_descriptions.csv", descs, ["layer", "channel", "level", "description",
                                                   "backend", "model", "status", "reason"])
    write_meta(run / "03_describe.meta.json", "03_describe", {}, [run / "03_descriptions.csv"],
               [meta02])
    return run


def embed(run, text_embedder, image_embedder, **settings):
    """Run stage 04 on a planted run folder (``settings``: fields of its Settings)."""
    from common.artefacts import Run
    return S.run(Run(run), S.Settings(**settings), text_embedder=text_embedder,
                 image_embedder=image_embedder)


NEURONS = {("a", 0): ["red", "red", "red", "red"], ("a", 1): ["blue", "blue", "red", "red"],
           ("b", 0): ["green"], ("b", 1): ["red", "red", "red", "red"]}


def test_concat_fusion_shapes_and_unit_rows(tmp_path):
    """Text and CNN spaces differ → fused is the concatenation, each half weighing 1/√2."""
    run = make_run(tmp_path, NEURONS, statuses={("b", 0): "failed"})
    arrays = embed(run, text_embedder=FakeText(), image_embedder=FakeCnn())
    saved = read_embeddings(run / "04_embeddings.npz")
    assert saved.keys() == [("a", 0), ("a", 1), ("b", 1)]
    assert saved.text.shape == (3, 6) and saved.image.shape == (3, 3)
    assert saved.fused.shape == (3, 9) and saved.fusion == "concat"
    for vectors in (saved.text, saved.image, saved.fused):
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(saved.fused[:, :6], saved.text / np.sqrt(2), atol=1e-6)
    assert np.allclose(saved.fused[:, 6:], saved.image / np.sqrt(2), atol=1e-6)
    assert saved.text_model == "fake-text" and saved.image_model == "fake-cnn"
    meta = json.loads((run / "04_embed.meta.json").read_text())
    assert meta["fusion"] == "concat" and meta["image_space"] == "cnn"
    assert set(meta["lineage"]) >= {"02_mosaics", "03_describe", "04_embed"}
    assert arrays["fused"].shape == saved.fused.shape
    raw = load_npz(run / "04_embeddings.npz")  # the contract's dtypes, as written
    assert all(raw[key].dtype == np.float32 for key in ("text", "image", "fused"))


def test_mean_fusion_when_one_space(tmp_path):
    """Towers of one space → fused is the normalised mean of the two vectors."""
    run = make_run(tmp_path, NEURONS)
    embed(run, text_embedder=FakeText(), image_embedder=FakeClipImage())
    saved = read_embeddings(run / "04_embeddings.npz")
    assert saved.fusion == "mean" and saved.fused.shape == (4, 6)
    assert np.allclose(saved.fused, E.l2_normalise(saved.text + saved.image), atol=1e-6)


def test_cnn_image_vector_is_mean_over_crops_each_crop_once(tmp_path):
    """Image vector = normalised mean of the crops' vectors; identical crops computed once."""
    run = make_run(tmp_path, NEURONS)
    fake = FakeCnn()
    saved = embed(run, text_embedder=FakeText(), image_embedder=fake)
    assert fake.seen == 3                              # distinct crops: red, blue, green
    assert set(fake.sizes) == {TILE}                   # crops fed at their own size
    red = E.l2_normalise(np.array([[255, 0, 0]], np.float32))[0]
    rows = {(lay, int(c)): v for lay, c, v in zip(saved["layer"], saved["channel"], saved["image"])}
    assert np.allclose(rows[("a", 0)], red, atol=1e-3)
    assert np.allclose(rows[("a", 0)], rows[("b", 1)])
    assert rows[("a", 1)][0] == pytest.approx(rows[("a", 1)][2], abs=1e-3)  # half red, half blue


def test_image_tiles_limits_the_crops(tmp_path):
    """--image-tiles 2: only the first two crops (both blue) enter the mean."""
    run = make_run(tmp_path, {("a", 1): ["blue", "blue", "red", "red"]})
    saved = embed(run, text_embedder=FakeText(), image_embedder=FakeCnn(), image_tiles=2)
    assert np.argmax(saved["image"][0]) == 2


def test_crop_vectors_of_every_neuron_each_distinct_crop_once(tmp_path):
    """04_crops.npz: every neuron of 02's index (a failed description too), its first
    --crop-vectors crops best first, the vector the embedder gives each, distinct crops stored
    once; the file is among 04's outputs, so 09 can check it came from this run."""
    from common.provenance import read_meta
    run = make_run(tmp_path, NEURONS, statuses={("b", 0): "failed"})
    embed(run, text_embedder=FakeText(), image_embedder=FakeCnn(), crop_vectors=3)
    crops = read_crop_vectors(run / "04_crops.npz")
    assert crops.embedder == "fake-cnn" and crops.space == "cnn" and crops.max_crops == 3
    assert len(crops.arrays["vectors"]) == 3            # red, blue, green: once each
    colour = {name: E.l2_normalise(np.array([rgb], np.float32) + 1e-3)[0]
              for name, rgb in COLOURS.items()}
    for (layer, channel), tiles in NEURONS.items():
        mine = crops.of(layer, channel)
        assert len(mine) == min(3, len(tiles))
        for vector, name in zip(mine, tiles):
            assert np.allclose(vector, colour[name], atol=1e-3)
    assert len(crops.of("z", 0)) == 0                     # not in the index: no crops
    assert read_meta(run / "04_crops.npz")["stage"] == "04_embed"


def test_crop_vectors_in_clip_space(tmp_path):
    """With a CLIP image tower the image vector embeds the mosaic, and the crops are embedded by
    the same tower (09 scores them in that space)."""
    run = make_run(tmp_path, {("a", 1): ["blue", "blue", "red", "red"]})
    embed(run, text_embedder=FakeText(), image_embedder=FakeClipImage())
    crops = read_crop_vectors(run / "04_crops.npz")
    assert crops.space == "clip" and crops.arrays["vectors"].shape == (2, 6)
    assert np.argmax(crops.of("a", 1)[0]) == 2 and np.argmax(crops.of("a", 1)[3]) == 0


def test_no_description_is_a_clear_error(tmp_path):
    """All rows failed → StageError."""
    run = make_run(tmp_path, {("a", 0): ["red"]}, statuses={("a", 0): "failed"})
    with pytest.raises(StageError, match="no successful"):
        embed(run, text_embedder=FakeText(), image_embedder=FakeCnn())


def test_fuse_rules():
    """mean needs equal shapes; concat keeps both halves; rows always unit length."""
    rng = np.random.default_rng(0)
    t, i = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    fused, rule = E.fuse(t, i, shared=False)
    assert rule == "concat" and fused.shape == (5, 7)
    assert np.allclose(np.linalg.norm(fused, axis=1), 1)
    with pytest.raises(ValueError):
        E.fuse(t, i, shared=True)
    fused, rule = E.fuse(t, t * 3, shared=True)
    assert rule == "mean" and np.allclose(fused, E.l2_normalise(t))


def test_concat_fusion_weighs_text_and_image_equally_whatever_their_scale():
    """Each half is made unit length before the concatenation, so each holds half of the fused
    row's squared length: text (3, 4) and image (0, 100) fuse to (0.6, 0.8, 0, 1) / √2 — an
    image half left at its own scale would drown the text."""
    text = np.array([[3.0, 4.0], [1.0, 0.0]])
    image = np.array([[0.0, 100.0, 0.0], [0.02, 0.0, 0.0]])
    fused, rule = E.fuse(text, image, shared=False)
    assert rule == "concat"
    expected = np.array([[0.6, 0.8, 0, 1, 0], [1, 0, 1, 0, 0]]) / np.sqrt(2)
    np.testing.assert_allclose(fused, expected)
    np.testing.assert_allclose(np.linalg.norm(fused[:, 2:], axis=1), np.sqrt(0.5))


def test_space_ids_of_clip_sentence_models():
    """sentence-transformers clip-ViT-L-14 lives in CLIP ViT-L/14's space, not ViT-B/32's."""
    assert E._clip_space_of("sentence-transformers/clip-ViT-L-14") == "clip:ViT-L/14"
    assert E._clip_space_of("clip-ViT-B-32") == "clip:ViT-B/32"
    assert E._clip_space_of("all-MiniLM-L6-v2") is None


def _tiny_clip():
    """A random CLIP with tiny towers (its tokenizer needs 77 tokens and 49408 ids; the vision
    tower has one head per 64 channels)."""
    from clip.clip import _transform
    from clip.model import CLIP
    torch.manual_seed(0)
    model = CLIP(embed_dim=12, image_resolution=32, vision_layers=1, vision_width=64,
                 vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=32,
                 transformer_heads=2, transformer_layers=1).eval()
    return model, _transform(32)


def test_clip_towers_share_a_space_and_fuse_by_mean():
    """Both towers of one CLIP: unit vectors of the joint dimension, same_space → mean."""
    model, pre = _tiny_clip()
    text = E.ClipEmbedder(model, pre, "tiny", "text", torch.device("cpu"))
    image = E.ClipEmbedder(model, pre, "tiny", "image", torch.device("cpu"))
    t = text.encode(["red stripes", "a dog"])
    v = image.encode([Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (50, 30))])
    assert t.shape == (2, 12) and v.shape == (2, 12)
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert E.same_space(text, image) and not E.same_space(text, FakeCnn())


class _TinyNet(nn.Module):
    """conv → global average pool → linear: the pooled feature is known exactly."""

    def __init__(self):
        """Fixed weights: channel k of the conv copies colour channel k (times 1)."""
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        """Logits of the pooled colour means."""
        return self.fc(self.pool(self.conv(x)).flatten(1))


def test_cnn_embedder_returns_the_pooled_feature():
    """The vector is the input of the last linear layer: here the normalised mean colour."""
    from types import SimpleNamespace
    bundle = SimpleNamespace(model=_TinyNet().eval(), input_size=16, mean=(0, 0, 0),
                             std=(1, 1, 1), device=torch.device("cpu"))
    emb = E.CnnImageEmbedder(bundle, "tiny")
    assert emb.dim == 3 and emb.space == "cnn"
    vec = emb.encode([Image.new("RGB", (20, 20), (255, 0, 0)),
                      Image.new("RGB", (20, 20), (0, 255, 255))], size=8)
    assert np.allclose(vec, [[1, 0, 0], [0, 2 ** -0.5, 2 ** -0.5]], atol=1e-5)


def test_auto_image_embedder_falls_back_to_cnn_without_clip_weights(tmp_path, monkeypatch):
    """No CLIP checkpoint on disk → the reference CNN; asking for CLIP explicitly → StageError."""
    from types import SimpleNamespace
    import common.models
    monkeypatch.setattr(E, "CLIP_CACHE", tmp_path)
    bundle = SimpleNamespace(model=_TinyNet().eval(), input_size=16, mean=(0, 0, 0),
                             std=(1, 1, 1), device=torch.device("cpu"), name="tiny-ref")
    monkeypatch.setattr(common.models, "load_reference_classifier", lambda device="auto": bundle)
    emb = E.load_image_embedder()
    assert emb.space == "cnn" and emb.name == "tiny-ref"
    with pytest.raises(StageError, match="CLIP weights"):
        E.load_image_embedder("clip")


def test_offline_text_model_ranks_paraphrases_closer():
    """The shipped all-MiniLM-L6-v2: 384-d unit rows; a paraphrase is nearer than another topic."""
    emb = E.load_text_embedder(device="cpu")
    assert emb.dim == 384 and emb.name == "all-MiniLM-L6-v2"
    v = emb.encode(["black and white diagonal stripes", "diagonal stripes in white and black",
                    "dogs playing on grass"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_one_space_needs_the_same_space_id_and_dimension():
    """Two embedders share a space only when both name the same space and have the same
    dimension; an embedder without a space id shares none."""
    from types import SimpleNamespace as Emb
    clip = Emb(space_id="clip:ViT-B/32", dim=512)
    # equal ids and dimensions, as read from elsewhere (not the same objects)
    assert E.same_space(clip, Emb(space_id="".join(["clip:", "ViT-B/32"]), dim=int("512")))
    assert not E.same_space(clip, Emb(space_id="text:words", dim=512))
    assert not E.same_space(clip, Emb(space_id="clip:ViT-B/32", dim=768))
    assert not E.same_space(Emb(space_id=None, dim=3), Emb(space_id=None, dim=3))
    assert not E.same_space(Emb(dim=3), clip)


def test_mean_fusion_refuses_shapes_numpy_would_broadcast():
    """Same-space fusion pairs rows one to one: one text row against two image rows (or the
    reverse) is an error, not a broadcast mean."""
    one, two = np.ones((1, 3)), np.ones((2, 3))
    for text, image in ((one, two), (two, one)):
        with pytest.raises(ValueError, match="equal shapes"):
            E.fuse(text, image, shared=True)


def test_l2_normalise_leaves_zero_rows_at_zero():
    """Rows are divided by their length; a zero row (no description) stays zero, not NaN."""
    out = E.l2_normalise(np.array([[0.0, 0.0], [3.0, 4.0]]), np.float64)
    np.testing.assert_array_equal(out, [[0.0, 0.0], [0.6, 0.8]])
