"""Stage 02: crop geometry, mosaic layout and the real script after a fake-model extraction."""
import csv
import io

import numpy as np
import pytest
from PIL import Image

from common.activations import read_activations
from common.images import load_rgb, network_input
from conftest import FAKE_MODEL, load_stage

extract = load_stage("01_extract")
mosaics = load_stage("02_mosaics")


@pytest.fixture
def extracted(image_folder, tmp_path):
    """A 01 run of the fake model (conv2's 16×16 maps are small enough to be stored)."""
    out = tmp_path / "run"
    extract.main(["--images", str(image_folder), "--out", str(out), "--model", FAKE_MODEL,
                  "--layers", "relu1,conv2", "--input-size", "32", "--topk", "9",
                  "--batch-size", "8", "--device", "cpu", "--max-map-side", "16"])
    return out


def run_mosaics(run_dir, *extra):
    """Run 02's main on a 01 run folder; return the index rows."""
    mosaics.main(["--activations", str(run_dir / "01_activations.npz"),
                  "--images", str(run_dir / "01_images.csv"), "--out-dir",
                  str(run_dir / "02_mosaics"), "--index", str(run_dir / "02_mosaics.csv"),
                  "--grid", "3", "--tile", "8", "--workers", "1", *extra])
    with open(run_dir / "02_mosaics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_letterbox_keeps_aspect_and_centres():
    """A 4×2 (h×w) crop in an 8-px tile becomes 8×4 centred between grey bands."""
    crop = np.zeros((4, 2, 3), np.uint8)
    tile = np.asarray(mosaics.letterbox(crop, 8))
    assert tile.shape == (8, 8, 3)
    assert (tile[:, 2:6] == 0).all()
    assert (tile[:, :2] == mosaics.BACKGROUND).all() and (tile[:, 6:] == mosaics.BACKGROUND).all()


def test_png_writer_round_trips_exactly():
    """The hand-made PNG encoder gives back every pixel when read by Pillow (odd sizes too)."""
    rng = np.random.default_rng(4)
    for shape in [(640, 640, 3), (7, 13, 3), (1, 1, 3)]:
        rgb = rng.integers(0, 256, size=shape, dtype=np.uint8)
        rgb[: shape[0] // 2] = 200  # flat areas as well as noise
        img = Image.open(io.BytesIO(mosaics.png_bytes(rgb)))
        assert img.mode == "RGB" and img.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(img), rgb)


def test_mask_crop_boxes_the_blob_with_the_peak():
    """Two blobs: the crop is the box of the one holding the peak, upsampled ×4."""
    image = np.full((16, 16, 3), 200, np.uint8)
    act = np.zeros((4, 4), np.float32)
    act[0, 0] = 1.0   # peak
    act[3, 3] = 0.8   # a second blob, above the 0.5 level but not connected
    crop = mosaics.mask_crop(image, act)
    assert crop.shape[0] < 16 and crop.shape[1] < 16   # only the first blob's box
    assert crop[0, 0, 0] == 200                         # inside the blob: untouched


def test_mosaics_end_to_end(extracted):
    """One PNG per neuron of the right size; tile 0 is the top image's receptive field."""
    rows = run_mosaics(extracted)
    layers, _, tops = read_activations(extracted / "01_activations.npz")
    assert len(rows) == sum(tops[name].channels for name in layers)
    first = rows[0]
    assert (first["layer"], first["channel"], first["grid"], first["tile_px"], first["crop"]) == (
        "relu1", "0", "3", "8", "rf")
    png = Image.open(extracted / first["path"])
    assert png.size == (24, 24)
    assert int(first["n_tiles"]) == 9

    # Rebuild tile 0 of relu1 / channel 0 by hand from the network input and compare.
    top = tops["relu1"]
    with open(extracted / "01_images.csv", newline="") as fh:
        paths = {int(r["image_id"]): r["path"] for r in csv.DictReader(fh)}
    image = np.asarray(network_input(load_rgb(paths[int(top.image_ids[0, 0])])[0], 32))
    crop = mosaics.rf_crop(image, top.rf, top.y[0, 0], top.x[0, 0])
    expected = np.asarray(mosaics.letterbox(np.ascontiguousarray(crop), 8))
    np.testing.assert_array_equal(np.asarray(png.convert("RGB"))[:8, :8], expected)
    # relu1 channel 0 detects red: its top tile is mostly red.
    assert expected[..., 0].mean() > expected[..., 1].mean() + 50


def test_mask_mode_and_fallback(extracted, capfd):
    """--crop mask uses stored maps (conv2) and falls back to rf where none were kept (relu1)."""
    rows = run_mosaics(extracted, "--crop", "mask")
    modes = {(r["layer"], r["crop"]) for r in rows}
    assert modes == {("relu1", "rf"), ("conv2", "mask")}
    assert "relu1 has no stored activation maps" in capfd.readouterr().err


def test_parallel_equals_serial(extracted, tmp_path):
    """Two worker processes write the same mosaics as one."""
    serial = run_mosaics(extracted)
    first_bytes = (extracted / serial[5]["path"]).read_bytes()
    parallel = run_mosaics(extracted, "--workers", "2")
    assert serial == parallel
    assert (extracted / parallel[5]["path"]).read_bytes() == first_bytes


def test_fewer_images_than_tiles_leaves_grey(extracted):
    """A 4×4 grid with only 9 stored crops per neuron fills 9 tiles and leaves the rest grey."""
    rows = run_mosaics(extracted, "--grid", "4")
    assert all(r["n_tiles"] == "9" for r in rows)
    png = np.asarray(Image.open(extracted / rows[0]["path"]).convert("RGB"))
    assert (png[24:, 8:] == mosaics.BACKGROUND).all()   # tiles 13–15 of the last row
