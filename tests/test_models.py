"""common/models.py: every way of naming a model, safe loading, default layers, class names."""
import numpy as np
import pytest
import torch

from common.cli import StageError
from common.models import get_module, load_model
from conftest import FAKE_MODEL
from fake_model import FakeNet


def coffee_top5(bundle) -> list[str]:
    """The model's five best classes for scikit-image's coffee photo, prepared as 01 does."""
    import skimage.data
    from PIL import Image

    from common.images import network_input, to_tensor
    x = to_tensor(network_input(Image.fromarray(skimage.data.coffee()), bundle.input_size),
                  bundle.mean, bundle.std)
    with torch.no_grad():
        return [bundle.class_names[i] for i in bundle.model(x[None]).topk(5).indices[0].tolist()]


def test_offline_default_is_a_trained_imagenet_classifier():
    """EfficientNet-Lite0's shipped weights recognise the coffee photo of scikit-image."""
    bundle = load_model(device="cpu")
    assert bundle.name == "efficientnet_lite0" and bundle.mean == (0.5, 0.5, 0.5)
    assert len(bundle.class_names) == 1000
    assert bundle.default_layers == ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.8",
                                     "_blocks.15"]
    assert "espresso" in coffee_top5(bundle)


def test_torchvision_random_init_needs_the_flag(monkeypatch):
    """Without weights and without network the error says how to provide weights."""
    import torchvision

    def offline(*_args, **kwargs):
        if kwargs.get("weights") is not None:
            raise OSError("no network")
        return torchvision.models.resnet18()
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(StageError, match="WEIGHTS=.*RANDOM_INIT=1"):
        load_model("resnet18", device="cpu")
    bundle = load_model("resnet18", random_init=True, device="cpu")
    assert bundle.spec["random_init"] is True
    assert bundle.default_layers == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert len(bundle.class_names) == 1000


def test_weights_file_is_loaded_safely(tmp_path):
    """A state dict (bare or wrapped, with DataParallel prefixes) is copied into the model."""
    source = FakeNet()
    with torch.no_grad():
        source.fc.bias.fill_(7.0)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "w.pth")
    bundle = load_model(FAKE_MODEL, weights=str(tmp_path / "w.pth"), device="cpu")
    assert torch.equal(bundle.model.fc.bias, torch.full((3,), 7.0))

    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(StageError, match="do not fit"):
        load_model(FAKE_MODEL, weights=str(tmp_path / "bad.pth"), device="cpu")


def test_whole_checkpoint_needs_opt_in(tmp_path):
    """A pickled model is refused by the safe loader and accepted with unsafe_pickle."""
    torch.save(FakeNet(), tmp_path / "model.pt")
    with pytest.raises(StageError, match="unsafe-pickle"):
        load_model(str(tmp_path / "model.pt"), device="cpu")
    bundle = load_model(str(tmp_path / "model.pt"), unsafe_pickle=True, device="cpu")
    assert isinstance(bundle.model, FakeNet) and bundle.class_names is None


def test_factory_model_default_layers_and_missing_file(tmp_path):
    """A factory model gets evenly spaced conv layers; a missing factory file is a clear error."""
    bundle = load_model(FAKE_MODEL, device="cpu")
    assert bundle.default_layers == ["conv1", "conv2"]
    with pytest.raises(StageError, match="does not exist"):
        load_model(str(tmp_path / "nope.py") + ":build", device="cpu")


def test_factory_file_with_a_dataclass_loads(tmp_path):
    """A factory file with postponed annotations and a dataclass (a config object) loads: the
    file's module is registered before it runs, as dataclasses look it up."""
    factory = tmp_path / "my_net.py"
    factory.write_text("from __future__ import annotations\n"
                       "from dataclasses import dataclass\n\n"
                       "import torch.nn as nn\n\n\n"
                       "@dataclass\nclass Config:\n    width: int = 4\n\n\n"
                       "def build():\n"
                       "    c = Config()\n"
                       "    return nn.Sequential(nn.Conv2d(3, c.width, 3), nn.ReLU(), "
                       "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c.width, 2))\n")
    bundle = load_model(f"{factory}:build", device="cpu", random_init=True)
    assert isinstance(bundle.model[0], torch.nn.Conv2d) and bundle.model[0].out_channels == 4


def test_vgg_default_layers_close_each_stage():
    """VGG: the ReLU just before each max-pool (five resolution stages)."""
    bundle = load_model("vgg11", random_init=True, device="cpu")
    modules = dict(bundle.model.named_modules())
    assert len(bundle.default_layers) == 5
    for name in bundle.default_layers:
        index = int(name.split(".")[1])
        assert isinstance(modules[name], torch.nn.ReLU)
        assert isinstance(modules[f"features.{index + 1}"], torch.nn.MaxPool2d)


def test_unknown_layer_lists_names():
    """get_module names the valid choices."""
    model = FakeNet()
    assert get_module(model, "conv2") is model.conv2
    with pytest.raises(StageError, match="conv1, relu1, pool"):
        get_module(model, "conv3")


def test_class_names_match_torchvision():
    """The shipped ImageNet names are torchvision's, in the same order."""
    import torchvision
    from common.imagenet import class_names, synsets
    expected = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert class_names() == expected
    assert synsets()[0] == "n01440764" and len(set(synsets())) == 1000
    assert np.all([s.startswith("n") for s in synsets()])


def test_grey_model_channels_mean_std_and_its_class_attribute(tmp_path):
    """The first convolution decides grey input; one MEAN value serves it, three are an error
    naming MEAN; a model's own ``classes`` attribute names its outputs."""
    from fake_grey_model import build
    bundle = load_model(f"{FAKE_MODEL.rsplit('/', 1)[0]}/fake_grey_model.py:build", device="cpu",
                        input_size=32, mean=(0.2,), std=(0.25,))
    assert bundle.channels == 1 and bundle.mean == (0.2,) and bundle.n_outputs == 4
    assert bundle.preprocess == {"input_size": 32, "mean": [0.2], "std": [0.25], "channels": 1}
    with pytest.raises(StageError, match=r"MEAN has 3 values .* 1 input channel \(grey\)"):
        load_model(f"{FAKE_MODEL.rsplit('/', 1)[0]}/fake_grey_model.py:build", device="cpu",
                   input_size=32, mean=(0.2, 0.2, 0.2), std=(0.25,))
    model = build()
    model.classes = ["a", "b", "c", "d"]
    torch.save(model, tmp_path / "grey.pt")
    named = load_model(str(tmp_path / "grey.pt"), unsafe_pickle=True, device="cpu", input_size=32)
    assert named.class_names == ["a", "b", "c", "d"] and named.mean == (0.449,)


def test_class_file_text_and_csv_and_count_check(tmp_path):
    """CLASSES as text lines or index,name rows (any order, header or not); a count that differs
    from the model's outputs is an error."""
    from common.classes import read_class_file
    (tmp_path / "c.txt").write_text("red\nedgy\nneither\n\n")
    (tmp_path / "c.csv").write_text("index,name\n2,neither\n0,red\n1,edgy\n")
    assert read_class_file(tmp_path / "c.txt") == read_class_file(tmp_path / "c.csv") == \
        ["red", "edgy", "neither"]
    bundle = load_model(FAKE_MODEL, device="cpu", input_size=32, classes=str(tmp_path / "c.csv"))
    assert bundle.class_names == ["red", "edgy", "neither"]
    (tmp_path / "two.txt").write_text("red\nedgy\n")
    with pytest.raises(StageError, match="names 2 classes but the model has 3 outputs"):
        load_model(FAKE_MODEL, device="cpu", input_size=32, classes=str(tmp_path / "two.txt"))
    (tmp_path / "same.txt").write_text("Ankle boot\nankle_boot\nx\n")
    with pytest.raises(StageError, match="alike"):
        read_class_file(tmp_path / "same.txt")


def test_torchvision_checkpoint_gets_the_architectures_layers(tmp_path):
    """A whole pickled ResNet gets the layers `MODEL=resnet18` gets, and ImageNet's mean/std."""
    import torchvision
    torch.save(torchvision.models.resnet18(), tmp_path / "r18.pt")
    bundle = load_model(str(tmp_path / "r18.pt"), unsafe_pickle=True, device="cpu")
    assert bundle.default_layers == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert bundle.mean == (0.485, 0.456, 0.406) and bundle.input_size == 224


def test_checkpoint_whose_class_cannot_be_imported_says_how(tmp_path, monkeypatch):
    """A pickled model of a class in a module that is not importable: PYTHONPATH or file.py:factory."""
    import sys
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "gone_net.py").write_text(
        "from torch import nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.conv = nn.Conv2d(3, 2, 3)\n\n"
        "    def forward(self, x):\n        return self.conv(x).mean((2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    import gone_net
    torch.save(gone_net.Net(), tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "gone_net")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "src")])
    with pytest.raises(StageError, match=r"PYTHONPATH.*file\.py:factory"):
        load_model(str(tmp_path / "net.pt"), unsafe_pickle=True, device="cpu")


def test_efficientnet_lite2_ships_offline_with_its_size():
    """MODEL=efficientnet_lite2: shipped weights, 260 px, mean = std = 0.5, one layer per stage;
    it recognises scikit-image's coffee photo."""
    bundle = load_model("efficientnet_lite2", device="cpu")
    assert bundle.input_size == 260 and bundle.mean == (0.5, 0.5, 0.5)
    assert bundle.default_layers == ["_blocks.0", "_blocks.3", "_blocks.6", "_blocks.11",
                                     "_blocks.20"]
    assert "espresso" in coffee_top5(bundle)
