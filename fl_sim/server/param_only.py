"""Parameter-only active attacks: weights a client loads into its own architecture with `load_state_dict(strict=True)`.

A user's model is a plain `nn.Module` the client builds itself, so these attacks set parameter VALUES only, on
the path attacker/carry.py finds from the image to the model's first linear layer:

- `TrapAttack` (`--attack trap`; Boenisch et al., "When the Curious Abandon Honesty"): on fl-sim's own models
  (they name their `TRAP_LAYER`) it is fl_sim/server/active.py's trap, unchanged. On any other model: the
  convolutions before the first linear layer carry the image (LOKI-style one-hot kernels; for the Flower
  quickstart's Net, the largest pixel of 4 x 4 blocks of one colour over the central 28 x 28 pixels, since
  two 2 x 2 max-pools stand between the image and fc1's 400 inputs), and that layer's rows become traps: random
  rows over the carried values whose negative part is scaled so that each fires for 1 in B of the server's
  public images. Reaches models whose first linear layer is followed by a ReLU and reached through
  convolutions, ReLUs, max-pools and flattening only (a linear-first MLP: every pixel exactly).
- `QbiAttack` (`--attack qbi`; Nowak et al. 2024, quantile-based bias initialisation): the same carrying and
  layer; its rows are Gaussian and each one's bias sits at the (1 - 1/B) quantile of the row's pre-activation
  over the public images, so each row fires for about 1 in B images, which makes rows fired by exactly one
  image the most likely. Same reach.

Both read a row fired by one image alone as dW / db, the layer's input for that image, mapped back to an
image in [0, 1] through the carrying (attacker.carry.CarriedReadout, whose `carried.description` says what it
did; the server's log prints it at the first arming). Their targets' replies are left out of the average:
their whole model was not the global one. A model they cannot reach gets one line naming the layer that stops
the image and why.
"""
from logging import INFO
from typing import Self, cast

import torch
from flwr.common import log
from torch import nn

from attacker.carry import Carried, CarriedReadout, ImagePath, carry_convs, fit_decoder, image_path, probe
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.learning.updates import Weights
from fl_sim.server import active
from fl_sim.server.active import AnalyticAttack, image_shape, pass_through_convs
from fl_sim.server.attacks import AttackContext

PUBLIC_IMAGES = 4096  # at most this many of the server's public images, drawn by the seed


def reach(model: nn.Module, shape: tuple[int, int, int], attack: str) -> ImagePath | None:
    """The path the attack takes through `model` (None: an fl-sim model that names its trap layer); a model it
    cannot reach raises ValueError in one line."""
    if getattr(model, "TRAP_LAYER", None) is not None:
        return None
    try:
        return image_path(model, shape)
    except ValueError as error:
        raise ValueError(f"{attack} cannot reach {type(model).__name__}: {error}") from None


class CarriedRows(AnalyticAttack):
    """An attack that carries the image to a linear layer and rewrites that layer's rows (`rows`)."""

    def __init__(self, model: nn.Module, public: torch.Tensor, num_classes: int, seed: int = 0):
        if len(public) > PUBLIC_IMAGES:  # enough for the quantiles and the decoder, and bounded memory
            public = public[torch.randperm(len(public), generator=torch.Generator().manual_seed(seed))[:PUBLIC_IMAGES]]
        self.model, self.public, self.num_classes, self.seed = model, public.float(), num_classes, seed
        self.shape = image_shape(self.public)
        self.path = reach(model, self.shape, self.name)
        self.layer = self.path.layer if self.path is not None else str(cast(active.Trappable, model).TRAP_LAYER)
        self.carried: Carried | None = None
        self._carrying: tuple[dict[str, torch.Tensor], Carried, torch.Tensor] | None = None

    @classmethod
    def build(cls, context: AttackContext) -> Self:
        return cls(context.model, context.public(), context.num_classes, context.config.seed)

    def rows(self, values: torch.Tensor, count: int, settings: TrainingSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` rows over the carried values (rows, L) and their biases (rows,), from the public images'
        carried values `values` (N, L), for updates of `settings.num_images` images."""
        raise NotImplementedError

    def carry(self, global_weights: Weights) -> tuple[dict[str, torch.Tensor], Carried, torch.Tensor]:
        """The global weights with the path's convolutions set to carry the image, what they carry to the layer,
        and the public images' carried values. The carrying overwrites every parameter before the layer, so it
        is the same every round: made once."""
        weights = {name: tensor.clone() for name, tensor in global_weights.items()}
        if self._carrying is None:
            if self.path is None:
                through = cast(active.Trappable, self.model).PASS_THROUGH
                pass_through_convs(weights, self.shape[0], through)
                self.model.load_state_dict(weights)
                values = {key: weights[key] for name, _ in through for key in (f"{name}.weight", f"{name}.bias")}
            else:
                self.model.load_state_dict(weights)
                values = carry_convs(self.model, self.path, self.shape)
            carried = probe(self.model, self.layer, self.shape, check=self.public[:16])
            public_values = carried.values(layer_inputs(self.model, self.layer, self.public)).float()
            self._carrying = values, fit_decoder(carried, public_values, self.public), public_values
            log(INFO, "%s: %s", self.name, self._carrying[1].description)
        carrying, self.carried, public_values = self._carrying
        weights.update({key: value.clone() for key, value in carrying.items()})
        return weights, self.carried, public_values

    def surgery(self, global_weights: Weights, settings: TrainingSettings) -> tuple[Weights, CarriedReadout]:
        weights, carried, values = self.carry(global_weights)
        honest = weights[f"{self.layer}.weight"]
        rows, bias = self.rows(values, honest.shape[0], settings)
        weight = torch.zeros(honest.shape, dtype=torch.float64)
        weight[:, carried.features] = rows.double() / carried.scale.double()
        bias = bias.double() - (rows.double() * (carried.offset / carried.scale).double()).sum(1)
        # each row as long as an honest one; with one step, its bias also no larger than the honest layer's largest
        # (the server reads new - sent in the weights' dtype, so a row's bias change must stand far above its
        # bias' rounding). Not with several: a row that short moves so far in a step that it fires for others.
        factor = honest.double().norm(dim=1) / weight.norm(dim=1).clamp_min(1e-30)
        if settings.total_steps == 1:
            honest_bias = weights[f"{self.layer}.bias"].double().abs().max().clamp_min(honest.shape[1] ** -0.5)
            factor = torch.minimum(factor, honest_bias / bias.abs().clamp_min(1e-30))
        weights[f"{self.layer}.weight"] = (weight * factor[:, None]).to(honest.dtype)
        weights[f"{self.layer}.bias"] = (bias * factor).to(honest.dtype)
        return weights, CarriedReadout(f"{self.layer}.weight", f"{self.layer}.bias", carried, self.shape)

    def aggregated(self, reply: Weights, sent: Weights, global_weights: Weights) -> None:
        """Nothing: the victim's whole model was not the global one."""
        return None


def layer_inputs(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """What `layer` of `model` receives (flattened) when the model runs `images`."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, i, _o: seen.append(i[0].detach()))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for start in range(0, len(images), 512):
                model(images[start: start + 512])
    finally:
        handle.remove()
    return torch.cat(seen).flatten(1)


def column_quantile(matrix: torch.Tensor, q: float) -> torch.Tensor:
    """Each column's q-quantile (linear interpolation, as torch.quantile, which refuses large inputs)."""
    ordered = matrix.sort(dim=0).values
    position = q * (len(matrix) - 1)
    low = int(position)
    high = min(low + 1, len(matrix) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


class TrapAttack(CarriedRows, active.TrapAttack):
    """Trap weights on any model they reach (module docstring): fl-sim's own models as before, any other model
    through the carried path."""

    name = "trap"

    def __init__(self, model: nn.Module, public: torch.Tensor, num_classes: int, seed: int = 0,
                 fire_share: float = 1.0):
        if getattr(model, "TRAP_LAYER", None) is not None:
            active.TrapAttack.__init__(self, model, public, num_classes, seed, fire_share)
            self.path = None
            return
        CarriedRows.__init__(self, model, public, num_classes, seed)
        self.fire_share = fire_share

    def surgery(self, global_weights: Weights, settings: TrainingSettings) -> tuple[Weights, object]:  # type: ignore[override]
        if self.path is None:
            return active.TrapAttack.surgery(self, global_weights, settings)
        return CarriedRows.surgery(self, global_weights, settings)

    def rows(self, values: torch.Tensor, count: int, settings: TrainingSettings) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        draw = torch.randn(count, values.shape[1], generator=generator)
        positive, negative = draw.clamp(min=0), (-draw).clamp(min=0)
        ratio = (values @ positive.T) / (values @ negative.T).clamp_min(1e-12)  # a row fires while s < ratio
        rate = min(1.0, self.fire_share / settings.num_images)
        scale = column_quantile(ratio, 1 - rate)
        return positive - scale[:, None] * negative, torch.zeros(count)


class QbiAttack(CarriedRows):
    """Quantile-based bias initialisation (module docstring): Gaussian rows, each bias at the (1 - 1/B) quantile
    of its pre-activation over the public images."""

    name = "qbi"

    def rows(self, values: torch.Tensor, count: int, settings: TrainingSettings) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        draw = torch.randn(count, values.shape[1], generator=generator)
        rate = min(1.0, 1.0 / settings.num_images)
        threshold = column_quantile((values @ draw.T).double(), 1 - rate)
        return draw, -threshold.float()
