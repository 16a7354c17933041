"""Measured appearance: colour names of pixels, and colour / contrast / edge statistics of every
receptive-field window of an image.

03's offline describer names the colours of a neuron's crops with ``colour_codes``; 09's offline
matcher measures, for every image, the same kinds of words in each window a layer's cells look at
(``window_features``), so that a description's appearance words can be checked on images the
describer never saw.
"""
from __future__ import annotations

import numpy as np

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
