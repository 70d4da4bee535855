"""A fully connected network: its first layer's gradient is the image itself, scaled."""
import torch
from torch import nn


class MLP(nn.Module):
    """Three linear layers with ReLUs; trap weights (fl_sim/server/active.py) rewrite `TRAP_LAYER`, the first,
    which sees the whole image (the model registry's `DENSE_SEES_IMAGE`), with no convolution to pass it on."""

    TRAP_LAYER = "layers.1"
    PASS_THROUGH: tuple[tuple[str, int], ...] = ()

    def __init__(self, channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 256):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * image_size * image_size, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def trap_input(self, x: torch.Tensor) -> torch.Tensor:
        """What `TRAP_LAYER` sees of images `x`: the pixels."""
        return x.flatten(1)
