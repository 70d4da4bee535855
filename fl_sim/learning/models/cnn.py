"""A small ReLU ConvNet: the kind of model a cross-device FL deployment actually trains."""
import torch
from torch import nn


class ConvNet(nn.Module):
    """Three ReLU convolutions (the last two of stride 2) and two linear layers.

    Trap weights (fl_sim/server/active.py) rewrite `TRAP_LAYER`, a ReLU linear layer that sees the whole image
    (the model registry's `DENSE_SEES_IMAGE`) once the convolutions of `PASS_THROUGH` (name, stride) are set to
    carry the image to it, space-to-depth.
    """

    TRAP_LAYER = "classifier.0"
    PASS_THROUGH = (("features.0", 1), ("features.2", 2), ("features.4", 2))

    def __init__(self, channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        side = (image_size + 1) // 2
        side = (side + 1) // 2
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * side * side, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def trap_input(self, x: torch.Tensor) -> torch.Tensor:
        """What `TRAP_LAYER` sees of images `x`."""
        return self.features(x).flatten(1)
