"""A small ReLU ConvNet: the kind of model a cross-device FL deployment actually trains."""
import torch
from torch import nn


class ConvNet(nn.Module):
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
