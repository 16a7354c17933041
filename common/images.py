"""Image input: listing an image set, decoding any file safely to RGB, and the network's input.

An image set is either a folder or a CSV list:

* **Folder.** Every sub-folder of the top folder is a class and its name is the label of every
  image below it, at any depth (``cat/indoor/1.jpg`` has the label ``cat``), the way ImageNet's
  ``train/n01440764/…`` layout is read. Image files lying directly in the top folder have no label
  (``""``): a flat folder is an unlabelled set, and a folder may mix both. Hidden files and folders
  (name starting with ``.``) are skipped; files without an image extension are skipped and
  counted in the log; symbolic links to folders are followed (each real folder once). The
  order is sorted by relative path, so listings are the same everywhere.
* **CSV** (or ``.tsv``). A ``path`` column (required) and an optional ``label`` column, other
  columns ignored; relative paths are taken from the CSV's own folder. Every row is listed,
  whatever its extension, in the CSV's order.

A path is kept byte for byte (later stages open the file by it); a label is shown everywhere, so
its control characters come out escaped (``\x1b``: ``common.cli.escaped``).

Listing never opens a file: one that has an image extension but holds no image is listed, and
``load_rgb`` reports it.

``load_rgb`` never lets a broken file crash a run: it raises :class:`BadImage` with a short
human reason, and otherwise returns an RGB image plus a note saying what was converted.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from common.classes import name_key
from common.cli import StageError, escaped

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".avif",
})  # compared case-insensitively; a file whose bytes are no image still reaches load_rgb
MAX_PIXELS = 50_000_000  # larger images are refused: decoding them could exhaust memory
# (PIL refuses more than 2 × Image.MAX_IMAGE_PIXELS by itself, whatever ``max_pixels`` says.)
MIN_SIDE = 8  # images with a shorter side are refused: nothing of a CNN's input is left in them
_EXIF_ORIENTATION = 0x0112  # EXIF tag: how the camera was held
_EXIF_TRANSPOSE = {  # orientation value -> the transpose that shows the photo upright
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


class BadImage(Exception):
    """A file that cannot be used as an image; ``reason`` says why in a few words."""

    def __init__(self, reason: str):
        """Keep ``reason`` for the images table and use it as the message."""
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageEntry:
    """One listed image: its path and its label (``""`` when unlabelled)."""

    path: str
    label: str = ""


# --------------------------------------------------------------------------------------------
# Listing


def has_image_extension(name: str) -> bool:
    """True if ``name`` ends with one of :data:`IMAGE_EXTENSIONS`, in any letter case."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(source: str | os.PathLike) -> list[ImageEntry]:
    """List the images of a folder or a CSV file (see the module docstring for the layouts).

    Raises StageError when the source is missing, holds no image, or is a CSV without a
    ``path`` column.
    """
    source_path = Path(source)
    if not source_path.exists():
        raise StageError(f"image source {source} does not exist; give an image folder or a CSV "
                         f"with a 'path' column (e.g. IMAGES=path/to/images)")
    if source_path.is_dir():
        entries = _list_folder(source_path)
    elif source_path.suffix.lower() in (".csv", ".tsv"):
        entries = _list_csv(source_path)
    else:
        raise StageError(f"image source {source} is neither a folder nor a .csv file; give an "
                         f"image folder or a CSV list of paths")
    if not entries:
        raise StageError(f"no image files in {source}; put images (.jpg, .png, …) in it or in "
                         f"class sub-folders, or list them in a CSV with a 'path' column")
    n_labelled = sum(1 for e in entries if e.label)
    log.info("listed %d images from %s (%d labelled, %d classes)", len(entries), source,
             n_labelled, len({e.label for e in entries if e.label}))
    return entries


def _list_folder(folder: Path) -> list[ImageEntry]:
    """Walk ``folder``: the first folder below it is the label; files on top are unlabelled."""
    found: list[tuple[str, str]] = []
    ignored: list[str] = []
    seen_dirs: set[str] = set()
    # Symlinked class folders are common (ImageNet set-ups); follow them, once each, so that a
    # link pointing back up the tree cannot loop.
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(folder)
        for name in files:
            if name.startswith("."):
                continue
            rel = (rel_root / name).as_posix()
            if has_image_extension(name):
                label = escaped(rel_root.parts[0]) if rel_root.parts else ""
                found.append((rel, label))
            else:
                ignored.append(rel)
    if ignored:
        log.info("ignored %d files without an image extension in %s (e.g. %s)", len(ignored),
                 folder, ", ".join(sorted(ignored)[:3]))
    if found and any(label for _, label in found) and any(not label for _, label in found):
        log.info("%s mixes class sub-folders with %d image files at its top level: those are "
                 "listed without a label", folder, sum(1 for _, label in found if not label))
    # Sort by the path's components so that "a/b" and "a-b" order the same on every system.
    found.sort(key=lambda item: item[0].split("/"))
    return [ImageEntry(str(folder / rel), label) for rel, label in found]


def _list_csv(csv_path: Path) -> list[ImageEntry]:
    """Read a CSV list: ``path`` (relative to the CSV's folder unless absolute), ``label``."""
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            columns = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
            if "path" not in columns:
                raise StageError(f"{csv_path} has no 'path' column (columns: "
                                 f"{', '.join(reader.fieldnames or []) or 'none'}); add a header "
                                 f"line with 'path' and, optionally, 'label'")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise StageError(f"cannot read the image list {csv_path}: {err}; save it as UTF-8 "
                         f"CSV") from None
    path_col, label_col = columns["path"], columns.get("label")
    entries = []
    for line_no, row in enumerate(rows, start=2):
        rel = (row.get(path_col) or "").strip()
        if not rel:
            raise StageError(f"{csv_path} line {line_no} has an empty path; fill it in or "
                             f"remove the row")
        label = escaped((row.get(label_col) or "").strip()) if label_col else ""
        path = Path(rel) if os.path.isabs(rel) else csv_path.parent / rel
        entries.append(ImageEntry(str(path), label))
    return entries


def find_duplicates(entries: Sequence[ImageEntry]) -> dict[int, str]:
    """Index → reason for every entry that repeats an earlier one: the same file listed twice
    (same real path), or another file with the same bytes. Only files of equal size are read, so
    a set without duplicates costs one ``stat`` per file."""
    reasons: dict[int, str] = {}
    first_of_path: dict[str, int] = {}
    by_size: dict[int, list[int]] = {}
    for i, entry in enumerate(entries):
        real = os.path.realpath(entry.path)
        if real in first_of_path:
            reasons[i] = f"duplicate of image {first_of_path[real]} (the same file listed again)"
            continue
        first_of_path[real] = i
        try:
            by_size.setdefault(os.stat(real).st_size, []).append(i)
        except OSError:
            continue  # missing or unreadable: load_rgb reports it
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        first_of_digest: dict[bytes, int] = {}
        for i in same_size:
            try:
                digest = hashlib.blake2b(Path(entries[i].path).read_bytes(), digest_size=16).digest()
            except OSError:
                continue
            if digest in first_of_digest:
                reasons[i] = f"duplicate of image {first_of_digest[digest]} (same content)"
            else:
                first_of_digest[digest] = i
    if reasons:
        log.warning("%d listed images repeat an earlier one and are counted once (recorded as "
                    "skipped), e.g. %s: %s", len(reasons), entries[min(reasons)].path,
                    reasons[min(reasons)])
    return reasons


# --------------------------------------------------------------------------------------------
# Decoding


def load_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS,
             min_side: int = MIN_SIDE) -> tuple[Image.Image, str]:
    """Decode ``path`` fully into an 8-bit RGB image; return it with a note on what was converted.

    The note is ``""`` for a plain RGB file, else short phrases joined by ``"; "`` (grayscale,
    CMYK, palette, alpha composited onto white, 16-bit scaled, EXIF rotation, first frame of an
    animation). Raises :class:`BadImage` for anything unusable: missing, empty, unreadable,
    not an image, truncated or corrupt, more than ``max_pixels`` pixels, or a side below
    ``min_side``.
    """
    path = Path(path)
    if path.is_dir():
        raise BadImage("is a folder, not an image file")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except OSError as err:
        raise BadImage(f"cannot read file: {err.strerror or err}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some library switched on PIL's padding of truncated files; a cut-off photo would then
        # come back half grey without a word. Switch it off for good (a flag write is thread-safe,
        # unlike a save-and-restore around each call in 01_extract's decoding threads).
        log.warning("PIL's LOAD_TRUNCATED_IMAGES was on; turning it off so that truncated files "
                    "are reported")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    return _decode(path, max_pixels, min_side)


def _decode(path: Path, max_pixels: int, min_side: int) -> tuple[Image.Image, str]:
    """Open, check, load and convert one file; every decoder failure becomes a BadImage."""
    try:
        with open(path, "rb") as fh, Image.open(fh) as img:
            _check_size(img.size, max_pixels, min_side)  # from the header, before any decoding
            notes = []
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                img.seek(0)
                notes.append(f"first of {n_frames} frames")
            img.load()
            rgb = _to_rgb(img, notes)
            orientation = _exif_orientation(img, notes)
            if orientation in _EXIF_TRANSPOSE:
                rgb = rgb.transpose(_EXIF_TRANSPOSE[orientation])
                notes.append(f"rotated per EXIF orientation {orientation}")
            elif orientation != 1:
                notes.append(f"unknown EXIF orientation {orientation!r} ignored")
            if rgb is img:
                rgb = img.copy()  # the opened image is unusable once its file is closed
    except BadImage:
        raise
    except PermissionError:
        raise BadImage("cannot read file: permission denied") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised file format)") from None
    except Image.DecompressionBombError:
        raise BadImage(f"too large to decode safely (over PIL's limit of "
                       f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:g} megapixels)") from None
    except (OSError, SyntaxError, EOFError) as err:
        raise BadImage(f"truncated or corrupt image data ({_short(err)})") from None
    except Exception as err:  # noqa: BLE001 — PIL's plugins raise many types on malformed data
        raise BadImage(f"cannot decode image ({type(err).__name__}: {_short(err)})") from None
    _check_size(rgb.size, max_pixels, min_side)
    return rgb, "; ".join(notes)


def _exif_orientation(img: Image.Image, notes: list[str]) -> int:
    """The EXIF orientation of ``img`` (1 = upright); a broken EXIF block is noted, not fatal."""
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as err:  # noqa: BLE001 — broken EXIF raises assorted types; pixels are fine
        notes.append(f"unreadable EXIF ignored ({type(err).__name__})")
        return 1


def _short(err: BaseException, limit: int = 80) -> str:
    """First line of an exception's message, cut to ``limit`` characters."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int) -> None:
    """Refuse images with too many pixels or too short a side."""
    width, height = size
    if width * height > max_pixels:
        raise BadImage(f"too large: {width}×{height} is {width * height / 1e6:.1f} megapixels, "
                       f"over the limit of {max_pixels / 1e6:g}")
    if min(width, height) < min_side:
        raise BadImage(f"too small: {width}×{height} px (minimum side {min_side} px)")


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Convert a loaded image of any PIL mode to 8-bit RGB, appending what was done to ``notes``."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("1", "L"):
        notes.append("black-and-white converted to RGB" if mode == "1"
                     else "grayscale converted to RGB")
        return img.convert("RGB")
    if mode == "P" and not img.has_transparency_data:
        notes.append("palette converted to RGB")
        return img.convert("RGB")
    if mode in ("P", "PA", "RGBA", "RGBa", "LA", "La"):
        return _flatten_alpha(img, notes)
    if mode == "CMYK":
        notes.append("CMYK converted to RGB (no colour profile applied)")
        return img.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(img, notes)
    notes.append(f"{mode} converted to RGB")
    return img.convert("RGB")


def _flatten_alpha(img: Image.Image, notes: list[str]) -> Image.Image:
    """Drop the alpha channel, compositing onto white when any pixel is not fully opaque."""
    rgba = img.convert("RGBA")
    low, _ = rgba.getchannel("A").getextrema()
    kind = {"P": "palette with transparency", "PA": "palette with alpha",
            "LA": "grayscale with alpha", "La": "grayscale with alpha"}.get(img.mode, img.mode)
    if low == 255:
        notes.append(f"{kind}: fully opaque, alpha dropped")
        return rgba.convert("RGB")
    notes.append(f"{kind}: composited onto white")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float grayscale image to 8 bits without clipping.

    16-bit data (and 32-bit integers that fit in 0…65535, as some readers store 16-bit PNGs) are
    scaled by their full range, value / 257, so that 0 and 65535 map onto 0 and 255 and a dim
    photo stays dim. Float data in 0…1 is multiplied by 255; anything else is stretched from
    its own minimum and maximum, since no nominal range is known.
    """
    values = np.asarray(img).astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
        notes.append("16-bit grayscale scaled to 8 bit")
    elif img.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
        notes.append("float grayscale (0–1) scaled to 8 bit")
    else:
        span = high - low
        scaled = (values - low) * (255.0 / span) if span > 0 else np.zeros_like(values)
        notes.append(f"{img.mode} values stretched from [{low:g}, {high:g}] to 0–255")
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


# --------------------------------------------------------------------------------------------
# Network input


def _input_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Where :func:`network_input` takes its square: the size (new_w, new_h) it resizes a
    width × height image to, and the corner (left, top) of the square it keeps there."""
    long = int(size * max(width, height) / min(width, height))
    new_w, new_h = (size, long) if width <= height else (long, size)
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def network_input(img: Image.Image, size: int) -> Image.Image:
    """torchvision's ``Resize(size)`` (bicubic) then ``CenterCrop(size)`` on a PIL image: the
    shorter side becomes ``size`` (the longer one ``int(size × long / short)``) and the middle
    square is kept, its corner at ``int(round(excess / 2))``.

    Written with PIL, which torchvision itself calls for PIL images (PIL always antialiases), so
    the pixels are the same (tests/test_images.py compares them with torchvision's): importing
    torchvision takes over a second, as it loads torch's compiler, in every process that only
    needs to resize an image, such as 09's image workers.
    """
    new_w, new_h, left, top = _input_geometry(*img.size, size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.BICUBIC)
    if (new_w, new_h) == (size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def network_view(img: Image.Image, size: int, channels: int = 3) -> Image.Image:
    """The network input as a picture (RGB): :func:`network_input`, in grey for a grey model."""
    view = network_input(img, size)
    return view.convert("L").convert("RGB") if channels == 1 else view


def small_views(img: Image.Image, size: int, shapes: Iterable[tuple[int, int]],
                channels: int = 3) -> dict[tuple[int, int], Image.Image]:
    """:func:`network_view` shrunk to each (height, width) of ``shapes``, made from ``img``
    without building the full-size view: the square the network sees is resampled straight from
    the source (bilinear, after an integer pixel-averaging shrink while 1.5× the largest shape
    remains): the same picture as shrinking the network view, up to resampling (under one grey
    level on average), at a fraction of the cost when the source is larger than the input.
    """
    shapes = list(shapes)
    new_w, new_h, left, top = _input_geometry(*img.size, size)
    scale_x, scale_y = img.width / new_w, img.height / new_h  # source pixels per input pixel
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    factor = int(min(box[2] - box[0], box[3] - box[1]) / (1.5 * max(max(s) for s in shapes)))
    if factor > 1:
        img = img.reduce(factor)
        box = tuple(v / factor for v in box)
    views = {}
    for height, width in shapes:
        view = img.resize((width, height), Image.BILINEAR, box=box)
        views[height, width] = view.convert("L").convert("RGB") if channels == 1 else view
    return views


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An image as a float32 tensor (C, H, W): (pixel / 255 - ``mean``) / ``std``, with C the
    number of values in ``mean``: 3 (RGB) or 1 (grey, ITU-R 601 luma as PIL's ``L`` mode)."""
    import torch  # here, not at the top: processes that only read and resize images skip it
    channels = len(mean)
    mode = "L" if channels == 1 else "RGB"
    array = np.asarray(img.convert(mode) if img.mode != mode else img, dtype=np.float32)
    tensor = torch.from_numpy(array / 255.0)
    tensor = tensor[None] if channels == 1 else tensor.permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)
    return ((tensor - mean_t) / std_t).contiguous()


# Where a neuron fires on an image: transparent below 40 % of its peak on the image, then yellow
# to red at the peak, more opaque as the value rises, so that the picture stays visible.
HEAT_STOPS = np.array([[0.0, 0, 160, 255, 0], [0.4, 0, 160, 255, 0], [0.6, 255, 230, 0, 110],
                       [1.0, 230, 0, 0, 190]], np.float32)  # value, R, G, B, alpha


def heat_rgba(activation: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """An activation map as an RGBA picture (``HEAT_STOPS`` colours), scaled from 0 (or its
    minimum when negative) to its maximum; ``size`` (width, height) resizes it bilinearly, so
    that it can be laid over an image (``Image.alpha_composite``) or, left small, stretched over
    one by a page. A constant map is transparent."""
    a = np.asarray(activation, np.float32)
    a = np.nan_to_num(a)
    low, high = min(float(a.min()), 0.0), float(a.max())
    v = (a - low) / (high - low) if high > low else np.zeros_like(a)
    channels = [np.interp(v, HEAT_STOPS[:, 0], HEAT_STOPS[:, k]) for k in range(1, 5)]
    picture = Image.fromarray(np.stack(channels, -1).round().astype(np.uint8), "RGBA")
    return picture.resize(size, Image.BILINEAR) if size else picture


def overlay(picture: Image.Image, activation: np.ndarray) -> Image.Image:
    """``picture`` (RGB) with ``activation``'s ``heat_rgba`` stretched over it (RGB)."""
    base = picture.convert("RGBA")
    return Image.alpha_composite(base, heat_rgba(activation, base.size)).convert("RGB")


# --------------------------------------------------------------------------------------------
# Labels

_SYNSET = re.compile(r"^n\d{8}$")  # WordNet noun id, the folder names of the ImageNet layout


def map_labels(labels: Iterable[str], class_names: Sequence[str] | None,
               synsets: Sequence[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Map image labels onto a classifier's class indices; return the mapping and the unmapped.

    A label maps when it is (in this order) a synset id in ``synsets`` (``n01440764``), a class
    name in ``class_names`` compared case-insensitively with ``_`` and ``-`` as spaces
    (``golden_retriever``; see common.classes.name_key), or a decimal class index (``"207"``) below ``len(class_names)``.
    Nothing is guessed: anything else, and a name that two classes share, is returned in the
    unmapped list (first-seen order) for the caller to report. Empty labels (unlabelled
    images) are in neither. When ``synsets`` is None and ``class_names`` are the 1000 ImageNet
    classes, the ImageNet synset ids are used. With ``class_names`` None only indices map, and
    their range cannot be checked.
    """
    if synsets is None and class_names is not None and len(class_names) == 1000:
        from common import imagenet  # deferred: only ImageNet-sized heads need the table
        if list(class_names) == imagenet.class_names():
            synsets = imagenet.synsets()
    synset_index = {s: i for i, s in enumerate(synsets or [])}
    name_index: dict[str, int] = {}
    shared_names: set[str] = set()
    for i, name in enumerate(class_names or []):
        key = name_key(name)
        if key in name_index:
            shared_names.add(key)
        name_index.setdefault(key, i)
    n_classes = len(class_names) if class_names is not None else None

    mapping: dict[str, int] = {}
    unmapped: list[str] = []
    for label in labels:
        if not label or label in mapping or label in unmapped:
            continue
        text = label.strip()
        key = name_key(text)
        if _SYNSET.match(text.lower()) and text.lower() in synset_index:
            mapping[label] = synset_index[text.lower()]
        elif key in name_index and key not in shared_names:
            mapping[label] = name_index[key]
        elif text.isascii() and text.isdecimal() and (n_classes is None or int(text) < n_classes):
            mapping[label] = int(text)
        else:
            if key in shared_names:
                log.warning("label %r names several classes; use its synset id or index", label)
            unmapped.append(label)
    return mapping, unmapped
