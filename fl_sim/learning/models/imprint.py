"""The imprint block of "Robbing the Fed" (Fowl et al., ICLR 2022) in front of any model.

`Imprinted(base, ...)` computes base(x + spread(a)) + shortcut(a), a = relu(imprint(centre(x))). The server
owns the added layers: sent disarmed (`spread` and `shortcut` zero) the block hands the base model exactly x,
so the model is the honest one; armed by the server (fl_sim/server/active.py) every row of `imprint`
measures a statistic of x against its own threshold and `spread` hands the base model x plus a tiny
brightness shift, enough for the imprint rows to receive a gradient. Clients must build this architecture, so
its size is part of the run config (`imprint_bins`). `spread` is fixed (a buffer the clients load and never
train): were it trained, each row's column would drift apart within a round of several steps, every row would
pass a slightly different gradient back, and bins would no longer difference to exact images (ResNet-20 at
K=4 x B=8: 48-56% of images at 30 dB with a trained spread, 80-81% fixed).

A second fixed path, `shortcut`, adds the rows' activations a to the logits as a - a.detach(), each row with a sign
(`shortcut.signs`) along one vector (`shortcut.weight`, zero disarmed): its value is nothing, so the logits are
always the base model's own, yet armed (the mosaic attack over several local steps, fl_sim/server/mosaic.py) each
row gets the gradient g of its image through it. Unlike the input shift, a gradient this way costs the base model
nothing: however large g, the base model trains on the image alone.
The rows of `imprint` see their input as (x - `centre.offset`) x `centre.scale` (fixed; 0 and 1 disarmed): a
row that image x switches on moves a later image x' by g (s^2 (x - o).(x' - o) + 1), so centred and scaled
the rows may take a far larger change per image for the same drift of their bins (docs/findings.md).
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


class FixedCentre(nn.Module):
    """What the imprint rows see of the image: (x - `offset`) x `scale`, both fixed (buffers the clients load and
    never train; 0 and 1 disarmed and for the imprint attack). A row that image x switches on moves by
    g s (x - o) in its weights and g in its bias, so the server reads x as weight change / (s x bias change) + o.
    (A module of its own, not buffers of the rows' linear layer: Opacus' per-example gradients refuse a trained
    layer that holds buffers.)"""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("offset", torch.zeros(features))
        self.register_buffer("scale", torch.ones(1))

    offset: torch.Tensor
    scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) * self.scale


class FixedShortcut(nn.Module):
    """The rows' activations added to the logits: (activations . `signs`) times `weight` (buffers, never trained
    by the clients; `weight` zero disarmed). `Imprinted` hands it a - a.detach(): zero in value, a's gradient."""

    def __init__(self, rows: int, classes: int):
        super().__init__()
        self.register_buffer("signs", torch.ones(rows))
        self.register_buffer("weight", torch.zeros(classes))

    signs: torch.Tensor
    weight: torch.Tensor

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return (activations @ self.signs)[:, None] * self.weight


class Imprinted(nn.Module):
    def __init__(self, base: nn.Module, channels: int, image_size: int, rows: int, classes: int):
        super().__init__()
        features = channels * image_size * image_size
        self.centre = FixedCentre(features)  # disarmed: the rows see x itself
        self.imprint = nn.Linear(features, rows)
        self.spread = FixedSpread(features)  # zero, disarmed: the base model sees exactly its input
        self.shortcut = FixedShortcut(rows, classes)  # zero, disarmed: the logits are the base model's
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activations = torch.relu(self.imprint(self.centre(x.flatten(1))))
        # the shortcut adds a - a.detach() = 0 to the logits: its value is nothing, its gradient the rows' own
        return self.base(x + self.spread(activations).view_as(x)) + self.shortcut(activations - activations.detach())
