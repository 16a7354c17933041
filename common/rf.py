"""Receptive fields of chosen layers of a PyTorch CNN, and the input-pixel box of one feature cell.

Conventions (used by every function here and by ``L/rf`` in ``01_activations.npz``):

- Coordinates are input-pixel indices of the network input; pixel ``i`` has its centre at ``i``
  (it covers ``[i - 0.5, i + 0.5)``).
- ``size``: extent of the field in input pixels. ``jump``: distance in input pixels between two
  adjacent feature cells (the product of the strides). ``start``: the coordinate of the centre of the
  field of feature cell ``(0, 0)``; it can be negative (padding) or end in .5 (even-sized fields).
- Feature cell ``(y, x)`` therefore sees the pixel rows ``start_h + y * jump_h ± (size_h - 1) / 2``
  (both ends included) and likewise for columns; ``common.fields.crop_box`` turns that into a
  clipped box.
- Sizes are the theoretical ones and are not clipped: deep layers can see more than the input.

How the values are computed. The model runs once on a blank input wrapped in a tensor subclass
whose ``__torch_dispatch__`` carries a field through every ATen operation, so whatever Python the
model's ``forward`` runs (control flow, "same"-padding computed from shapes with ``F.pad``, custom
autograd functions) is followed exactly. Per operation:

- convolution and max / average pooling: kernel, stride, padding (asymmetric included) and dilation;
  explicit padding (``nn.ZeroPad2d``, ``F.pad``, reflection / replication) shifts the start.
- element-wise operations (ReLU, ReLU6, SiLU, sigmoid, batch norm, dropout, identity, …) pass the
  field through; normalisations that use per-image statistics (group / layer / instance norm) are
  treated the same way, since they rescale rather than mix in other positions.
- additions, multiplications and concatenations along channels take the union of their inputs'
  fields. With equal jumps the union is exact (its start moves when the branches are offset). With
  different jumps no single (size, jump, start) is exact, so the jump of the coarser branch is kept
  and the size is widened symmetrically until it covers every branch at every cell (a logged bound).
- an input broadcast over space (a 1×1 gate such as squeeze-and-excitation, or a per-channel
  constant) does not widen the field: strictly such a layer sees the whole image, but the pattern it
  responds to lies in its local field, which is what crops should show.
- global / adaptive pooling, spatial means, flattening and linear layers: the result has one cell
  whose field is the union of the fields of all cells of the map they read, i.e. the whole input
  and usually more; its jump is that map's extent. Adaptive pooling that divides the map evenly is
  an ordinary pooling; uneven bins are treated as global along that axis (jump 0). A linear layer
  applied at each position of a channels-last map (as in ConvNeXt) is a 1×1 conv and keeps the field.
- views, permutes, slices (``x[..., ::2]`` doubles the jump) and copies follow the image axes.

Transformer layers (tokens, or a channels-last grid inside Swin-like stages) are not traced:
attention mixes every patch with every other, so their theoretical field is the whole input and
a crop of it would show nothing in particular. Their cells get a *patch field* instead
(``patch_field``): the cell's own patch of the input plus a margin of PATCH_MARGIN of a cell on
each side (at least PATCH_MARGIN_MIN pixels), centred on the patch. It shows where the token sits,
not all it has seen.

A layer whose output went through an operation without a rule (transposed convolution, upsampling,
spatial softmax, …), or a model that cannot run on the wrapped tensor, falls back to
``estimate_receptive_fields``: a gradient probe on a linearised copy of the model; a warning says
the values are estimated.
"""
from __future__ import annotations

import copy
import difflib
import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from common.cli import StageError
from common.fields import RF
from common.models import input_channels

log = logging.getLogger("neuron-atlas.rf")

MENU_DEPTH = 2  # unknown-layer errors list module names up to this many dotted levels
MENU_MAX = 80  # ... and at most this many of them
PATCH_MARGIN = 0.5  # patch fields: margin on each side, as a share of the cell's side ...
PATCH_MARGIN_MIN = 8  # ... and at least this many input pixels (Swin's first cells are 4 px)


def patch_field(grid: tuple[int, int], input_size: int | tuple[int, int]) -> RF:
    """The field given to a cell of a ``grid`` (rows, columns) of patches tiling the input: its
    patch (a cell is input / grid pixels) plus the margin described in the module docstring."""
    height, width = _pair(input_size)
    jump_h, jump_w = height / grid[0], width / grid[1]
    size_h, size_w = (jump + 2 * max(PATCH_MARGIN * jump, PATCH_MARGIN_MIN)
                      for jump in (jump_h, jump_w))
    return RF(size_h, size_w, jump_h, jump_w, (jump_h - 1) / 2, (jump_w - 1) / 2)


def receptive_fields(model: nn.Module, layer_names: Sequence[str], input_size: int | tuple[int, int],
                     channels: int | None = None,
                     patch_grids: dict[str, tuple[int, int]] | None = None) -> dict[str, RF]:
    """Receptive field of each named layer's output for an input of ``input_size`` (side, or (H, W)).

    ``layer_names`` are dotted module names as in ``model.named_modules()``; a module called several
    times in one forward pass is described by its last call (as forward hooks record it). Exact
    analysis as described in the module docstring; layers it cannot follow are estimated with
    ``estimate_receptive_fields`` and a warning. ``channels`` is the number of input channels
    (default: ``common.models.input_channels``, the first ``nn.Conv2d``'s, else 3). The model is
    left as it was (mode included).
    Raises ``StageError`` for an unknown layer name or a layer that the forward pass never runs.
    Layers named in ``patch_grids`` (transformer layers: name → their patch grid) get a
    ``patch_field`` and are not traced.
    """
    names = list(dict.fromkeys(layer_names))
    _check_layer_names(model, names)
    size = _pair(input_size)
    patch_grids = patch_grids or {}
    traced = [name for name in names if name not in patch_grids]
    fields = _trace_fields(model, traced, size, channels) if traced else {}
    fields.update({name: patch_field(grid, size) for name, grid in patch_grids.items()
                   if name in names})
    result: dict[str, RF] = {}
    to_probe = []
    for name in names:
        field = fields.get(name)
        if isinstance(field, RF):
            result[name] = field
        elif isinstance(field, _Field):
            if field.note:
                log.warning("receptive field of %s is a bound, not exact: %s", name, field.note)
            result[name] = field.to_rf()
        else:
            to_probe.append(name)
            log.warning("receptive field of %s estimated with a gradient probe, not computed exactly: %s",
                        name, field.reason)
    if to_probe:
        result.update(estimate_receptive_fields(model, to_probe, size, channels))
    return {name: result[name] for name in names}


def estimate_receptive_fields(model: nn.Module, layer_names: Sequence[str],
                              input_size: int | tuple[int, int], channels: int | None = None) -> dict[str, RF]:
    """Receptive fields measured with a gradient probe: the fallback, and an independent check.

    A float32 copy of the model is linearised so that no gradient cancels or vanishes: element-wise
    activation modules become identities, ``nn.MaxPool2d`` becomes average pooling of the same
    geometry (max pooling passes gradient to one input per window), every weight is set to
    ``1 / fan_in``, biases and norm scales to 1 and batch-norm statistics to (0, 1). On an all-ones
    input, the nonzero input gradient of one feature cell is then exactly its field, as long as the
    field lies inside the input. Size and start come from the centre cell, the jump from the shift of
    its neighbour's field. A field that touches the input border is clipped: its size is then a lower
    bound and a warning says so; probe with a larger ``input_size`` to avoid it. Layers whose output
    has no spatial axes get the whole input. Functional activations left in ``forward`` (``F.relu``
    and the like) stay; on this all-positive input they pass gradient, except ones that saturate.
    The gradient at the far edge of a field shrinks by about 1/k² per k×k layer; float32 (faster than
    float64, several times so for depthwise convolutions) holds that for about 40 stacked 3×3 layers,
    and a warning is logged when the smallest gradient comes near its limit.
    """
    names = list(dict.fromkeys(layer_names))
    _check_layer_names(model, names)
    height, width = _pair(input_size)
    probe = _linearised_copy(model)
    device = _model_device(model)
    image = torch.ones(1, channels or input_channels(model), height, width, dtype=_PROBE_DTYPE,
                       device=device, requires_grad=True)
    outputs = _run_with_hooks(probe, names, image)
    result = {}
    for name in names:
        output = outputs.get(name)
        if output is None:
            raise StageError(f"layer {name!r} never runs in the model's forward pass; choose a layer that does")
        if output.ndim != 4 or not output.requires_grad:
            result[name] = RF(height, width, height, width, (height - 1) / 2, (width - 1) / 2)
            continue
        result[name] = _probe_layer(output, image, name)
    return result


# ---------------------------------------------------------------------------------------------
# Exact propagation through ATen operations.

@dataclass(frozen=True)
class _Span:
    """Field along one axis: ``first`` input pixel seen by cell 0, ``size`` pixels, ``jump`` per cell."""

    first: float
    size: float
    jump: float

    def window(self, kernel: int, stride: int, pad: int, dilation: int) -> "_Span":
        """The span after a sliding window (convolution or pooling) with left/top padding ``pad``."""
        return _Span(self.first - pad * self.jump, self.size + dilation * (kernel - 1) * self.jump,
                     self.jump * stride)

    def whole(self, cells: int) -> "_Span":
        """The span of one cell that reads all ``cells`` cells of this map (global pooling)."""
        return _Span(self.first, self.size + (cells - 1) * self.jump, cells * self.jump)


@dataclass(frozen=True)
class _Field:
    """Receptive field carried by a tensor, and where its image axes are.

    Three layouts: ``axes`` = the tensor dims holding (H, W) (a feature map, any memory order);
    ``packed`` = ``(dim, block, i_h, i_w)`` when a reshape folded the dims ``block`` (which hold H at
    ``i_h`` and W at ``i_w``) into the single dim ``dim``, as ``nn.Linear`` does with channels-last
    maps; both None once the map was flattened or reduced and every value sees every cell.
    ``note`` is non-empty when the spans are a bound rather than exact.
    """

    h: _Span
    w: _Span
    axes: tuple[int, int] | None = None
    packed: tuple[int, tuple[int, ...], int, int] | None = None
    note: str = ""

    def to_rf(self) -> RF:
        """Public form: sizes, jumps and centres of cell (0, 0)."""
        return RF(self.h.size, self.w.size, self.h.jump, self.w.jump,
                  self.h.first + (self.h.size - 1) / 2, self.w.first + (self.w.size - 1) / 2)

    @property
    def image_dims(self) -> set[int]:
        """Tensor dims that carry image position."""
        if self.axes is not None:
            return set(self.axes)
        return {self.packed[0]} if self.packed is not None else set()

    def map_size(self, shape: Sequence[int]) -> tuple[int, int]:
        """Cells along H and W of a tensor of ``shape`` carrying this field ((1, 1) once flattened)."""
        if self.axes is not None:
            return shape[self.axes[0]], shape[self.axes[1]]
        if self.packed is not None:
            _, block, i_h, i_w = self.packed
            return block[i_h], block[i_w]
        return 1, 1

    def renumbered(self, new_dim: Callable[[int], int]) -> "_Field":
        """The same field after an operation that moves tensor dims (``new_dim(old) -> new``)."""
        axes = tuple(new_dim(a) for a in self.axes) if self.axes is not None else None
        packed = (new_dim(self.packed[0]),) + self.packed[1:] if self.packed is not None else None
        return replace(self, axes=axes, packed=packed)

    def flattened(self, shape: Sequence[int]) -> "_Field":
        """The field of anything computed from all cells at once (a flattened or fully reduced map)."""
        n_h, n_w = self.map_size(shape)
        return _Field(self.h.whole(n_h), self.w.whole(n_w), note=self.note)


@dataclass(frozen=True)
class _Lost:
    """The field could not be followed through some operation; ``reason`` says which."""

    reason: str


class _Untraceable(Exception):
    """The wrapped forward pass cannot give correct fields for any layer (e.g. data written into a plain tensor)."""


class _Tracked(torch.Tensor):
    """A tensor wrapper that carries the receptive field of its values through every ATen operation."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor, field):
        """Wrap ``elem`` (a plain tensor) with ``field`` (a ``_Field``, ``_Lost`` or None for constants)."""
        obj = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=elem.device, layout=elem.layout, requires_grad=False)
        obj.elem = elem
        obj.field = field
        return obj

    def __repr__(self):
        """Short description; the default would dispatch operations on the wrapper."""
        return f"_Tracked(shape={tuple(self.shape)}, field={self.field})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        """Run ``func`` on the wrapped tensors and attach the field its output gets."""
        kwargs = kwargs or {}
        if "out" in kwargs:
            raise _Untraceable(f"{func} writes into an out= tensor")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        out_leaves, _ = tree_flatten(out)
        if not any(isinstance(leaf, torch.Tensor) for leaf in out_leaves):
            return out
        field = _propagate(func, args, kwargs, out)
        first_arg = func._schema.arguments[0] if func._schema.arguments else None
        if first_arg is not None and first_arg.alias_info is not None and first_arg.alias_info.is_write:
            target = args[0]
            if isinstance(target, _Tracked):
                target.field = field
                return target
            if field is not None:
                raise _Untraceable(f"{func} writes input-dependent values into a plain tensor")
            return out
        if field is None:
            return out
        return tree_map(lambda t: _Tracked(t, field) if isinstance(t, torch.Tensor) else t, out)


def _unwrap(value):
    """The plain tensor inside a ``_Tracked``; anything else unchanged."""
    return value.elem if isinstance(value, _Tracked) else value


def _field_of(value):
    """The field carried by ``value`` (None for constants and non-tensors)."""
    return value.field if isinstance(value, _Tracked) else None


def _join(*notes: str) -> str:
    """Concatenate distinct non-empty notes."""
    return "; ".join(dict.fromkeys(n for n in notes if n))


def _bind(func, args, kwargs) -> dict:
    """Arguments of an ATen call by schema name, defaults filled in."""
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _pair_list(value, default=None) -> tuple[int, int]:
    """An ATen int-list argument (length 0, 1 or 2, or an int) as an (h, w) pair; ``default``
    stands in for an empty or missing one (a module's attributes never are)."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        value = default
    if isinstance(value, int):
        return value, value
    return value[0], value[-1]  # one number stands for both axes


def _main_input(bound):
    """The tensor an operation acts on (``self`` or ``input``) and its field."""
    x = bound.get("input", bound.get("self"))
    return x, _field_of(x)


def _result(out) -> torch.Tensor:
    """The first tensor of an operation's output."""
    return next(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


def _on_image_axes(x, field, what: str):
    """``_Lost`` unless ``field`` is a feature map whose image axes are ``x``'s last two dims."""
    if not isinstance(field, _Field):
        return field
    if field.axes != (x.ndim - 2, x.ndim - 1):
        return _Lost(f"{what} over a tensor whose last two dims are not the image axes")
    return None


def _window_rule(bound, kernel, stride, padding, dilation, what: str):
    """Field after a 2-D sliding window (convolution or pooling) over the main input."""
    x, field = _main_input(bound)
    problem = _on_image_axes(x, field, what)
    if problem is not None:
        return problem
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    return replace(field, h=field.h.window(kh, sh, ph, dh), w=field.w.window(kw, sw, pw, dw))


def _rule_convolution(func, bound, args, out):
    """``aten.convolution``: kernel from the weight's shape; transposed convolutions are not followed."""
    if bound.get("transposed"):
        return _Lost("transposed convolution")
    weight = bound["weight"]
    if weight.ndim != 4:
        return _Lost(f"{weight.ndim - 2}-D convolution")
    return _window_rule(bound, tuple(weight.shape[-2:]), _pair_list(bound["stride"], 1),
                        _pair_list(bound["padding"], 0), _pair_list(bound["dilation"], 1), "convolution")


def _rule_pool(func, bound, args, out):
    """Max / average pooling (``max_pool2d[_with_indices]``, ``avg_pool2d``); empty stride means kernel."""
    kernel = _pair_list(bound["kernel_size"], 1)
    return _window_rule(bound, kernel, _pair_list(bound.get("stride"), kernel),
                        _pair_list(bound.get("padding"), 0), _pair_list(bound.get("dilation"), 1), "pooling")


def _rule_pad(func, bound, args, out):
    """Explicit padding: pairs in the argument run from the last dim backwards; left/top pads shift the start."""
    x, field = _main_input(bound)
    if not isinstance(field, _Field):
        return field
    pads = list(bound.get("pad", bound.get("padding")))
    touched = {x.ndim - 1 - i for i in range(len(pads) // 2)}
    if field.axes is None:
        lost = touched & field.image_dims
        return _Lost("padding of the dim that holds the flattened image positions") if lost else field
    spans = []
    for axis, span in zip(field.axes, (field.h, field.w)):
        pair = x.ndim - 1 - axis
        before = pads[2 * pair] if 2 * pair < len(pads) else 0
        spans.append(_Span(span.first - before * span.jump, span.size, span.jump))
    return replace(field, h=spans[0], w=spans[1])


def _rule_adaptive_pool(func, bound, args, out):
    """Adaptive pooling: identity, an even pooling, or global along an axis with uneven bins."""
    x, field = _main_input(bound)
    problem = _on_image_axes(x, field, "adaptive pooling")
    if problem is not None:
        return problem
    result = _result(out)
    spans, note = [], field.note
    for axis, span in zip(field.axes, (field.h, field.w)):
        n_in, n_out = x.shape[axis], result.shape[axis]
        if n_in == n_out:
            spans.append(span)
        elif n_in % n_out == 0:
            step = n_in // n_out
            spans.append(span.window(step, step, 0, 1))
        else:
            whole = span.whole(n_in)
            spans.append(_Span(whole.first, whole.size, 0.0))
            note = _join(note, f"adaptive pooling {n_in}→{n_out} has uneven bins; treated as global")
    return replace(field, h=spans[0], w=spans[1], note=note)


def _rule_reduction(func, bound, args, out):
    """Reductions (mean, sum, max, …): over the image axes they make the field global."""
    if "other" in bound:
        return _rule_pointwise(func, bound, args, out)
    x, field = _main_input(bound)
    if not isinstance(field, _Field):
        return field
    dims = bound.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return field.flattened(x.shape)
    dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)}
    reduced = dims & field.image_dims
    keepdim = bool(bound.get("keepdim", False))
    if reduced and reduced != field.image_dims:
        return _Lost("reduction over one image axis only")
    if reduced and keepdim and field.axes is not None:
        n_h, n_w = field.map_size(x.shape)
        return replace(field, h=field.h.whole(n_h), w=field.w.whole(n_w))
    if reduced:
        return field.flattened(x.shape)
    return field if keepdim else field.renumbered([d for d in range(x.ndim) if d not in dims].index)


def _same_dims(a: Sequence[int], b: Sequence[int]) -> bool:
    """Shape prefixes / suffixes compare equal."""
    return tuple(a) == tuple(b)


def _track_reshape(field, in_shape: Sequence[int], out_shape: Sequence[int]):
    """Where the image axes end up after a reshape from ``in_shape`` to ``out_shape``.

    They are found when the dims before and after them are unchanged (leading or trailing dims may be
    added or removed), when a reshape folds a run of dims holding both image axes into one dim
    (packed), or unfolds such a packed dim again; anything else flattens the field.
    """
    if not isinstance(field, _Field) or not field.image_dims:
        return field
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    low, high = min(field.image_dims), max(field.image_dims)
    shift = len(out_shape) - len(in_shape)
    if len(out_shape) > high and _same_dims(in_shape[:high + 1], out_shape[:high + 1]):
        return field
    if low + shift >= 0 and _same_dims(in_shape[low:], out_shape[low + shift:]):
        return field.renumbered(lambda d: d + shift)
    if field.packed is not None:
        dim, block, i_h, i_w = field.packed
        width = len(block)
        if (_same_dims(out_shape[:dim], in_shape[:dim]) and _same_dims(out_shape[dim:dim + width], block)
                and _same_dims(out_shape[dim + width:], in_shape[dim + 1:])):
            return replace(field, axes=(dim + i_h, dim + i_w), packed=None)
    else:
        for first in range(low + 1):
            for last in range(high, len(in_shape)):
                if (len(out_shape) == len(in_shape) - (last - first) and _same_dims(out_shape[:first], in_shape[:first])
                        and out_shape[first] == math.prod(in_shape[first:last + 1])
                        and _same_dims(out_shape[first + 1:], in_shape[last + 1:])):
                    packed = (first, in_shape[first:last + 1], field.axes[0] - first, field.axes[1] - first)
                    return replace(field, axes=None, packed=packed)
    return field.flattened(in_shape)


def _rule_reshape(func, bound, args, out):
    """Views, copies, re-strides and reshapes: the image axes are followed by shape."""
    x, field = _main_input(bound)
    return _track_reshape(field, x.shape, _result(out).shape)


def _rule_expand(func, bound, args, out):
    """``expand``: leading dims shift the axes; an image axis broadcast from 1 gives every cell one field (jump 0)."""
    x, field = _main_input(bound)
    if not isinstance(field, _Field) or not field.image_dims:
        return field
    shift = out.ndim - x.ndim
    moved = field.renumbered(lambda d: d + shift)
    if moved.axes is None:
        return moved
    spans = []
    for old, new, span in zip(field.axes, moved.axes, (field.h, field.w)):
        grown = x.shape[old] == 1 and out.shape[new] != 1
        spans.append(_Span(span.first, span.size, 0.0) if grown else span)
    return replace(moved, h=spans[0], w=spans[1])


def _rule_permute(func, bound, args, out):
    """``permute`` / ``transpose`` / ``t``: the image axes move with their dims."""
    x, field = _main_input(bound)
    if not isinstance(field, _Field) or not field.image_dims:
        return field
    name = func._schema.name.partition("::")[2]
    if name == "permute":
        order = [d % x.ndim for d in bound["dims"]]
    else:
        order = list(range(x.ndim))
        d0, d1 = (0, 1) if name in ("t", "t_") else (bound["dim0"] % x.ndim, bound["dim1"] % x.ndim)
        order[d0], order[d1] = order[d1], order[d0]
    return field.renumbered(order.index)


def _rule_slice(func, bound, args, out):
    """``slice`` (``x[..., a:b:s]``): along an image axis it moves the start and multiplies the jump."""
    x, field = _main_input(bound)
    if not isinstance(field, _Field):
        return field
    dim = bound.get("dim", 0) % x.ndim
    if dim not in field.image_dims:
        return field
    if field.axes is None:
        return _Lost("slicing a dim that packs the image axes")
    start = bound.get("start") or 0
    if start < 0:
        start = max(start + x.shape[dim], 0)
    step = bound.get("step") or 1
    span = field.h if dim == field.axes[0] else field.w
    moved = _Span(span.first + start * span.jump, span.size, span.jump * step)
    return replace(field, h=moved) if dim == field.axes[0] else replace(field, w=moved)


def _rule_split(func, bound, args, out):
    """``split`` / ``unbind`` / ``select``: along a non-image dim the field is kept (dims renumbered)."""
    x, field = _main_input(bound)
    if not isinstance(field, _Field):
        return field
    dim = bound.get("dim", 0) % x.ndim
    if dim in field.image_dims:
        return _Lost("splitting or selecting along an image axis")
    if func._schema.name.partition("::")[2] in ("unbind", "select"):
        return field.renumbered(lambda d: d - (dim < d))
    return field


def _union_spans(spans: list[_Span], cells: int) -> tuple[_Span, str]:
    """One span covering every span at every one of ``cells`` cells (exact when the jumps agree)."""
    if len({s.jump for s in spans}) == 1:
        first = min(s.first for s in spans)
        last = max(s.first + s.size - 1 for s in spans)
        return _Span(first, last - first + 1, spans[0].jump), ""
    ref = max(spans, key=lambda s: (s.jump, s.size))
    half = 0.0
    for cell in {0, max(cells - 1, 0)}:
        centre = ref.first + (ref.size - 1) / 2 + cell * ref.jump
        for s in spans:
            lo, hi = s.first + cell * s.jump, s.first + cell * s.jump + s.size - 1
            half = max(half, centre - lo, hi - centre)
    note = f"branches with jumps {sorted({s.jump for s in spans})} merged; the field is a symmetric bound"
    return _Span(ref.first + (ref.size - 1) / 2 - half, 2 * half + 1, ref.jump), note


def _union_fields(items: list[tuple[object, Sequence[int]]], out_shape: Sequence[int]):
    """Union of the fields of tensors (field, shape) combined into one of ``out_shape``.

    Shapes broadcast aligned to the right. Inputs that cover the output's cells one to one are
    merged; inputs broadcast over the image axes (gates, per-channel terms) are left out when there
    are any of the former (module docstring).
    """
    lost = next((f for f, _ in items if isinstance(f, _Lost)), None)
    if lost is not None:
        return lost
    out_shape = tuple(out_shape)
    aligned, gates, flat = [], [], []
    for field, shape in items:
        if not isinstance(field, _Field):
            continue
        shift = len(out_shape) - len(shape)
        moved = field.renumbered(lambda d: d + shift)
        if not field.image_dims:
            (flat if math.prod(shape) == math.prod(out_shape) else gates).append(field)
        elif all(shape[d] == out_shape[d + shift] for d in field.image_dims):
            aligned.append(moved)
        else:
            gates.append(_Field(_Span(field.h.first, field.h.size, 0.0), _Span(field.w.first, field.w.size, 0.0),
                                moved.axes, moved.packed, field.note))
    if aligned and flat:
        return _Lost("a feature map is combined with a tensor whose image axes were lost in a reshape")
    if len({(f.axes, f.packed) for f in aligned}) > 1:
        return _Lost("inputs with their image axes in different dims")
    chosen = aligned or flat or gates
    if not chosen:
        return None
    layout = chosen[0] if len({(f.axes, f.packed) for f in chosen}) == 1 else _Field(chosen[0].h, chosen[0].w)
    n_h, n_w = layout.map_size(out_shape)
    h, note_h = _union_spans([f.h for f in chosen], n_h)
    w, note_w = _union_spans([f.w for f in chosen], n_w)
    return replace(layout, h=h, w=w, note=_join(*(f.note for f in chosen), note_h, note_w))


def _rule_pointwise(func, bound, args, out):
    """Element-wise operations: the union of the inputs that span the output's map (gates left out)."""
    leaves, _ = tree_flatten(list(bound.values()))
    items = [(leaf.field, leaf.shape) for leaf in leaves if isinstance(leaf, _Tracked)]
    return _union_fields(items, _result(out).shape)


def _rule_cat(func, bound, args, out):
    """``cat`` / ``stack``: along a non-image dim, the union of the pieces' fields."""
    stacking = func._schema.name.endswith("stack")
    dim = bound.get("dim", 0) % out.ndim
    items = []
    for piece in bound["tensors"]:
        field, shape = _field_of(piece), tuple(piece.shape)
        if isinstance(field, _Field):
            if stacking:
                field = field.renumbered(lambda d: d + (dim <= d))
                shape = shape[:dim] + (1,) + shape[dim:]
            elif dim in field.image_dims:
                return _Lost("concatenation along an image axis")
            else:
                shape = shape[:dim] + (out.shape[dim],) + shape[dim + 1:]
        items.append((field, shape))
    return _union_fields(items, out.shape)


def _rule_softmax(func, bound, args, out):
    """Softmax over channels is element-wise in space; over an image axis it is not followed."""
    x, field = _main_input(bound)
    if isinstance(field, _Field) and bound["dim"] % x.ndim in field.image_dims:
        return _Lost("softmax over an image axis")
    return field


def _rule_first_input(func, bound, args, out):
    """Normalisations and dropout: the output has the field of the input."""
    return _main_input(bound)[1]


def _rule_dense(func, bound, args, out):
    """Matrix products: rows that hold packed image positions keep them; otherwise everything is merged."""
    rows = bound.get("mat1", bound.get("self"))
    others = [v for k, v in bound.items() if isinstance(v, _Tracked) and v is not rows]
    field = _field_of(rows)
    if (isinstance(field, _Field) and field.packed is not None and field.packed[0] == 0 and rows.ndim == 2
            and all(v.field is None for v in others)):
        return field
    leaves, _ = tree_flatten(list(bound.values()))
    fields = [leaf.field.flattened(leaf.shape) if isinstance(leaf.field, _Field) else leaf.field
              for leaf in leaves if isinstance(leaf, _Tracked)]
    return _union_fields([(f, ()) for f in fields], ())


def _rule_as_strided(func, bound, args, out):
    """``as_strided`` that keeps the shape only changes the memory layout (e.g. to channels-last)."""
    x, field = _main_input(bound)
    if tuple(bound["size"]) == tuple(x.shape):
        return field
    return _Lost("as_strided with a new shape")


def _rule_constant(func, bound, args, out):
    """Factories such as ``zeros_like``: the result does not depend on the input's values."""
    return None


def _rule_copy(func, bound, args, out):
    """``copy_``: the destination takes the source's field."""
    return _field_of(bound["src"])


_RULES: dict[str, Callable] = {
    "convolution": _rule_convolution,
    "max_pool2d": _rule_pool, "max_pool2d_with_indices": _rule_pool, "avg_pool2d": _rule_pool,
    "constant_pad_nd": _rule_pad, "reflection_pad2d": _rule_pad, "replication_pad2d": _rule_pad,
    "_adaptive_avg_pool2d": _rule_adaptive_pool, "adaptive_max_pool2d": _rule_adaptive_pool,
    "mean": _rule_reduction, "sum": _rule_reduction, "amax": _rule_reduction, "amin": _rule_reduction,
    "max": _rule_reduction, "min": _rule_reduction, "var": _rule_reduction, "std": _rule_reduction,
    "prod": _rule_reduction, "logsumexp": _rule_reduction, "norm": _rule_reduction,
    "linalg_vector_norm": _rule_reduction, "var_mean": _rule_reduction, "std_mean": _rule_reduction,
    "view": _rule_reshape, "_unsafe_view": _rule_reshape, "reshape": _rule_reshape,
    "_reshape_alias": _rule_reshape, "squeeze": _rule_reshape, "squeeze_": _rule_reshape,
    "unsqueeze": _rule_reshape, "unsqueeze_": _rule_reshape, "flatten": _rule_reshape,
    "unflatten": _rule_reshape, "alias": _rule_reshape, "detach": _rule_reshape, "clone": _rule_reshape,
    "_to_copy": _rule_reshape, "lift_fresh": _rule_reshape, "contiguous": _rule_reshape,
    "as_strided": _rule_as_strided, "as_strided_": _rule_as_strided,
    "expand": _rule_expand, "permute": _rule_permute, "transpose": _rule_permute, "t": _rule_permute,
    "slice": _rule_slice, "split": _rule_split, "split_with_sizes": _rule_split, "unbind": _rule_split,
    "select": _rule_split,
    "cat": _rule_cat, "stack": _rule_cat,
    "_softmax": _rule_softmax, "_log_softmax": _rule_softmax,
    "native_batch_norm": _rule_first_input, "_native_batch_norm_legit": _rule_first_input,
    "_native_batch_norm_legit_no_training": _rule_first_input, "_batch_norm_with_update": _rule_first_input,
    "_batch_norm_no_update": _rule_first_input, "cudnn_batch_norm": _rule_first_input,
    "miopen_batch_norm": _rule_first_input, "native_group_norm": _rule_first_input,
    "native_layer_norm": _rule_first_input, "native_dropout": _rule_first_input,
    "addmm": _rule_dense, "mm": _rule_dense, "bmm": _rule_dense, "baddbmm": _rule_dense,
    "matmul": _rule_dense, "linear": _rule_dense, "_addmm_activation": _rule_dense,
    "zeros_like": _rule_constant, "ones_like": _rule_constant, "empty_like": _rule_constant,
    "full_like": _rule_constant, "rand_like": _rule_constant, "randn_like": _rule_constant,
    "new_zeros": _rule_constant, "new_ones": _rule_constant, "new_empty": _rule_constant,
    "new_full": _rule_constant, "new_empty_strided": _rule_constant, "fill_": _rule_constant,
    "zero_": _rule_constant,
    "copy_": _rule_copy,
}
# Element-wise operations that ATen does not tag as pointwise.
_ELEMENTWISE = {"hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "_prelu_kernel", "prelu",
                "log_sigmoid_forward", "rrelu_with_noise", "silu", "silu_", "gelu", "gelu_", "mish",
                "mish_", "relu", "relu_", "hardtanh", "hardtanh_", "threshold", "threshold_",
                "leaky_relu", "leaky_relu_", "elu", "elu_", "softplus", "clamp", "clamp_", "where",
                "masked_fill", "masked_fill_"}


def _propagate(func, args, kwargs, out):
    """Field of the output of one ATen call, from its inputs' fields (None when it uses no input)."""
    leaves, _ = tree_flatten((args, kwargs))
    tracked = [leaf for leaf in leaves if isinstance(leaf, _Tracked)]
    if not tracked or all(t.field is None for t in tracked):
        return None
    namespace, _, name = func._schema.name.partition("::")
    rule = None
    if namespace == "aten":
        elementwise = torch.Tag.pointwise in func.tags or name in _ELEMENTWISE
        rule = _rule_pointwise if elementwise else _RULES.get(name)
    if rule is None:
        lost = next((t.field for t in tracked if isinstance(t.field, _Lost)), None)
        return lost or _Lost(f"no receptive-field rule for {func}")
    first = _field_of(args[0]) if args else None
    if isinstance(first, _Lost) and rule is not _rule_constant:
        return first
    return rule(func, _bind(func, args, kwargs), args, out)


def _trace_fields(model: nn.Module, names: list[str], size: tuple[int, int], channels: int | None) -> dict:
    """Run ``model`` once on a wrapped blank input; the field (or ``_Lost``) of each named layer's output."""
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    blank = torch.zeros(1, channels or input_channels(model), *size, dtype=dtype, device=_model_device(model))
    unit = _Span(0.0, 1.0, 1.0)
    try:
        outputs = _run_with_hooks(model, names, _Tracked(blank, _Field(unit, unit, axes=(2, 3))))
    except _Untraceable as err:
        return {name: _Lost(str(err)) for name in names}
    except Exception as err:  # noqa: BLE001 -- any failure of the wrapped run means: use the probe instead
        return {name: _Lost(f"the model does not run on the tracking tensor ({type(err).__name__}: {err})")
                for name in names}
    fields = {}
    for name in names:
        if name not in outputs:
            raise StageError(f"layer {name!r} never runs in the model's forward pass; choose a layer that does")
        value = outputs[name]
        field = value.field if isinstance(value, _Snapshot) else None
        fields[name] = field if field is not None else _Lost("its output does not depend on the input")
    return fields


def _run_with_hooks(model: nn.Module, names: Iterable[str], image: torch.Tensor) -> dict:
    """Forward ``image`` through ``model`` in eval mode; what each named module output at its last call.

    The value is the first output tensor, or for a ``_Tracked`` output a ``_Snapshot`` of its field
    taken at hook time (in-place operations later in the forward pass must not change it). Module
    modes are restored afterwards; gradients are recorded only when ``image`` requires them.
    """
    outputs: dict[str, object] = {}

    def make_hook(name):
        """Forward hook that stores the module's output under ``name``."""
        def hook(module, inputs, output):
            """Keep the latest output; a module called twice is described by its last call."""
            tensor = next((t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)), None)
            outputs[name] = _Snapshot(tensor.field) if isinstance(tensor, _Tracked) else tensor
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in names]
    try:
        model.eval()
        with torch.set_grad_enabled(image.requires_grad):
            model(image)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return outputs


@dataclass(frozen=True)
class _Snapshot:
    """A field recorded at hook time."""

    field: object


# ---------------------------------------------------------------------------------------------
# Gradient probe.

_PROBE_DTYPE = torch.float32
_UNDERFLOW_WARNING = 1e-30  # float32's smallest normal number is 1.2e-38
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid,
                nn.Tanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Dropout,
                nn.Dropout2d)


class _DilatedWindow(nn.Module):
    """A dilated max pool's windows with every input passing gradient: the mean over each window
    as a depthwise convolution (AvgPool2d has no dilation), padded so that the output has the
    pool's size, ``ceil_mode`` included."""

    def __init__(self, pool: nn.MaxPool2d):
        """Take the geometry of ``pool``."""
        super().__init__()
        self.pool = pool
        self.kernel = _pair_list(pool.kernel_size)
        self.stride = _pair_list(pool.stride or pool.kernel_size)  # an empty stride means the kernel
        self.padding = _pair_list(pool.padding)
        self.dilation = _pair_list(pool.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Window means of ``x`` (N, C, H, W) on the pool's grid."""
        out_hw = self.pool(x.detach()).shape[-2:]
        pads = []
        for axis in (1, 0):  # F.pad lists the last axis first: left, right, top, bottom
            k, s, p, d = (self.kernel[axis], self.stride[axis], self.padding[axis],
                          self.dilation[axis])
            needed = (out_hw[axis] - 1) * s + d * (k - 1) + 1
            pads += [p, max(0, needed - x.shape[-2 + axis] - p)]
        channels = x.shape[1]
        weight = torch.full((channels, 1, *self.kernel), 1.0 / (self.kernel[0] * self.kernel[1]),
                            dtype=x.dtype, device=x.device)
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, pads), weight,
                                          stride=self.stride, dilation=self.dilation,
                                          groups=channels)


def _linearised_copy(model: nn.Module) -> nn.Module:
    """A copy in which no input gradient cancels or vanishes (see ``estimate_receptive_fields``)."""
    probe = copy.deepcopy(model).to(_PROBE_DTYPE).eval()
    for name, module in list(probe.named_modules()):
        replacement = None
        if type(module) in _ACTIVATIONS:
            replacement = nn.Identity()
        elif type(module) is nn.MaxPool2d and _pair_list(module.dilation) == (1, 1):
            replacement = nn.AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode)
        elif type(module) is nn.MaxPool2d:
            replacement = _DilatedWindow(module)
        if replacement is not None and name:
            parent_name, _, child = name.rpartition(".")
            setattr(probe.get_submodule(parent_name), child, replacement)
    with torch.no_grad():
        for param in probe.parameters():
            param.requires_grad_(False)
            param.fill_(1.0 / math.prod(param.shape[1:]))  # 1 / fan-in; 1 for biases, scales, scalars
        for module in probe.modules():
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
    return probe


def _extent(grad: torch.Tensor, axis: int) -> tuple[int, int]:
    """First and last index along image ``axis`` (0 = rows) where ``grad`` (N, C, H, W) is nonzero."""
    mask = (grad != 0).any(dim=0).any(dim=0)
    hits = torch.nonzero(mask.any(dim=1 - axis)).flatten()
    return int(hits[0]), int(hits[-1])


def _probe_layer(output: torch.Tensor, image: torch.Tensor, name: str) -> RF:
    """Field of one layer from the input gradients of its centre cell and that cell's diagonal neighbour."""
    n_h, n_w = output.shape[-2:]
    # The centre cell and the next one, or on an axis of two cells the first and the second (the
    # centre would be the last, with no next one to measure the jump from).
    cell = (min(n_h // 2, max(n_h - 2, 0)), min(n_w // 2, max(n_w - 2, 0)))
    after = (min(cell[0] + 1, n_h - 1), min(cell[1] + 1, n_w - 1))
    grads = [torch.autograd.grad(output[..., y, x].sum(), image, retain_graph=True)[0] for y, x in (cell, after)]
    smallest = min(float(g.abs()[g != 0].min()) for g in grads)
    if smallest < _UNDERFLOW_WARNING:
        log.warning("probe of %s: input gradients down to %.1e, near the float32 limit; the field may be "
                    "underestimated", name, smallest)
    limits = image.shape[-2:]
    values, clipped = {}, False
    for axis, n_cells in ((0, n_h), (1, n_w)):
        lo, hi = _extent(grads[0], axis)
        lo2, hi2 = _extent(grads[1], axis)
        limit = limits[axis]
        clipped = clipped or lo == 0 or hi == limit - 1
        if n_cells == 1:
            jump = float(limit)
        elif lo > 0 and lo2 > 0:
            jump = float(lo2 - lo)
        elif hi < limit - 1 and hi2 < limit - 1:
            jump = float(hi2 - hi)
        else:
            jump = limit / n_cells
        size = float(hi - lo + 1)
        values[axis] = (size, jump, (lo + hi) / 2 - cell[axis] * jump)
    if clipped:
        log.warning("probe of %s: the field reaches the border of the %s×%s input, so its size is a lower "
                    "bound; probe with a larger input", name, *limits)
    (size_h, jump_h, start_h), (size_w, jump_w, start_w) = values[0], values[1]
    return RF(size_h, size_w, jump_h, jump_w, start_h, start_w)


# ---------------------------------------------------------------------------------------------
# Small helpers.

def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``input_size`` as (H, W)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _check_layer_names(model: nn.Module, names: Sequence[str]) -> None:
    """Raise ``StageError`` naming the unknown layers, close matches and a short list of valid names."""
    known = dict(model.named_modules())
    unknown = [name for name in names if not name or name not in known]
    if not names:
        raise StageError("no layer names given; choose dotted module names such as " + _menu(known))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, [k for k in known if k], n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise StageError(f"unknown layer name(s) {', '.join(hints)}. Layer names are dotted module names as "
                         f"in model.named_modules(); valid names include: {_menu(known)}")


def _menu(known: dict) -> str:
    """Comma-separated module names up to ``MENU_DEPTH`` levels (at most ``MENU_MAX``)."""
    names = [name for name in known if name and name.count(".") < MENU_DEPTH]
    shown = ", ".join(names[:MENU_MAX])
    more = len(names) - MENU_MAX
    return shown + (f", … ({more} more at this depth; deeper names work too)" if more > 0 else "")
