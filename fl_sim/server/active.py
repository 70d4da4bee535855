"""The malicious server's model surgery: the weights it sends its targets so their update carries the images.

The server's side of the analytic attacks (attacker/analytic.py reads the updates), as implementations of
the one `Attack` interface (fl_sim/server/attacks.py). Each attack, once per round, `arm`s the global weights
by its `surgery` (every target gets the same armed weights; everyone else the honest ones), with the readout
that reads them back off the updates; `aggregated` says what of a target's reply enters the average.

- `ImprintAttack` (needs the imprint block in the architecture, fl_sim/learning/models/imprint.py): block b's rows
  measure the image along the b-th principal direction of the server's public data (its test split),
  against thresholds at that statistic's quantiles there, so each bin is equally likely to hold an image.
  Principal directions spread the images most per unit of weight and give uncorrelated statistics, so an
  image that shares a bin in one block is likely alone in another. Victims' updates are averaged
  without the imprint block (its rows are the server's and are re-set every round): the base model
  trained on x plus a shift of under 1e-3 of a pixel, so the honest part of their update is kept.
- `TrapAttack` (weights only): the first fully connected layer gets random rows whose negative parts are
  scaled so each row fires for 1 in K x B of the public images; for the ConvNet the convolutions before it
  are set to pass the image through (space-to-depth, 12 or 48 channels of the 32 and 64 there). The model
  class names the layer and the convolutions (`Trappable`).
  A victim's update is left out of the average: its whole model was not the global one.
- `QuietTrapAttack` (`--attack trap-quiet`): the trap, made to pass the clients' own inspection
  (clients/inspection.py, `--defense inspect`), as SEER asks of every malicious-server attack. Where the trap
  writes exact zeros (the pass-through convolutions' unused taps, the trapped layer's dead columns, every
  bias it sets) it writes noise of QUIET times the honest layer's spread, and it jitters every parameter by as
  much again, with fresh draws each round, so no layer is ever exactly as it was. Armed from a client's first
  round on, it never jumps away from the model the client saw last. What it gives up for that is measured in
  docs/findings.md ("Can clients detect a malicious model?").

Scales, for float32: the server reads new - sent in float32, so a row's change from one image must stand
far above its weights' resolution (6e-8 of them), while within a round of K steps the rows must not move
so much that images change bins. The imprint's rows are small (`ALPHA`), and the one gradient they all
share is set so that one image moves the statistic by DRIFT_SHARE of a bin: far above rounding, far below
a bin.
"""
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacker import Reconstruction, recover_labels
from attacker.analytic import ImprintReadout, Readout, TrapReadout, recover
from attacker.labels import mean_softmax
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.learning.data import ImageDataset
from fl_sim.learning.models.imprint import Imprinted
from fl_sim.learning.updates import Weights
from fl_sim.server.attacks import Armed, Attack, AttackContext, Observed, SettingValue

ALPHA = 1e-3  # the imprint rows' scale: only the base model's input shift depends on it
DRIFT_SHARE = 0.15  # K > 1 steps: one image's effect on the rows, in bins of the statistic
BIAS_RESOLUTION = 1e-4  # K = 1: one image's bias change over the largest bias (float32 resolves 6e-8 of it)
# the imprint block's entries, re-set by the server every round
SERVER_OWNED = ("imprint.", "spread.", "shortcut.", "centre.")


class AnalyticAttack(Attack):
    """A malicious server's analytic attack: model surgery on what its targets are sent, and a readout of their
    updates. Every target gets the same armed weights; the readout is the attack's, by its own method."""

    model: nn.Module
    public: torch.Tensor
    num_classes: int

    @abstractmethod
    def surgery(self, global_weights: Weights, settings: TrainingSettings) -> tuple[Weights, Readout]:
        """The weights sent to the targets, and the readout that recovers their images from the update."""

    def arm(self, global_weights: Weights, settings: TrainingSettings, targets: Sequence[int]) -> Armed:
        weights, readout = self.surgery(global_weights, settings)
        return Armed({target: weights for target in targets}, readout)

    def read(self, observed: Sequence[Observed], armed: Armed | None, seed: int) -> list[Reconstruction]:
        if armed is None or armed.readout is None:
            raise ValueError(f"{self.name} reads only updates of the weights it armed")
        settings, sent = observed[0].settings, observed[0].sent
        updates = [each.update for each in observed]
        labels = [self._labels(sent, update, settings) for update in updates]
        found = [label for label in labels if label is not None]
        return recover(armed.readout, updates, settings.num_images, found if len(found) == len(labels) else None)

    def _labels(self, armed: Weights, update: Weights, settings: TrainingSettings) -> torch.Tensor | None:
        """The round's labels from the last layer (order unknown), or None when they cannot be read."""
        try:
            params = {name: armed[name].float() for name, _ in self.model.named_parameters()}
            shape = tuple(self.public.shape[1:])
            p_mean = mean_softmax(self.model, {**armed}, shape, settings.batchnorm)
            return recover_labels(self.model, params, update, settings, shape, self.num_classes, p_mean)
        except Exception:  # labels are a bonus of the analytic attacks, never their failure
            return None


@dataclass(frozen=True)
class Imprint:
    """The imprint's layout: block b's row indices (thresholds ascending), directions and thresholds."""

    rows: torch.Tensor
    directions: torch.Tensor
    thresholds: torch.Tensor


class ImprintAttack(AnalyticAttack):
    name = "imprint"

    def __init__(self, model: nn.Module, public: torch.Tensor, num_classes: int, blocks: int,
                 drift_share: float = DRIFT_SHARE):
        if not isinstance(model, Imprinted):
            raise ValueError("the imprint attack needs the imprint block in the clients' model (imprint-bins)")
        rows = model.imprint.out_features
        if blocks < 1 or rows % blocks or rows // blocks < 2:
            raise ValueError(f"imprint: {rows} rows cannot be split into {blocks} blocks of 2 or more bins")
        self.model, self.public, self.drift_share = model, public.float(), drift_share
        self.num_classes, self.blocks = num_classes, blocks
        self.layout, self.gap = imprint_layout(self.public, blocks, rows // blocks)
        self.energy = float((self.public.flatten(1) ** 2).sum(1).mean())  # mean |x|^2: how far one image moves rows

    @classmethod
    def build(cls, context: AttackContext) -> Self:
        return cls(context.model, context.public(), context.num_classes, context.config.imprint_blocks)

    def resolved(self) -> dict[str, SettingValue]:
        return {"imprint_blocks": self.blocks}

    def surgery(self, global_weights: Weights, settings: TrainingSettings) -> tuple[Weights, ImprintReadout]:
        weights = {name: tensor.clone() for name, tensor in global_weights.items()}
        layout, features = self.layout, self.public[0].numel()
        weight = layout.directions.repeat_interleave(layout.rows.shape[1], 0) * ALPHA
        bias = -layout.thresholds.flatten() * ALPHA
        # the shared gradient: the base model's input gradient along the brightness direction u
        u = torch.full((features,), features ** -0.5)
        per_image = settings.lr * self._input_gradient(global_weights, settings) @ u
        scale = float(per_image.abs().median().clamp_min(1e-12))
        if settings.local_steps * settings.epochs == 1:  # one step: nothing moves the rows before they are read
            rho = BIAS_RESOLUTION * float(self.layout.thresholds.abs().max())
        else:  # one image's row change / ALPHA, so that it moves the statistic by drift_share of a bin
            rho = self.drift_share * self.gap / (self.energy + 1)
        eps = rho * ALPHA / scale
        weights["imprint.weight"], weights["imprint.bias"] = weight, bias
        weights["spread.weight"] = eps * u
        readout = ImprintReadout("imprint.weight", "imprint.bias", layout.rows, layout.directions,
                                 layout.thresholds, image_shape(self.public))
        return weights, readout

    def _input_gradient(self, global_weights: Weights, settings: TrainingSettings) -> torch.Tensor:
        return input_gradient(self.model, self.public, global_weights, settings)

    def aggregated(self, reply: Weights, sent: Weights, global_weights: Weights) -> Weights:
        """The victim's base model as it trained it; the imprint block as the global model has it."""
        return {name: global_weights[name] if name.startswith(SERVER_OWNED) else tensor
                for name, tensor in reply.items()}


class Trappable(Protocol):
    """What a model class says of itself for trap weights (fl_sim/learning/models: cnn.py, mlp.py): the ReLU
    linear layer that sees the whole image, the convolutions (name, stride) that carry the image to it, and
    what that layer sees of images."""

    TRAP_LAYER: str
    PASS_THROUGH: tuple[tuple[str, int], ...]

    def trap_input(self, x: torch.Tensor) -> torch.Tensor: ...


class TrapAttack(AnalyticAttack):
    name = "trap"

    def __init__(self, model: nn.Module, public: torch.Tensor, num_classes: int, seed: int = 0,
                 fire_share: float = 1.0):
        self.model, self.public, self.seed, self.fire_share = model, public.float(), seed, fire_share
        self.num_classes = num_classes
        layer = getattr(model, "TRAP_LAYER", None)
        if layer is None:
            raise ValueError(
                f"trap weights cannot reach {type(model).__name__}: they need a ReLU fully connected layer that "
                "sees the whole image. LeNet has none (its only linear layer gives the logits, after sigmoid "
                "convolutions whose second stride-2 layer keeps 768 of 3072 values); the ResNets pool the "
                "features globally before their only linear layer. Use the imprint attack for those.")
        trappable = cast(Trappable, model)
        self.layer, self.convs, self.trap_input = trappable.TRAP_LAYER, trappable.PASS_THROUGH, trappable.trap_input
        if self.convs:
            channels = public.shape[1]
            first, last = model.get_submodule(self.convs[0][0]), model.get_submodule(self.convs[-1][0])
            assert isinstance(first, nn.Conv2d) and isinstance(last, nn.Conv2d)
            if first.out_channels < 4 * channels or last.out_channels < 16 * channels:
                raise ValueError(f"trap: this {type(model).__name__} is too narrow to pass the image through its "
                                 "strided convolutions")

    @classmethod
    def build(cls, context: AttackContext) -> Self:
        return cls(context.model, context.public(), context.num_classes, context.config.seed)

    def surgery(self, global_weights: Weights, settings: TrainingSettings) -> tuple[Weights, TrapReadout]:
        weights = {name: tensor.clone() for name, tensor in global_weights.items()}
        if self.convs:
            pass_through_convs(weights, self.public.shape[1], self.convs)
        self.model.load_state_dict(weights)
        features, pixels = self._features(self.public), self._pixel_map()
        rows = weights[f"{self.layer}.weight"].shape[0]
        generator = torch.Generator().manual_seed(self.seed)
        draw = torch.randn(rows, features.shape[1], generator=generator)
        draw[:, ~torch.isin(torch.arange(features.shape[1]), pixels)] = 0  # the zero features carry nothing
        positive, negative = draw.clamp(min=0), (-draw).clamp(min=0)
        ratio = (features @ positive.T) / (features @ negative.T).clamp_min(1e-12)  # a row fires while s < ratio
        rate = min(1.0, self.fire_share / settings.num_images)
        scale = torch.quantile(ratio, 1 - rate, dim=0)
        trap = positive - scale[:, None] * negative
        norm = weights[f"{self.layer}.weight"].norm(dim=1, keepdim=True)
        weights[f"{self.layer}.weight"] = trap / trap.norm(dim=1, keepdim=True) * norm
        weights[f"{self.layer}.bias"] = torch.zeros(rows)
        readout = TrapReadout(f"{self.layer}.weight", f"{self.layer}.bias", pixels, image_shape(self.public))
        return weights, readout

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """The trapped layer's input for `images`, with the pass-through convolutions."""
        with torch.no_grad():
            return self.trap_input(images)

    def _pixel_map(self) -> torch.Tensor:
        """Where each pixel lands at the trapped layer's input: an image of distinct values traced through."""
        count = self.public[0].numel()
        index = (torch.arange(count, dtype=torch.float64) + 1).reshape(1, *self.public.shape[1:])
        with torch.no_grad():
            features = self._features(index.float().div(count + 1)).double().mul(count + 1).round().long()[0]
        pixels = torch.full((count,), -1, dtype=torch.long)
        live = features > 0
        pixels[features[live] - 1] = live.nonzero().flatten()
        if (pixels < 0).any():
            raise ValueError("trap: the convolutions could not pass every pixel through")
        return pixels

    def aggregated(self, reply: Weights, sent: Weights, global_weights: Weights) -> None:
        """Nothing: the victim's whole model was not the global one."""
        return None


QUIET = 1e-3  # the quiet trap's noise, in units of each honest tensor's standard deviation


class QuietTrapAttack(TrapAttack):
    name = "trap-quiet"

    def __init__(self, model: nn.Module, public: torch.Tensor, num_classes: int, seed: int = 0,
                 quiet: float = QUIET):
        super().__init__(model, public, num_classes, seed)
        self.quiet, self.armings = quiet, 0

    def resolved(self) -> dict[str, SettingValue]:
        return {"quiet": self.quiet}

    def surgery(self, global_weights: Weights, settings: TrainingSettings) -> tuple[Weights, TrapReadout]:
        """The trap's weights with no exact zero left and every parameter moved a little (fresh each arming)."""
        weights, readout = super().surgery(global_weights, settings)
        self.armings += 1
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.armings])
                                                     .generate_state(1)[0]))
        for name, _ in self.model.named_parameters():
            honest = global_weights[name].float()
            spread = float(honest.std()) if honest.numel() > 1 else float(honest.abs().mean())
            noise = torch.randn(honest.shape, generator=generator) * self.quiet * max(spread, 1e-6)
            weights[name] = weights[name] + noise
        return weights, readout


def global_base(model: nn.Module, global_weights: Weights) -> nn.Module:
    """The imprinted model's base with the global weights, in train mode, as the clients run it."""
    assert isinstance(model, Imprinted)
    base = model.base
    base.load_state_dict({k.removeprefix("base."): v for k, v in global_weights.items() if k.startswith("base.")})
    base.train()
    return base


def input_gradient(model: nn.Module, public: torch.Tensor, global_weights: Weights,
                   settings: TrainingSettings) -> torch.Tensor:
    """d loss / d input of the imprinted model's base on one public batch of B, flattened: (B, features)."""
    base = global_base(model, global_weights)
    images = public[: max(2, settings.batch_size)].clone().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        logits = base(images)
    classes = logits.shape[1]
    loss = F.cross_entropy(logits, torch.arange(len(images)) % classes)  # any labels: only the scale matters
    (gradient,) = torch.autograd.grad(loss, images)
    return gradient.flatten(1)


def imprint_layout(public: torch.Tensor, blocks: int, bins: int, first_row: int = 0) -> tuple[Imprint, float]:
    """The imprint's layout over rows `first_row ..`: `blocks` principal directions of the public images, each
    against `bins` thresholds at the quantiles of its statistic there (so each bin is equally likely to hold an
    image); and a typical bin's width, in units of the statistic."""
    flat = public.flatten(1).float()
    centred = flat - flat.mean(0)
    # principal directions, made orthogonal to the mean image: the statistic is then centred near 0,
    # which keeps the thresholds (the rows' biases) small, so one image's bias change stands above their rounding
    mean = flat.mean(0) / flat.mean(0).norm()
    directions = torch.linalg.svd(centred.double(), full_matrices=False).Vh[:blocks].float()
    directions = directions - (directions @ mean)[:, None] * mean
    directions = directions / directions.norm(dim=1, keepdim=True)
    values = flat @ directions.T  # (N, blocks)
    quantiles = torch.quantile(values.double(), torch.linspace(0, 1, bins + 1, dtype=torch.float64)[:-1], dim=0).T
    spread = values.max(0).values - values.min(0).values
    quantiles[:, 0] = values.min(0).values - spread  # every image above the first row's threshold
    gap = float((quantiles[:, 2:] - quantiles[:, 1:-1]).median()) if bins > 2 else float(spread.median())
    rows = torch.arange(first_row, first_row + blocks * bins).reshape(blocks, bins)
    return Imprint(rows, directions, quantiles.float()), gap


def image_shape(images: torch.Tensor) -> tuple[int, int, int]:
    """(C, H, W) of a batch of images."""
    channels, height, width = images.shape[1:]
    return channels, height, width


def pass_through_convs(weights: Weights, channels: int, convs: Sequence[tuple[str, int]]) -> None:
    """Sets the convolutions `convs` (name, stride 1 or 2) in `weights` to carry the image to the linear layer
    unchanged (a stride of 2 moves each 2 x 2 patch into 4 channels)."""
    live = channels
    for name, stride in convs:
        weight = torch.zeros_like(weights[f"{name}.weight"])
        for c in range(live):
            if stride == 1:
                weight[c, c, 1, 1] = 1.0
            else:
                for dy in (0, 1):
                    for dx in (0, 1):
                        weight[4 * c + 2 * dy + dx, c, 1 + dy, 1 + dx] = 1.0
        live = live if stride == 1 else 4 * live
        weights[f"{name}.weight"] = weight
        weights[f"{name}.bias"] = torch.zeros(weight.shape[0])


def public_images(dataset: ImageDataset, count: int = 2048, seed: int = 0) -> torch.Tensor:
    """Up to `count` images of the server's own (public) split, drawn from the seed."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:count]
    images, _ = dataset.tensors(order.numpy())
    return images

