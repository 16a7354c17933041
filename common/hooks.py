"""Forward hooks as context managers (always removed, even when the forward pass fails), and the
layouts of layer outputs: where the channel axis is and which axes are positions.

A hook sees a layer's output at the moment the layer returns. Torch code often changes that tensor
in place afterwards (``out += identity`` in ResNet blocks, ``ReLU(inplace=True)``), so hooks here
either reduce the output immediately (``reduce_outputs``) or keep a copy (``record_outputs``).

Layouts (``Layout``, ``infer_layout``). A neuron is a channel; its positions are the cells of a grid
on the input image. Four output shapes are read:

- ``grid``: ``(B, C, H, W)``, a convolution's feature map;
- ``channels_last``: ``(B, H, W, C)``, as inside Swin and other transformer stages;
- ``tokens``: ``(B, N, C)``, a ViT block: ``prefix`` leading tokens (the class token first, then
  e.g. a distillation token) and ``N - prefix`` patch tokens in row-major order on the patch grid;
- ``vector``: ``(B, C)``, one position per channel (read only for the classifier's output).

Which of ``(B, C, H, W)`` and ``(B, H, W, C)`` an output is follows from which pair of axes has the
input's aspect ratio (feature maps shrink both sides by the same stride); when both pairs do (as
many channels as cells per side), a LayerNorm, Linear or Swin module is taken as channels-last;
when neither does, the output is read as ``(B, C, H, W)``, as for any CNN.
The patch grid of tokens comes from the model's ``patch_size`` attribute or its first convolution
whose kernel equals its stride (the patch embedding), else from the square number of tokens.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from common.cli import StageError
from common.models import get_module, module_names

log = logging.getLogger(__name__)


GRID, CHANNELS_LAST, TOKENS, VECTOR = "grid", "channels_last", "tokens", "vector"
MAX_PREFIX = 8  # most non-patch tokens (class, distillation, register tokens) ahead of the patches


@dataclass(frozen=True)
class Layout:
    """How one layer's output holds its channels and positions (see the module docstring)."""

    kind: str                  # grid | channels_last | tokens | vector
    channels: int
    grid: tuple[int, int]      # positions per column and row: (H, W), the patch grid for tokens
    prefix: int = 0            # tokens: leading non-patch tokens; the first is the class token
    patch: str = ""            # tokens: where the patch grid came from, said in the log

    @property
    def channel_axis(self) -> int:
        """Axis of the channels in the output tensor."""
        return 1 if self.kind in (GRID, VECTOR) else -1

    @property
    def has_class_token(self) -> bool:
        """True for tokens with a class token (the first of the prefix tokens)."""
        return self.kind == TOKENS and self.prefix > 0

    def to_grid(self, out: torch.Tensor) -> torch.Tensor:
        """The output as ``(B, C, H, W)`` over its positions: patch tokens only, on their grid."""
        height, width = self.grid
        if self.kind == VECTOR:
            return out[:, :, None, None]
        if self.kind == CHANNELS_LAST:
            return out.permute(0, 3, 1, 2)
        if self.kind == TOKENS:
            return out[:, self.prefix:].transpose(1, 2).reshape(out.shape[0], self.channels,
                                                                 height, width)
        return out

    def class_token(self, out: torch.Tensor) -> torch.Tensor | None:
        """The class token's ``(B, C)`` values, or None without one."""
        return out[:, 0] if self.has_class_token else None

    def per_channel(self, out: torch.Tensor) -> torch.Tensor:
        """The output as ``(B, C, P)`` over every position it has (class token included)."""
        moved = out.movedim(self.channel_axis, 1)
        return moved.reshape(moved.shape[0], moved.shape[1], -1)

    def describe(self) -> str:
        """One phrase for the log: the layout and its grid."""
        height, width = self.grid
        if self.kind == TOKENS:
            extra = f" after {self.prefix} leading token(s), the first kept as class token" \
                if self.prefix else ", no class token"
            return f"tokens on a {height}×{width} patch grid{extra} ({self.patch})"
        return f"{self.kind} {height}×{width}"

    def as_dict(self) -> dict:
        """The layout as JSON-ready values (01's metadata, key ``layouts``)."""
        values = asdict(self)
        values["grid"] = list(self.grid)
        return values


def _fits(height: int, width: int, image_hw: tuple[int, int]) -> bool:
    """True when a ``height`` × ``width`` grid has the image's aspect ratio, to within one cell,
    and is no larger than the image."""
    img_h, img_w = image_hw
    return 1 <= height <= img_h and 1 <= width <= img_w and \
        abs(height * img_w - width * img_h) <= max(img_h, img_w)


def _looks_channels_last(module: nn.Module | None) -> bool:
    """Tie-break for a square ``(B, C, C, C)``-like output: modules that act on the last axis."""
    return module is not None and (isinstance(module, (nn.LayerNorm, nn.Linear))
                                   or "swin" in type(module).__name__.lower()
                                   or type(module).__name__ == "Permute")


def patch_side(model: nn.Module) -> int | None:
    """Patch side of a ViT-like model in input pixels: its ``patch_size`` attribute, else the first
    convolution whose kernel equals its stride (a patch embedding); None when neither exists."""
    size = getattr(model, "patch_size", None)
    if isinstance(size, (tuple, list)) and size:
        size = size[0]
    if isinstance(size, int) and size > 0:
        return size
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kernel, stride = module.kernel_size[0], module.stride[0]
            return kernel if kernel == stride and kernel > 1 else None
    return None


def infer_layout(shape: Sequence[int], image_hw: tuple[int, int], module: nn.Module | None = None,
                 patch: int | None = None) -> Layout | None:
    """The layout of an output of ``shape`` for an input image of ``image_hw`` (H, W); None when
    the shape is none of those read (see the module docstring). ``patch`` is the model's patch
    side (``patch_side``) for token outputs."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 2:
        return Layout(VECTOR, shape[1], (1, 1))
    if len(shape) == 4:
        first, last = _fits(shape[2], shape[3], image_hw), _fits(shape[1], shape[2], image_hw)
        if first and (not last or not _looks_channels_last(module)):
            return Layout(GRID, shape[1], (shape[2], shape[3]))
        if last:
            return Layout(CHANNELS_LAST, shape[3], (shape[1], shape[2]))
        return Layout(GRID, shape[1], (shape[2], shape[3]))  # read as 01 always read 4-D maps
    if len(shape) == 3:
        return _token_layout(shape[1], shape[2], image_hw, patch)
    return None


def _token_layout(n_tokens: int, channels: int, image_hw: tuple[int, int],
                  patch: int | None) -> Layout | None:
    """Layout of ``(B, n_tokens, channels)``: the patch grid from ``patch`` when the model has
    one (None when the token count does not fit it), else the square grid that leaves the fewest
    (at most MAX_PREFIX) leading tokens."""
    if patch:
        grid = (image_hw[0] // patch, image_hw[1] // patch)
        prefix = n_tokens - grid[0] * grid[1]
        if 0 <= prefix <= MAX_PREFIX:
            return Layout(TOKENS, channels, grid, prefix, f"{patch}-px patches of a "
                                                          f"{image_hw[0]}×{image_hw[1]} input")
        return None
    for prefix in range(0, MAX_PREFIX + 1):
        side = math.isqrt(max(n_tokens - prefix, 0))
        if side > 1 and side * side == n_tokens - prefix and _fits(side, side, image_hw):
            return Layout(TOKENS, channels, (side, side), prefix,
                          f"square grid from the token count {n_tokens}")
    return None


def _shape_of(out) -> tuple[int, ...]:
    """An output's shape; () for an output that is not a tensor (never readable)."""
    return tuple(out.shape) if isinstance(out, torch.Tensor) else ()


def probe_shapes(model: nn.Module, layer_names: Sequence[str]):
    """Context manager yielding a dict filled with each layer's output shape at a forward pass
    (quietly: a module run several times, common among all modules, is no concern here)."""
    return reduce_outputs(model, layer_names, _shape_of, warn_repeats=False)


def probe_layouts(model: nn.Module, layer_names: Sequence[str], image_hw: tuple[int, int],
                  channels: int = 3, shapes: Mapping[str, tuple] | None = None
                  ) -> dict[str, tuple[tuple[int, ...], Layout | None]]:
    """Each layer's output shape on a blank image and its layout (None: not readable); layers
    that never run are left out. ``shapes`` recorded on such an image at this size (a
    ``ModelBundle``'s) spare the forward pass when they cover every layer."""
    if not shapes or any(name not in shapes for name in layer_names):
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        with probe_shapes(model, layer_names) as shapes, torch.inference_mode():
            model(torch.zeros(1, channels, *image_hw, device=device))
    patch = patch_side(model)
    return {name: (shapes[name],
                   infer_layout(shapes[name], image_hw, get_module(model, name), patch))
            for name in layer_names if name in shapes}


def readable(layout: Layout | None, n_outputs: int | None) -> bool:
    """True for a layout stage 01 reads: any grid, channels-last or token layout, and a vector
    only when it is the classifier's output (one neuron per class, for 09's final-layer
    benchmark): a hidden vector has no positions, so no crop could show what a neuron sees."""
    return layout is not None and (layout.kind != VECTOR or layout.channels == n_outputs)


def read_layouts(model: nn.Module, layer_names: Sequence[str], image_hw: tuple[int, int],
                 channels: int = 3, n_outputs: int | None = None,
                 shapes: Mapping[str, tuple] | None = None) -> dict[str, Layout]:
    """The layout of each named layer, logged; a layer whose output cannot be read stops with one
    line naming it, its shape and layers that can be read. ``shapes``: as for ``probe_layouts``."""
    probed = probe_layouts(model, layer_names, image_hw, channels, shapes)
    for name in layer_names:
        if name not in probed:
            raise StageError(f"layer {name!r} never runs in the model's forward pass; choose a "
                             f"layer that does")
        shape, layout = probed[name]
        if not readable(layout, n_outputs):
            raise StageError(
                f"layer {name!r} gives a {tuple(shape)} output, which 01 cannot read as neurons "
                f"with positions (it reads (B, C, H, W), (B, H, W, C), (B, tokens, C) and the "
                f"classifier's (B, classes)). Layers it can read include: "
                f"{', '.join(readable_menu(model, image_hw, channels, n_outputs, shapes))} "
                f"(all of them: "
                f"python -m tools.layers MODEL)")
        log.info("layer %s: output %s read as %s", name, tuple(shape), layout.describe())
    return {name: probed[name][1] for name in layer_names}


def readable_menu(model: nn.Module, image_hw: tuple[int, int], channels: int,
                  n_outputs: int | None, shapes: Mapping[str, tuple] | None = None,
                  at_most: int = 12) -> list[str]:
    """Up to ``at_most`` readable layers spread evenly over the model, shallow names first."""
    names = [n for n, (_, layout) in probe_layouts(model, module_names(model), image_hw,
                                                   channels, shapes).items()
             if readable(layout, n_outputs)]
    shallow = min((n.count(".") for n in names), default=0)
    names = [n for n in names if n.count(".") <= shallow + 2] or names
    step = max(1, math.ceil(len(names) / at_most))
    return names[::step][:at_most]


def output_layouts(model: nn.Module, shapes: Mapping[str, Sequence[int]],
                   image_hw: tuple[int, int]) -> dict[str, Layout]:
    """The layout of each named layer's output of ``shapes`` for an input of ``image_hw``; a shape
    none of the layouts reads falls back to channels on axis 1 (a grid of whatever follows)."""
    patch = patch_side(model)
    layouts = {}
    for name, shape in shapes.items():
        layout = infer_layout(shape, image_hw, get_module(model, name), patch)
        layouts[name] = layout or Layout(GRID, int(shape[1]), (1, 1))
    return layouts


@contextlib.contextmanager
def reduce_outputs(model: nn.Module, layer_names: Sequence[str],
                   reducer: Callable[[torch.Tensor], object] | Mapping[str, Callable],
                   warn_repeats: bool = True) -> Iterator[dict[str, object]]:
    """Yield a dict that holds ``reducer(output)`` of each layer for the latest forward pass.

    ``reducer`` (one function, or one per layer name) runs inside the hook, before any later
    in-place change to the output. A module
    called several times in one forward (a ReLU shared inside a block) keeps its last call and a
    warning is logged (unless ``warn_repeats`` is False), since "the output of that layer" is then
    ambiguous.
    """
    results: dict[str, object] = {}
    calls: dict[str, int] = {}
    warned: set[str] = set()
    handles = []

    def make_hook(name: str):
        """Hook that stores the reduction of ``name``'s output."""
        reduce = reducer[name] if isinstance(reducer, Mapping) else reducer

        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            calls[name] = calls.get(name, 0) + 1
            if warn_repeats and calls[name] == 2 and name not in warned:
                warned.add(name)
                log.warning("layer %s runs more than once per forward pass; its last call is used",
                            name)
            results[name] = reduce(output)
        return hook

    try:
        for name in layer_names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))

        # A new forward pass starts: forget how often each layer ran in the previous one.
        handles.append(model.register_forward_pre_hook(lambda _m, _i: calls.clear()))
        yield results
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record_outputs(model: nn.Module, layer_names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict filled with a detached copy of each layer's output at every forward pass."""
    with reduce_outputs(model, layer_names, lambda out: out.detach().clone()) as results:
        yield results


@contextlib.contextmanager
def ablate_channels(model: nn.Module, channels: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Zero the given output channels of the given layers for as long as the block runs: at every
    position of a feature map and in every token (class token included), whatever the layout."""
    handles = []
    image_hw: list[tuple[int, int]] = []
    patch = patch_side(model)

    def make_hook(index: torch.Tensor):
        """Hook returning a copy of the output with ``index`` channels set to zero (of the first
        element of a tuple output, as ``reduce_outputs`` reads it)."""
        def hook(module, _inputs, output):
            if isinstance(output, tuple):
                return (hook(module, _inputs, output[0]), *output[1:])
            layout = infer_layout(output.shape, image_hw[-1], module, patch) if image_hw else None
            axis = layout.channel_axis if layout is not None else 1
            output = output.clone()
            output.index_fill_(axis % output.ndim, index.to(output.device), 0)
            return output
        return hook

    def remember_input(_model, inputs):
        """Keep the input image's (H, W): it decides which axis of a 4-D output is the channel."""
        image = inputs[0] if inputs else None
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            image_hw[:] = [tuple(image.shape[-2:])]

    try:
        handles.append(model.register_forward_pre_hook(remember_input))
        for name, chans in channels.items():
            if len(chans):
                index = torch.as_tensor(list(chans), dtype=torch.long)
                handles.append(get_module(model, name).register_forward_hook(make_hook(index)))
        yield
    finally:
        for handle in handles:
            handle.remove()
