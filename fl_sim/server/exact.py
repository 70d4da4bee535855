"""The honest-but-curious server's exact batch attacks: `spear` and `cocktail`, read off one linear layer's update.

Both are passive: every client gets the global model, nothing of the average changes, so no inspection of the
model can see them. Both read the first linear layer followed by a ReLU: on `mlp` it sees the image (the inputs
it recovers are the images); on `cnn` it sits behind the convolutions, so its inputs are the convolutions'
features, and `spear` then inverts them to images through the known convolutions (an optimisation against the
exact features, not against the gradient). The log says which it did, and how long each victim took.

A one-step update is -lr times the gradient, and the mean of several clients' one-step updates (secure
aggregation's) is the gradient of all their images at once: each attack reads the layer's weight and bias
change as they are (their common factor cancels). K local steps sum K gradients: the rank grows to K x B
and each step's batch stands apart as long as the sum stays within reach.
"""
import time
from collections.abc import Sequence
from logging import INFO
from typing import Self

import torch
from flwr.common import log
from torch import nn

from attacker import Reconstruction, Status, recover_labels
from attacker.analytic import CONFIRMED, UNRECOVERED
from attacker.carry import image_path, layer_input
from attacker.cocktail import cocktail
from attacker.labels import mean_softmax
from attacker.spear import BUDGET, spear
from fl_sim.learning.models.cnn import ConvNet
from fl_sim.learning.models.mlp import MLP
from fl_sim.learning.updates import Weights
from fl_sim.server.attacks import Armed, Attack, AttackContext, Observed, SettingValue

INVERSION_LR = 0.05  # Adam's step on the images' logits when the features are inverted through the convolutions


def first_relu_layer(model: nn.Module,
                     image_shape: tuple[int, int, int] | None = None) -> tuple[str, nn.Linear, nn.Module | None]:
    """The first linear layer followed by a ReLU, and the convolutions before it (None: it sees the image). fl-sim's
    `mlp` and `cnn` name theirs; any other model (a user's own, with `image_shape`) is read by the image's path
    (attacker/carry.py), and reached only where that layer sees the image itself (a linear first layer)."""
    if isinstance(model, MLP):
        layer = model.layers[1]
        assert isinstance(layer, nn.Linear)
        return "layers.1", layer, None
    if isinstance(model, ConvNet):
        layer = model.classifier[0]
        assert isinstance(layer, nn.Linear)
        return "classifier.0", layer, model.features
    if image_shape is not None:
        path = image_path(model, image_shape)  # a path the image cannot take is refused in one line there
        found = model.get_submodule(path.layer)
        if not path.relu or path.convs or not isinstance(found, nn.Linear):
            raise ValueError(f"the exact batch attacks read a linear layer that sees the image and is followed by a "
                             f"ReLU; {type(model).__name__}'s first, {path.layer}, "
                             f"{'sees it through ' + ', '.join(path.convs) if path.convs else 'has no ReLU after it'}")
        return path.layer, found, None
    raise ValueError(f"the exact batch attacks read a ReLU linear layer (mlp, cnn), not {type(model).__name__}")


def pixel_map(model: nn.Module, layer: str, image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, scale) with the layer's input = offset + scale x the image's pixels, entry by entry, for a layer that
    sees the image (a model's input normalization makes them other than 0 and 1); checked on a random image."""
    zero = layer_input(model, layer, torch.zeros(1, *image_shape)).flatten().double()
    scale = layer_input(model, layer, torch.ones(1, *image_shape)).flatten().double() - zero
    probe = torch.rand(1, *image_shape, generator=torch.Generator().manual_seed(0))
    seen = layer_input(model, layer, probe).flatten().double()
    if len(seen) != probe.numel() or (scale.abs() < 1e-12).any() or \
            not torch.allclose(seen, zero + scale * probe.flatten().double(), atol=1e-4):
        raise ValueError(f"{layer}'s input is not the image's pixels, each scaled and shifted: the exact batch attacks "
                         "cannot place it back into images")
    return zero, scale


class ExactBatchAttack(Attack):
    """What `spear` and `cocktail` share: the layer, the labels, placing the layer inputs back into images."""

    def __init__(self, model: nn.Module, public: torch.Tensor, image_shape: tuple[int, int, int], num_classes: int,
                 iterations: int):
        self.model, self.public, self.image_shape = model, public.float(), image_shape
        self.num_classes, self.iterations = num_classes, iterations
        self.layer, _, self.convolutions = first_relu_layer(model, image_shape)
        self.pixels = pixel_map(model, self.layer, image_shape) if self.convolutions is None else None
        self.features: list[torch.Tensor | None] = []  # the last round's recovered layer inputs, per victim

    @classmethod
    def build(cls, context: AttackContext) -> Self:
        return cls(context.model, context.public(), context.image_shape, context.num_classes,
                   context.config.iterations)

    def settings(self) -> dict[str, SettingValue]:
        return {"iterations": self.iterations if self.convolutions is not None else None}

    def read(self, observed: Sequence[Observed], armed: Armed | None, seed: int) -> list[Reconstruction]:
        started = time.perf_counter()
        sent = observed[0].sent
        self.model.load_state_dict(sent)
        inputs = self.recover([each.update[f"{self.layer}.weight"] for each in observed],
                              [each.update[f"{self.layer}.bias"] for each in observed], observed, seed)
        self.features = [found if isinstance(found, torch.Tensor) else None for found in inputs]
        results = [self._images(found, each, sent) for found, each in zip(inputs, observed)]
        seconds = (time.perf_counter() - started) / max(len(observed), 1)
        place = ("the images" if self.convolutions is None else
                 f"the convolutions' features, inverted to images by {self.iterations} Adam steps against them")
        log(INFO, "%s: %d victim(s), %d read (the inputs of %s: %s), %.2f s per victim", self.name, len(observed),
            sum(result.ok for result in results), self.layer, place, seconds)
        return results

    def recover(self, weight_changes: list[torch.Tensor], bias_changes: list[torch.Tensor],
                observed: Sequence[Observed], seed: int) -> list[torch.Tensor | str]:
        """Each victim's layer inputs (count, features), or the reason none were read."""
        raise NotImplementedError

    def _images(self, found: torch.Tensor | str, each: Observed, sent: Weights) -> Reconstruction:
        if isinstance(found, str):
            return Reconstruction.failure(Status.FAILED, found)
        count = each.settings.num_images
        if len(found) > count:
            return Reconstruction.failure(Status.FAILED, f"{len(found)} inputs read off the layer, more than the "
                                                         f"{count} images the update holds")
        found = found.float()
        if self.pixels is not None:  # the layer's inputs back into pixels
            offset, scale = self.pixels
            images = ((found.double() - offset) / scale).float().reshape(-1, *self.image_shape).clamp(0, 1)
        else:
            images = self.invert(found).clamp(0, 1)
        missing = count - len(images)
        status = [CONFIRMED] * len(images) + [UNRECOVERED] * missing
        images = torch.cat([images, torch.zeros(missing, *self.image_shape)])
        return Reconstruction(images, self._labels(sent, each), 0.0, image_status=status)

    def invert(self, features: torch.Tensor) -> torch.Tensor:
        """Images whose convolution features match `features` (n, features): Adam on the images' logits."""
        assert self.convolutions is not None
        convolutions = self.convolutions.eval()
        generator = torch.Generator().manual_seed(0)
        logits = torch.zeros(len(features), *self.image_shape).add_(
            0.01 * torch.randn(len(features), *self.image_shape, generator=generator)).requires_grad_(True)
        optimiser = torch.optim.Adam([logits], lr=INVERSION_LR)
        scale = features.norm(dim=1).clamp_min(1e-12)
        for _ in range(self.iterations):
            optimiser.zero_grad()
            mismatch = (convolutions(torch.sigmoid(logits)).flatten(1) - features).norm(dim=1) / scale
            mismatch.pow(2).sum().backward()
            optimiser.step()
        return torch.sigmoid(logits.detach())

    def _labels(self, sent: Weights, each: Observed) -> torch.Tensor:
        """The update's labels from the last layer (order unknown); zeros when they cannot be read."""
        count = each.settings.num_images
        try:
            params = {name: sent[name].float() for name, _ in self.model.named_parameters()}
            p_mean = mean_softmax(self.model, dict(sent), self.image_shape, each.settings.batchnorm)
            return recover_labels(self.model, params, each.update, each.settings, self.image_shape,
                                  self.num_classes, p_mean)
        except Exception:  # labels are a bonus here, never the attack's failure
            return torch.zeros(count, dtype=torch.long)

    def off_rates(self) -> torch.Tensor:
        """Each unit's share of the server's public images that leave it off, at the sent weights."""
        _, layer, _ = first_relu_layer(self.model, self.image_shape)
        with torch.no_grad():
            inputs = layer_input(self.model, self.layer, self.public)
            return (layer(inputs.flatten(1)) <= 0).double().mean(0)


class SpearAttack(ExactBatchAttack):
    """`--attack spear`: attacker.spear on the first ReLU linear layer's update (exact, or failed with a reason)."""

    name = "spear"
    budget = BUDGET

    def recover(self, weight_changes: list[torch.Tensor], bias_changes: list[torch.Tensor],
                observed: Sequence[Observed], seed: int) -> list[torch.Tensor | str]:
        layer = first_relu_layer(self.model, self.image_shape)[1]
        weights = (layer.weight.detach(), layer.bias.detach())
        rates = self.off_rates()
        found = spear(weight_changes, bias_changes, [weights] * len(observed), off_rates=[rates] * len(observed),
                      budget=self.budget, seed=seed)
        return [result.inputs if result.inputs is not None else f"spear: {result.reason}" for result in found]

    def settings(self) -> dict[str, SettingValue]:
        return {**super().settings(), "budget": self.budget}


class CocktailAttack(ExactBatchAttack):
    """`--attack cocktail`: attacker.cocktail (FastICA) on the first linear layer's update."""

    name = "cocktail"

    def recover(self, weight_changes: list[torch.Tensor], bias_changes: list[torch.Tensor],
                observed: Sequence[Observed], seed: int) -> list[torch.Tensor | str]:
        shape = self.image_shape if self.convolutions is None else None
        found = cocktail(weight_changes, bias_changes, max_sources=observed[0].settings.num_images,
                         image_shape=shape, seed=seed)
        return [result.inputs if result.inputs is not None else f"cocktail: {result.reason}" for result in found]
