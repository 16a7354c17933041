"""Tests for common/rf.py: exact receptive fields of tiny networks, crop boxes, and a gradient probe.

Expected values are worked out by hand with the recurrence, per axis, for a window of kernel k,
stride s, left/top padding p and dilation d applied to a field (first pixel f, size r, jump j):
    f' = f - p*j        r' = r + d*(k-1)*j        j' = j*s        start = f + (r-1)/2
starting from the input itself: f = 0, r = 1, j = 1 (pixel i has its centre at i).
"""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from common.cli import StageError
from common.fields import RF, crop_box, field_box
from common.rf import _DilatedWindow, estimate_receptive_fields, patch_field, receptive_fields


def rf(size, jump, start):
    """A square RF (same values along both axes)."""
    return RF(size, size, jump, jump, start, start)


class Residual(nn.Module):
    """out = main(x) + skip(x)."""

    def __init__(self, main, skip):
        """Keep the two branches."""
        super().__init__()
        self.main, self.skip = main, skip

    def forward(self, x):
        """Add the branches."""
        return self.main(x) + self.skip(x)


class Concat(nn.Module):
    """Two branches concatenated along channels, then a 1×1 conv."""

    def __init__(self, left, right):
        """Keep the branches and the mixing conv."""
        super().__init__()
        self.left, self.right = left, right
        self.mix = nn.Conv2d(2, 1, 1)

    def forward(self, x):
        """Concatenate and mix."""
        return self.mix(torch.cat([self.left(x), self.right(x)], dim=1))


class Gate(nn.Module):
    """Squeeze-and-excitation: the map times a sigmoid of its own global average."""

    def __init__(self):
        """A 3×3 conv and the 1×1 conv of the gate."""
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        """Gate the conv's output."""
        y = self.conv(x)
        return y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))


class DynamicSamePad(nn.Conv2d):
    """TensorFlow-style "same" padding computed from the input's shape inside ``forward`` (with F.pad)."""

    def forward(self, x):
        """Pad so that the output has ceil(input / stride) cells, the extra pixel on the right/bottom."""
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def single_conv():
    """One unpadded 3×3 conv."""
    return nn.Sequential(nn.Conv2d(1, 1, 3))


def stride_then_conv():
    """3×3 stride 2 (pad 1), then 3×3 (pad 1)."""
    return nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 3, padding=1))


def dilated():
    """3×3 stride 2, then 3×3 with dilation 2, both unpadded."""
    return nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.Conv2d(1, 1, 3, dilation=2))


def pooled():
    """3×3 conv (pad 1), 2×2 max-pool, 3×3 conv (pad 1)."""
    return nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(1, 1, 3, padding=1))


def dilated_pool():
    """3×3 conv, then a 3×3 max pool with stride 2 and dilation 2 (its window spans 5 pixels)."""
    return nn.Sequential(nn.Conv2d(1, 1, 3), nn.MaxPool2d(3, stride=2, dilation=2))


def dilated_pool_ceil():
    """The same pool padded by 1 and rounding its output size up (``ceil_mode``)."""
    return nn.Sequential(nn.Conv2d(1, 1, 3),
                         nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True))


def asymmetric_pad():
    """ZeroPad2d(left=2, right=0, top=0, bottom=1), then an unpadded 3×3 stride-2 conv."""
    return nn.Sequential(nn.ZeroPad2d((2, 0, 0, 1)), nn.Conv2d(1, 1, 3, stride=2))


def residual_strided_skip():
    """ResNet-style downsampling block: 3×3/2 → ReLU → 3×3 on the main path, 1×1/2 on the skip."""
    main = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1))
    return nn.Sequential(Residual(main, nn.Conv2d(1, 1, 1, stride=2)))


def residual_offset():
    """Residual whose branches see offset windows: 3×3/2 pad 1 vs right-padded 5×5/2."""
    skip = nn.Sequential(nn.ZeroPad2d((0, 4, 0, 4)), nn.Conv2d(1, 1, 5, stride=2))
    return nn.Sequential(Residual(nn.Conv2d(1, 1, 3, stride=2, padding=1), skip))


def concat_branches():
    """Inception-style: a 3×3 (pad 1) branch next to a left/top-padded 5×5 branch."""
    right = nn.Sequential(nn.ZeroPad2d((4, 0, 4, 0)), nn.Conv2d(1, 1, 5))
    return nn.Sequential(Concat(nn.Conv2d(1, 1, 3, padding=1), right))


TINY = {  # name: (factory, layer, input side, expected RF)
    "single_conv": (single_conv, "0", 16, rf(3, 1, 1)),
    "stride_then_conv": (stride_then_conv, "1", 16, rf(7, 2, 0)),
    "dilated": (dilated, "1", 33, rf(11, 2, 5)),
    "pooled": (pooled, "2", 16, rf(8, 2, 0.5)),
    "dilated_pool": (dilated_pool, "1", 16, rf(7, 2, 3)),
    "dilated_pool_ceil": (dilated_pool_ceil, "1", 17, rf(7, 2, 2)),
    "asymmetric_pad": (asymmetric_pad, "1", 16, RF(3, 3, 2, 2, 1, -1)),
    "residual_strided_skip": (residual_strided_skip, "0", 16, rf(7, 2, 0)),
    "residual_offset": (residual_offset, "0", 16, rf(6, 2, 1.5)),
    "concat_branches": (concat_branches, "0", 16, rf(6, 1, -1.5)),
}


def boxes_read(net, height, width):
    """The input pixels each of some cells of ``net``'s output reads, by brute force: the box
    (top, left, bottom, right) where its input gradient is nonzero, with every weight set to 1 (no
    gradient cancels without a non-linearity). Cells: the first, second, middle and last two rows
    and columns, so that clipped border cells are included.
    """
    with torch.no_grad():
        for param in net.parameters():
            param.fill_(1.0)
    image = torch.ones(1, 1, height, width, requires_grad=True)
    out = net(image)
    n_h, n_w = out.shape[2:]
    boxes = {}
    for y in sorted({0, 1, n_h // 2, n_h - 2, n_h - 1}):
        for x in sorted({0, 1, n_w // 2, n_w - 2, n_w - 1}):
            grad, = torch.autograd.grad(out[0, :, y, x].sum(), image, retain_graph=True)
            rows = torch.nonzero(grad[0, 0].abs().sum(1)).flatten()
            cols = torch.nonzero(grad[0, 0].abs().sum(0)).flatten()
            boxes[y, x] = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    return boxes


def analytic(name):
    """Analytic RF of a TINY entry's layer."""
    factory, layer, side, _ = TINY[name]
    return receptive_fields(factory(), [layer], side)[layer]


def test_single_conv():
    """The base case, and the pixel-centre convention: an unpadded 3×3 conv's cell 0 sees pixels 0..2.

    size = 1 + 1*(3-1)*1 = 3, jump = 1, first = 0, start = 0 + (3-1)/2 = 1.
    """
    assert analytic("single_conv") == rf(3, 1, 1)


def test_padding_moves_start_before_the_image():
    """Padding shifts the field left: with pad 1, cell 0 is centred on pixel 0 (first pixel -1)."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1))
    # first = 0 - 1*1 = -1, size 3, start = -1 + 1 = 0
    assert receptive_fields(net, ["0"], 16)["0"] == rf(3, 1, 0)


def test_stride_then_conv():
    """A stride multiplies the jump, and the next kernel grows the field by (k-1)*jump, not k-1.

    conv 3×3/2 pad 1: first = -1, size 3, jump 2.
    conv 3×3 pad 1:   first = -1 - 1*2 = -3, size = 3 + 2*2 = 7, jump 2, start = -3 + 3 = 0.
    """
    assert receptive_fields(stride_then_conv(), ["0"], 16)["0"] == rf(3, 2, 0)
    assert analytic("stride_then_conv") == rf(7, 2, 0)


def test_dilation():
    """Dilation widens the kernel to d*(k-1)+1 taps without adding any.

    conv 3×3/2: first 0, size 3, jump 2.  conv 3×3 dilation 2: size = 3 + 2*(3-1)*2 = 11, first 0,
    jump 2, start = 0 + 5 = 5.
    """
    assert analytic("dilated") == rf(11, 2, 5)


def test_max_pool():
    """An even pooling window gives a half-pixel start: fields of even size have no centre pixel.

    conv 3×3 pad 1: first -1, size 3, jump 1.  max-pool 2/2: size 3 + 1 = 4, jump 2, first -1,
    start = -1 + 1.5 = 0.5.  conv 3×3 pad 1: first = -1 - 2 = -3, size = 4 + 2*2 = 8, start = 0.5.
    """
    net = pooled()
    fields = receptive_fields(net, ["1", "2"], 16)
    assert fields["1"] == rf(4, 2, 0.5)
    assert fields["2"] == rf(8, 2, 0.5)


def test_avg_pool_with_padding():
    """Average pooling follows the same rule, its padding included.

    avg-pool 3/2 pad 1: first = 0 - 1 = -1, size 3, jump 2, start 0; conv 3×3: size 3 + 2*2 = 7,
    first -1, start -1 + 3 = 2.
    """
    net = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1), nn.Conv2d(1, 1, 3))
    fields = receptive_fields(net, ["0", "1"], 16)
    assert fields["0"] == rf(3, 2, 0)
    assert fields["1"] == rf(7, 2, 2)


def test_asymmetric_zero_pad():
    """Asymmetric "same" padding (nn.ZeroPad2d) moves rows and columns differently.

    rows: top pad 0 → first 0, size 3, start 1.  columns: left pad 2 → first -2, start -1.
    Bottom/right padding only adds cells at the far end and changes nothing here. jump 2.
    """
    assert analytic("asymmetric_pad") == RF(3, 3, 2, 2, 1, -1)


def test_dynamic_same_padding_with_f_pad():
    """Padding computed in forward with F.pad from the input's shape is followed for that input size.

    3×3/2 on 16 px: 8 cells, total pad = 7*2 + 3 - 16 = 1 → (0 before, 1 after) → first 0, start 1.
    On 15 px: 8 cells, total pad = 7*2 + 3 - 15 = 2 → (1, 1) → first -1, start 0.
    """
    net = nn.Sequential(DynamicSamePad(1, 1, 3, stride=2))
    assert receptive_fields(net, ["0"], 16)["0"] == rf(3, 2, 1)
    assert receptive_fields(net, ["0"], 15)["0"] == rf(3, 2, 0)


def test_efficientnet_package_static_same_padding():
    """The default model's convs (efficientnet_lite_pytorch) pad with a ZeroPad2d fixed at build time.

    5×5/2 built for 16 px: 8 cells, total pad = 7*2 + 5 - 16 = 3 → (1 before, 2 after):
    first -1, size 5, jump 2, start -1 + 2 = 1.
    """
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding
    net = nn.Sequential(Conv2dStaticSamePadding(1, 1, 5, stride=2, image_size=16))
    assert receptive_fields(net, ["0"], 16)["0"] == rf(5, 2, 1)


def test_conv_padding_same_even_kernel():
    """Conv2d(padding="same") with an even kernel pads one pixel more after than before.

    4×4, total pad 3 → 1 before: first -1, size 4, start -1 + 1.5 = 0.5 (checked by the probe too).
    """
    net = nn.Sequential(nn.Conv2d(1, 1, 4, padding="same"))
    assert receptive_fields(net, ["0"], 16)["0"] == rf(4, 1, 0.5)
    assert estimate_receptive_fields(net, ["0"], 16)["0"] == rf(4, 1, 0.5)


def test_residual_with_strided_skip():
    """A residual addition takes the union of its branches; here the main path contains the skip.

    main: 3×3/2 pad 1 → first -1, size 3, jump 2; 3×3 pad 1 → first -3, size 7 (pixels -3..3).
    skip: 1×1/2 → first 0, size 1, jump 2 (pixel 0).  Union: -3..3 → size 7, jump 2, start 0.
    """
    assert analytic("residual_strided_skip") == rf(7, 2, 0)


def test_residual_offset_branches_take_the_hull():
    """Offset branches: the union reaches past both, and its centre moves.

    main: 3×3/2 pad 1 → pixels -1..1.  skip: right pad only, 5×5/2 → pixels 0..4.  Both jump 2.
    Union: -1..4 → size 6, start -1 + 2.5 = 1.5.
    """
    assert analytic("residual_offset") == rf(6, 2, 1.5)


def test_concat_takes_the_union():
    """Concatenated branches feed one layer, which sees the union of their fields.

    left: 3×3 pad 1 → pixels -1..1.  right: left/top pad 4, 5×5 → first -4, pixels -4..0.
    Union -4..1 → size 6, jump 1, start -4 + 2.5 = -1.5.
    """
    assert analytic("concat_branches") == rf(6, 1, -1.5)


def test_branches_with_different_jumps_give_a_covering_bound(caplog):
    """Adding branches of different jumps has no exact (size, jump, start); the bound must cover both.

    main: 3×3/2 pad 1 → cell y sees 2y-1..2y+1.  skip: 9×9 unpadded → cell y sees y..y+8 (8 cells on
    16 px). Kept jump 2, centre 2y; needed half-width max over y=0 and y=7 of max(2y - y, y + 8 - 2y)
    = 8 → size 17, start 0. The warning says it is a bound.
    """
    net = nn.Sequential(Residual(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 9)))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        field = receptive_fields(net, ["0"], 16)["0"]
    assert field == rf(17, 2, 0)
    for y in range(8):
        centre, half = field.start_h + y * field.jump_h, (field.size_h - 1) / 2
        assert centre - half <= min(2 * y - 1, y) and centre + half >= max(2 * y + 1, y + 8)
    assert "bound" in caplog.text


class AddedAxis(nn.Module):
    """A 3×3 conv whose output gains an axis before the image axes and loses it again."""

    def __init__(self):
        """The conv."""
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        """Conv, then (1, 1, H, W) → (1, 1, 1, H, W) → (1, 1, H, W)."""
        return self.conv(x).unsqueeze(1).squeeze(1)


def test_axes_added_and_removed_before_the_image_axes_keep_the_field():
    """An axis inserted or dropped in front of the image axes moves them, and the field with
    them: two 3×3 convs see 5 pixels, not the whole image."""
    net = nn.Sequential(AddedAxis(), nn.Conv2d(1, 1, 3, padding=1))
    assert receptive_fields(net, ["0", "1"], 16) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


class Stacked(nn.Module):
    """The two branches of concat_branches stacked on a new axis ``dim``, then summed over it."""

    def __init__(self, dim):
        """The 3×3 branch and the left/top-padded 5×5 branch."""
        super().__init__()
        self.dim = dim
        self.left = nn.Conv2d(1, 1, 3, padding=1)
        self.right = nn.Sequential(nn.ZeroPad2d((4, 0, 4, 0)), nn.Conv2d(1, 1, 5))

    def forward(self, x):
        """Stacked on a new axis (e.g. (1, 2, 1, H, W) for dim 1, (1, 1, H, 2, W) for dim -2),
        summed over it."""
        return torch.stack([self.left(x), self.right(x)], dim=self.dim).sum(dim=self.dim)


@pytest.mark.parametrize("dim", [1, 2, -2, -1])
def test_stack_moves_the_image_axes_and_takes_the_union(dim, caplog):
    """Stacking before the image axes (dim 1, or 2 just before the rows) shifts them by one, between
    them (-2) shifts the columns only, after them not; the sum over the stack
    sees the union of the two fields, as concatenation does: pixels -4..1 → size 6, jump 1,
    start -1.5. A 3×3 conv after it finds the image axes where they are (no probe): -5..2 → 8."""
    net = nn.Sequential(Stacked(dim), nn.Conv2d(1, 1, 3, padding=1))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        fields = receptive_fields(net, ["0", "1"], 16)
    assert fields == {"0": rf(6, 1, -1.5), "1": rf(8, 1, -1.5)}
    assert "estimated" not in caplog.text


def test_even_adaptive_pooling_is_a_window():
    """AdaptiveAvgPool2d 16 → 4 is a 4×4 window of stride 4: after a 3×3 pad-1 conv (pixels
    -1..1), pooled cell 0 reads conv cells 0..3, pixels -1..4 → size 6, jump 4, start 1.5."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AdaptiveAvgPool2d(4))
    assert receptive_fields(net, ["1"], 16)["1"] == rf(6, 4, 1.5)


class Tokens(nn.Module):
    """A 3×3 conv whose map is flattened into tokens (1, C, H·W) and folded back, as ViT-style
    blocks do."""

    def __init__(self):
        """The conv."""
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        """Conv, flatten the image axes into one, unflatten them again."""
        y = self.conv(x)
        return y.flatten(2).view(y.shape)


def test_image_axes_packed_into_tokens_and_unpacked_keep_the_field(caplog):
    """Flattening H and W into one token axis and back keeps them followed: a 3×3 conv after it
    sees 5 pixels, with no probe."""
    net = nn.Sequential(Tokens(), nn.Conv2d(1, 1, 3, padding=1))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        fields = receptive_fields(net, ["0", "1"], 16)
    assert fields == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}
    assert "estimated" not in caplog.text


class Spread(nn.Module):
    """A conv's global mean spread over a map of ones (a constant, not traced): the output is
    made of the gate alone."""

    def __init__(self):
        """The conv."""
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        """Global mean of the conv, times a map of ones of the input's size."""
        return self.conv(x).mean((2, 3), keepdim=True) * torch.ones(1, 1, *x.shape[2:])


def test_a_map_made_of_a_global_gate_alone_sees_the_whole_image_from_every_cell():
    """Every cell of a map that only spreads a global mean sees the same field, the whole image:
    size at least the image, jump 0 on both axes."""
    field = receptive_fields(nn.Sequential(Spread()), ["0"], 16)["0"]
    assert field.size_h >= 16 and field.size_w >= 16
    assert field.jump_h == 0 and field.jump_w == 0


class Regridded(nn.Module):
    """A 3×3 conv on 16 × 16 whose 256 tokens are folded into an 8 × 32 grid: not its image."""

    def __init__(self):
        """The conv."""
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        """Conv, flatten the image axes into tokens, fold them into another grid."""
        y = self.conv(x)
        return y.flatten(2).view(1, 1, 8, 32)


def test_tokens_folded_into_another_grid_are_not_taken_for_the_image():
    """256 tokens of a 16 × 16 map folded into 8 × 32 are not the image's rows and columns: the
    analysis does not claim the conv's 3 × 3 field for its cells but the whole image, as for any
    flattening (folding them back into 16 × 16 is followed; test above)."""
    field = receptive_fields(nn.Sequential(Regridded()), ["0"], 16)["0"]
    assert field.size_h >= 16 and field.size_w >= 16


class ChannelsLast(nn.Module):
    """A 3×3 conv whose map is permuted to channels-last (1, H, W, C) and back."""

    def __init__(self):
        """The conv."""
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        """Conv, permute to (N, H, W, C), permute back."""
        return self.conv(x).permute(0, 2, 3, 1).permute(0, 3, 1, 2)


def test_permuted_image_axes_are_followed(caplog):
    """Permutes move the image axes and back: a 3×3 conv after them sees 5 pixels, no probe."""
    net = nn.Sequential(ChannelsLast(), nn.Conv2d(1, 1, 3, padding=1))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        fields = receptive_fields(net, ["0", "1"], 16)
    assert fields == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}
    assert "estimated" not in caplog.text


class Lambda(nn.Module):
    """``fn`` as a layer (a named step of a Sequential)."""

    def __init__(self, fn):
        """Keep the function."""
        super().__init__()
        self.fn = fn

    def forward(self, x):
        """``fn(x)``."""
        return self.fn(x)


def test_rows_and_columns_swapped_and_back_with_negative_dims_keep_the_field(caplog):
    """A 3 tall × 1 wide unpadded conv (rows: size 3, start 1; columns: size 1, start 0), its map
    transposed with ``transpose(2, 3)`` and back with ``transpose(-1, -2)``, then a 3×3 pad-1
    conv: the image axes are followed through both, so the last conv is traced (5 × 3 px, start
    1 and 0), as the probe measures too."""
    net = nn.Sequential(nn.Conv2d(1, 1, (3, 1)),
                        Lambda(lambda y: y.transpose(2, 3).transpose(-1, -2)),
                        nn.Conv2d(1, 1, 3, padding=1))
    expected = {"1": RF(3, 1, 1, 1, 1, 0), "2": RF(5, 3, 1, 1, 1, 0)}
    assert traced(net, ["1", "2"], (12, 20), caplog) == expected
    assert estimate_receptive_fields(net, ["1", "2"], (12, 20)) == expected


def test_slicing_the_columns_of_a_transposed_map_moves_its_columns(caplog):
    """A 3×3 pad-1 conv's map transposed (columns now in dim 2, before the rows in dim 3), every
    second column from the second kept (``[:, :, 1::2]``), and transposed back: the columns
    start at pixel 1 with jump 2, the rows are unchanged; traced, as the probe measures too."""
    net = nn.Sequential(ConvThen(lambda y: y.transpose(2, 3)[:, :, 1::2].transpose(2, 3)))
    expected = {"0": RF(3, 3, 1, 2, 0, 1)}
    assert traced(net, ["0"], (12, 20), caplog) == expected
    assert estimate_receptive_fields(net, ["0"], (12, 20)) == expected


def test_a_matrix_of_positions_transposed_with_t_keeps_its_positions(caplog):
    """A 3×3 pad-1 conv's map (one image) as an (H·W, C) matrix, transposed with ``.t()`` to
    (C, H·W) and read back as the map, (C, 1, H, W) with its first two dims swapped: the positions
    move with the transpose and are unpacked again, so the field is the conv's, traced."""
    def through_t(y):
        n, c, h, w = y.shape
        return y.permute(0, 2, 3, 1).reshape(h * w, c).t().reshape(c, n, h, w).transpose(0, 1)
    net = nn.Sequential(ConvThen(through_t, channels=2), nn.Conv2d(2, 1, 3, padding=1))
    assert traced(net, ["0", "1"], (12, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


def test_a_map_expanded_under_a_new_leading_dim_keeps_its_image_axes(caplog):
    """A 3×3 pad-1 conv's map expanded to (2, N, C, H, W) (a new leading dim: the image axes move
    up by one) and one of the two copies taken: a 3×3 conv after it is traced, 5 px."""
    net = nn.Sequential(ConvThen(lambda y: y.expand(2, *y.shape)[1]), nn.Conv2d(1, 1, 3, padding=1))
    assert traced(net, ["0", "1"], (12, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


def test_one_row_expanded_to_two_has_no_jump_between_them(caplog):
    """The map's 12 rows averaged into one (adaptive pooling: rows -1 … 12 of the image, size 14,
    start 5.5), then expanded to two rows: both see the same pixels, so the jump between them
    is 0, traced; the columns keep the 3×3 pad-1 conv's field."""
    net = nn.Sequential(ConvThen(lambda y: F.adaptive_avg_pool2d(y, (1, None)).expand(-1, -1, 2, -1)))
    assert traced(net, ["0"], (12, 20), caplog) == {"0": RF(14, 3, 0, 1, 5.5, 0)}


def test_the_probe_measures_a_field_whose_gradient_is_negative():
    """A layer that negates a 3×3 pad-1 conv has a negative gradient everywhere in its field:
    the probe reads where the gradient is nonzero, whatever its sign."""
    net = nn.Sequential(ConvThen(lambda y: -y))
    assert estimate_receptive_fields(net, ["0"], (12, 20)) == {"0": rf(3, 1, 0)}


def test_elementwise_layers_pass_through():
    """ReLU (in place too), BN, SiLU, ReLU6, Dropout and Identity do not change the field."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1), nn.ReLU(inplace=True), nn.SiLU(),
                        nn.ReLU6(), nn.Dropout(0.5), nn.Identity())
    fields = receptive_fields(net, [str(i) for i in range(7)], 16)
    assert set(fields.values()) == {rf(3, 1, 0)}


def test_global_pool_flatten_linear_cover_the_whole_input():
    """After global pooling a single cell reads every cell, so its field is the union over the map.

    conv 3×3 pad 1 on 16 px: 16 cells, cell y sees y-1..y+1.  Union: -1..16 → size 18, start 7.5
    (the image centre), jump 16 (the map's extent). Flatten and Linear keep it; the crop is the image.
    """
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 4))
    fields = receptive_fields(net, ["1", "2", "3"], 16)
    assert set(fields.values()) == {rf(18, 16, 7.5)}
    assert crop_box(fields["3"], 0, 0, 16, 16) == (0, 0, 16, 16)


def test_squeeze_excitation_gate_keeps_the_local_field():
    """A 1×1 gate broadcast over the map (squeeze-and-excitation) is documented not to widen the field."""
    net = nn.Sequential(Gate())
    assert receptive_fields(net, ["0"], 16)["0"] == rf(3, 1, 0)


class LinearGate(nn.Module):
    """Squeeze-and-excitation written with a Linear layer: the gate loses its image axes (a mean
    over them, then a (B, C) vector viewed back as (B, C, 1, 1)) before it scales the map."""

    def __init__(self):
        """A 3×3 conv of 2 channels and the Linear of the gate."""
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        """Gate the conv's output."""
        y = self.conv(x)
        gate = torch.sigmoid(self.fc(y.mean(dim=(2, 3))))
        return y * gate.view(-1, 2, 1, 1)


def test_a_gate_without_image_axes_keeps_the_local_field(caplog):
    """A gate whose image axes were averaged away (no image dims at all) is broadcast over the map:
    the field stays the conv's, found by analysis, not the probe."""
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        fields = receptive_fields(nn.Sequential(LinearGate()), ["0"], 16)
    assert fields["0"] == rf(3, 1, 0)
    assert "estimated" not in caplog.text


def test_unfollowed_operation_falls_back_to_the_probe(caplog):
    """An operation without a rule (here pixel-unshuffle) is measured by the probe, with a warning.

    conv 3×3 pad 1 then space-to-depth by 2: each cell reads a 2×2 block of conv cells:
    size 3 + 1 = 4, jump 2, first -1, start 0.5.
    """
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.PixelUnshuffle(2), nn.Conv2d(4, 1, 1))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        fields = receptive_fields(net, ["0", "2"], 16)
    assert fields["0"] == rf(3, 1, 0)
    assert fields["2"] == rf(4, 2, 0.5)
    assert "receptive field of 2 estimated" in caplog.text
    assert "receptive field of 0 estimated" not in caplog.text


def test_model_mode_and_statistics_are_left_alone():
    """The analysis runs in eval mode and restores each module's mode; BN statistics do not move."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1)).train()
    before = net[1].running_mean.clone()
    receptive_fields(net, ["1"], 16)
    assert net.training and net[1].training
    assert torch.equal(net[1].running_mean, before)


@pytest.mark.parametrize("name", sorted(TINY))
def test_probe_agrees_with_analysis_on_tiny_networks(name):
    """The gradient probe (an independent method) measures the same fields as the analysis."""
    factory, layer, side, expected = TINY[name]
    assert estimate_receptive_fields(factory(), [layer], 2 * side + 1)[layer] == expected


def test_probe_measures_the_jump_on_a_map_two_cells_wide():
    """A 3 × 3 convolution of stride 4 on 17 × 9 pixels has a 4 × 2 map: on the axis of two cells
    the probe measures the jump between cells 0 and 1 (the centre cell, 1, has no next one), and
    agrees with the analysis — size 3, jump 4, first centre at pixel 1 — on both orientations."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, stride=4))
    for size in ((17, 9), (9, 17)):
        assert estimate_receptive_fields(net, ["0"], size)["0"] == rf(3, 4, 1)
        assert receptive_fields(net, ["0"], size)["0"] == rf(3, 4, 1)


def test_unknown_layer_lists_valid_names():
    """A mistyped layer stops the run with the valid names (and a close match) in the message."""
    net = torchvision.models.resnet18()
    with pytest.raises(StageError) as err:
        receptive_fields(net, ["layer5"], 224)
    message = str(err.value)
    assert "layer5" in message and "layer4" in message and "layer1.0" in message and "conv1" in message
    assert "layer1.0.conv1" not in message  # only the first two levels are listed


def test_layer_that_never_runs_is_an_error():
    """A module that exists but is not called in forward has no output to describe."""
    net = Residual(nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3))
    net.unused = nn.Conv2d(1, 1, 3)
    with pytest.raises(StageError, match="never runs"):
        receptive_fields(net, ["unused"], 16)


def test_rf_array_round_trip():
    """``as_array`` is float64 in the documented order and ``from_array`` inverts it."""
    field = RF(1, 2, 3, 4, 5.5, -6)
    array = field.as_array()
    assert array.dtype == np.float64 and array.tolist() == [1, 2, 3, 4, 5.5, -6]
    assert RF.from_array(array) == field


def test_crop_box_inside_and_clipped():
    """Boxes are pixel-exact inside the image and clipped at every border.

    RF(7, jump 2, start 0): cell (5, 3) is centred on (10, 6) → rows 7..13, cols 3..9 →
    (7, 3, 14, 10). Cell (0, 0) spans -3..3 → clipped to (0, 0, 4, 4). Cell (7, 7) of a 16 px image
    spans 11..17 → (11, 11, 16, 16).
    """
    field = rf(7, 2, 0)
    assert crop_box(field, 5, 3, 16, 16) == (7, 3, 14, 10)
    assert crop_box(field, 0, 0, 16, 16) == (0, 0, 4, 4)
    assert crop_box(field, 7, 7, 16, 16) == (11, 11, 16, 16)


def test_crop_box_half_pixel_start_and_huge_fields():
    """Even-sized fields (start .5) give exact integer boxes; fields larger than the image give it all.

    RF(8, jump 2, start 0.5): cell 2 is centred on 4.5 → pixels 1..8 → (1, 1, 9, 9).
    RF(435, jump 32, start 0) at cell (3, 3) of a 224 px image covers everything; a field wholly
    outside the image gives an empty box.
    """
    assert crop_box(rf(8, 2, 0.5), 2, 2, 16, 16) == (1, 1, 9, 9)
    assert crop_box(rf(435, 32, 0), 3, 3, 224, 224) == (0, 0, 224, 224)
    # Unclipped, that field is centred on 96: 96 − 217 = −121 up to −121 + 435 = 314.
    assert field_box(rf(435, 32, 0), 3, 3) == (-121, -121, 314, 314)
    top, left, bottom, right = crop_box(rf(3, 1, -10), 0, 0, 16, 16)
    assert top == bottom and left == right


@pytest.mark.parametrize("name", ["stride_then_conv", "asymmetric_pad", "residual_offset", "concat_branches"])
def test_crop_box_matches_the_pixels_a_cell_reads(name):
    """crop_box and the start convention agree with the input pixels each cell really depends on.

    All weights are 1 and there is no non-linearity, so a cell's input gradient is nonzero exactly on
    the pixels it reads (padding excluded). Checked for the cells of the first, second, middle and
    last two rows and columns, so that clipped border cells are included.
    """
    factory, layer, side, _ = TINY[name]
    net = factory()
    field = receptive_fields(net, [layer], side)[layer]
    for (y, x), box in boxes_read(net, side, side).items():
        assert crop_box(field, y, x, side, side) == box, (y, x)


def test_resnet18_matches_gradient_probe():
    """On a random-init torchvision ResNet-18 the analysis equals the gradient probe at every chosen layer.

    The probe input must contain the centre cell's whole field (435 px at layer4), so layer4 is probed
    at 448 px and the others at 240 px, which is cheaper. The values themselves are the known ones:
    7, 43, 99, 211, 435 px with jumps 2, 4, 8, 16, 32 and start 0 (symmetric padding everywhere).
    """
    net = torchvision.models.resnet18(weights=None)
    layers = ["relu", "layer1", "layer2", "layer3", "layer4"]
    exact = receptive_fields(net, layers, 224)
    assert [exact[name].size_h for name in layers] == [7, 43, 99, 211, 435]
    probed = estimate_receptive_fields(net, layers[:-1], 240)
    probed.update(estimate_receptive_fields(net, ["layer4"], 448))
    assert probed == exact


def test_efficientnet_lite0_matches_gradient_probe():
    """Same check on the default model, EfficientNet-Lite0 (asymmetric static "same" padding, ReLU6).

    Blocks up to _blocks.8 (field 211 px) fit a 256 px probe. Deeper blocks (403 px at _blocks.11,
    851 px at _blocks.15) would need a probe input of 500 to 900 px, too slow here; on a smaller
    input the probe is clipped by the border and only gives a lower bound, so it is not compared.
    Their analysis uses the same rules (padding, window, residual union) checked here and above.
    """
    from efficientnet_lite_pytorch import EfficientNet
    net = EfficientNet.from_name("efficientnet-lite0")
    layers = ["_conv_stem", "_blocks.0", "_blocks.1", "_blocks.3", "_blocks.5", "_blocks.8"]
    exact = receptive_fields(net, layers, 224)
    assert estimate_receptive_fields(net, layers, 256) == exact
    # stem 3×3/2 built for 224 px: total pad = 111*2 + 3 - 224 = 1 → (0 before, 1 after):
    # first 0, size 3, start 1 (a symmetric pad 1 would give start 0)
    assert exact["_conv_stem"] == rf(3, 2, 1)


def test_crop_box_clips_each_axis_to_its_own_side_of_a_wide_image():
    """A 12 × 20 image (height ≠ width): the bottom is clipped to the height, the right to the
    width. RF(7, jump 2, start 0) at cell (5, 9) is centred on (10, 18) → rows 7..13, cols 15..21
    → clipped to (7, 15, 12, 20); in a 20 × 12 image the same cell at (9, 5) → (15, 7, 20, 12).
    Anisotropic fields clip the same way: RF 5 × 9 at cell (0, 0) spans rows −2..2, cols −4..4.
    """
    field = rf(7, 2, 0)
    assert crop_box(field, 5, 9, 12, 20) == (7, 15, 12, 20)
    assert crop_box(field, 9, 5, 20, 12) == (15, 7, 20, 12)
    wide = RF(size_h=5, size_w=9, jump_h=1, jump_w=1, start_h=0, start_w=0)
    assert field_box(wide, 0, 0) == (-2, -4, 3, 5)
    assert crop_box(wide, 0, 0, 2, 30) == (0, 0, 2, 5)


# Non-square images, kernels and strides, and the rules' less common branches. A rule that
# raises or loses the field is hidden by the probe fallback, which often measures the same
# values, so these tests also check that no field was estimated.

def traced(net, layers, size, caplog):
    """``receptive_fields`` of ``layers``, asserting that each was traced, none estimated."""
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        fields = receptive_fields(net, layers, size)
    assert "estimated" not in caplog.text
    return fields


class ConvThen(nn.Module):
    """A 3×3 pad-1 conv with ``channels`` outputs, then ``after`` applied to its output: how a
    model reshapes, reduces or combines a map, written as a function of the map."""

    def __init__(self, after, channels=1):
        """The conv and the function applied to its output."""
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.after = after

    def forward(self, x):
        """``after(conv(x))``."""
        return self.after(self.conv(x))


class Subsample(nn.Module):
    """Every second row from row 1 and every third column from column 2 (a negative start,
    -18 on a 20 px width)."""

    def forward(self, x):
        """The strided slice."""
        return x[:, :, 1::2, -18::3]


def test_slicing_with_a_start_and_a_step_moves_and_spreads_each_axis(caplog):
    """Slicing is followed per axis on a 16 × 20 image: after a 3×3 pad-1 conv (first -1, size 3),
    rows 1::2 start at conv row 1 (first 0, jump 2) and columns -18::3 = 2::3 at conv column 2
    (first 1, jump 3). A 3×3 pad-1 conv after it: rows first 0 - 2 = -2, size 3 + 2*2 = 7,
    start 1; columns first 1 - 3 = -2, size 3 + 2*3 = 9, start 2. The brute-force boxes agree
    where the field lies inside the image (at the border the second conv's padding hides pixels
    of the theoretical field)."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), Subsample(), nn.Conv2d(1, 1, 3, padding=1))
    fields = traced(net, ["1", "2"], (16, 20), caplog)
    assert fields["1"] == RF(3, 3, 2, 3, 1, 2)
    assert fields["2"] == RF(7, 9, 2, 3, 1, 2)
    inside = {cell: box for cell, box in boxes_read(net, 16, 20).items()
              if crop_box(fields["2"], *cell, 16, 20) == field_box(fields["2"], *cell)}
    assert (4, 3) in inside
    for (y, x), box in inside.items():
        assert field_box(fields["2"], y, x) == box, (y, x)


def test_two_layer_head_after_flatten_keeps_the_whole_image_field(caplog):
    """A classifier head of two Linear layers on a flattened 12 × 20 map: both see the union of
    every cell. conv 3×3 pad 1, avg-pool 4: first -1, size 6, jump 4; 3 × 5 cells.
    Rows: size 6 + 2*4 = 14, jump 3*4 = 12, start -1 + 6.5 = 5.5; columns: size 6 + 4*4 = 22,
    jump 20, start -1 + 10.5 = 9.5 (the image centre). The second Linear adds nothing."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(15, 4),
                        nn.ReLU(), nn.Linear(4, 2))
    fields = traced(net, ["3", "5"], (12, 20), caplog)
    assert fields["3"] == fields["5"] == RF(14, 22, 12, 20, 5.5, 9.5)
    assert crop_box(fields["5"], 0, 0, 12, 20) == (0, 0, 12, 20)


def test_adaptive_pooling_per_axis_identity_window_or_uneven(caplog):
    """Adaptive pooling decides per axis, on a 16 × 15 map of 3×3 pad-1 conv cells (first -1,
    size 3, jump 1). To (16, 5): rows unchanged, columns a 3-wide window (size 5, jump 3,
    start 1). Then to (4, 2): rows a 4-wide window (size 6, jump 4, start 1.5); columns 5 → 2 have
    uneven bins, so each cell gets the whole row of cells (size 5 + 4*3 = 17, start 7) with
    jump 0, and a warning that this is a bound."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AdaptiveAvgPool2d((16, 5)),
                        nn.AdaptiveAvgPool2d((4, 2)))
    fields = traced(net, ["1", "2"], (16, 15), caplog)
    assert fields["1"] == RF(3, 5, 1, 3, 0, 1)
    assert fields["2"] == RF(6, 17, 4, 0, 1.5, 7)
    assert "uneven bins" in caplog.text


def broadcast_summary(y):
    """The map's global mean (kept 1 × 1) expanded back over the map: an image-pooling branch."""
    return y.mean(dim=(2, 3), keepdim=True).expand_as(y)


def test_summary_broadcast_over_the_map_gives_every_cell_the_whole_image(caplog):
    """On a 12 × 20 image every cell of the broadcast mean sees all conv cells: rows -1..12
    (size 14, start 5.5), columns -1..20 (size 22, start 9.5), and the same at every cell (jump 0),
    so every crop is the whole image."""
    fields = traced(nn.Sequential(ConvThen(broadcast_summary)), ["0"], (12, 20), caplog)
    assert fields["0"] == RF(14, 22, 0, 0, 5.5, 9.5)
    assert crop_box(fields["0"], 7, 13, 12, 20) == (0, 0, 12, 20)


class CropSkip(nn.Module):
    """A strided 3×3 conv plus the input's top-left corner of the same number of cells."""

    def __init__(self):
        """The conv."""
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, stride=2, padding=1)

    def forward(self, x):
        """conv(x) + x cropped to the conv's map."""
        y = self.conv(x)
        return y + x[:, :, :y.shape[2], :y.shape[3]]


def test_covering_bound_of_branches_with_different_jumps_is_set_by_the_farthest_cell(caplog):
    """On a 16 × 12 image the conv (cell y reads 2y-1..2y+1, jump 2) and the crop (cell y reads
    pixel y, jump 1) drift apart: the symmetric bound centred on 2y must reach pixel y at the last
    cell, y = 7 of 8 rows (half-width 7, size 15) and x = 5 of 6 columns (size 11). It covers
    every cell's pixels (brute force) and is no wider than the last cell needs."""
    net = nn.Sequential(CropSkip())
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        field = receptive_fields(net, ["0"], (16, 12))["0"]
    assert field == RF(15, 11, 2, 2, 0, 0)
    assert "bound" in caplog.text
    for (y, x), (top, left, bottom, right) in boxes_read(net, 16, 12).items():
        b_top, b_left, b_bottom, b_right = field_box(field, y, x)
        assert b_top <= top and b_left <= left and b_bottom >= bottom and b_right >= right, (y, x)
    assert field_box(field, 7, 5)[:2] == (7, 5)  # the last cell's crop pixel is on the bound's edge


def softmax_over(dim):
    """A 2-channel conv's map, then a softmax over tensor dim ``dim``."""
    return ConvThen(lambda y: y.softmax(dim=dim), channels=2)


@pytest.mark.parametrize("dim", [1, -3])
def test_softmax_over_channels_keeps_the_field(dim, caplog):
    """A softmax across channels (dim 1, or -3 counted from the end) mixes no positions."""
    assert traced(nn.Sequential(softmax_over(dim)), ["0"], 16, caplog)["0"] == rf(3, 1, 0)


@pytest.mark.parametrize("dim", [3, -1])
def test_spatial_softmax_is_left_to_the_probe(dim, caplog):
    """A softmax along the width (dim 3, or -1) mixes a whole row: it has no exact rule, so the
    field is measured by the probe, with a warning."""
    net = nn.Sequential(softmax_over(dim))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        field = receptive_fields(net, ["0"], 16)["0"]
    assert "receptive field of 0 estimated" in caplog.text
    assert field == estimate_receptive_fields(net, ["0"], 16)["0"]


def every_second_row(y):
    """``as_strided`` to a new shape: the even rows of a contiguous (N, C, H, W) map."""
    n, c, h, w = y.shape
    return y.as_strided((n, c, h // 2, w), (c * h * w, h * w, 2 * w, 1))


def test_as_strided_to_the_same_shape_keeps_the_field(caplog):
    """A re-strided view that keeps the shape is a memory-layout change; the field is traced."""
    assert traced(nn.Sequential(ConvThen(lambda y: y.as_strided(y.shape, y.stride()))), ["0"], 16, caplog)["0"] == rf(3, 1, 0)


def test_as_strided_to_a_new_shape_is_left_to_the_probe(caplog):
    """A re-strided view to a new shape (every second row) is not followed: the probe measures
    it: rows jump 2, columns unchanged (size 3, jump 1, start 0)."""
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        field = receptive_fields(nn.Sequential(ConvThen(every_second_row)), ["0"], 16)["0"]
    assert "receptive field of 0 estimated" in caplog.text
    assert field == RF(3, 3, 2, 1, 0, 0)


def test_probe_of_a_dilated_pool_with_per_axis_geometry_on_a_wide_image():
    """The probe stands in for a dilated max pool with the mean of its windows; with a different
    kernel, stride, padding and dilation per axis, on a 31 × 41 image, it measures the analysis.
    conv 3×3: first 0, size 3. Pool rows: k 3, s 2, p 1, d 2 → first -1, size 3 + 4 = 7, jump 2,
    start 2; columns: k 2, s 3, p 0, d 3 → first 0, size 3 + 3 = 6, jump 3, start 2.5."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3),
                        nn.MaxPool2d((3, 2), stride=(2, 3), padding=(1, 0), dilation=(2, 3)))
    expected = RF(7, 6, 2, 3, 2, 2.5)
    assert receptive_fields(net, ["1"], (31, 41))["1"] == expected
    assert estimate_receptive_fields(net, ["1"], (31, 41))["1"] == expected


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_probe_window_mean_has_the_dilated_pools_grid_and_taps(ceil_mode):
    """The probe's stand-in for a dilated max pool gives the pool's output grid on non-square
    inputs (ceil_mode included), and without ceil_mode each value is the mean of the pool's taps
    (torch's unfold gathers them independently)."""
    pool = nn.MaxPool2d((3, 2), stride=(2, 3), padding=(1, 1), dilation=(2, 1), ceil_mode=ceil_mode)
    window = _DilatedWindow(pool)
    torch.manual_seed(0)
    for height, width in ((8, 11), (9, 12), (14, 17)):
        x = torch.randn(1, 2, height, width)
        out = window(x)
        assert out.shape == pool(x).shape, (height, width)
        if not ceil_mode:
            taps = F.unfold(x, pool.kernel_size, dilation=pool.dilation, padding=pool.padding,
                            stride=pool.stride)
            means = taps.view(1, 2, 6, *out.shape[-2:]).mean(dim=2)
            assert torch.allclose(out, means, atol=1e-6)


def test_probe_on_an_input_barely_larger_than_the_field(caplog):
    """5×5 stride 2 pad 2 (cell y reads 2y-2..2y+2) probed on a 6 × 10 image. Columns: the centre
    cell 2 reads 2..6 and cell 3 reads 4..8, inside the image: jump 2, start 0. Rows: 3 cells; the
    centre cell 1 reads 0..4 (touching the top) and cell 2 is clipped at the bottom (2..5 of 2..6),
    so neither edge gives the jump: it is the image over the cells, 6 / 3 = 2, and the field is
    still exact. A warning says the field reaches the border; on a 20 × 24 image, where the
    centre cell's field is inside, there is none."""
    net = nn.Sequential(nn.Conv2d(1, 1, 5, stride=2, padding=2))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        assert estimate_receptive_fields(net, ["0"], (20, 24))["0"] == rf(5, 2, 0)
    assert "reaches the border" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        field = estimate_receptive_fields(net, ["0"], (6, 10))["0"]
    assert field == rf(5, 2, 0) == receptive_fields(net, ["0"], (6, 10))["0"]
    assert "reaches the border" in caplog.text


def test_probe_jump_of_a_field_wider_than_the_input():
    """7×7 stride 2 pad 3 on 6 rows: the centre cell 1 reads -1..5, clipped at both ends to the
    whole image (size 6, a lower bound of 7), and cell 2 reads 1..7. The clipped top edge says
    nothing about the shift, so the jump is the image over the cells, 6 / 3 = 2, not 1 - 0."""
    net = nn.Sequential(nn.Conv2d(1, 1, 7, stride=2, padding=3))
    field = estimate_receptive_fields(net, ["0"], (6, 10))["0"]
    assert (field.size_h, field.jump_h) == (6, 2)
    assert (field.size_w, field.jump_w, field.start_w) == (7, 2, 0)


def glu(y):
    """One half of the channels gated by the sigmoid of the other half (split with ``chunk``)."""
    a, b = y.chunk(2, dim=1)
    return a * torch.sigmoid(b)


CHANNEL_PICKS = {  # a 2-channel map taken apart along dim 1 and put back as (N, 1, H, W)
    "select": lambda y: (y[:, 0] + y[:, 1]).unsqueeze(1),
    "unbind": lambda y: torch.mul(*y.unbind(1)).unsqueeze(1),
    "chunk": glu,
}


@pytest.mark.parametrize("mode", ["select", "unbind", "chunk"])
def test_taking_channels_apart_keeps_the_image_axes(mode, caplog):
    """Selecting, unbinding or splitting channels keeps the field and the image axes (the dims
    after the removed one move down by one): a 3×3 conv after it sees 5 pixels, traced on a
    12 × 20 image."""
    net = nn.Sequential(ConvThen(CHANNEL_PICKS[mode], channels=2), nn.Conv2d(1, 1, 3, padding=1))
    assert traced(net, ["0", "1"], (12, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


def test_probe_gives_a_layer_without_image_axes_the_whole_input():
    """Probed, a layer whose output has no image axes (a Linear after flattening) gets the
    whole 12 × 20 input: size and jump the image's sides, centred on its centre (5.5, 9.5)."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Flatten(), nn.Linear(240, 2))
    assert estimate_receptive_fields(net, ["2"], (12, 20))["2"] == RF(12, 20, 12, 20, 5.5, 9.5)


def test_concatenation_along_an_image_axis_is_left_to_the_probe(caplog):
    """Concatenating a map with itself along the width puts cells of different places side by side: no single jump
    fits, so the field is measured by the probe and the warning says why."""
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        receptive_fields(nn.Sequential(ConvThen(lambda y: torch.cat([y, y], dim=3))), ["0"], 16)
    assert "receptive field of 0 estimated" in caplog.text
    assert "concatenation along an image axis" in caplog.text


def test_the_probe_warning_names_the_first_operation_not_followed(caplog):
    """Once the field is lost, later operations keep the first reason: the warning names the
    pixel-unshuffle, not the re-strided view after it (which has a reason of its own)."""
    net = nn.Sequential(ConvThen(lambda y: every_second_row(F.pixel_unshuffle(y, 2))))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        receptive_fields(net, ["0"], 16)
    assert "pixel_unshuffle" in caplog.text
    assert "as_strided" not in caplog.text


def test_probe_warns_only_when_gradients_near_the_float32_limit(caplog):
    """The probe's gradient at a field's far corner shrinks by 1/9 per 3×3 layer: after 3 layers
    (9^-3) no warning; after 32 (9^-32 = 3e-31, below the 1e-30 mark) a warning, and the field
    (65 px, 1 + 32*2) is still measured whole on a 70 px input."""
    shallow = nn.Sequential(*(nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)))
    deep = nn.Sequential(*(nn.Conv2d(1, 1, 3, padding=1) for _ in range(32)))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        assert estimate_receptive_fields(shallow, ["2"], 16)["2"] == rf(7, 1, 0)
    assert "float32" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        assert estimate_receptive_fields(deep, ["31"], 70)["31"] == rf(65, 1, 0)
    assert "near the float32 limit" in caplog.text
    # Weights are 1 / fan-in, so the channels do not change this: two channels per layer after
    # the first give the corner the same 9^-32, and the same warning.
    wide = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), *(nn.Conv2d(2, 2, 3, padding=1) for _ in range(31)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        assert estimate_receptive_fields(wide, ["31"], 70)["31"] == rf(65, 1, 0)
    assert "near the float32 limit" in caplog.text


def test_transformer_layers_get_patch_fields():
    """Layers named in ``patch_grids`` are not traced: each cell gets its patch plus a margin of
    half a cell, at least 8 px, on each side. ViT-B/16 on 224 px: 14 × 14 cells of 16 px, margin
    8 → size 32, start 7.5. Swin's first stage: 56 × 56 cells of 4 px, margin 8 (the minimum) →
    size 20, start 1.5. A 7 × 7 grid on a 112 × 224 image: cells 16 × 32 px, margins 8 and 16 →
    32 × 64, starts 7.5 and 15.5; the conv before it is traced as usual."""
    assert patch_field((14, 14), 224) == rf(32, 16, 7.5)
    assert patch_field((56, 56), 224) == rf(20, 4, 1.5)
    net = nn.Sequential(nn.Conv2d(1, 1, 16, stride=16), nn.Identity())
    fields = receptive_fields(net, ["0", "1"], (112, 224), patch_grids={"1": (7, 7)})
    assert fields == {"0": rf(16, 16, 7.5), "1": RF(32, 64, 16, 32, 7.5, 15.5)}


class ChannelsLastLinear(nn.Module):
    """A 3×3 conv of 2 channels, then a Linear over channels on the (N, H, W, C) map (as ConvNeXt
    blocks do), back to (N, C, H, W)."""

    def __init__(self):
        """The conv and the Linear."""
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        """Conv, Linear at each position, permute back."""
        return self.fc(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_linear_at_each_position_of_a_channels_last_map_is_a_1x1_conv(caplog):
    """A Linear applied per position mixes channels only: on a 12 × 20 image the field stays the
    conv's (3 px), and a 3×3 conv after it sees 5 px, traced without the probe."""
    net = nn.Sequential(ChannelsLastLinear(), nn.Conv2d(1, 1, 3, padding=1))
    assert traced(net, ["0", "1"], (12, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


REDUCTIONS = {  # a 2-channel map reduced over channels or rows, kept 4-D
    "channels": lambda y: y.amax(dim=1).unsqueeze(1),
    "channels kept": lambda y: y.sum(dim=1, keepdim=True),
    "rows": lambda y: y.mean(dim=2, keepdim=True),
}


@pytest.mark.parametrize("how", ["channels", "channels kept"])
def test_reduction_over_channels_keeps_the_field(how, caplog):
    """A max or sum over channels (the image axes move down by one when the dim goes) reads one
    position: a 3×3 conv after it sees 5 px, traced."""
    net = nn.Sequential(ConvThen(REDUCTIONS[how], channels=2), nn.Conv2d(1, 1, 3, padding=1))
    assert traced(net, ["0", "1"], (12, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


def test_reduction_over_one_image_axis_is_left_to_the_probe(caplog):
    """A mean over the rows only has no single field of the traced form: the probe measures it
    (with a warning that names the reason)."""
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        receptive_fields(nn.Sequential(ConvThen(REDUCTIONS["rows"], channels=2)), ["0"], (12, 20))
    assert "receptive field of 0 estimated" in caplog.text
    assert "one image axis only" in caplog.text


def test_no_layer_names_or_the_whole_model_is_an_error():
    """An empty list of layers, or the empty name (the model itself), stops with a StageError
    that lists valid names."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3))
    with pytest.raises(StageError, match="no layer names given"):
        receptive_fields(net, [], 16)
    with pytest.raises(StageError, match="unknown layer name"):
        receptive_fields(net, [""], 16)


class Twice(nn.Module):
    """One 3×3 conv applied twice (shared weights)."""

    def __init__(self):
        """The conv."""
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        """conv(conv(x))."""
        return self.conv(self.conv(x))


def test_a_module_called_twice_is_described_by_its_last_call(caplog):
    """As forward hooks record it: the shared conv's output is that of its second call (5 px)."""
    assert traced(Twice(), ["conv"], (12, 20), caplog) == {"conv": rf(5, 1, 0)}


def copied_into_a_plain_tensor(y):
    """The map copied into a new plain (untracked) tensor, which is returned."""
    buffer = torch.zeros(y.shape, dtype=y.dtype)
    buffer.copy_(y)
    return buffer


def test_values_written_into_a_plain_tensor_send_every_layer_to_the_probe(caplog):
    """Input-dependent values written into a tensor the tracking cannot see would lose the field
    silently; instead every layer falls back to the probe (which measures them: 3 px)."""
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        fields = receptive_fields(nn.Sequential(ConvThen(copied_into_a_plain_tensor)), ["0", "0.conv"], 16)
    assert fields == {"0": rf(3, 1, 0), "0.conv": rf(3, 1, 0)}
    assert "receptive field of 0.conv estimated" in caplog.text
    assert "into a plain tensor" in caplog.text


def test_a_float64_model_is_traced_in_its_own_dtype(caplog):
    """The blank input takes the model's dtype, so a float64 model runs and is traced."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 3, padding=1)).double()
    assert traced(net, ["1"], (12, 20), caplog) == {"1": rf(7, 2, 0)}


def tokens_and_back(y):
    """ViT-style tokens (N, H·W, C) made from the map, then the map again."""
    tokens = y.flatten(2).transpose(1, 2)
    return tokens.transpose(1, 2).reshape(y.shape)


def test_token_axis_moved_by_a_transpose_keeps_the_field(caplog):
    """The packed token axis (rows × columns of a 12 × 20 map) is followed when a transpose
    moves it to dim 1 and back: a 3×3 conv after it sees 5 px, traced."""
    net = nn.Sequential(ConvThen(tokens_and_back, channels=2), nn.Conv2d(2, 1, 3, padding=1))
    assert traced(net, ["0", "1"], (12, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


def with_coordinate_channel(y):
    """CoordConv-style: a constant channel of column coordinates concatenated in front of the map."""
    n, _, h, w = y.shape
    return torch.cat([torch.linspace(-1, 1, w).expand(n, 1, h, w), y], dim=1)


def test_a_constant_channel_concatenated_first_leaves_the_field(caplog):
    """A channel that does not depend on the image adds nothing to the field, wherever it is in
    the concatenation: the conv's 3 px, and 5 px after a 3×3 conv, traced on 12 × 20."""
    net = nn.Sequential(ConvThen(with_coordinate_channel), nn.Conv2d(2, 1, 3, padding=1))
    assert traced(net, ["0", "1"], (12, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


def channel_shuffle_channels_last(y):
    """ShuffleNet's channel shuffle on a channels-last map: (N, H, W, C) viewed as (N, H, W, 2, C/2),
    the two channel axes swapped, back to (N, H, W, C), then channels-first again."""
    n, c, h, w = y.shape
    shuffled = y.permute(0, 2, 3, 1).reshape(n, h, w, 2, c // 2).transpose(3, 4).reshape(n, h, w, c)
    return shuffled.permute(0, 3, 1, 2)


def test_reshaping_the_channels_after_channels_last_image_axes_keeps_the_field(caplog):
    """Splitting and merging the channel dim that follows the image axes of a (N, H, W, C) map
    moves no position: the conv's 3 px, and 5 px after a 3×3 conv, traced on 12 × 20 — what the
    gradient probe measures too."""
    net = nn.Sequential(ConvThen(channel_shuffle_channels_last, channels=4), nn.Conv2d(4, 1, 3, padding=1))
    fields = traced(net, ["0", "1"], (12, 20), caplog)
    assert fields == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}
    assert estimate_receptive_fields(net, ["0", "1"], (12, 20)) == fields


class PixelMLP(nn.Module):
    """A model without any nn.Conv2d: a Linear over the three colour values of each pixel
    (channels-last), then 2×2 max pooling."""

    def __init__(self):
        """The Linear and the pool."""
        super().__init__()
        self.mix = nn.Linear(3, 4)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        """(N, 3, H, W) → per-pixel Linear → (N, 4, H, W) → pooled."""
        return self.pool(self.mix(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_a_model_without_a_convolution_is_given_rgb_input(caplog):
    """With no nn.Conv2d to read the input channels from, the analysis and the probe feed the
    model 3 channels (RGB, as common.models assumes for such a model): a per-pixel Linear then a
    2×2 pool sees 2 × 2 pixels (start 0.5, jump 2), traced, and the probe agrees."""
    fields = traced(PixelMLP(), ["mix", "pool"], (12, 20), caplog)
    assert fields == {"mix": rf(1, 1, 0), "pool": rf(2, 2, 0.5)}
    assert estimate_receptive_fields(PixelMLP(), ["pool"], (12, 20)) == {"pool": rf(2, 2, 0.5)}


class ListedGeometry(nn.Conv2d):
    """A 3×3 conv called with its stride and padding as one-number lists ([2], [1]), then a 3×3
    max pool of stride [2]: torch applies the one number to both axes."""

    def forward(self, x):
        """``F.conv2d`` and ``F.max_pool2d`` with one-number lists."""
        return F.max_pool2d(F.conv2d(x, self.weight, stride=[2], padding=[1]), [3], stride=[2])


def test_one_number_lists_of_stride_and_padding_apply_to_both_axes(caplog):
    """On a 12 × 20 image the listed geometry is that of Conv2d(3, stride 2, pad 1) then
    MaxPool2d(3, stride 2): conv first -1, size 3, jump 2; pool first -1, size 3 + 2*2 = 7,
    jump 4, start 2 — on both axes, traced."""
    plain = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.MaxPool2d(3, stride=2))
    assert traced(nn.Sequential(ListedGeometry(1, 1, 3)), ["0"], (12, 20), caplog) == {"0": rf(7, 4, 2)}
    assert receptive_fields(plain, ["1"], (12, 20)) == {"1": rf(7, 4, 2)}


class DenseMix(nn.Module):
    """A 3×3 conv's map plus a fully connected mix of all its cells viewed back as a map (as
    MLP-Mixer's token mixing does)."""

    def __init__(self):
        """The conv, and a Linear over the 16 × 20 cells."""
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.mix = nn.Linear(320, 320)

    def forward(self, x):
        """map + Linear(flattened map) viewed as the map."""
        y = self.conv(x)
        return y + self.mix(y.flatten(1)).view(y.shape)


def test_a_map_plus_a_dense_mix_of_all_its_cells_sees_the_whole_image(caplog):
    """Every cell of the sum reads every cell of the conv through the Linear, so its field is the
    whole 16 × 20 image, not the conv's 3 px: the analysis cannot place the mixed term's cells (its
    image axes were flattened away) and leaves the layer to the probe, which measures the image.
    (The map has 320 cells, more than CPython keeps as shared small ints.)"""
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        field = receptive_fields(nn.Sequential(DenseMix()), ["0"], (16, 20))["0"]
    assert "receptive field of 0 estimated" in caplog.text
    assert field.size_h >= 16 and field.size_w >= 20


def test_probe_warns_of_a_field_cut_by_the_bottom_edge_of_a_tall_image(caplog):
    """A field can run past one edge only: 200 rows of zero padding below a 260 × 3 image, then a
    201 × 1 conv (exactly: size 201, start 100). The probe's centre cell 130 reads rows 130..330,
    of which 130..259 exist: it measures 130 rows, a lower bound, and says so, on an image taller
    than 256 px as on a small one; the columns (1 px, inside) are exact."""
    net = nn.Sequential(nn.ZeroPad2d((0, 0, 0, 200)), nn.Conv2d(1, 1, (201, 1)))
    assert receptive_fields(net, ["1"], (260, 3)) == {"1": RF(201, 1, 1, 1, 100, 0)}
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        field = estimate_receptive_fields(net, ["1"], (260, 3))["1"]
    assert field == RF(130, 1, 1, 1, 64.5, 0)
    assert "reaches the border" in caplog.text


def test_a_residual_on_a_map_wider_than_256_cells_keeps_the_local_field(caplog):
    """The branches of a sum are matched by their map sizes as numbers: on a 5 × 300 image (more
    cells than CPython keeps as shared small ints) conv(x) + x keeps the conv's field, 3 px with
    jump 1 — not the jump 0 of a gate broadcast over the map."""
    net = nn.Sequential(Residual(nn.Conv2d(1, 1, 3, padding=1), nn.Identity()))
    assert traced(net, ["0"], (5, 300), caplog) == {"0": rf(3, 1, 0)}


def test_tokens_of_a_map_of_more_than_256_cells_are_followed(caplog):
    """A 16 × 20 map has 320 tokens (more than CPython keeps as shared small ints): flattened into
    one token axis, or into (N, tokens, C) and transposed, and folded back, its image axes are
    still followed — a 3×3 conv after it sees 5 px, traced."""
    for block in (Tokens(), ConvThen(tokens_and_back)):
        net = nn.Sequential(block, nn.Conv2d(1, 1, 3, padding=1))
        assert traced(net, ["0", "1"], (16, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


class BufferKernel(nn.Module):
    """A fixed gain per colour channel and a fixed 3×3 kernel, kept as buffers: a model with no
    parameters."""

    def __init__(self):
        """The gains and the kernel."""
        super().__init__()
        self.register_buffer("gain", torch.ones(1, 3, 1, 1))
        self.register_buffer("kernel", torch.ones(1, 3, 3, 3))

    def forward(self, x):
        """The unpadded convolution of the scaled input with the kernel."""
        return F.conv2d(x * self.gain, self.kernel)


def test_the_blank_input_is_made_on_the_models_device(caplog):
    """The traced input is built on the device of the model's first parameter, or buffer when it
    has none. The meta device (tensors without data) stands in for a GPU: a model moved there,
    with parameters or with buffers only, is traced there — a CPU input would not run with it."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.PReLU(),
                        nn.Conv2d(1, 1, 3, padding=1)).to("meta")
    assert traced(net, ["2"], (12, 20), caplog) == {"2": rf(7, 2, 0)}
    assert traced(nn.Sequential(BufferKernel()).to("meta"), ["0"], (12, 20), caplog) == {"0": rf(3, 1, 1)}


def swin_pad(y):
    """Swin's window padding: the map channels-last (N, H, W, C) padded with F.pad's pairs from the
    last dim — channels (0, 0), 2 columns on the left, 1 row on top — then channels-first again."""
    return F.pad(y.permute(0, 2, 3, 1), (0, 0, 2, 0, 1, 0)).permute(0, 3, 1, 2)


def test_padding_a_channels_last_map_moves_the_start_of_its_image_axes(caplog):
    """After a 3×3 pad-1 conv (first -1, size 3) on 12 × 20, one row padded on top moves the rows'
    first pixel to -2 (start -1) and two columns on the left the columns' to -3 (start -2), as the
    gradient probe measures too."""
    net = nn.Sequential(ConvThen(swin_pad))
    expected = {"0": RF(3, 3, 1, 1, -1, -2)}
    assert traced(net, ["0"], (12, 20), caplog) == expected
    assert estimate_receptive_fields(net, ["0"], (12, 20)) == expected


def test_a_mistyped_layer_name_gets_its_close_matches_and_a_far_one_none():
    """The error names each unknown layer; a near miss gets "did you mean" with the close
    names, a name like no layer gets no such hint."""
    net = nn.Sequential()
    net.add_module("stem", nn.Conv2d(1, 1, 3))
    net.add_module("stage", nn.Conv2d(1, 1, 3))
    with pytest.raises(StageError) as err:
        receptive_fields(net, ["stme", "zzz"], 16)
    message = str(err.value)
    assert "'stme' (did you mean stem" in message
    assert "'zzz' (did you mean" not in message and "'zzz'" in message


def test_adaptive_pooling_to_more_cells_than_the_map_is_global_along_that_axis(caplog):
    """Adaptive pooling of a 4 × 20 map of 3×3 pad-1 conv cells to (8, 10): the rows are stretched
    (each input row feeds two output rows), which no single jump describes, so they are treated as
    global — every cell gets rows -1..4 (size 6, start 1.5, jump 0) and a note that this is a
    bound; the columns halve evenly (a 2-wide window: size 4, jump 2, start 0.5)."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AdaptiveAvgPool2d((8, 10)))
    assert traced(net, ["1"], (4, 20), caplog) == {"1": RF(6, 4, 0, 2, 1.5, 0.5)}
    assert "uneven bins" in caplog.text


def test_a_global_max_over_all_dims_sees_the_whole_image(caplog):
    """``torch.amax`` without dims (ATen gets an empty dim list) reduces everything: its field is
    the union of all conv cells — on 12 × 20, rows -1..12 (size 14, jump 12, start 5.5) and
    columns -1..20 (size 22, jump 20, start 9.5) — traced."""
    fields = traced(nn.Sequential(ConvThen(lambda y: y.amax())), ["0"], (12, 20), caplog)
    assert fields == {"0": RF(14, 22, 12, 20, 5.5, 9.5)}


def test_probe_takes_the_jump_from_the_lower_edges_when_the_upper_edge_touches_the_border():
    """Six zero rows on top of a 10 × 12 image, then an unpadded 5×5 conv: 12 × 8 cells, cell y
    reads rows y-6..y-2. The probe's centre row 6 reads rows 0..4, touching the top, so the jump
    is measured between the lower edges of rows 6 and 7 (4 → 5: 1), not guessed as the image over
    the cells (10 / 12); the field agrees with the analysis (size 5, start -4 and 2)."""
    net = nn.Sequential(nn.ZeroPad2d((0, 0, 6, 0)), nn.Conv2d(1, 1, 5))
    expected = {"1": RF(5, 5, 1, 1, -4, 2)}
    assert receptive_fields(net, ["1"], (10, 12)) == expected
    assert estimate_receptive_fields(net, ["1"], (10, 12)) == expected


def test_padding_only_the_channels_of_a_channels_last_map_keeps_its_field(caplog):
    """F.pad with one pair pads the last dim only: on a channels-last (N, H, W, C) map that is the
    channels, so rows and columns keep the 3×3 pad-1 conv's field (size 3, start 0), traced."""
    net = nn.Sequential(ConvThen(lambda y: F.pad(y.permute(0, 2, 3, 1), (0, 1)).permute(0, 3, 1, 2)))
    assert traced(net, ["0"], (12, 20), caplog) == {"0": rf(3, 1, 0)}


def test_padding_the_flattened_positions_is_not_followed(caplog):
    """A map flattened to (N, C, H·W) and given one more slot in front of its positions (a class
    token's place) no longer lines its cells up with the image: the trace stops there, names the
    padding, and the probe measures the conv's field instead."""
    net = nn.Sequential(ConvThen(lambda y: F.pad(y.flatten(2), (1, 0))[..., 1:].view(y.shape)))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        assert receptive_fields(net, ["0"], (12, 20)) == {"0": rf(3, 1, 0)}
    assert "estimated" in caplog.text and "padding of the dim that holds" in caplog.text


def tokens_with_a_padded_channel(y):
    """ViT-style tokens (N, H·W, C) given one more channel of zeros with F.pad, then the map again
    (N, C + 1, H, W)."""
    n, c, h, w = y.shape
    tokens = F.pad(y.flatten(2).transpose(1, 2), (0, 1))
    return tokens.transpose(1, 2).reshape(n, c + 1, h, w)


def test_padding_the_channels_of_tokens_keeps_their_image_axes(caplog):
    """Padding touches only the channel dim of the tokens, not the packed token axis: the field is
    kept, the map is unpacked again, and a 3×3 conv after it sees 5 px, traced on 12 × 20."""
    net = nn.Sequential(ConvThen(tokens_with_a_padded_channel), nn.Conv2d(2, 1, 3, padding=1))
    assert traced(net, ["0", "1"], (12, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


def channel_attention(y):
    """DANet-style channel attention: each position's channel vector (rows of an (H·W, C) matrix)
    multiplied by the C × C channel affinities of the whole map, then the map again."""
    n, c, h, w = y.shape
    rows = y.permute(0, 2, 3, 1).reshape(h * w, c)
    mixed = rows @ torch.softmax(rows.T @ rows, dim=-1)
    return mixed.reshape(n, h, w, c).permute(0, 3, 1, 2)


def test_positions_mixed_by_affinities_of_the_whole_map_see_the_whole_image(caplog):
    """The affinities are computed from every position, so every cell of the result sees the whole
    12 × 20 image — rows -1..12 (size 14, start 5.5), columns -1..20 (size 22, start 9.5), jump
    the map's extent — traced, not the conv's 3 px."""
    fields = traced(nn.Sequential(ConvThen(channel_attention, channels=2)), ["0"], (12, 20), caplog)
    assert fields == {"0": RF(14, 22, 12, 20, 5.5, 9.5)}


def test_a_1d_convolution_along_the_tokens_is_left_to_the_probe_and_named(caplog):
    """A 1-D convolution along the token axis of (N, C, H·W) tokens mixes tokens across the ends
    of rows: there is no rule for it, so the probe measures the layer and the warning names the
    1-D convolution."""
    net = nn.Sequential(ConvThen(lambda y: F.conv1d(y.flatten(2), torch.ones(1, 1, 3), padding=1).view(y.shape)))
    with caplog.at_level(logging.WARNING, logger="neuron-atlas.rf"):
        receptive_fields(net, ["0"], (12, 20))
    assert "receptive field of 0 estimated" in caplog.text
    assert "1-D convolution" in caplog.text


def test_probe_gives_an_axis_of_one_cell_the_input_side_as_its_jump():
    """A map one cell high (two rows cropped off the top of a 10 × 20 image, then a 5×5 conv of
    stride 8: rows 2..6) has no second row to measure a jump from: like a layer without image
    axes, it gets the input's height, 10; its size 5 and start 4 come from its cell. The columns
    (two cells, 0..4 and 8..12) are measured as usual: size 5, jump 8, start 2."""
    net = nn.Sequential(nn.ZeroPad2d((0, 0, -2, 0)), nn.Conv2d(1, 1, 5, stride=8))
    assert estimate_receptive_fields(net, ["1"], (10, 20)) == {"1": RF(5, 5, 10, 8, 4, 2)}


def test_taking_apart_the_last_dim_of_a_channels_last_map_leaves_its_image_axes(caplog):
    """Selecting or unbinding the channels of a (N, H, W, C) map removes a dim after the image
    axes, which stay where they are: a 3×3 conv after it sees 5 px, traced on 12 × 20."""
    picks = {"select": lambda t: t[..., 0] + t[..., 1], "unbind": lambda t: torch.mul(*t.unbind(-1))}
    for pick in picks.values():
        block = ConvThen(lambda y: pick(y.permute(0, 2, 3, 1)).unsqueeze(1), channels=2)
        net = nn.Sequential(block, nn.Conv2d(1, 1, 3, padding=1))
        assert traced(net, ["0", "1"], (12, 20), caplog) == {"0": rf(3, 1, 0), "1": rf(5, 1, 0)}


def test_probe_window_mean_of_a_dilated_pool_of_stride_one_has_its_grid():
    """With stride 1 every padded pixel adds a cell, so the stand-in must pad exactly what the
    pool reads: a 3×3 max pool of dilation 2 (and padding 1) on 7 × 9 gives 5 × 7 cells, and so
    does the window mean, each cell the mean of the pool's taps."""
    pool = nn.MaxPool2d(3, stride=1, padding=1, dilation=2)
    x = torch.randn(1, 2, 7, 9, generator=torch.Generator().manual_seed(0))
    out = _DilatedWindow(pool)(x)
    assert out.shape == pool(x).shape == (1, 2, 5, 7)
    taps = F.unfold(x, 3, dilation=2, padding=1)
    assert torch.allclose(out, taps.view(1, 2, 9, 5, 7).mean(dim=2), atol=1e-6)


def test_rows_folded_into_channels_leave_no_image_axes(caplog):
    """CRNN-style: the map's rows folded into its channels, (N, C·H, W), keep only the columns as a
    spatial dim, so no cell of the image is placed: the field is the whole 12 × 20 image (rows
    -1..12, columns -1..20), traced, not the conv's 3 px."""
    net = nn.Sequential(ConvThen(lambda y: y.reshape(y.shape[0], -1, y.shape[3]), channels=2))
    assert traced(net, ["0"], (12, 20), caplog) == {"0": RF(14, 22, 12, 20, 5.5, 9.5)}


def test_branches_with_different_jumps_and_a_padded_start_give_the_hand_computed_bound():
    """The symmetric bound over branches of different jumps, by hand, on an axis of 2 cells: A
    (first −1, size 3, jump 1) and B (first −2, size 6, jump 2, the reference). B's centre is at
    0.5 and 2.5; the farthest edge from it is 2.5 away at both cells (B's own, and A's pixel 0
    at cell 1), so the bound is first 0.5 − 2.5 = −2, size 6, jump 2."""
    from common.rf import _Span, _union_spans
    span, note = _union_spans([_Span(-1.0, 3.0, 1.0), _Span(-2.0, 6.0, 2.0)], 2)
    assert span == _Span(-2.0, 6.0, 2.0) and "symmetric bound" in note
