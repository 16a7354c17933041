"""Tests of common/images.py and common/imagenet.py: listing, bad-input corpus, geometry, labels.

Every file is made in tmp_path with a known content, so each expected pixel can be worked out on
paper: a broken file must come back as BadImage with the right reason, a usable one as RGB with
the right values.
"""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from common import images, imagenet
from common.cli import StageError
from common.images import BadImage, ImageEntry, list_images, load_rgb, map_labels

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers


def save(path: Path, image: Image.Image, fmt: str | None = None, **kwargs) -> Path:
    """Save ``image`` to ``path`` (creating folders) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kwargs)
    return path


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes = b"") -> bytes:
    """A PNG built by hand (so header fields such as a huge size can be planted)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        """One PNG chunk with its CRC."""
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def noise_rgb(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A noisy RGB image (noise keeps compressed files long enough to cut in half)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reason_of(path) -> str:
    """The reason load_rgb gives for refusing ``path`` (fails the test if it is accepted)."""
    with pytest.raises(BadImage) as info:
        load_rgb(path)
    assert info.value.reason and len(info.value.reason) < 160
    assert str(info.value) == info.value.reason
    return info.value.reason


# ------------------------------------------------------------------ unusable files


def test_zero_byte_file_is_reported_empty(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty" in reason_of(path)


def test_missing_file_and_folder_are_reported(tmp_path):
    assert "not found" in reason_of(tmp_path / "nope.png")
    folder = tmp_path / "looks_like.jpg"
    folder.mkdir()
    assert "folder" in reason_of(folder)


def test_non_image_bytes_with_image_extension(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is a text file, not a picture\n" * 20)
    assert "not an image" in reason_of(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_reported_not_padded(tmp_path, fmt):
    buffer = io.BytesIO()
    noise_rgb(128, 96).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "truncated" in reason_of(path)


def test_truncated_file_reported_even_if_pil_global_allows_it(tmp_path, monkeypatch):
    """Another library may switch PIL's LOAD_TRUNCATED_IMAGES on; load_rgb must not obey it."""
    buffer = io.BytesIO()
    noise_rgb(128, 96).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:2000])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "truncated" in reason_of(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data_is_reported(tmp_path):
    good = io.BytesIO()
    noise_rgb().save(good, "PNG")
    data = bytearray(good.getvalue())
    start = data.index(b"IDAT") + 20
    data[start:start + 200] = bytes(200)  # zeroed compressed data: CRC and zlib stream break
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    assert reason_of(path)


def test_unreadable_file_is_reported(tmp_path, monkeypatch):
    path = save(tmp_path / "secret.png", noise_rgb())

    def denied(*args, **kwargs):
        """Stand-in for open() on a file without read permission."""
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "open", denied, raising=False)
    assert "permission denied" in reason_of(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_by_mode_bits(tmp_path):
    path = save(tmp_path / "secret.png", noise_rgb())
    path.chmod(0)
    try:
        assert "permission" in reason_of(path)
    finally:
        path.chmod(0o644)


def test_decompression_bomb_header_is_refused_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(raw_png(100_000, 100_000, 8, 0))  # claims 10 gigapixels, holds nothing
    assert "too large" in reason_of(path)


@pytest.mark.parametrize("max_pixels", [10_000, 30_000])
def test_max_pixels_is_configurable_and_pil_limits_restored(tmp_path, max_pixels):
    """200×200 = 40 000 px is over both limits; PIL's own global limit is left alone."""
    path = save(tmp_path / "big.png", noise_rgb(200, 200))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match="too large"):
        load_rgb(path, max_pixels=max_pixels)
    assert Image.MAX_IMAGE_PIXELS == before
    image, _ = load_rgb(path, max_pixels=40_000)
    assert image.size == (200, 200)


def test_tiny_images_are_refused_below_min_side(tmp_path):
    one = save(tmp_path / "one.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    assert "too small" in reason_of(one)
    thin = save(tmp_path / "thin.png", Image.new("RGB", (300, 4), (10, 20, 30)))
    assert "too small" in reason_of(thin)
    ok, _ = load_rgb(save(tmp_path / "eight.png", Image.new("RGB", (8, 8), (10, 20, 30))))
    assert ok.size == (8, 8)


def test_concurrent_loading_in_threads_keeps_each_verdict(tmp_path):
    """01_extract decodes in a thread pool: good and broken files mixed must each get their own
    verdict, as they do one at a time."""
    from concurrent.futures import ThreadPoolExecutor
    good = [save(tmp_path / f"ok{i}.png", noise_rgb(seed=i)) for i in range(12)]
    buffer = io.BytesIO()
    noise_rgb(128, 96).save(buffer, "JPEG")
    cut = []
    for i in range(12):
        cut.append(tmp_path / f"cut{i}.jpg")
        cut[-1].write_bytes(buffer.getvalue()[: 1500 + 10 * i])

    def verdict(path):
        """'ok' or the BadImage reason."""
        try:
            load_rgb(path)
            return "ok"
        except BadImage as err:
            return err.reason

    paths = [p for pair in zip(good, cut) for p in pair] * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(verdict, paths))
    assert verdicts == [verdict(p) for p in paths]
    assert verdicts.count("ok") == len(good) * 3


# ------------------------------------------------------------------ conversions


def test_plain_rgb_has_no_note_and_survives_file_close(tmp_path):
    source = noise_rgb()
    image, note = load_rgb(save(tmp_path / "rgb.png", source))
    assert note == ""
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(source))


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_becomes_rgb(tmp_path, mode):
    value = 100 if mode == "L" else 255
    image, note = load_rgb(save(tmp_path / f"{mode}.png", Image.new(mode, (20, 10), value)))
    assert image.mode == "RGB" and image.size == (20, 10)
    assert image.getpixel((3, 3)) == (value, value, value)
    assert "converted to RGB" in note


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("TIFF", "tif")])
def test_cmyk_pure_cyan_becomes_rgb_cyan(tmp_path, fmt, suffix):
    path = save(tmp_path / f"cyan.{suffix}", Image.new("CMYK", (16, 16), (255, 0, 0, 0)), fmt)
    image, note = load_rgb(path)
    assert np.allclose(image.getpixel((8, 8)), (0, 255, 255), atol=3)
    assert "CMYK" in note


def test_palette_without_transparency(tmp_path):
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    palette_image.paste(1, (8, 0, 16, 16))
    image, note = load_rgb(save(tmp_path / "pal.png", palette_image))
    assert image.getpixel((2, 2)) == (200, 10, 10)
    assert image.getpixel((12, 2)) == (10, 200, 10)
    assert note == "palette converted to RGB"


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_with_transparency_is_composited_on_white(tmp_path, suffix):
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette_image.paste(1, (8, 0, 16, 16))
    image, note = load_rgb(save(tmp_path / f"pal_t.{suffix}", palette_image, transparency=0))
    assert image.getpixel((2, 2)) == (255, 255, 255)  # transparent index: white, not black
    assert image.getpixel((12, 2)) == (10, 200, 10)
    assert "composited onto white" in note


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (16, 8), (255, 0, 0, 255))
    rgba.paste((255, 0, 0, 0), (0, 0, 4, 8))  # transparent strip
    rgba.paste((0, 0, 255, 128), (4, 0, 8, 8))  # half-transparent blue
    image, note = load_rgb(save(tmp_path / "rgba.png", rgba))
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert np.allclose(image.getpixel((5, 1)), (127, 127, 255), atol=1)
    assert image.getpixel((12, 1)) == (255, 0, 0)
    assert "composited onto white" in note

    la = Image.new("LA", (16, 8), (0, 0))
    image, note = load_rgb(save(tmp_path / "la.png", la))
    assert image.getpixel((3, 3)) == (255, 255, 255)
    assert "grayscale with alpha" in note


def test_opaque_alpha_is_just_dropped(tmp_path):
    image, note = load_rgb(save(tmp_path / "opaque.png", Image.new("RGBA", (9, 9), (1, 2, 3, 255))))
    assert image.getpixel((0, 0)) == (1, 2, 3)
    assert "alpha dropped" in note


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("TIFF", "tif")])
def test_16bit_gradient_keeps_order_and_full_range(tmp_path, fmt, suffix):
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    path = save(tmp_path / f"g16.{suffix}", Image.fromarray(gradient), fmt)
    image, note = load_rgb(path)
    row = np.asarray(image)[0]
    assert np.array_equal(row[:, 0], row[:, 1]) and np.array_equal(row[:, 0], row[:, 2])
    assert row[0, 0] == 0 and row[-1, 0] == 255  # full range, no clipping at 255 raw counts
    assert np.all(np.diff(row[:, 0].astype(int)) >= 0)
    assert len(np.unique(row[:, 0])) > 200  # ordering kept, not collapsed to a few levels
    assert abs(int(row[128, 0]) - 128) <= 1
    assert "16-bit" in note


def test_16bit_rgb_png_is_scaled_not_clipped(tmp_path):
    width = 256
    ramp = (np.arange(width) * 257).astype(">u2")
    pixels = np.stack([ramp, ramp[::-1], np.full(width, 32896, ">u2")], axis=-1)
    rows = b"".join(b"\x00" + pixels.tobytes() for _ in range(8))
    path = tmp_path / "rgb16.png"
    path.write_bytes(raw_png(width, 8, 16, 2, rows))
    image, _ = load_rgb(path)
    array = np.asarray(image)
    assert tuple(array[0, 0]) == (0, 255, 128)
    assert tuple(array[0, 255]) == (255, 0, 128)


def test_32bit_and_float_images_are_stretched(tmp_path):
    wide = np.tile(np.arange(-1000, 1000, 100, dtype=np.int32), (10, 1))  # 10×20, negative too
    image, note = load_rgb(save(tmp_path / "i32.tif", Image.fromarray(wide, "I")))
    row = np.asarray(image)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row.astype(int)) > 0)
    assert "stretched" in note

    unit = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (10, 1))
    image, note = load_rgb(save(tmp_path / "f.tif", Image.fromarray(unit, "F")))
    row = np.asarray(image)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert "float" in note


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_exif_orientation_6_is_applied(tmp_path, fmt, suffix):
    """Orientation 6 = the camera was turned: stored 40×20, shown 20×40 rotated clockwise,
    so the stored top-left red block ends up top-right."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / f"rot.{suffix}", stored, fmt, exif=exif.tobytes())
    image, note = load_rgb(path)
    assert image.size == (20, 40)
    assert np.allclose(image.getpixel((15, 4)), (255, 0, 0), atol=40)
    assert np.allclose(image.getpixel((4, 4)), (0, 0, 255), atol=40)
    assert "EXIF orientation 6" in note


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0),
                                                                (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    image, note = load_rgb(path)
    assert image.getpixel((8, 8)) == (255, 0, 0)
    assert "first of 3 frames" in note


def test_non_ascii_file_names(tmp_path):
    path = save(tmp_path / "Katzen-Café" / "naïve_猫.PNG", noise_rgb(), "PNG")
    entries = list_images(tmp_path)
    assert entries == [ImageEntry(str(path), "Katzen-Café")]
    image, _ = load_rgb(entries[0].path)
    assert image.size == (64, 48)


# ------------------------------------------------------------------ listing


def _relative(entries, root) -> list[tuple[str, str]]:
    """Entries as (path relative to root, label) for readable asserts."""
    return [(Path(e.path).relative_to(root).as_posix(), e.label) for e in entries]


def test_folder_with_classes_nesting_top_files_and_junk(tmp_path):
    for rel in ["n01440764/b.jpg", "n01440764/a.JPEG", "tabby/deep/er/x.png", "tabby/y.webp",
                "top.bmp", "n01440764/.hidden.jpg", ".cache/z.jpg", "tabby/readme.txt",
                "notes.csv", "fake/not_really.jpg"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")  # listing never opens the files
    entries = list_images(tmp_path)
    assert _relative(entries, tmp_path) == [
        ("fake/not_really.jpg", "fake"),
        ("n01440764/a.JPEG", "n01440764"),
        ("n01440764/b.jpg", "n01440764"),
        ("tabby/deep/er/x.png", "tabby"),
        ("tabby/y.webp", "tabby"),
        ("top.bmp", ""),
    ]
    assert entries == list_images(tmp_path)  # deterministic
    assert "not an image" in reason_of(entries[0].path)  # listed, then reported by load_rgb


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_symlinked_class_folders_are_followed_without_looping(tmp_path):
    store = tmp_path / "store" / "cats"
    store.mkdir(parents=True)
    (store / "c.png").write_bytes(b"x")
    root = tmp_path / "set"
    root.mkdir()
    (root / "tabby").symlink_to(store, target_is_directory=True)
    (store / "loop").symlink_to(root, target_is_directory=True)  # points back up the tree
    assert _relative(list_images(root), root) == [("tabby/c.png", "tabby")]


def test_flat_folder_has_no_labels(tmp_path):
    for name in ["b.png", "a.tiff", "c.gif"]:
        (tmp_path / name).write_bytes(b"x")
    assert _relative(list_images(tmp_path), tmp_path) == [("a.tiff", ""), ("b.png", ""),
                                                           ("c.gif", "")]


def test_csv_list_with_relative_absolute_paths_and_bom(tmp_path):
    elsewhere = save(tmp_path / "elsewhere" / "abs.png", noise_rgb())
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "set.csv").write_text(
        "\ufeffPath,Label,comment\n"
        f"imgs/one.jpg,n02123045,x\n"
        f"{elsewhere},,y\n"
        f"imgs/two.jpg, tabby ,z\n", encoding="utf-8")
    entries = list_images(lists / "set.csv")
    assert entries == [ImageEntry(str(lists / "imgs" / "one.jpg"), "n02123045"),
                       ImageEntry(str(elsewhere), ""),
                       ImageEntry(str(lists / "imgs" / "two.jpg"), "tabby")]


def test_csv_without_label_column_is_unlabelled(tmp_path):
    (tmp_path / "l.csv").write_text("path\na.png\nb.png\n")
    assert [e.label for e in list_images(tmp_path / "l.csv")] == ["", ""]


@pytest.mark.parametrize("content,message", [
    ("file,label\na.png,x\n", "no 'path' column"),
    ("path,label\n,x\n", "empty path"),
])
def test_bad_csv_lists_stop_with_a_fix(tmp_path, content, message):
    (tmp_path / "l.csv").write_text(content)
    with pytest.raises(StageError, match=message):
        list_images(tmp_path / "l.csv")


def test_missing_and_empty_sources_stop_with_a_fix(tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="no image files"):
        list_images(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(StageError, match="no image files"):
        list_images(tmp_path / "junk")
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(StageError, match="neither a folder nor a .csv"):
        list_images(tmp_path / "list.txt")


# ------------------------------------------------------------------ network input


@pytest.mark.parametrize("size_in,side", [
    ((400, 300), 224), ((300, 400), 224), ((224, 224), 224), ((17, 9), 224), ((1000, 230), 224),
    # an odd excess (where the corner is rounded), a longer side that int() truncates, a square
    # that is only resampled, and another network size
    ((225, 224), 224), ((224, 227), 224), ((333, 500), 224), ((100, 100), 224),
    ((641, 427), 240), ((7, 3), 5)])
def test_network_input_matches_torchvision_resize_and_centre_crop(size_in, side):
    """network_input is written with PIL; torchvision's transforms are the reference."""
    from torchvision import transforms
    source = noise_rgb(*size_in, seed=3)
    ours = images.network_input(source, side)
    reference = transforms.Compose([
        transforms.Resize(side, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(side)])(source)
    assert ours.size == (side, side)
    assert np.array_equal(np.asarray(ours), np.asarray(reference))


def test_network_input_does_not_load_torchvision():
    """09's image workers resize every image without paying torchvision's import (over a
    second: it loads torch's compiler)."""
    code = ("import sys; from PIL import Image; from common.images import network_input; "
            "network_input(Image.new('RGB', (300, 200)), 224); "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_network_input_keeps_the_centre():
    """400×200, left half black, right half white → 100×100 crop of the middle 200×100 of the
    200×100 resize: columns 0–49 black, 50–99 white."""
    source = Image.new("RGB", (400, 200), (0, 0, 0))
    source.paste((255, 255, 255), (200, 0, 400, 200))
    row = np.asarray(images.network_input(source, 100))[50, :, 0].astype(int)
    assert np.all(row[:48] < 5) and np.all(row[52:] > 250)


def test_to_tensor_normalises_per_channel():
    tensor = images.to_tensor(Image.new("RGB", (5, 4), (255, 0, 51)), (0.5, 0.5, 0.2),
                              (0.5, 0.5, 0.1))
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, -1.0, 0.0]), atol=1e-5)
    gray = images.to_tensor(Image.new("L", (2, 2), 255), (0, 0, 0), (1, 1, 1))
    assert gray.shape == (3, 2, 2) and torch.all(gray == 1)


# ------------------------------------------------------------------ labels


def test_imagenet_table_matches_torchvision_and_known_synsets():
    from torchvision.models import ResNet50_Weights
    names, wnids = imagenet.class_names(), imagenet.synsets()
    assert names == ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(set(wnids)) == 1000 and all(w.startswith("n") and len(w) == 9 for w in wnids)
    assert wnids == sorted(wnids)  # ILSVRC class indices follow the sorted synset ids
    assert (wnids[0], names[0]) == ("n01440764", "tench")
    assert (wnids[281], names[281]) == ("n02123045", "tabby")
    assert (wnids[999], names[999]) == ("n15075141", "toilet tissue")


def test_map_labels_by_synset_name_and_index():
    names = imagenet.class_names()
    mapping, unmapped = map_labels(
        ["n01440764", "golden_retriever", "Golden Retriever", "  tabby ", "207", "", "n01440764",
         "golden retriver", "1000", "n99999999", "dog", "-1"], names, imagenet.synsets())
    assert mapping == {"n01440764": 0, "golden_retriever": 207, "Golden Retriever": 207,
                       "  tabby ": 281, "207": 207}
    assert unmapped == ["golden retriver", "1000", "n99999999", "dog", "-1"]


def test_map_labels_uses_imagenet_synsets_for_imagenet_names_only():
    assert map_labels(["n02123045"], imagenet.class_names())[0] == {"n02123045": 281}
    mapping, unmapped = map_labels(["n02123045", "cat", "1"], ["cat", "dog"])
    assert mapping == {"cat": 0, "1": 1} and unmapped == ["n02123045"]


def test_map_labels_refuses_ambiguous_names_and_handles_no_names():
    mapping, unmapped = map_labels(["crane", "2"], ["crane", "Crane", "heron"])
    assert mapping == {"2": 2} and unmapped == ["crane"]
    mapping, unmapped = map_labels(["3", "cat"], None)
    assert mapping == {"3": 3} and unmapped == ["cat"]



@pytest.mark.parametrize("size_in,side,shapes", [
    ((400, 300), 224, [(64, 64), (68, 68)]), ((300, 400), 224, [(40, 40)]),
    ((641, 427), 240, [(30, 50)]), ((224, 224), 224, [(64, 64)]), ((48, 48), 32, [(8, 8)])])
def test_small_views_are_the_network_view_shrunk(size_in, side, shapes):
    """02's shrunk copies are made straight from the photo: the same picture as shrinking the
    network's own view, of the square the network saw (the red bands outside it stay out)."""
    width, height = size_in
    side_in = min(size_in)
    source = Image.new("RGB", size_in, (220, 30, 30))  # red where the crop cuts away ...
    yy, xx = np.mgrid[0:side_in, 0:side_in] * (2 * np.pi / side_in)
    waves = np.stack([128 + 90 * np.sin(3 * xx), 128 + 90 * np.cos(2 * yy),
                      128 + 90 * np.sin(xx + yy)], -1).astype(np.uint8)
    source.paste(Image.fromarray(waves), ((width - side_in) // 2, (height - side_in) // 2))
    views = images.small_views(source, side, shapes)
    full = images.network_view(source, side)
    for height_out, width_out in shapes:
        ref = np.asarray(full.resize((width_out, height_out), Image.BILINEAR)).astype(int)
        got = np.asarray(views[height_out, width_out]).astype(int)
        assert got.shape == (height_out, width_out, 3)
        diff = np.abs(got - ref)
        # a pixel's shift of the waves would differ by up to ~25 levels inside; the outer ring
        # blends the red border in proportions that depend on the resampling
        assert diff.mean() < 2 and diff[2:-2, 2:-2].max() <= 6, (size_in, diff.mean())


def test_small_views_of_a_grey_model_are_grey():
    """For a one-channel model the shrunk copies are grey, as the network saw the image."""
    views = images.small_views(noise_rgb(300, 200, seed=2), 100, [(20, 20)], channels=1)
    pixels = np.asarray(views[20, 20])
    assert pixels.shape == (20, 20, 3) and pixels.std() > 0
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
