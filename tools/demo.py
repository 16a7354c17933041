"""The offline demo probe set: photos shipped inside pip packages, enlarged by seeded augmentation.

No labelled natural-image set can be downloaded here, so the demo starts from the few photos that
scikit-image, scikit-learn and matplotlib install with themselves and cuts each into many
different views (random crops at scales from a small patch to the whole photo, horizontal flips,
slight brightness/contrast/saturation changes, quarter turns for photos that have no upright).
That gives low- and mid-level neurons many distinct patches of edges, textures, colours, faces,
an animal and objects. Photos for which an ImageNet class honestly applies go into a sub-folder
named by its synset id; the others lie at the top of the folder and have no label.

Writes into OUT_DIR:
    n02123045/chelsea_0000.jpg …   labelled views, one folder per ImageNet synset
    astronaut_0000.jpg …           unlabelled views
    images.csv                     path, label, source, class_name: the list to give the stages
    README.txt                     how the set is made, which photo got which label and why
    manifest.json                  parameters and file hashes; a rebuild with the same is skipped

The output is byte-identical for the same ``--n-images`` and ``--seed``. The folder is built in a
temporary sibling and renamed into place, so an interrupted build never looks finished.

    python -m tools.demo data/demo_images --n-images 1500 --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

from common import imagenet
from common.cli import StageError, exit_on_stage_error, stage_parser, start_stage
from common.io import write_csv, write_json, write_text

log = logging.getLogger("neuron-atlas.demo")

RECIPE = 1  # bump when the sources or the augmentation change, so old builds are rebuilt
OUT_SIDE = 224  # pixels per side of each written view: the reference classifier's input size
JPEG_QUALITY = 90  # fixed, so that files are identical run to run
JITTER = 0.12  # brightness, contrast and saturation factors drawn from 1 ± JITTER
LABELLED_WEIGHT = 3  # a labelled photo gets this many shares of the views, an unlabelled one 1
MIN_SCALE_LABELLED = 0.3  # smallest crop area (fraction of the photo) that still shows the object
MIN_SCALE_UNLABELLED = 0.03  # unlabelled photos may be cut down to small texture patches
_QUARTER_TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                  Image.Transpose.ROTATE_270)


@dataclass(frozen=True)
class Photo:
    """A source photo: where it comes from, its label (synset or ""), and why that label."""

    name: str
    origin: str
    synset: str
    why: str
    any_orientation: bool = False  # True when the photo has no upright (microscopy, sky, ground)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    """Loader for a photo of ``skimage.data`` (only those stored inside the package are used)."""
    def load() -> np.ndarray:
        """Read the photo from the installed scikit-image."""
        import skimage.data
        return getattr(skimage.data, name)()
    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    """Loader for one of scikit-learn's sample images (``china.jpg``, ``flower.jpg``)."""
    def load() -> np.ndarray:
        """Read the photo from the installed scikit-learn."""
        from sklearn.datasets import load_sample_image
        return load_sample_image(filename)
    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    """Loader for a photo in matplotlib's sample data."""
    def load() -> np.ndarray:
        """Read the photo from the installed matplotlib."""
        import matplotlib.cbook
        with matplotlib.cbook.get_sample_data(filename) as fh:
            return np.asarray(Image.open(fh).convert("RGB"))
    return load


def _motorcycle() -> np.ndarray:
    """The left image of scikit-image's stereo pair."""
    import skimage.data
    return skimage.data.stereo_motorcycle()[0]


# (photo, loader). Labels only where an ImageNet class names what the photo shows; the classes
# chosen have close neighbours (tabby / tiger cat / Egyptian cat, espresso / cup / coffee mug,
# military uniform / suit / Windsor tie, palace / monastery / stupa), so the classifier makes real
# mistakes on the crops for the debugging stage to explain.
SOURCES: tuple[tuple[Photo, Callable[[], np.ndarray]], ...] = (
    (Photo("chelsea", "skimage.data.chelsea", "n02123045",
           "a tabby cat: striped coat and the M mark on the forehead"), _skimage("chelsea")),
    (Photo("coffee", "skimage.data.coffee", "n07920052",
           "a small cup of espresso with crema on a saucer"), _skimage("coffee")),
    (Photo("grace_hopper", "matplotlib sample_data/grace_hopper.jpg", "n03763968",
           "Grace Hopper in US Navy dress uniform"), _matplotlib("grace_hopper.jpg")),
    (Photo("china", "sklearn load_sample_image('china.jpg')", "n03877845",
           "the Summer Palace in Beijing (its Tower of Buddhist Incense)"), _sklearn("china.jpg")),
    (Photo("astronaut", "skimage.data.astronaut", "",
           "portrait of an astronaut: ImageNet has no class for a person"), _skimage("astronaut")),
    (Photo("camera", "skimage.data.camera", "",
           "a man with a camera on a tripod (grayscale): the subject is the person"),
     _skimage("camera")),
    (Photo("rocket", "skimage.data.rocket", "",
           "a launch vehicle on its pad: ImageNet's 'missile' is a weapon, not this"),
     _skimage("rocket")),
    (Photo("motorcycle", "skimage.data.stereo_motorcycle (left)", "",
           "a motorcycle: ImageNet has only moped and motor scooter"), _motorcycle),
    (Photo("flower", "sklearn load_sample_image('flower.jpg')", "",
           "a dahlia: ImageNet's only flower classes are daisy and a lady's slipper"),
     _sklearn("flower.jpg")),
    (Photo("coins", "skimage.data.coins", "", "old coins on a dark cloth (grayscale): no class"),
     _skimage("coins")),
    (Photo("hubble_deep_field", "skimage.data.hubble_deep_field", "",
           "galaxies in deep space: no class", True), _skimage("hubble_deep_field")),
    (Photo("immunohistochemistry", "skimage.data.immunohistochemistry", "",
           "stained tissue under a microscope: no class", True),
     _skimage("immunohistochemistry")),
    (Photo("retina", "skimage.data.retina", "", "fundus photo of a retina: no class", True),
     _skimage("retina")),
    (Photo("brick", "skimage.data.brick", "", "brick wall texture (grayscale): no class", True),
     _skimage("brick")),
    (Photo("grass", "skimage.data.grass", "", "grass texture (grayscale): no class", True),
     _skimage("grass")),
    (Photo("gravel", "skimage.data.gravel", "", "gravel texture (grayscale): no class", True),
     _skimage("gravel")),
    (Photo("moon", "skimage.data.moon", "", "lunar surface (grayscale): no class", True),
     _skimage("moon")),
    (Photo("page", "skimage.data.page", "", "a scanned page of text (grayscale): no class"),
     _skimage("page")),
    (Photo("colorwheel", "skimage.data.colorwheel", "",
           "a synthetic hue/saturation wheel, for colour-selective units: no class"),
     _skimage("colorwheel")),
)


def _as_rgb(array: np.ndarray) -> Image.Image:
    """A uint8 photo array (grayscale or RGB) as a PIL RGB image."""
    image = Image.fromarray(np.ascontiguousarray(array))
    return image.convert("RGB") if image.mode != "RGB" else image


def allocate(n_images: int, photos: list[Photo]) -> list[int]:
    """Views per photo: labelled photos weigh LABELLED_WEIGHT, others 1; the total is ``n_images``.

    Largest-remainder rounding (ties by photo order), and every photo gets at least one view
    when ``n_images`` allows it.
    """
    weights = np.array([LABELLED_WEIGHT if p.synset else 1 for p in photos], dtype=np.float64)
    shares = weights / weights.sum() * n_images
    counts = np.floor(shares).astype(int)
    order = sorted(range(len(photos)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: n_images - int(counts.sum())]:
        counts[i] += 1
    if n_images >= len(photos):
        for i in np.flatnonzero(counts == 0):
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1
    return counts.tolist()


def make_view(photo: Image.Image, rng: np.random.Generator, min_scale: float,
              any_orientation: bool, side: int = OUT_SIDE) -> Image.Image:
    """One augmented side² view of ``photo``: random crop, flip, colour jitter, maybe a turn.

    The crop's area is drawn log-uniformly between ``min_scale`` and the whole photo, so every
    zoom level is about equally common, with an aspect ratio between 3/4 and 4/3.
    """
    width, height = photo.size
    area = width * height * float(np.exp(rng.uniform(np.log(min_scale), 0.0)))
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    crop_w = int(round(min(width, np.sqrt(area * aspect))))
    crop_h = int(round(min(height, np.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    view = photo.resize((side, side), Image.Resampling.BICUBIC,
                        box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if any_orientation:
        turn = _QUARTER_TURNS[int(rng.integers(0, 4))]
        if turn is not None:
            view = view.transpose(turn)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhancer(view).enhance(float(rng.uniform(1 - JITTER, 1 + JITTER)))
    return view


def whole_view(photo: Image.Image, side: int = OUT_SIDE) -> Image.Image:
    """The largest centred square of ``photo`` at side², unaugmented (view 0 of each photo)."""
    width, height = photo.size
    square = min(width, height)
    left, top = (width - square) // 2, (height - square) // 2
    return photo.resize((side, side), Image.Resampling.BICUBIC,
                        box=(left, top, left + square, top + square))


def _jpeg_bytes(image: Image.Image) -> bytes:
    """Encode as baseline JPEG with fixed settings and no metadata, so bytes are reproducible."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False,
               subsampling="4:2:0")
    return buffer.getvalue()


def _parameters(n_images: int, seed: int, side: int) -> dict:
    """What a finished build must match to be reused."""
    return {"recipe": RECIPE, "n_images": n_images, "seed": seed, "out_side": side,
            "jpeg_quality": JPEG_QUALITY}


def is_complete(out_dir: Path, n_images: int, seed: int, side: int = OUT_SIDE) -> bool:
    """True if ``out_dir`` holds a finished build with these parameters and all its files."""
    manifest_file = out_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("parameters") != _parameters(n_images, seed, side):
        return False
    return all((out_dir / rel).is_file() for rel in manifest.get("files", {}))


def _readme(photos: list[Photo], counts: list[int], n_images: int, seed: int, side: int) -> str:
    """README.txt: how the set was made, what each photo is labelled and why, and its limits."""
    names = dict(zip(imagenet.synsets(), imagenet.class_names()))
    lines = [
        "neuron-atlas demo probe set",
        "===========================",
        "",
        f"{n_images} JPEG views ({side}x{side} px, quality {JPEG_QUALITY}) cut from "
        f"{len(photos)} photos that ship inside",
        "pip packages (scikit-image, scikit-learn, matplotlib), built offline by",
        f"`python -m tools.demo OUT_DIR --n-images {n_images} --seed {seed}"
        f"{'' if side == OUT_SIDE else f' --side {side}'}`; the same "
        "arguments and package versions give the same bytes.",
        "",
        "View 0 of each photo is its centred square, unchanged. Every other view is a random",
        "crop whose area is drawn log-uniformly between a small patch and the whole photo",
        f"(labelled photos: {MIN_SCALE_LABELLED:g}-1 of the area so the object stays in view; "
        f"unlabelled: {MIN_SCALE_UNLABELLED:g}-1),",
        "aspect 3:4 to 4:3, resized to the output size, flipped left-right half of the time,",
        f"with brightness, contrast and saturation scaled by 1 +/- {JITTER:g}; photos without",
        "an upright (microscopy, sky, textures) are also turned by a random multiple of 90",
        "degrees. Grayscale photos are stored as RGB.",
        "",
        "Labels: a photo is put in a folder named by an ImageNet synset id only where that",
        "class honestly names what it shows; the others lie at the top of the folder and are",
        "unlabelled (empty label in images.csv).",
        "",
        "photo                 views  label",
    ]
    for photo, count in zip(photos, counts):
        label = f"{photo.synset} {names[photo.synset]}" if photo.synset else "(none)"
        lines.append(f"{photo.name:<21} {count:>5}  {label}")
        lines.append(f"{'':<29}{photo.why}; from {photo.origin}")
    lines += [
        "",
        "What it can show: which neurons respond to edges, colours, textures, text, faces, fur,",
        "fabric, architecture and so on, with many distinct patches per photo for early and",
        f"middle layers; and, for the {len({p.synset for p in photos if p.synset})} labelled "
        "classes, real misclassifications between",
        "close ImageNet classes for the debugging stage.",
        "",
        "What it cannot show: views of one photo are not independent samples, so",
        "accuracies and per-class statistics describe these few photos, not the classes;",
        "deep-layer neurons selective for objects absent here (most of the 1000 classes)",
        "only get their weak responses; top-k lists are dominated by near-duplicate crops",
        "of the same photo; and nothing here measures how a model does on real data.",
        "For that, run the pipeline on your own labelled images (IMAGES=path).",
        "",
    ]
    return "\n".join(lines)


def build_demo_set(out_dir: str | os.PathLike, n_images: int = 1500, seed: int = 0,
                   side: int = OUT_SIDE) -> Path:
    """Build the demo set in ``out_dir`` (skipped when already complete); return its images.csv.

    ``side`` is the pixel size of the square views; benchmarks use photo-sized views.
    """
    out_dir = Path(out_dir)
    if n_images < 1:
        raise StageError(f"--n-images must be at least 1, got {n_images}")
    if side < 8:
        raise StageError(f"--side must be at least 8 pixels, got {side}")
    if is_complete(out_dir, n_images, seed, side):
        log.info("demo set in %s is complete (n_images=%d, seed=%d); nothing to do", out_dir,
                 n_images, seed)
        # Make re-runs this rule when demo.py is newer than images.csv; a fresh time stamp tells
        # it that the (unchanged) set is up to date.
        os.utime(out_dir / "images.csv")
        return out_dir / "images.csv"

    _check_replaceable(out_dir)
    photos = [photo for photo, _ in SOURCES]
    counts = allocate(n_images, photos)
    names = dict(zip(imagenet.synsets(), imagenet.class_names()))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        rows, files, source_hashes = [], {}, {}
        progress = tqdm(total=n_images, desc="demo views", unit="img", disable=None)
        for index, ((photo, loader), count) in enumerate(zip(SOURCES, counts)):
            if count == 0:
                continue
            array = loader()
            source_hashes[photo.name] = hashlib.sha256(np.ascontiguousarray(array)).hexdigest()
            image = _as_rgb(array)
            min_scale = MIN_SCALE_LABELLED if photo.synset else MIN_SCALE_UNLABELLED
            folder = tmp_dir / photo.synset if photo.synset else tmp_dir
            folder.mkdir(exist_ok=True)
            for view_no in range(count):
                # One generator per view, keyed by (seed, photo, view): a view does not change
                # when other photos or n_images change.
                rng = np.random.default_rng([seed, index, view_no])
                view = (whole_view(image, side) if view_no == 0
                        else make_view(image, rng, min_scale, photo.any_orientation, side))
                data = _jpeg_bytes(view)
                rel = f"{photo.synset + '/' if photo.synset else ''}{photo.name}_{view_no:04d}.jpg"
                (tmp_dir / rel).write_bytes(data)
                files[rel] = hashlib.sha256(data).hexdigest()
                rows.append({"path": rel, "label": photo.synset, "source": photo.name,
                             "class_name": names.get(photo.synset, "")})
                progress.update(1)
        progress.close()
        rows.sort(key=lambda row: row["path"].split("/"))
        write_csv(tmp_dir / "images.csv", rows, ["path", "label", "source", "class_name"])
        write_text(tmp_dir / "README.txt", _readme(photos, counts, n_images, seed, side))
        write_json(tmp_dir / "manifest.json", {
            "parameters": _parameters(n_images, seed, side),
            "photos": [{"name": p.name, "origin": p.origin, "label": p.synset,
                        "class_name": names.get(p.synset, ""), "why": p.why, "views": c,
                        "sha256": source_hashes.get(p.name, "")}
                       for p, c in zip(photos, counts)],
            "files": files,
        })
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the finished set is an ordinary folder
        _replace_dir(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    labelled = sum(c for p, c in zip(photos, counts) if p.synset)
    log.info("wrote %d demo images to %s (%d labelled in %d classes)", n_images, out_dir,
             labelled, len({p.synset for p in photos if p.synset}))
    return out_dir / "images.csv"


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to overwrite a folder that is neither empty nor an earlier demo build."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise StageError(f"{out_dir} exists and is not a folder; choose another demo folder")
    if any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise StageError(f"{out_dir} exists, is not empty and holds no demo manifest.json; "
                         f"it is not replaced: choose another folder or remove it")


def _replace_dir(new: Path, target: Path) -> None:
    """Put the folder ``new`` in place of ``target`` with renames, deleting the old one after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m tools.demo``."""
    parser = stage_parser("Build the offline demo image set from photos shipped in pip packages.")
    parser.prog = "python -m tools.demo"
    parser.add_argument("out_dir", help="folder to create (replaced if incomplete or different)")
    parser.add_argument("--n-images", type=int, default=1500, help="number of views to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentations")
    parser.add_argument("--side", type=int, default=OUT_SIDE, help="pixels per side of each view")
    return parser


@exit_on_stage_error
def main(argv=None):
    """Entry point: build the demo set."""
    args = start_stage(build_parser(), argv)
    build_demo_set(args.out_dir, n_images=args.n_images, seed=args.seed, side=args.side)


if __name__ == "__main__":
    main()
