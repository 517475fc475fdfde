"""A tiny CNN split into `stem` / `body` / `fc`, so methods can perturb or read intermediate stages.

KD³ mixes feature statistics after the stem, AdaSim needs the pooled feature as a backbone
output and OTD takes per-sample gradients of the linear head; all three need the pieces apart.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.errors import KdforgeError

__all__ = ["TinyCNN"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyCNN(nn.Module):
    """stem: conv-BN-ReLU + pool (width); body: two conv stages (2w, 4w) + global pool; fc: linear (or identity)."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 0 or min(width, in_channels) < 1:
            raise KdforgeError(
                f"TinyCNN: need num_classes >= 0 (0: no head), width, in_channels >= 1, got "
                f"{num_classes}, {width}, {in_channels}"
            )
        self.stem = nn.Sequential(_block(in_channels, width), nn.MaxPool2d(2))
        self.body = nn.Sequential(
            _block(width, 2 * width), nn.MaxPool2d(2), _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 4 * width
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else nn.Identity()

    def features(self, x: Tensor) -> Tensor:
        """Penultimate (pooled) feature, (B, 4*width)."""
        return self.body(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
