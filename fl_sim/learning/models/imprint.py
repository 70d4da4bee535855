"""The imprint block of "Robbing the Fed" (Fowl et al., ICLR 2022) in front of any model.

`Imprinted(base, ...)` computes base(x + spread(relu(imprint(x)))). The server owns the two added
layers: sent disarmed (`spread` zero) the block hands the base model exactly x, so the model is the
honest one; armed by the server (fl_sim/server/active.py) every row of `imprint` measures a statistic of x
against its own threshold and `spread` hands the base model x plus a tiny brightness shift, enough
for the imprint rows to receive a gradient. Clients must build this architecture, so its size is part
of the run config (`imprint_bins`). `spread` is fixed (a buffer the clients load and never train): were
it trained, each row's column would drift apart within a round of several steps, every row would pass a
slightly different gradient back, and bins would no longer difference to exact images (ResNet-20 at
K=4 x B=8: 48-56% of images at 30 dB with a trained spread, 80-81% fixed).
"""
import torch
from torch import nn


class FixedSpread(nn.Module):
    """The shift the imprint rows hand the base model: `weight` (a buffer: sent with the model, never trained by
    the clients) times the sum of the rows' activations. One column shared by every row, not a column per row:
    the rows must all pass the same gradient back (see the module docstring), and a (features, rows) matrix
    of equal columns would double what every client receives and sends back."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(features))

    weight: torch.Tensor

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return activations.sum(1, keepdim=True) * self.weight


class Imprinted(nn.Module):
    def __init__(self, base: nn.Module, channels: int, image_size: int, rows: int):
        super().__init__()
        features = channels * image_size * image_size
        self.imprint = nn.Linear(features, rows)
        self.spread = FixedSpread(features)  # zero, disarmed: the base model sees exactly its input
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = self.spread(torch.relu(self.imprint(x.flatten(1))))
        return self.base(x + shift.view_as(x))
