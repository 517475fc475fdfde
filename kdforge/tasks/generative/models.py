"""The feed-forward manipulator f(x) = x + delta(x) and the attribute classifier that scores edits.

The manipulator must move a bar across the whole image (horizontal -> vertical), so delta is an
encoder-decoder with a fully connected bottleneck (a global receptive field). Its last layer
starts at zero: training starts from the identity edit, as SDD's latent mapper does.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.errors import ConfigError

__all__ = ["Manipulator", "build_classifier"]


class Manipulator(nn.Module):
    """f(x) = x + delta(x): conv down to size/4, MLP bottleneck, transposed convs back up."""

    def __init__(self, size: int = 16, channels: int = 1, width: int = 16, bottleneck: int = 128) -> None:
        super().__init__()
        if size % 4 or width < 1 or bottleneck < 1:
            raise ConfigError(f"manipulator: need size divisible by 4, width >= 1 and bottleneck >= 1, got "
                              f"{size}, {width}, {bottleneck}")
        flat = 2 * width * (size // 4) ** 2
        self.encode = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.SiLU(), nn.Flatten())
        self.bottleneck = nn.Sequential(nn.Linear(flat, bottleneck), nn.SiLU(), nn.Linear(bottleneck, flat), nn.SiLU(),
                                        nn.Unflatten(1, (2 * width, size // 4, size // 4)))
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.decode[-1].weight)
        nn.init.zeros_(self.decode[-1].bias)

    def delta(self, x: Tensor) -> Tensor:
        return self.decode(self.bottleneck(self.encode(x)))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.delta(x)


def build_classifier(width: int = 8, classes: int = 2, channels: int = 1) -> nn.Module:
    """A small zoo ConvNet (2 stages) that reads the attribute from an image."""
    from kdforge.models import create_model

    return create_model("convnet", num_classes=classes, in_channels=channels, width=width, depth=2)
