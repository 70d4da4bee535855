"""DLG's LeNet: three 5x5 sigmoid convolutions (strides 2, 2, 1) and one linear layer.

Sigmoid activations and no pooling keep the network twice differentiable everywhere,
which is why the DLG paper (Zhu et al., 2019) used it to show the leak most clearly.
"""
import torch
from torch import nn


class LeNet(nn.Module):
    def __init__(self, channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 12):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        side = (image_size + 1) // 2
        side = (side + 1) // 2
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
