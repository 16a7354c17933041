"""Measured appearance: colour names of pixels, the colour / contrast / orientation / stripe
measures of a neuron's crops and the phrase that says them, and the colour / contrast / edge
statistics of every receptive-field window of an image.

The offline describer (common/describers.py) says what a neuron's crops look like with
``measure_tiles`` and ``appearance_phrase``; 09's offline matcher measures, for every image, the
same kinds of words in each window a layer's cells look at (``window_features``), so that a
description's appearance words can be checked on images the describer never saw.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from common.mosaics import BACKGROUND

PALETTE = ["black", "white", "gray", "red", "orange", "yellow", "green", "cyan", "blue", "purple",
           "pink", "brown"]
# Window features after the colour shares (one per PALETTE entry), in this order:
EXTRA_FEATURES = ["brightness", "contrast", "edges", "vertical", "diagonal", "coherence",
                  "colourfulness"]
FEATURES = PALETTE + EXTRA_FEATURES


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """Name each RGB pixel (…, 3 uint8) with a basic colour word: its index into PALETTE."""
    x = rgb.reshape(-1, 3).astype(np.float32) / 255.0
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    # Element-wise maxima of the three channels: a reduction along an axis of length 3 is
    # several times slower in numpy, and 09 names every pixel of every image.
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    v, s = mx, np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    h = h * 60.0
    code = {name: i for i, name in enumerate(PALETTE)}
    chroma = (s >= 0.25) & (v >= 0.2)
    # Hue bands [previous bound, bound) and their names; the last band wraps round to red.
    bounds = np.array([15, 40, 70, 165, 195, 255, 290, 340], dtype=h.dtype)
    band_names = np.array([code[n] for n in ("red", "orange", "yellow", "green", "cyan", "blue",
                                             "purple", "pink", "red")], dtype=np.int8)
    names = np.where(chroma, band_names[np.searchsorted(bounds, h, side="right")],
                     np.int8(code["gray"]))
    # Dark oranges and reds are what people call brown.
    names[chroma & (names == code["orange"]) & (v < 0.65)] = code["brown"]
    names[chroma & (names == code["red"]) & (v < 0.45) & (s < 0.7)] = code["brown"]
    names[~chroma & (v >= 0.8)] = code["white"]
    names[v < 0.2] = code["black"]
    return names.reshape(rgb.shape[:-1])


def pixel_maps(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel quantities whose window sums give ``window_features`` (H × W × 18, float64).

    Channels: one-hot colour name (12), luminance, luminance², and the structure tensor of the
    luminance gradient (gx², gy², gx·gy; Sobel).
    """
    from scipy.ndimage import sobel
    n = len(PALETTE)
    out = np.empty(rgb.shape[:2] + (n + 5,))  # filled in place: 09 runs this on every image
    out[..., :n] = colour_codes(rgb)[..., None] == np.arange(n)
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    gx, gy = sobel(lum, axis=1) / 8, sobel(lum, axis=0) / 8
    out[..., n] = lum
    for i, (a, b) in enumerate(((lum, lum), (gx, gx), (gy, gy), (gx, gy)), start=n + 1):
        np.multiply(a, b, out=out[..., i])
    return out


def integral_image(maps: np.ndarray) -> np.ndarray:
    """Summed-area table of ``pixel_maps``: (H + 1) × (W + 1) × channels, zero first row and column."""
    height, width = maps.shape[:2]
    integral = np.zeros((height + 1, width + 1, maps.shape[2]))
    integral[1:, 1:] = maps
    # Running sums a row, then a column, at a time: the same additions in the same order as
    # cumsum, but numpy's cumsum along the first two axes of this array ran about 7× slower.
    for y in range(2, height + 1):
        integral[y] += integral[y - 1]
    for x in range(2, width + 1):
        integral[:, x] += integral[:, x - 1]
    return integral


def window_features(integral: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """FEATURES of each window ``boxes`` (n × [top, left, bottom, right], ends excluded) → n × F,
    from the ``integral_image`` of the pixel maps.

    Every window costs the same whatever its size (four look-ups in the summed-area table).
    Colour shares are fractions of the window's pixels; brightness and contrast are the mean and
    standard deviation of luminance; edges is the mean squared gradient; vertical is
    (Jxx − Jyy) / (Jxx + Jyy) of the structure tensor J (+1: vertical edges, −1: horizontal);
    diagonal is 2|Jxy| / (Jxx + Jyy); coherence how much one orientation dominates (0 … 1);
    colourfulness 1 − Σ share² over colour names.
    """
    top, left, bottom, right = (boxes[:, i] for i in range(4))
    sums = integral[bottom, right] - integral[top, right] - integral[bottom, left] + \
        integral[top, left]
    area = np.maximum((bottom - top) * (right - left), 1)[:, None]
    mean = sums / area
    n_col = len(PALETTE)
    shares = mean[:, :n_col]
    lum, lum2, jxx, jyy, jxy = (mean[:, n_col + i] for i in range(5))
    energy = jxx + jyy
    safe = np.maximum(energy, 1e-9)
    extra = np.stack([
        lum, np.sqrt(np.maximum(lum2 - lum * lum, 0.0)), energy,
        np.where(energy > 1e-9, (jxx - jyy) / safe, 0.0),
        np.where(energy > 1e-9, 2 * np.abs(jxy) / safe, 0.0),
        np.where(energy > 1e-9, np.hypot(jxx - jyy, 2 * jxy) / safe, 0.0),
        1.0 - (shares ** 2).sum(1)], axis=1)
    return np.concatenate([shares, extra], axis=1)


# ---------------------------------------------------------------------------------------------
# A neuron's crops: what they look like, measured and said


def _centre_weight(side: int) -> np.ndarray:
    """Gaussian weight over a tile: a receptive field's centre drives the unit most."""
    ax = np.arange(side) - (side - 1) / 2
    w = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * (side / 3.0) ** 2))
    return w / w.sum()


def measure_tiles(tiles: Sequence[np.ndarray]) -> dict:
    """Colour shares, contrast, dominant orientation, its consistency, and stripe frequency.

    Orientation comes from the structure tensor of each tile's luminance (gradient outer
    products, centre-weighted); the tiles' doubled angles are averaged, weighted by gradient
    energy, so that opposite gradients agree. Stripes are told from single edges by the
    frequency of the strongest non-constant Fourier component. All tiles are processed at once.
    Flat grey (02's padding past the image border, empty tiles) is left out, and so is the border
    between it and the image, which is no feature of the image.
    """
    from scipy.ndimage import correlate1d, maximum_filter
    empty = {"colours": {}, "contrast": 0.0, "agreement": 0.0, "coherence": 0.0,
             "orientation_deg": 0.0, "cycles": 0.0, "periodic": 0.0, "n_tiles": 0}
    side = min(min(t.shape[:2]) for t in tiles) if len(tiles) else 0
    if side < 4:
        return empty
    stack = np.stack([t[:side, :side] for t in tiles])
    valid = ~np.all(stack == BACKGROUND, axis=-1)
    stack, valid = stack[valid.mean((1, 2)) >= 0.2], valid[valid.mean((1, 2)) >= 0.2]
    if not len(stack):
        return empty
    w = _centre_weight(side)
    codes = colour_codes(stack)
    counts = np.bincount(codes[valid], weights=np.broadcast_to(w, codes.shape)[valid],
                         minlength=len(PALETTE))
    shares = {PALETTE[i]: float(c / counts.sum()) for i, c in enumerate(counts) if c > 0}
    shares = dict(sorted(shares.items(), key=lambda kv: -kv[1]))
    lum = stack.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    w_image = w * valid
    w_image /= w_image.sum((1, 2), keepdims=True)
    mean = (w_image * lum).sum((1, 2), keepdims=True)
    contrasts = np.sqrt((w_image * (lum - mean) ** 2).sum((1, 2)))
    lum = np.where(valid, lum, mean)  # grey padding → the tile's mean: no step at its border
    # Sobel along one image axis, smoothing along the other (never across tiles); gradients that
    # touch padding are dropped.
    gx = correlate1d(correlate1d(lum, [-1, 0, 1], axis=2), [1, 2, 1], axis=1) / 8
    gy = correlate1d(correlate1d(lum, [-1, 0, 1], axis=1), [1, 2, 1], axis=2) / 8
    w_grad = w * ~maximum_filter(~valid, size=(1, 3, 3))
    jxx, jyy, jxy = ((w_grad * gx * gx).sum((1, 2)), (w_grad * gy * gy).sum((1, 2)),
                     (w_grad * gx * gy).sum((1, 2)))
    energy = jxx + jyy
    live = energy >= 1e-5
    if live.any():
        coherence = np.hypot(jxx - jyy, 2 * jxy)[live] / energy[live]
        doubled = np.arctan2(2 * jxy, jxx - jyy)[live]
        vec = np.sum(energy[live] * np.exp(1j * doubled)) / energy[live].sum()
        spec = np.abs(np.fft.fft2((lum - lum.mean((1, 2), keepdims=True))[live] *
                                  np.sqrt(w * side * side), axes=(1, 2))) ** 2
        fy, fx = np.meshgrid(np.fft.fftfreq(side) * side, np.fft.fftfreq(side) * side,
                             indexing="ij")
        radius = np.hypot(fy, fx)
        spec[:, radius < 1] = 0
        flat = spec.reshape(len(spec), -1)
        peak_r = radius.reshape(-1)[np.argmax(flat, axis=1)]
        near = np.abs(radius[None] - peak_r[:, None, None]) <= 1
        periodic = (spec * near).sum((1, 2)) / np.maximum(spec.sum((1, 2)), 1e-12)
        agreement = float(np.abs(vec))
        stripe_deg = float((np.degrees(np.angle(vec)) / 2 + 90) % 180)  # edges cross gradients
        coh, cyc, per = (float(np.median(coherence)), float(np.median(peak_r)),
                         float(np.median(periodic)))
    else:
        agreement = stripe_deg = coh = cyc = per = 0.0
    return {"colours": shares, "contrast": float(np.median(contrasts)), "agreement": agreement,
            "coherence": coh, "orientation_deg": stripe_deg, "cycles": cyc, "periodic": per,
            "n_tiles": int(len(stack))}


def orientation_word(deg: float) -> str:
    """horizontal / vertical / diagonal for a line angle in degrees (0 = horizontal)."""
    deg = deg % 180
    if deg < 22.5 or deg >= 157.5:
        return "horizontal"
    if 67.5 <= deg < 112.5:
        return "vertical"
    return "diagonal"


def appearance_phrase(m: dict) -> str:
    """A short phrase saying only what ``measure_tiles`` found."""
    if m["n_tiles"] == 0:
        return ""
    shares = m["colours"]
    # Near-equal shares are listed in palette order, so "black and white" reads the same each time.
    ranked = sorted(shares, key=lambda c: (-round(shares[c] * 10), PALETTE.index(c)))
    main = [c for c in ranked if shares[c] >= 0.15][:3]
    if not main or sum(shares[c] for c in ranked[:3]) < 0.6:
        colours = "mixed colours"
    elif len(main) == 1:
        colours = main[0]
    else:
        colours = ", ".join(main[:-1]) + " and " + main[-1]
    oriented = m["agreement"] >= 0.5 and m["coherence"] >= 0.35
    if m["contrast"] < 0.03:
        return f"uniform {colours} areas"
    elif oriented and m["cycles"] >= 2 and m["periodic"] >= 0.15:
        form = f"{orientation_word(m['orientation_deg'])} stripes"
    elif oriented:
        form = f"{orientation_word(m['orientation_deg'])} edges"
    elif m["periodic"] >= 0.25 and m["cycles"] >= 2:
        form = "a repeating texture"
    else:
        form = "irregular texture"
    text = f"{form} in mixed colours" if colours == "mixed colours" else f"{colours} {form}"
    if m["contrast"] >= 0.25:
        text += ", high contrast"
    elif m["contrast"] < 0.08:
        text += ", low contrast"
    return text
