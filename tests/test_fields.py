"""Tests for common/fields.py: the pixel boxes of feature cells (field_box, crop_box) and the window
a mosaic tile shows (tile_window), on non-square images, fractional fields and fields exactly as
long as the image. Plain arithmetic checked against hand computations; no torch.

Convention (common/rf.py): a field of ``size`` pixels centred on ``start + cell * jump`` covers
the pixels centre − (size − 1)/2 … centre + (size − 1)/2, rounded to the nearest pixel.
"""
import itertools

import pytest

from common.fields import RF, crop_box, field_box, tile_window


def test_a_field_as_long_as_the_image_height_shows_the_whole_height_but_not_the_whole_width():
    """An 11 × 20 image (height ≠ width) and an 11-px square field, jump 2, start 0: cell (0, 3)
    is centred on (0, 6) → rows −5..5, cols 1..11 (unclipped). Its rows span exactly the image's
    height, so the tile shows rows 0..10; its columns are shorter than the width and stay the
    field's own. The same field on the 20 × 11 image turned on its side swaps the roles."""
    field = RF(11, 11, 2, 2, 0, 0)
    assert field_box(field, 0, 3) == (-5, 1, 6, 12)
    assert tile_window(field, 0, 3, 11, 20) == (0, 1, 11, 12)
    assert field_box(field, 3, 0) == (1, -5, 12, 6)
    assert tile_window(field, 3, 0, 20, 11) == (1, 0, 12, 11)
    # Away from the border too: cell (5, 2) spans rows 5..15 (past the bottom) and cols −1..9.
    assert tile_window(field, 5, 2, 11, 20) == (0, -1, 11, 10)
    assert tile_window(field, 2, 5, 20, 11) == (-1, 0, 10, 11)


def test_a_field_one_pixel_shorter_than_the_image_keeps_its_own_window():
    """A 10-px field in an 11-px-high image is not the whole image: the window is the field, run
    past the border where the network saw padding (rows −4..5, cols 1..11 for cell (0, 6) of
    jump 1, start 0). At 11 px it becomes the whole axis, at 13 px too."""
    assert tile_window(RF(10, 11, 1, 1, 0, 0), 0, 6, 11, 20) == (-4, 1, 6, 12)
    assert tile_window(RF(11, 11, 1, 1, 0, 0), 0, 6, 11, 20) == (0, 1, 11, 12)
    assert tile_window(RF(13, 11, 1, 1, 0, 0), 0, 6, 11, 20) == (0, 1, 11, 12)
    # Along the width: 19 px of a 20-px-wide image stay the field, 20 px are the whole width.
    assert tile_window(RF(5, 19, 1, 1, 0, 0), 6, 0, 11, 20) == (4, -9, 9, 10)
    assert tile_window(RF(5, 20, 1, 1, 0, 0), 6, 0, 11, 20) == (4, 0, 9, 20)


def test_deep_fields_show_the_whole_image_from_every_cell():
    """A field larger than the image on both axes shows the whole 12 × 20 image, wherever the cell
    is and however far its field runs past the border."""
    deep = RF(99, 99, 16, 16, 7, 7)
    for y, x in itertools.product(range(3), range(4)):
        assert tile_window(deep, y, x, 12, 20) == (0, 0, 12, 20)


@pytest.mark.parametrize("size", [0.6, 1, 4, 7, 7.4, 7.6, 8, 26.67, 32])
def test_fractional_fields_give_boxes_of_the_rounded_size_from_the_nearest_pixel(size):
    """Estimated and patch fields may be fractional (a 32-px input cut into 3 patches: jump 10.67).
    Every box of a layer has round(size) pixels, and its first pixel is the field's first edge,
    centre − (size − 1)/2, rounded to the nearest pixel: never more than half a pixel off."""
    for start, jump in [(0.0, 1.0), (4.83, 10.67), (0.5, 2.0), (-3.25, 3.5)]:
        field = RF(size, size, jump, jump, start, start)
        for cell in range(6):
            top, left, bottom, right = field_box(field, cell, cell)
            assert bottom - top == right - left == round(size)
            edge = start + cell * jump - (size - 1) / 2
            assert top == left and -0.5 < top - edge <= 0.5, (start, jump, cell)


def test_patch_cell_box_is_its_patch_plus_the_margin():
    """A ViT cell of a 224-px input cut into 14 patches of 16 px, with 8 px of margin on each side
    (size 32, jump 16, start 7.5): cell (0, 13) covers rows −8..23 and cols 200..231 — patch 13 is
    pixels 208..223."""
    field = RF(32, 32, 16, 16, 7.5, 7.5)
    assert field_box(field, 0, 13) == (-8, 200, 24, 232)
    assert crop_box(field, 0, 13, 224, 224) == (0, 200, 24, 224)


def test_crop_box_of_a_field_touching_the_border_from_inside_is_not_clipped():
    """A 5-px field ending exactly on the last row and column of an 11 × 20 image (cell (8, 17),
    jump 1, start 0: rows 6..10, cols 15..19) keeps all its pixels; one cell further loses a row
    and a column; one starting exactly at pixel 0 keeps its first row and column."""
    field = RF(5, 5, 1, 1, 0, 0)
    assert crop_box(field, 8, 17, 11, 20) == (6, 15, 11, 20) == field_box(field, 8, 17)
    assert crop_box(field, 9, 18, 11, 20) == (7, 16, 11, 20)
    assert crop_box(field, 2, 2, 11, 20) == (0, 0, 5, 5) == field_box(field, 2, 2)
    # Wholly below or right of the image: empty along that axis, at the border.
    assert crop_box(field, 30, 3, 11, 20) == (11, 1, 11, 6)
    assert crop_box(field, 3, 30, 11, 20) == (1, 20, 6, 20)


def test_rf_array_of_the_wrong_length_is_refused():
    """01_activations.npz keeps six values per layer; five or seven are an error naming the count."""
    assert RF.from_array([5, 7, 1, 2, 0.5, 1.5]) == RF(5, 7, 1, 2, 0.5, 1.5)
    for values in ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7]):
        with pytest.raises(ValueError, match=f"got {len(values)}"):
            RF.from_array(values)
