"""The imprint block of "Robbing the Fed" (Fowl et al., ICLR 2022) in front of any model.

`Imprinted(base, ...)` computes base(x + spread(relu(imprint(x)))). The server owns the two added
layers: sent disarmed (`spread` zero) the block hands the base model exactly x, so the model is the
honest one; armed by the server (fl_sim/active.py) every row of `imprint` measures a statistic of x
against its own threshold and `spread` hands the base model x plus a tiny brightness shift, enough
for the imprint rows to receive a gradient. Clients must build this architecture, so its size is part
of the run config (`imprint_bins`).
"""
import torch
from torch import nn


class Imprinted(nn.Module):
    def __init__(self, base: nn.Module, channels: int, image_size: int, rows: int):
        super().__init__()
        features = channels * image_size * image_size
        self.imprint = nn.Linear(features, rows)
        self.spread = nn.Linear(rows, features, bias=False)
        nn.init.zeros_(self.spread.weight)  # disarmed: the base model sees exactly its input
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = self.spread(torch.relu(self.imprint(x.flatten(1))))
        return self.base(x + shift.view_as(x))
