"""Receptive-field geometry: the ``RF`` record of a layer (size, jump and start per axis, in input
pixels; conventions in ``common/rf.py``, which computes them) and the pixel box of a feature cell.

Plain arithmetic, without torch, so that processes that only cut or measure image windows (02's
and 09's workers) need not import it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class RF:
    """Receptive field of a layer: size, jump and start per axis, in input pixels (conventions: common/rf.py)."""

    size_h: float
    size_w: float
    jump_h: float
    jump_w: float
    start_h: float
    start_w: float

    def as_array(self) -> np.ndarray:
        """The six values as float64, in field order (the ``L/rf`` array of 01_activations.npz)."""
        return np.array([self.size_h, self.size_w, self.jump_h, self.jump_w,
                         self.start_h, self.start_w], dtype=np.float64)

    @classmethod
    def from_array(cls, values: Sequence[float]) -> "RF":
        """Inverse of ``as_array``."""
        if len(values) != 6:
            raise ValueError(f"an RF array has 6 values, got {len(values)}")
        return cls(*(float(v) for v in values))


def field_box(rf: RF, y: int, x: int) -> tuple[int, int, int, int]:
    """Pixel box ``(top, left, bottom, right)`` of feature cell ``(y, x)``'s whole field, unclipped.

    ``bottom`` and ``right`` are exclusive; the box may run past the image on any side (where the
    network saw padding). Estimated fields may be fractional; their edges are rounded to the
    nearest pixel, so every box of a layer has the same size.
    """
    top, bottom = _axis_span(rf.start_h + y * rf.jump_h, rf.size_h)
    left, right = _axis_span(rf.start_w + x * rf.jump_w, rf.size_w)
    return top, left, bottom, right


def crop_box(rf: RF, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``field_box`` clipped to a ``height`` × ``width`` image: the crop is ``image[top:bottom, left:right]``.

    The box is empty (``top == bottom`` or ``left == right``) only if the field lies wholly outside
    the image.
    """
    top, left, bottom, right = field_box(rf, y, x)
    return (min(max(top, 0), height), min(max(left, 0), width),
            min(max(bottom, 0), height), min(max(right, 0), width))


def tile_window(rf: RF, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The input box ``(top, left, bottom, right)`` that cell (y, x)'s mosaic tile shows (02's
    crops, the atlas's tiles).

    It is the cell's receptive field, which may run past the image, except along an axis where the
    field is at least as long as the image: there it is the whole image (deep layers).
    """
    top, left, bottom, right = field_box(rf, y, x)
    if bottom - top >= height:
        top, bottom = 0, height
    if right - left >= width:
        left, right = 0, width
    return top, left, bottom, right


def _axis_span(centre: float, size: float) -> tuple[int, int]:
    """First and past-the-end pixel of a field of ``size`` pixels centred on ``centre`` (sizes are
    positive: common/rf.py never makes a field smaller than one pixel)."""
    first = math.floor(centre - (size - 1) / 2 + 0.5)
    return first, first + int(round(size))
