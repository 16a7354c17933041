"""Vision transformers: token and channels-last layouts, patch fields, default layers, ablation.

The models are tiny and random (or hand-set where a test needs a known answer), built here: a
2-block torchvision ViT on 32-px images (8-px patches: a 4 × 4 grid plus a class token) and a
channels-last block (a 4-px patch embedding followed by a LayerNorm and a Linear on the last axis).
"""
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from common.artefacts import read_activations, read_images, read_stats
from common.fields import RF, crop_box
from common.hooks import (CHANNELS_LAST, GRID, TOKENS, VECTOR, ablate_channels, infer_layout,
                          patch_side, record_outputs)
from common.io import read_json
from common.models import default_layers
from conftest import load_stage

extract = load_stage("01_extract")
SIZE = 32


def tiny_vit(**extra) -> nn.Module:
    """The 2-block ViT of the module docstring, seeded."""
    torch.manual_seed(0)
    return VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=3, **extra).eval()


class Permute(nn.Module):
    """(B, C, H, W) → (B, H, W, C), as Swin does after its patch embedding."""

    def forward(self, x):
        """The permuted tensor."""
        return x.permute(0, 2, 3, 1)


class ChannelsLast(nn.Module):
    """A 4-px patch embedding, a channels-last block (LayerNorm, Linear) and a classifier."""

    def __init__(self, width: int = 5):
        """Build the layers, seeded."""
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), Permute())
        self.block = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        """Logits of the three classes from the mean over the grid."""
        return self.head(self.block(self.embed(x)).mean(dim=(1, 2)))


FACTORIES = '''
import sys
sys.path.insert(0, {tests!r})
from test_transformers import ChannelsLast, tiny_vit


def vit():
    return tiny_vit()


def vit_pre_logits():
    return tiny_vit(representation_size=8)


def channels_last():
    return ChannelsLast()
'''


@pytest.fixture
def factories(tmp_path):
    """A factory file naming the test models as MODEL=file.py:function."""
    path = tmp_path / "models.py"
    path.write_text(FACTORIES.format(tests=str(__import__("pathlib").Path(__file__).parent)))
    return path


def images_csv(folder, n: int = 12, seed: int = 0):
    """``n`` random 32-px images and a CSV listing them."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir()
    lines = ["path,label"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,")
    (folder / "images.csv").write_text("\n".join(lines) + "\n")
    return folder / "images.csv"


def run_extract(csv_path, out, model, layers, *extra):
    """01's main on a test model (random weights) with a 32-px input."""
    extract.main(["--images", str(csv_path), "--run", str(out), "--model", model,
                  "--layers", layers, "--input-size", str(SIZE), "--topk", "4",
                  "--batch-size", "5", "--device", "cpu", "--mean", "0.5", "--std", "0.5", *extra])


def brute_force(model, csv_path, layer, layout_kind):
    """Every image's output of ``layer`` as (N, C, H, W) over its patches, plus the class token
    (N, C) or None, from one plain forward pass per image."""
    from common.images import list_images, load_rgb, network_input, to_tensor
    grids, classes = [], []
    with record_outputs(model, [layer]) as out, torch.no_grad():
        for entry in list_images(str(csv_path)):
            model(to_tensor(network_input(load_rgb(entry.path)[0], SIZE), (0.5,) * 3,
                            (0.5,) * 3)[None])
            value = out[layer][0]
            if layout_kind == TOKENS:
                classes.append(value[0])
                value = value[1:].T.reshape(value.shape[1], 4, 4)
            elif layout_kind == CHANNELS_LAST:
                value = value.permute(2, 0, 1)
            grids.append(value)
    return torch.stack(grids).numpy(), (torch.stack(classes).numpy() if classes else None)


def test_layouts_of_each_shape():
    """Each shape gets its layout; the two 4-D layouts are told apart by which axes have the
    input's aspect ratio, a tie by the module; shapes without positions are None."""
    image = (32, 32)
    assert infer_layout((2, 6, 8, 8), image).kind == GRID
    last = infer_layout((2, 8, 8, 6), image)
    assert (last.kind, last.channels, last.grid) == (CHANNELS_LAST, 6, (8, 8))
    assert infer_layout((2, 8, 8, 8), image, nn.Conv2d(3, 8, 4)).kind == GRID
    assert infer_layout((2, 8, 8, 8), image, nn.LayerNorm(8)).kind == CHANNELS_LAST
    tokens = infer_layout((2, 17, 16), image, patch=8)
    assert (tokens.kind, tokens.grid, tokens.prefix, tokens.has_class_token) == \
        (TOKENS, (4, 4), 1, True)
    no_class = infer_layout((2, 16, 16), image, patch=8)
    assert (no_class.prefix, no_class.has_class_token) == (0, False)
    # Without a known patch side the grid comes from the square number of tokens.
    assert infer_layout((2, 50, 16), (224, 224)).grid == (7, 7)
    assert infer_layout((2, 10), image).kind == VECTOR
    assert infer_layout((2, 7, 16), image, patch=8) is None      # 7 tokens: no grid
    assert infer_layout((2, 3, 5, 40), image).kind == GRID      # neither pair fits: as CNNs
    assert infer_layout((2, 1, 3, 8, 8), image) is None
    assert patch_side(tiny_vit()) == 8 and patch_side(ChannelsLast()) == 4


def test_tokens_to_grid_keeps_patch_order():
    """Patch token k lands on cell (k // 4, k % 4) and the class token is kept apart."""
    layout = infer_layout((1, 17, 2), (32, 32), patch=8)
    out = torch.zeros(1, 17, 2)
    out[0, 1 + 6, 1] = 5.0  # patch token 6: row 1, column 2
    out[0, 0, 0] = 9.0      # class token
    grid = layout.to_grid(out)
    assert grid.shape == (1, 2, 4, 4) and grid[0, 1, 1, 2] == 5.0 and grid.sum() == 5.0
    assert layout.class_token(out)[0].tolist() == [9.0, 0.0]


def test_vit_extract_equals_brute_force(factories, tmp_path):
    """01 on a token layer: top-k, positions, per-image max / mean over patches and the class
    token equal a plain forward pass per image; the layout is recorded in the metadata."""
    csv_path = images_csv(tmp_path / "img")
    out = tmp_path / "run"
    layer = "encoder.layers.encoder_layer_1.mlp"
    run_extract(csv_path, out, f"{factories}:vit", layer)
    grids, classes = brute_force(tiny_vit(), csv_path, layer, TOKENS)
    n, c = grids.shape[:2]
    flat = grids.reshape(n, c, -1)
    _, _, tops = read_activations(out / "01_activations.npz")
    top = tops[layer]
    assert top.fmap.tolist() == [16, 4, 4]
    for ch in range(c):
        order = np.argsort(-flat[:, ch].max(axis=1), kind="stable")[:4]
        assert top.image_ids[ch].tolist() == order.tolist()
        np.testing.assert_allclose(top.values[ch], flat[order, ch].max(axis=1), rtol=1e-5)
        cells = flat[order, ch].argmax(axis=1)
        assert top.y[ch].tolist() == (cells // 4).tolist()
        assert top.x[ch].tolist() == (cells % 4).tolist()
    np.testing.assert_allclose(read_stats(out / "01_stats", layer, "max"), flat.max(axis=2),
                               rtol=1e-5)
    np.testing.assert_allclose(read_stats(out / "01_stats", layer, "mean"), flat.mean(axis=2),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(read_stats(out / "01_stats", layer, "cls"), classes, rtol=1e-5)
    meta = read_json(out / "01_extract.meta.json")
    assert meta["layouts"][layer] == {"kind": TOKENS, "channels": 16, "grid": [4, 4], "prefix": 1,
                                      "patch": "8-px patches of a 32×32 input"}
    # The field of a patch: its 8 px plus a margin of max(4, 8) px on each side, centred on it.
    assert top.rf.tolist() == [24.0, 24.0, 8.0, 8.0, 3.5, 3.5]


def test_channels_last_extract_equals_brute_force(factories, tmp_path):
    """01 on a (B, H, W, C) block: the channel is the last axis, the grid the two middle ones."""
    csv_path = images_csv(tmp_path / "img", seed=2)
    out = tmp_path / "run"
    run_extract(csv_path, out, f"{factories}:channels_last", "block")
    grids, _ = brute_force(ChannelsLast(), csv_path, "block", CHANNELS_LAST)
    flat = grids.reshape(grids.shape[0], grids.shape[1], -1)
    _, _, tops = read_activations(out / "01_activations.npz")
    assert tops["block"].fmap.tolist() == [5, 8, 8]
    for ch in range(5):
        order = np.argsort(-flat[:, ch].max(axis=1), kind="stable")[:4]
        assert tops["block"].image_ids[ch].tolist() == order.tolist()
    np.testing.assert_allclose(read_stats(out / "01_stats", "block", "mean"), flat.mean(axis=2),
                               rtol=1e-5, atol=1e-6)
    assert not (out / "01_stats" / "block.cls.npy").exists()
    assert read_json(out / "01_extract.meta.json")["layouts"]["block"]["kind"] == CHANNELS_LAST


def test_planted_token_crop_covers_its_patch(tmp_path):
    """A ViT whose token channel 0 is its patch's brightness (hand-set embedding, no position
    or class signal): the brightest image's top cell is the planted patch, and the crop 02 cuts
    from 01's field and position covers that patch."""
    from PIL import Image
    model = tiny_vit()
    with torch.no_grad():
        model.conv_proj.weight.zero_()
        model.conv_proj.weight[0] = 1.0 / (3 * 64)
        model.conv_proj.bias.zero_()
        model.encoder.pos_embedding.zero_()
        model.class_token.zero_()
    folder = tmp_path / "img"
    folder.mkdir()
    planted = (2, 1)  # patch row 2, column 1: pixels 16–23 × 8–15
    dark = np.full((SIZE, SIZE, 3), 20, np.uint8)
    bright = dark.copy()
    bright[16:24, 8:16] = 250
    for i, arr in enumerate([dark, bright, dark + 10]):
        Image.fromarray(arr).save(folder / f"{i}.png")
    (folder / "images.csv").write_text("path,label\n0.png,\n1.png,\n2.png,\n")
    torch.save(model, tmp_path / "planted.pt")
    out = tmp_path / "run"
    extract.main(["--images", str(folder / "images.csv"), "--run", str(out), "--model",
                  str(tmp_path / "planted.pt"), "--unsafe-pickle", "--layers", "encoder.dropout",
                  "--input-size", str(SIZE), "--topk", "3", "--device", "cpu",
                  "--mean", "0", "--std", "1"])
    images = {r.image_id: r.path for r in read_images(out / "01_images.csv")}
    top = read_activations(out / "01_activations.npz")[2]["encoder.dropout"]
    assert images[int(top.image_ids[0, 0])].endswith("1.png")
    assert (int(top.y[0, 0]), int(top.x[0, 0])) == planted
    top_, left, bottom, right = crop_box(RF(*top.rf.tolist()), planted[0], planted[1], SIZE, SIZE)
    assert top_ <= 16 and bottom >= 24 and left <= 8 and right >= 16
    assert bottom - top_ < SIZE and right - left < SIZE  # a patch crop, not the whole image


def test_hidden_vector_layer_is_a_clear_error(factories, tmp_path, capfd):
    """A (B, C) layer that is not the classifier's output stops 01 with one line naming the
    layer, its shape and layers that can be read; the classifier's output itself is read."""
    csv_path = images_csv(tmp_path / "img", n=4)
    with pytest.raises(SystemExit) as exc:
        run_extract(csv_path, tmp_path / "x", f"{factories}:vit_pre_logits", "heads.pre_logits")
    assert exc.value.code == 2
    err = capfd.readouterr().err
    line = next(line for line in err.splitlines() if "heads.pre_logits" in line)
    assert "(1, 8)" in line and "encoder" in line and "tools.layers" in line
    assert "Traceback" not in err
    run_extract(csv_path, tmp_path / "y", f"{factories}:vit_pre_logits", "heads.head")
    assert read_activations(tmp_path / "y" / "01_activations.npz")[2]["heads.head"].fmap.tolist() \
        == [3, 1, 1]


@pytest.mark.parametrize("model, layer, axis", [(tiny_vit(), "encoder.layers.encoder_layer_0.mlp", 2),
                                                (ChannelsLast(), "block", 3)])
def test_ablation_zeroes_a_channel_in_every_token(model, layer, axis):
    """Zeroing channel 2 zeroes it at every position (every token, the class token included)
    and leaves the other channels as they were."""
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), record_outputs(model, [layer]) as before:
        model(x)
        base = before[layer]
    with torch.no_grad(), ablate_channels(model, {layer: [2]}), \
            record_outputs(model, [layer]) as after:
        model(x)
    assert base.select(axis, 2).abs().sum() > 0
    assert after[layer].select(axis, 2).abs().sum() == 0
    keep = [c for c in range(base.shape[axis]) if c != 2]
    torch.testing.assert_close(after[layer].index_select(axis, torch.tensor(keep)),
                               base.index_select(axis, torch.tensor(keep)))


def test_relevance_sums_over_tokens():
    """Activation × gradient of a token layer is one value per channel (not per token)."""
    from common.attribution import channel_attribution
    model = tiny_vit()
    relevance, _ = channel_attribution(model, ["encoder.layers.encoder_layer_1.mlp"],
                                       torch.randn(2, 3, SIZE, SIZE), [0, 1])
    assert relevance["encoder.layers.encoder_layer_1.mlp"].shape == (2, 16)


def test_default_layers_of_transformers(caplog):
    """Five evenly spaced blocks: the MLP of ViT blocks, Swin and ConvNeXt blocks themselves; a
    rule that finds fewer than three says so with the command listing the candidates."""
    import torchvision
    vit = torchvision.models.vit_b_16()
    assert default_layers("vit_b_16", vit) == [f"encoder.layers.encoder_layer_{i}.mlp"
                                                for i in (0, 3, 6, 8, 11)]
    swin = torchvision.models.swin_t()
    assert default_layers("swin_t", swin) == ["features.1.0", "features.3.1", "features.5.2",
                                              "features.5.4", "features.7.1"]
    convnext = torchvision.models.convnext_tiny()
    assert default_layers("convnext_tiny", convnext) == ["features.1.0", "features.3.1",
                                                         "features.5.2", "features.5.7",
                                                         "features.7.2"]
    with caplog.at_level(logging.WARNING):
        assert default_layers("tiny", tiny_vit()) == ["encoder.layers.encoder_layer_0.mlp",
                                                      "encoder.layers.encoder_layer_1.mlp"]
    assert "only 2 layer(s)" in caplog.text and "python -m tools.layers tiny" in caplog.text


def test_ablation_of_a_tuple_output():
    """Attention modules return (output, weights): the channel is zeroed in the output, in every
    token, and the module's output stays a tuple."""
    model = tiny_vit()
    layer = "encoder.layers.encoder_layer_0.self_attention"
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad(), ablate_channels(model, {layer: [1]}), \
            record_outputs(model, [layer]) as after:
        model(x)
    assert after[layer].shape == (1, 17, 16) and after[layer][..., 1].abs().sum() == 0
