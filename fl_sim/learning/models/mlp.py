"""A fully connected network: its first layer's gradient is the image itself, scaled."""
import torch
from torch import nn


class MLP(nn.Module):
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
