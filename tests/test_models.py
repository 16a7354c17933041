"""common/models.py: every way of naming a model, safe loading, default layers, class names."""
import numpy as np
import pytest
import torch

from common.cli import StageError
from common.models import get_module, load_model
from conftest import FAKE_MODEL
from fake_model import FakeNet


def test_offline_default_is_a_trained_imagenet_classifier():
    """EfficientNet-Lite0's shipped weights recognise the coffee photo of scikit-image."""
    import skimage.data
    from PIL import Image

    from common.images import network_input, to_tensor
    bundle = load_model(device="cpu")
    assert bundle.name == "efficientnet_lite0" and bundle.mean == (0.5, 0.5, 0.5)
    assert len(bundle.class_names) == 1000
    assert bundle.default_layers == ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.8",
                                     "_blocks.15"]
    x = to_tensor(network_input(Image.fromarray(skimage.data.coffee()), 224), bundle.mean,
                  bundle.std)
    with torch.no_grad():
        top5 = bundle.model(x[None]).topk(5).indices[0].tolist()
    assert bundle.class_names.index("espresso") in top5


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
