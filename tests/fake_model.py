"""A tiny CNN with hand-set weights whose neurons have known, paper-computable preferences.

conv1 (3 → 4 channels, 3×3, padding 1), ReLU:
  0  redness       +1 on R, −0.5 on G and B at the centre tap only (a 1×1 colour detector)
  1  vertical edge  Sobel-x on the grey level (bright to the right of dark)
  2  horizontal edge  Sobel-y on the grey level (bright below dark)
  3  brightness    mean of the 3×3 neighbourhood of the grey level
pool: 2×2 max-pool (stride 2)
conv2 (4 → 2 channels, 1×1): 0 copies conv1's red channel, 1 sums both edge channels
head: global average pool then a linear 2 → 3 classifier: class 0 "red", 1 "edgy", 2 "neither"
"""
import torch
from torch import nn


class FakeNet(nn.Module):
    """The tiny hand-set network described in the module docstring."""

    def __init__(self):
        """Build the layers and set every weight by hand."""
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 2, 1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        grey = torch.tensor([1 / 3, 1 / 3, 1 / 3])
        sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        with torch.no_grad():
            w = torch.zeros(4, 3, 3, 3)
            w[0, :, 1, 1] = torch.tensor([1.0, -0.5, -0.5])
            w[1] = grey[:, None, None] * sobel_x
            w[2] = grey[:, None, None] * sobel_x.T
            w[3] = grey[:, None, None] / 9
            self.conv1.weight.copy_(w)
            self.conv1.bias.zero_()
            w2 = torch.zeros(2, 4, 1, 1)
            w2[0, 0] = 1.0
            w2[1, 1] = w2[1, 2] = 1.0
            self.conv2.weight.copy_(w2)
            self.conv2.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0], [-2.0, -2.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))

    def forward(self, x):
        """Logits for the three classes."""
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(torch.flatten(self.gap(x), 1))


def build() -> nn.Module:
    """Factory used as MODEL=tests/fake_model.py:build."""
    return FakeNet()
