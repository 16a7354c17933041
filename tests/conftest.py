"""Shared test fixtures: loading stage scripts, the tiny fake model and images made on the fly."""
import pathlib
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.stages import load_stage  # noqa: E402,F401  (re-exported for the tests)

FAKE_MODEL = f"{ROOT / 'tests' / 'fake_model.py'}:build"


def make_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A small RGB picture whose content the fake model's neurons can be checked against.

    red: a red square on grey at a random place; edges: vertical black/white bars with slight noise;
    plain: uniform grey with slight noise.
    """
    arr = np.full((size, size, 3), 120, np.uint8)
    if kind == "red":
        s = size // 3
        top, left = rng.integers(0, size - s, size=2)
        arr[top:top + s, left:left + s] = (230, 20, 20)
    elif kind == "edges":
        period = int(rng.integers(4, 9))
        arr[:, (np.arange(size) // period) % 2 == 1] = 250
        arr[:, (np.arange(size) // period) % 2 == 0] = 10
        # slight noise, so that no two images are byte-identical (01 skips duplicates)
        arr = (arr.astype(int) + rng.integers(-3, 4, size=arr.shape)).clip(0, 255).astype(np.uint8)
    else:
        arr = np.clip(arr + rng.integers(-3, 4, size=arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def project_copy(root: pathlib.Path) -> pathlib.Path:
    """A copy of the project's scripts, Makefile and common/, tests/, tools/ (sharing .venv) in ``root``.

    Copies keep their timestamps, so that make in the copy behaves as in the working tree, and
    touching a script there never touches the working copy.
    """
    root.mkdir(parents=True)
    for item in ROOT.iterdir():
        if item.name.endswith(".py") or item.name in ("Makefile", "requirements.txt"):
            shutil.copy2(item, root / item.name)
    for folder in ("common", "tests", "tools"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".venv").symlink_to(ROOT / ".venv")
    return root


def labelled_images(root: pathlib.Path, per_class: int, seed: int) -> pathlib.Path:
    """``per_class`` 48-px images of each kind in class folders (0 = red, 1 = edges, 2 = plain)
    under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for label, kind in enumerate(["red", "edges", "plain"]):
        (root / str(label)).mkdir(parents=True)
        for i in range(per_class):
            make_image(kind, 48, rng).save(root / str(label) / f"{kind}_{i:02d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    """A labelled folder of 30 images (classes 0 = red, 1 = edges, 2 = plain) plus one corrupt file."""
    root = labelled_images(tmp_path / "images", 10, 0)
    (root / "2" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


@pytest.fixture
def fake_bundle():
    """The fake model loaded through the real loader, with a 32-pixel input."""
    from common.models import load_model
    return load_model(FAKE_MODEL, device="cpu", input_size=32)


STRIPE_FOLDERS = ["Pin_Stripe", "narrow-band", "WIDE band", "broad_band"]  # fake_grey_model's
# classes, written as a dataset might: other case, '_' and '-' for spaces


def stripe_image(period: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Black-and-white stripes of ``period`` px, random orientation and phase, slight noise."""
    phase = int(rng.integers(0, period))
    on = ((np.arange(size) + phase) // (period // 2)) % 2 == 1
    grey = np.where(on[None, :], 250, 5) * np.ones((size, 1))
    if rng.random() < 0.5:
        grey = grey.T
    grey = grey + rng.integers(-3, 4, size=grey.shape)
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")


@pytest.fixture
def stripe_folder(tmp_path):
    """8 stripe images per class of tests/fake_grey_model.py in class folders, and 4 pin-stripe
    images filed under narrow-band (the model gets those 'wrong'), plus classes.txt beside."""
    rng = np.random.default_rng(1)
    root = tmp_path / "stripes"
    for folder, period in zip(STRIPE_FOLDERS, (2, 4, 8, 16)):
        (root / folder).mkdir(parents=True)
        for i in range(8):
            stripe_image(period, rng).save(root / folder / f"{i}.png")
    for i in range(4):
        stripe_image(2, rng).save(root / "narrow-band" / f"mislabelled_{i}.png")
    (tmp_path / "classes.txt").write_text("pin stripe\nnarrow band\nwide band\nbroad band\n")
    return root
