"""A tiny grey-image classifier with hand-set weights and its own four classes: stripe widths.

Trained (by hand) on 32-px grey images of black-and-white stripes normalised with mean 0.2 and
std 0.25. Square-wave stripes of period p (p/2 px black, p/2 px white) have a mean absolute
difference between neighbouring pixels of 2/p, times 1/std after normalisation, so the
classes are told apart by that edge density alone:

conv1 (1 → 4 channels, 3×3, no padding), ReLU: the rising and falling steps along x and along y
gap, sum: the edge density d (mean over positions of the four channels)
bands: logits −4·(log2 d − log2(2 / (p · 0.25)))² for p = 2, 4, 8, 16 — classes 0 "pin stripe",
       1 "narrow band", 2 "wide band", 3 "broad band"

At any other input size the stripes are rescaled before the network sees them, so their density
moves by a factor and every class shifts to its neighbour: the accuracy falls to about chance.
"""
import torch
from torch import nn

PERIODS = (2, 4, 8, 16)
CLASSES = ["pin stripe", "narrow band", "wide band", "broad band"]
STD = 0.25  # the normalisation the model was "trained" with (mean 0.2 does not affect it)


class Bands(nn.Module):
    """Edge density (B, 1) → four logits peaked at the density of each class's stripes."""

    def __init__(self):
        """Store each class's log2 density as a buffer."""
        super().__init__()
        centres = [float(torch.log2(torch.tensor(2 / (p * STD)))) for p in PERIODS]
        self.register_buffer("centres", torch.tensor(centres))

    def forward(self, density):
        """Logits: minus four times the squared log2 distance to each class centre."""
        return -4 * (torch.log2(density + 1e-6) - self.centres) ** 2


class GreyStripes(nn.Module):
    """The network described in the module docstring."""

    def __init__(self):
        """Build the layers and set the step filters by hand."""
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, bias=False)
        self.relu1 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.bands = Bands()
        with torch.no_grad():
            w = torch.zeros(4, 1, 3, 3)
            w[0, 0, 1, 1], w[0, 0, 1, 2] = -1, 1   # rising step along x
            w[1] = -w[0]                           # falling step along x
            w[2, 0, 1, 1], w[2, 0, 2, 1] = -1, 1   # rising step along y
            w[3] = -w[2]
            self.conv1.weight.copy_(w)

    def forward(self, x):
        """Logits of the four stripe classes."""
        edges = self.relu1(self.conv1(x))
        density = torch.flatten(self.gap(edges), 1).sum(dim=1, keepdim=True)
        return self.bands(density)


def build() -> nn.Module:
    """Factory used as MODEL=tests/fake_grey_model.py:build."""
    return GreyStripes()
