"""Stage 02: crop geometry, mosaic layout and the real script after a fake-model extraction."""
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from common.artefacts import Run, read_activations, read_images, read_mosaics
from common.cli import StageError
from common.images import load_rgb, network_input, small_views
from common.fields import RF, field_box
from conftest import FAKE_MODEL, load_stage

extract = load_stage("01_extract")
mosaics = load_stage("02_mosaics")


@pytest.fixture
def extracted(image_folder, tmp_path):
    """A 01 run of the fake model (conv2's 16×16 maps are small enough to be stored)."""
    out = tmp_path / "run"
    extract.main(["--images", str(image_folder), "--run", str(out), "--model", FAKE_MODEL,
                  "--layers", "relu1,conv2", "--input-size", "32", "--topk", "9",
                  "--batch-size", "8", "--device", "cpu", "--max-map-side", "16"])
    return out


def run_mosaics(run_dir, *extra):
    """Run 02's main on a 01 run folder; return the index rows."""
    mosaics.main(["--run", str(run_dir), "--grid", "3", "--tile", "8", "--workers", "1", *extra])
    return read_mosaics(run_dir / "02_mosaics.csv")


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
    # and it compresses: a 640-px mosaic of flat tiles takes under 2 % of its raw bytes
    flat = np.repeat(np.repeat(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 80, 0), 80, 1)
    assert len(mosaics.png_bytes(flat)) < 0.02 * flat.nbytes


def test_png_is_the_standard_format_decoded_by_hand():
    """The encoder writes what the PNG standard requires, so that strict decoders (libpng, the
    browsers') read the mosaics too, not only Pillow: the signature; an IHDR for an 8-bit RGB
    image (width, height, bit depth 8, colour type 2, compression, filter and interlace methods
    0); chunks whose CRC covers tag and body; and an IDAT that zlib inflates into rows each
    starting with filter type 2 ("Up": each byte is its difference from the byte above), which
    summed down the columns modulo 256 give back every pixel of a 5 × 9 image."""
    import struct
    import zlib
    rgb = np.random.default_rng(5).integers(0, 256, size=(5, 9, 3), dtype=np.uint8)
    data = mosaics.png_bytes(rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        length, tag = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == \
            zlib.crc32(tag + body), tag
        chunks[tag] = body
        at += 12 + length
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"] and chunks[b"IEND"] == b""
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (9, 5, 8, 2, 0, 0, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(5, 1 + 9 * 3)
    assert (rows[:, 0] == 2).all()
    pixels = np.cumsum(rows[:, 1:].astype(np.int64), axis=0) % 256
    np.testing.assert_array_equal(pixels.reshape(5, 9, 3), rgb)


def test_tiles_cut_from_a_mosaic_are_those_pasted_row_by_row():
    """A 3 × 3 grid of 4-px tiles: ranks 0–6 fill two rows and the first place of the third (rank
    4 missing: its place stays grey). Rank 5 sits on row 1, column 2, pixels [4:8, 8:12]; cutting
    the tiles back gives each rank's pixels in rank order, whatever is asked past the grid."""
    from common.mosaics import cut_tiles, paste_tiles
    rng = np.random.default_rng(7)
    tiles = [rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8) for _ in range(7)]
    pasted, placed = paste_tiles([(r, None if r == 4 else t) for r, t in enumerate(tiles)], 3, 4)
    assert pasted.shape == (12, 12, 3) and placed == 6
    np.testing.assert_array_equal(pasted[4:8, 8:12], tiles[5])
    np.testing.assert_array_equal(pasted[8:12, 0:4], tiles[6])
    assert (pasted[4:8, 4:8] == mosaics.BACKGROUND).all() and (pasted[8:, 4:] == 128).all()
    cut = cut_tiles(Image.fromarray(pasted), 3, 4, 7)
    assert len(cut) == 7 and len(cut_tiles(pasted, 3, 4, 20)) == 9
    for rank, tile in enumerate(tiles):
        expected = np.full((4, 4, 3), 128, np.uint8) if rank == 4 else tile
        np.testing.assert_array_equal(cut[rank], expected, f"rank {rank}")


def test_mask_crop_boxes_the_blob_with_the_peak():
    """Two blobs: the crop is the box of the one holding the peak, upsampled ×4."""
    image = np.full((16, 16, 3), 200, np.uint8)
    act = np.zeros((4, 4), np.float32)
    act[0, 0] = 1.0   # peak
    act[3, 3] = 0.8   # a second blob, above the 0.5 level but not connected
    crop = mosaics.mask_crop(image, act)
    assert crop.shape[0] < 16 and crop.shape[1] < 16   # only the first blob's box
    assert crop[0, 0, 0] == 200                         # inside the blob: untouched


def test_resize_stack_matches_pillow_one_by_one():
    """Two-call batched resizing equals separate Pillow resizes within one grey level."""
    rng = np.random.default_rng(1)
    for h, w, height, width in [(7, 9, 13, 20), (67, 67, 64, 64), (211, 150, 64, 45),
                                (30, 20, 12, 40), (5, 5, 5, 9), (3, 3, 3, 3)]:
        images = rng.integers(0, 256, size=(4, h, w, 3), dtype=np.uint8)
        got = mosaics.resize_stack(images, height, width)
        assert got.shape == (4, height, width, 3)
        for one, mine in zip(images, got):
            pil = np.asarray(Image.fromarray(one).resize((width, height), Image.BILINEAR))
            assert np.abs(mine.astype(int) - pil).max() <= 1, (h, w, height, width)


def reference_tile(image: np.ndarray, rf: RF, y: int, x: int, tile: int) -> np.ndarray:
    """Independent rendering of a tile: the field (whole image where the field is larger) pasted on
    grey at full resolution, then one Pillow resize to the tile."""
    top, left, bottom, right = field_box(rf, y, x)
    side = image.shape[0]
    if bottom - top >= side:
        top, bottom = 0, side
    if right - left >= side:
        left, right = 0, side
    canvas = np.full((bottom - top, right - left, 3), mosaics.BACKGROUND, np.uint8)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(bottom, side), min(right, side)
    canvas[y0 - top:y1 - top, x0 - left:x1 - left] = image[y0:y1, x0:x1]
    return np.asarray(Image.fromarray(canvas).resize((tile, tile), Image.BILINEAR))


@pytest.fixture
def one_image_cache(tmp_path):
    """Factory: decode one smooth 48-px image into 02's caches, as the stage's workers would."""
    def make(shrunk_sizes=()):
        yy, xx = np.mgrid[0:48, 0:48]
        rgb = np.stack([yy * 5, xx * 5, 255 - (yy + xx) * 2], -1).astype(np.uint8)
        path = tmp_path / "smooth.png"
        Image.fromarray(rgb).save(path)
        cache = tmp_path / "cache"
        cache.mkdir(exist_ok=True)
        slots = {mosaics.FULL: 0} | {shape: 0 for shape in shrunk_sizes}
        mosaics.make_cache(cache, {key: 1 for key in slots}, 48)
        mosaics._init_worker(str(cache), 48)
        assert mosaics._decode((str(path), slots, 3)) == ""
        return np.asarray(network_input(load_rgb(path)[0], 48))
    return make


def test_rf_tile_inside_the_image_is_the_enlarged_field(one_image_cache):
    """Field 9 px, tile 18 px: an interior cell's tile is its 9×9 crop at twice the size."""
    image = one_image_cache()
    rf = RF(9, 9, 4, 4, 0, 0)
    (tile,) = mosaics.rf_tiles([(0, 5, 6)], rf, 18)   # centre (20, 24): rows 16–24, cols 20–28
    crop = image[16:25, 20:29]
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((18, 18),
                                                                              Image.BILINEAR))
    assert np.abs(tile.astype(int) - expected).max() <= 1


def test_rf_tile_past_the_border_is_grey_at_the_same_scale(one_image_cache):
    """Cell (0, 0) of a 9-px field centred on pixel 0: its first 4 rows and columns lie outside
    the image and stay grey; the rest shows pixels 0–4 at the layer's scale (2×), not stretched."""
    image = one_image_cache()
    rf = RF(9, 9, 4, 4, 0, 0)
    (tile,) = mosaics.rf_tiles([(0, 0, 0)], rf, 18)
    assert (tile[:7] == mosaics.BACKGROUND).all() and (tile[:, :7] == mosaics.BACKGROUND).all()
    assert np.abs(tile.astype(int) - reference_tile(image, rf, 0, 0, 18)).max() <= 1
    inside = tile[9:, 9:].astype(int)   # away from the blended edge: image pixels 0–4
    assert (np.abs(inside - mosaics.BACKGROUND).sum(-1) > 0).all()
    # A field wholly outside the image gives no tile.
    assert mosaics.rf_tiles([(0, 0, 0)], RF(3, 3, 1, 1, -10, -10), 18) == [None]


def test_deep_field_tile_is_the_whole_image_shrunk_once(one_image_cache):
    """A field larger than the input shows the whole input: the shrunk copy made at decoding."""
    image = one_image_cache([(16, 16)])
    rf = RF(99, 99, 16, 16, 7, 7)
    assert mosaics.layer_plan(rf, 48, 48, 16)[3] == (16, 16)
    first, second = mosaics.rf_tiles([(0, 0, 0), (0, 2, 1)], rf, 16)
    np.testing.assert_array_equal(first, second)   # every cell shows the same whole image
    whole = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR))
    assert np.abs(first.astype(int) - whole).mean() < 1.5


def test_large_field_cut_from_the_shrunk_copy_matches_full_resolution(one_image_cache):
    """A 41-px field (most of the 48-px image) in a 16-px tile is cut from the shrunk copy; it
    matches cutting at full resolution and resizing, up to resampling differences."""
    rf = RF(41, 41, 8, 8, 3, 3)
    shrunk = mosaics.layer_plan(rf, 48, 48, 16)[3]
    assert shrunk == (19, 19)
    image = one_image_cache([shrunk])
    for y, x in [(2, 3), (0, 0), (5, 5)]:
        (tile,) = mosaics.rf_tiles([(0, y, x)], rf, 16)
        diff = np.abs(tile.astype(int) - reference_tile(image, rf, y, x, 16))
        assert diff.mean() < 6, (y, x, diff.mean())


def test_mosaics_end_to_end(extracted):
    """One PNG per neuron of the right size; tile 0 is the top image's receptive field."""
    rows = run_mosaics(extracted)
    layers, _, tops = read_activations(extracted / "01_activations.npz")
    assert len(rows) == sum(tops[name].channels for name in layers)
    first = rows[0]
    assert (first.layer, first.channel, first.grid, first.tile_px, first.crop) == (
        "relu1", 0, 3, 8, "rf")
    assert first.path == extracted / "02_mosaics" / "relu1" / "0.png"
    png = Image.open(first.path)
    assert png.size == (24, 24)
    assert first.n_tiles == 9

    # Rebuild tile 0 of relu1 / channel 0 by hand from the network input and compare.
    top = tops["relu1"]
    paths = {r.image_id: r.path for r in read_images(extracted / "01_images.csv")}
    image = np.asarray(network_input(load_rgb(paths[int(top.image_ids[0, 0])])[0], 32))
    expected = reference_tile(image, RF(*top.rf.tolist()), int(top.y[0, 0]), int(top.x[0, 0]), 8)
    assert np.abs(np.asarray(png.convert("RGB"))[:8, :8].astype(int) - expected).max() <= 1
    # relu1 channel 0 detects red: its top tile is mostly red.
    assert expected[..., 0].mean() > expected[..., 1].mean() + 50


def test_deep_layer_tiles_are_whole_inputs_shrunk_from_the_photos(image_folder, tmp_path):
    """A layer whose field covers the input (the pooled one) is tiled from whole inputs shrunk
    straight from the photos, kept in a cache of their own beside relu1's full-size inputs: each
    of its tiles is its own top image, in rank order, whatever images the other layer needs."""
    run_dir = tmp_path / "run"
    extract.main(["--images", str(image_folder), "--run", str(run_dir), "--model", FAKE_MODEL,
                  "--layers", "relu1,gap", "--input-size", "32", "--topk", "9",
                  "--batch-size", "8", "--device", "cpu"])
    rows = run_mosaics(run_dir)
    layers, _, tops = read_activations(run_dir / "01_activations.npz")
    assert mosaics.layer_plan(RF(*tops["gap"].rf.tolist()), 32, 32, 8)[3] == (8, 8)
    assert mosaics.layer_plan(RF(*tops["relu1"].rf.tolist()), 32, 32, 8)[3] is None
    paths = {r.image_id: r.path for r in read_images(run_dir / "01_images.csv")}
    # the two layers' image sets differ, so their caches number the images differently
    assert set(tops["gap"].image_ids[:, :9].ravel()) != set(tops["relu1"].image_ids[:, :9].ravel())
    for row in (r for r in rows if r.layer == "gap"):
        png = np.asarray(Image.open(row.path).convert("RGB"))
        for rank, image_id in enumerate(tops["gap"].image_ids[row.channel, :9]):
            # small_views is checked against the network's own view in test_images.py
            photo = load_rgb(paths[int(image_id)])[0]
            r, c = divmod(rank, 3)
            np.testing.assert_array_equal(png[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8],
                                          np.asarray(small_views(photo, 32, [(8, 8)])[8, 8]))
    # and relu1's best tile is still its top image's field, cut from the full-size input
    relu1 = next(r for r in rows if r.layer == "relu1" and r.channel == 0)
    top = tops["relu1"]
    image = np.asarray(network_input(load_rgb(paths[int(top.image_ids[0, 0])])[0], 32))
    expected = reference_tile(image, RF(*top.rf.tolist()), int(top.y[0, 0]), int(top.x[0, 0]), 8)
    png = np.asarray(Image.open(relu1.path).convert("RGB"))
    assert np.abs(png[:8, :8].astype(int) - expected).max() <= 1


def test_too_little_scratch_space_is_a_clear_error(extracted, monkeypatch):
    """Before decoding anything, 02 checks that the decoded images fit on the disk."""
    full_disk = shutil._ntuple_diskusage(total=10**9, used=10**9, free=0)
    monkeypatch.setattr(mosaics.shutil, "disk_usage", lambda _path: full_disk)
    with pytest.raises(StageError, match="scratch space.*--layers"):
        mosaics.run(Run(extracted), mosaics.Settings(grid=3, tile=8))
    assert not (extracted / "02_mosaics.csv").exists()


def test_mask_mode_and_fallback(extracted, capfd):
    """--crop mask uses stored maps (conv2) and falls back to rf where none were kept (relu1)."""
    rows = run_mosaics(extracted, "--crop", "mask")
    modes = {(r.layer, r.crop) for r in rows}
    assert modes == {("relu1", "rf"), ("conv2", "mask")}
    assert "relu1 has no stored activation maps" in capfd.readouterr().err


def test_parallel_equals_serial(extracted, tmp_path):
    """Two worker processes write the same mosaics as one."""
    serial = run_mosaics(extracted)
    first_bytes = serial[5].path.read_bytes()
    parallel = run_mosaics(extracted, "--workers", "2")
    assert serial == parallel
    assert parallel[5].path.read_bytes() == first_bytes


def test_fewer_images_than_tiles_leaves_grey(extracted):
    """A 4×4 grid with only 9 stored crops per neuron fills 9 tiles and leaves the rest grey."""
    rows = run_mosaics(extracted, "--grid", "4")
    assert all(r.n_tiles == 9 for r in rows)
    png = np.asarray(Image.open(rows[0].path).convert("RGB"))
    assert (png[24:, 8:] == mosaics.BACKGROUND).all()   # tiles 13–15 of the last row
