"""A disguised attack of the SEER class (Garov et al., "Hiding in Plain Sight", ICLR 2024): the model the server
sends is trained together with a secret decoder that the server keeps, so that the round's aggregate gradient
decodes to the one image of the round with a chosen property (the brightest, the reddest, ...). Pure torch.

How the parts fit (fl-sim's own design of the method, not SEER's code):

- The property: `property_scores`, a linear statistic of an image (mean brightness, or one colour over the
  others), and its ranking: the round's chosen image is the one with the largest score.
- The disaggregation, in the model's own parameters: `units` (K) units of a hidden ReLU linear layer are trained
  to have pre-activations that grow with the property, each crossing zero at its own threshold (ascending: the
  property's (1 - m_k / n) quantile of the training images, m_k the images of an n-image round expected above
  it). Unit k then fires for the images above its threshold only, and its weight gradient is the sum of
  g_i h_i over those images (h_i: the layer's input, g_i: the gradient passed back to the unit), its bias
  gradient the sum of g_i. The highest unit whose bias gradient is not zero is fired by the round's brightest
  images only; when it is one image, weight / bias gradient is that image's h exactly (`disaggregate`).
- The reconstructor (`Decoder`, never sent): a small convolutional network that maps the layer's input h back
  to the image. It is trained with the model's convolutions, so that h keeps what the decoder needs.
- Training (`train_step`): one step of the server's joint objective on a simulated round of n images: the
  model's classification loss (the federation still trains), the units' calibration against their thresholds
  (exact near and above each, kept below zero far under it), the decoder on the images' h, and the attack
  itself: the decoder applied to what `disaggregate` reads off the round's mean gradient (computed with
  create_graph, so its loss is backpropagated through the gradient into the model: double backprop), against
  the round's chosen image. Secure aggregation's rounding may be
  simulated as Gaussian noise on the mean gradient (`noise`). A stability term keeps the model trainable by the
  federation: the classification loss of the model after the round's own FedSGD step (-lr x its mean gradient,
  again with create_graph), so that the clients' own step at their learning rate does not break the model it
  is sent (trained without it, the model lost its accuracy in one FedSGD round at lr 0.05: docs/findings.md).

The decoder reads only the K rows and biases of one layer of the aggregate update: the gradient of a few
thousand parameters, never the rest of the model.
"""
import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

PROPERTIES = ("bright", "dark", "red", "green", "blue")
# the relative squared error of a matched image's layer input below which the read was one image's features
# (`decode_round`): a mixture of several images' features, which no one image gives, stays above it
MATCH_TOLERANCE = 0.01


def property_scores(images: torch.Tensor, name: str) -> torch.Tensor:
    """Each image's property score (larger: more of the property), a linear statistic of its pixels.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, H, W) in [0, 1].
    name : str
        One of PROPERTIES: bright (mean pixel), dark (minus it), red / green / blue (that colour's mean minus the
        mean of the other two; a one-channel image has only bright and dark).

    Returns
    -------
    torch.Tensor
        (N,) scores.
    """
    if name == "bright":
        return images.mean((1, 2, 3))
    if name == "dark":
        return -images.mean((1, 2, 3))
    colours = {"red": 0, "green": 1, "blue": 2}
    if name not in colours:
        raise ValueError(f"unknown property {name!r}: choose one of {', '.join(PROPERTIES)}")
    if images.shape[1] != 3:
        raise ValueError(f"property {name!r} needs colour images, not {images.shape[1]} channel(s)")
    channel = images.mean((2, 3))
    own = channel[:, colours[name]]
    return own - (channel.sum(1) - own) / 2


@dataclass(frozen=True)
class DisguiseConfig:
    """What the model and decoder were trained for; saved beside the checkpoint as JSON.

    Parameters
    ----------
    model : str
        The registered model (its parameter names and shapes are what is sent).
    property : str
        The chosen property (PROPERTIES).
    layer : str
        The hidden ReLU linear layer whose units disaggregate (its input h is what the decoder inverts).
    units : list of int
        The layer's units used, thresholds ascending.
    expected : list of float
        For each unit, the images of a round of `round_images` expected above its threshold.
    thresholds : list of float
        Each unit's property threshold (the training images' quantile).
    feature_shape : list of int
        h reshaped for the decoder (C, S, S).
    image_shape : list of int
        (C, H, W) of the images.
    round_images : int
        The images behind the aggregate the decoder was trained on (clients x B).
    clients, batch_size : int
        How the round was simulated.
    lr : float
        The clients' learning rate the readout assumes (FedSGD: the update is -lr x the mean gradient).
    noise : float
        The standard deviation of the noise added to the simulated mean gradient (secure aggregation's
        rounding, in gradient units).
    steps, seed : int
        The training's length and seed.
    width : int
        The decoder's width.
    """

    model: str
    property: str
    layer: str
    units: list[int]
    expected: list[float]
    thresholds: list[float]
    feature_shape: list[int]
    image_shape: list[int]
    round_images: int = 160
    clients: int = 10
    batch_size: int = 16
    lr: float = 0.05
    noise: float = 0.0
    steps: int = 0
    seed: int = 0
    width: int = 64
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class Decoder(nn.Module):
    """The server's secret reconstructor: the layer input h (reshaped to `feature_shape`) back to an image.

    Parameters
    ----------
    feature_shape : sequence of int
        (C, S, S): h as the convolutions left it.
    image_shape : sequence of int
        (C, H, W) of the images; H must be S times a power of two.
    width : int
        Channels of its hidden layers.
    """

    def __init__(self, feature_shape: Sequence[int], image_shape: Sequence[int], width: int = 64):
        super().__init__()
        channels, side = feature_shape[0], feature_shape[1]
        layers: list[nn.Module] = [nn.Conv2d(channels, 2 * width, 3, padding=1), nn.ReLU()]
        current = 2 * width
        while side < image_shape[1]:  # each doubling of the side halves the channels
            layers += [nn.ConvTranspose2d(current, current // 2, 4, stride=2, padding=1), nn.ReLU(),
                       nn.Conv2d(current // 2, current // 2, 3, padding=1), nn.ReLU()]
            current, side = current // 2, side * 2
        if side != image_shape[1]:
            raise ValueError(f"features of side {feature_shape[1]} do not double up to images of side {image_shape[1]}")
        layers.append(nn.Conv2d(current, image_shape[0], 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.feature_shape = tuple(feature_shape)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) layer inputs -> (N, C, H, W) images in [0, 1]."""
        return torch.sigmoid(self.body(features.reshape(len(features), *self.feature_shape)))


def disaggregate(weight_rows: torch.Tensor, bias: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, int]:
    """The layer input of the round's chosen image, read off the units' gradient.

    Parameters
    ----------
    weight_rows : torch.Tensor
        (K, F) the units' weight gradient (thresholds ascending).
    bias : torch.Tensor
        (K,) their bias gradient.
    tolerance : float
        A bias gradient at most this large (in magnitude) is a unit no image fired (noise of the aggregation).

    Returns
    -------
    tuple
        (h (F,), the unit read; -1 when none fired, and h is then zeros).
    """
    fired = (bias.abs() > tolerance).nonzero().flatten()
    if not len(fired):
        return torch.zeros_like(weight_rows[0]), -1
    unit = int(fired[-1])
    return weight_rows[unit] / bias[unit], unit


def unit_gradients(model: nn.Module, layer: str, units: Sequence[int], images: torch.Tensor, labels: torch.Tensor,
                   clients: int, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The round's mean gradient of the units' weight rows and biases: FedSGD of `clients` clients, each one step
    on its equal share of `images` (batch statistics per client, as each client trains).

    Parameters
    ----------
    model : nn.Module
        The model in training mode.
    layer : str
        The linear layer.
    units : sequence of int
        Its units read.
    images, labels : torch.Tensor
        The round's images, client after client.
    clients : int
        How many clients share them (1: one batch; a model without batch norm gives the same mean).
    create_graph : bool
        Keep the graph, to backpropagate through the gradient.

    Returns
    -------
    tuple
        ((K, F) weight rows, (K,) biases) of the mean gradient.
    """
    module = cast(nn.Linear, model.get_submodule(layer))
    index = torch.as_tensor(list(units))
    rows, biases = [], []
    for chunk, chunk_labels in zip(images.chunk(clients), labels.chunk(clients), strict=True):
        loss = F.cross_entropy(model(chunk), chunk_labels)
        weight, bias = torch.autograd.grad(loss, (module.weight, module.bias), create_graph=create_graph)
        rows.append(weight[index])
        biases.append(bias[index])
    return torch.stack(rows).mean(0), torch.stack(biases).mean(0)


def layer_inputs_of(model: nn.Module, layer: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the layer's input h (N, F)) of one forward pass."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, i, _o: seen.append(i[0]))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return logits, seen[0].flatten(1)


@dataclass
class StepLosses:
    """One training step's losses (each the mean squared error or cross-entropy it names)."""

    classify: float
    calibrate: float
    autoencode: float
    attack: float  # NaN when no unit fired
    fired_one: float  # 1 when the unit read was fired by the chosen image alone, else 0
    stable: float = float("nan")  # the classification loss after the round's FedSGD step (NaN: not computed)


def train_step(model: nn.Module, decoder: Decoder, config: DisguiseConfig, images: torch.Tensor,
               labels: torch.Tensor, weights: tuple[float, float, float, float] = (1.0, 10.0, 1.0, 1.0),
               generator: torch.Generator | None = None, autoencoded: int = 32,
               stable: float = 0.0) -> tuple[torch.Tensor, StepLosses]:
    """The joint loss of one simulated round (module docstring); the caller steps the optimiser.

    Parameters
    ----------
    model, decoder : nn.Module
        The model sent and the secret decoder, in training mode.
    config : DisguiseConfig
        The layer, units, thresholds, property, clients and noise.
    images, labels : torch.Tensor
        The round's `config.round_images` images, client after client.
    weights : tuple of float
        Weights of the classification, calibration, auto-encoding and attack losses.
    generator : torch.Generator or None
        Draws the aggregation noise.
    autoencoded : int
        The first this many images train the decoder on their own h.
    stable : float
        Weight of the stability term: the classification loss, on the same images, of the model after the round's
        FedSGD step at `config.lr` (0: not computed; it costs about one more double backprop).

    Returns
    -------
    tuple
        (the loss to backpropagate, its parts).
    """
    classify_w, calibrate_w, autoencode_w, attack_w = weights
    module = cast(nn.Linear, model.get_submodule(config.layer))
    index = torch.as_tensor(config.units)
    logits, h = layer_inputs_of(model, config.layer, images)
    classify = F.cross_entropy(logits, labels)
    scores = property_scores(images, config.property)
    thresholds = torch.as_tensor(config.thresholds, dtype=scores.dtype)
    pre = h @ module.weight[index].T + module.bias[index]  # (N, K)
    spread = scores.std().clamp_min(1e-6)
    target = (scores[:, None] - thresholds[None, :]) / spread  # a unit crosses zero at its threshold
    # exact near and above each threshold (where the ranking is decided); far below it, only kept from firing
    near = target > -1
    calibrate = torch.where(near, (pre - target) ** 2, F.relu(pre + 1) ** 2).mean()
    autoencode = F.mse_loss(decoder(h[:autoencoded]), images[:autoencoded])
    grads = None
    if stable > 0:  # the whole round's gradient, taken once: the units' rows read off it, and the step taken with it
        grads = round_gradients(model, images, labels, config.clients, create_graph=True)
        rows, bias = grads[f"{config.layer}.weight"][index], grads[f"{config.layer}.bias"][index]
    else:
        rows, bias = unit_gradients(model, config.layer, config.units, images, labels, config.clients,
                                    create_graph=True)
    if config.noise > 0:
        rows = rows + config.noise * torch.randn(rows.shape, generator=generator)
        bias = bias + config.noise * torch.randn(bias.shape, generator=generator)
    chosen = int(scores.argmax())
    features, unit = disaggregate(rows, bias, tolerance=4 * config.noise)
    fired_one, attack_value = 0.0, float("nan")
    if unit >= 0:
        attack = F.mse_loss(decoder(features[None])[0], images[chosen])
        fired_one = float(int((scores > thresholds[unit]).sum()) == 1)
        attack_value = attack.item()
    else:
        attack = torch.zeros(())
    loss = classify_w * classify + calibrate_w * calibrate + autoencode_w * autoencode + attack_w * attack
    stable_value = float("nan")
    if grads is not None:
        after = stepped_loss(model, config, images, labels, grads)
        loss = loss + stable * after
        stable_value = after.item()
    return loss, StepLosses(classify.item(), calibrate.item(), autoencode.item(), attack_value, fired_one,
                            stable_value)


def round_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, clients: int,
                    create_graph: bool = False) -> dict[str, torch.Tensor]:
    """The round's mean gradient of every parameter: each of `clients` clients' gradient on its equal share of
    `images` (client after client), averaged; with `create_graph`, differentiable in the parameters."""
    named = dict(model.named_parameters())
    grads = [torch.zeros_like(p) for p in named.values()]
    for chunk, chunk_labels in zip(images.chunk(clients), labels.chunk(clients), strict=True):
        each = torch.autograd.grad(F.cross_entropy(model(chunk), chunk_labels), list(named.values()),
                                   create_graph=create_graph)
        grads = [total + g / clients for total, g in zip(grads, each, strict=True)]
    return dict(zip(named, grads, strict=True))


def stepped_loss(model: nn.Module, config: DisguiseConfig, images: torch.Tensor, labels: torch.Tensor,
                 grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The classification loss on `images` of the model after the round's FedSGD step: the round's mean gradient
    (`grads`, else `round_gradients` with create_graph) times `config.lr` subtracted from every parameter;
    differentiable in the model's parameters."""
    if grads is None:
        grads = round_gradients(model, images, labels, config.clients, create_graph=True)
    stepped = {name: p - config.lr * grads[name] for name, p in model.named_parameters()}
    return F.cross_entropy(torch.func.functional_call(model, stepped, (images,)), labels)


def refit_decoder(decoder: Decoder, model: nn.Module, layer: str, public: torch.Tensor, steps: int,
                  batch: int = 64, lr: float = 1e-3, seed: int = 0) -> Decoder:
    """A copy of the decoder fitted again to the layer inputs of the model as it is now (the federation trains the
    convolutions, and the decoder was trained for the features of the model first sent), on the server's own
    public images: `steps` Adam steps of `batch` images, the mean squared error of the decoder on their h.

    Parameters
    ----------
    decoder : Decoder
        The decoder as it is (left unchanged).
    model : nn.Module
        The model whose layer input the decoder will read (the one the round's update was taken against).
    layer : str
        The disaggregating layer.
    public, steps, batch, lr, seed
        The server's images (N, C, H, W) in [0, 1] and the fit's length, batch, Adam's rate and its draws.

    Returns
    -------
    Decoder
        The refitted copy, in evaluation mode.
    """
    fitted = copy.deepcopy(decoder).train()
    with torch.no_grad():
        _, features = layer_inputs_of(model, layer, public)
    optimizer = torch.optim.Adam(fitted.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(public), (min(batch, len(public)),), generator=generator)
        loss = F.mse_loss(fitted(features[pick]), public[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return fitted.eval()


def match_features(model: nn.Module, layer: str, features: torch.Tensor, start: torch.Tensor, steps: int,
                   lr: float = 0.01) -> tuple[torch.Tensor, float]:
    """The image whose layer input is `features`, found from `start` (the decoder's image) by `steps` Adam steps
    on its pixels (kept in [0, 1]) against the relative squared error of its layer input: the decoder gives the
    likely image, the model's own convolutions then pin down what their features determine.

    Parameters
    ----------
    model : nn.Module
        The model the features were read off (in evaluation mode; left unchanged).
    layer : str
        The disaggregating layer, whose input `features` is.
    features : torch.Tensor
        (F,) the layer input read off the units.
    start : torch.Tensor
        (C, H, W) the first guess, in [0, 1].
    steps, lr
        Adam's steps and rate.

    Returns
    -------
    tuple
        ((C, H, W) in [0, 1], the relative squared error of its layer input against `features`: near zero when
        `features` are one image's, larger for a mixture of several images' that no image gives).
    """
    target = features.detach().float()[None]
    scale = target.square().sum().clamp_min(1e-12)
    image = start.detach().clone()[None].requires_grad_(True)
    optimizer = torch.optim.Adam([image], lr=lr)
    for _ in range(steps):
        _, h = layer_inputs_of(model, layer, image)
        loss = (h - target).square().sum() / scale
        image.grad = torch.autograd.grad(loss, [image])[0]  # the model's parameters collect no gradient
        optimizer.step()
        with torch.no_grad():
            image.clamp_(0, 1)
    with torch.no_grad():
        _, h = layer_inputs_of(model, layer, image)
        error = float((h - target).square().sum() / scale)
    return image.detach()[0], error


# the circular shifts (rows, columns) of the server's images `fit_units` adds to them, each also mirrored: they
# keep every image's property score exactly and multiply the fit's images (a fit on 2,270 training images without
# them: calibration error on held-out images 0.20 spreads, against 0.09 with 7 shifts)
SHIFTS = ((0, 0), (0, 2), (0, -2), (2, 0), (-2, 0), (2, 2), (-2, -2), (2, -2), (-2, 2), (0, 4), (4, 0), (0, -4),
          (-4, 0))


def fit_units(model: nn.Module, config: DisguiseConfig, images: torch.Tensor, ridge: float = 10.0,
              reach: float = 1.5, shifts: Sequence[tuple[int, int]] = SHIFTS, chunk: int = 512,
              peak: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight and bias with the units' rows fitted again, on the server's own images, to the
    calibration they were trained for: each unit's pre-activation equal to (score - threshold) / the scores'
    spread, over the images within `reach` spreads below its threshold and above it (where the ranking is decided).
    The federation trains the model, and a unit's crossing drifts off its threshold; training leaves the units
    calibrated only as well as its other losses allow. Each row is the least-squares fit with a ridge penalty
    towards the row as it is (so the rows move only as far as the fit needs), over the images, their circular
    `shifts` and their mirror images (which keep the score). Only the units' rows change, and none becomes more
    peaked than `peak` (a row's kurtosis): where a fit would, its ridge is raised tenfold, up to 4 times, and a row
    still too peaked keeps its weights (an inspecting client flags peaked rows: clients/inspection.py). Each unit's
    bias is then the least-squares one for the weights it has.

    Parameters
    ----------
    model : nn.Module
        The model as the server would send it (left unchanged).
    config : DisguiseConfig
        The layer, units, thresholds and property.
    images : torch.Tensor
        (N, C, H, W) the server's images in [0, 1].
    ridge : float
        The penalty on a row's change (in units of one image's squared error).
    reach : float
        How many spreads below its threshold a unit is fitted.
    shifts : sequence of (int, int)
        The circular shifts of the images taken (each also mirrored); (0, 0): the images themselves.
    chunk : int
        Images a forward pass (the memory of the fit).
    peak : float or None
        The largest kurtosis a fitted row may have (None: that of the layer's most peaked row before the fit; the
        attack gives its checkpoint's, which the federation's training does not raise).

    Returns
    -------
    tuple
        (the layer's whole weight, its whole bias), refitted.
    """
    module = cast(nn.Linear, model.get_submodule(config.layer))
    index = torch.as_tensor(config.units)
    scores = property_scores(images, config.property).double()
    spread = scores.std().clamp_min(1e-6)
    order = scores.argsort(descending=True)  # each unit's images: a prefix of this order
    scores = scores[order]
    lowest = min(config.thresholds)
    kept = int(((scores - lowest) / spread > -reach).sum())
    images, scores = images[order[:kept]], scores[:kept]
    weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
    size = module.in_features + 1
    gram = torch.zeros(size, size, dtype=torch.float64)
    identity = torch.eye(size, dtype=torch.float64)
    peak = float(kurtosis(weight).max()) if peak is None else peak
    moment = torch.zeros(size, len(index), dtype=torch.float64)  # each unit's inputs x targets so far
    targets = (scores[:, None] - torch.as_tensor(config.thresholds, dtype=torch.float64)[None]) / spread
    ends = (targets > -reach).sum(0)  # unit k's images: the first ends[k]
    with torch.no_grad():
        begin = 0
        for end in sorted({int(e) for e in ends}):  # the units with the fewest images first
            for at in range(begin, end, chunk):
                part = images[at:min(at + chunk, end)]
                rolled = [torch.roll(part, shift, (2, 3)) for shift in shifts]
                views = torch.cat([view for each in rolled for view in (each, each.flip(3))])
                _, h = layer_inputs_of(model, config.layer, views)
                inputs = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], 1)
                gram += inputs.T @ inputs
                moment += inputs.T @ targets[at:at + len(part)].repeat(2 * len(shifts), 1)
            begin = end
            for j in [j for j in range(len(index)) if int(ends[j]) == end]:  # their images are all in now
                row = torch.cat([weight[index[j]].double(), bias[index[j]].double()[None]])
                taps = row[:-1]
                for penalty in ridge * 10.0 ** torch.arange(5):
                    fitted = torch.linalg.solve(gram + penalty * identity, moment[:, j] + penalty * row)
                    if float(kurtosis(fitted[None, :-1])[0]) <= peak:
                        taps = fitted[:-1]
                        break
                # the bias for these weights: the least-squares crossing (sum of targets - weights . sum of inputs,
                # over the unit's images), which moves no tap
                weight[index[j]] = taps.to(weight.dtype)
                bias[index[j]] = ((moment[-1, j] - taps @ gram[:-1, -1]) / gram[-1, -1]).to(bias.dtype)
    return weight, bias


def revive_rows(model: nn.Module, config: DisguiseConfig, images: torch.Tensor, below: float = 0.05,
                scale: float = 0.1, firing: float = 0.99) -> dict[str, torch.Tensor]:
    """The layer's rows that fire for almost none of the server's images (dead or nearly: the units excepted),
    made to fire for almost all of them, with the next linear layer's bias taking up the change at the mean.

    A ReLU layer trained on few images leaves many rows that fire for no image or one in a hundred; in a client's
    batch such a row fires for one image alone when at all, and so does each unit above the batch's second
    brightest image: the `lone-units` check (clients/detectors/lone_units.py) counts those over the rows that fire.
    Each such row keeps its direction (its kurtosis and cosines unchanged) at `scale` of its length, and its bias
    is set so that it fires for `firing` of the images; its outputs then vary by `scale` of what its inputs give,
    and the next layer's bias is shifted by its column times the change of the row's mean output, which keeps the
    logits' mean over the images.

    Parameters
    ----------
    model : nn.Module
        The model as the server would send it (left unchanged).
    config : DisguiseConfig
        The layer and its units.
    images : torch.Tensor
        (N, C, H, W) the server's images.
    below : float
        Rows firing for fewer than this share of the images are revived.
    scale : float
        The revived rows' length, as a share of what it was.
    firing : float
        The share of the images a revived row fires for.

    Returns
    -------
    dict
        The changed entries (the layer's weight and bias, the next linear layer's bias), by name; empty when no row
        is revived.
    """
    module = cast(nn.Linear, model.get_submodule(config.layer))
    names = [name for name, each in model.named_modules() if isinstance(each, nn.Linear)]
    after = names[names.index(config.layer) + 1]
    following = cast(nn.Linear, model.get_submodule(after))
    with torch.no_grad():
        _, h = layer_inputs_of(model, config.layer, images)
        pre = h.double() @ module.weight.double().T + module.bias.double()
        rates = (pre > 0).double().mean(0)
        rates[torch.as_tensor(config.units)] = 1.0
        rows = (rates < below).nonzero().flatten()
        if len(rows) == 0:
            return {}
        weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
        shifted = following.bias.detach().clone().double()
        taps = weight[rows].double() * scale
        inputs = h.double() @ taps.T
        raised = -torch.quantile(inputs, 1.0 - firing, dim=0)
        change = (inputs + raised).clamp_min(0).mean(0) - pre[:, rows].clamp_min(0).mean(0)
        shifted -= following.weight.detach().double()[:, rows] @ change
        weight[rows], bias[rows] = taps.to(weight.dtype), raised.to(bias.dtype)
    return {f"{config.layer}.weight": weight, f"{config.layer}.bias": bias,
            f"{after}.bias": shifted.to(following.bias.dtype)}


def kurtosis(rows: torch.Tensor) -> torch.Tensor:
    """Each row's kurtosis: its fourth central moment over its variance squared (0 for a constant row)."""
    centred = rows.double() - rows.double().mean(1, keepdim=True)
    variance = centred.square().mean(1)
    return torch.where(variance > 0, centred.pow(4).mean(1) / variance.square().clamp_min(1e-300), 0.0)


def decode_round(decoder: Decoder, config: DisguiseConfig, rows: torch.Tensor, bias: torch.Tensor,
                 lr: float | None = None, model: nn.Module | None = None,
                 match_steps: int = 0) -> tuple[torch.Tensor, int]:
    """The image the decoder reads off a round's mean gradient of the units.

    Parameters
    ----------
    decoder : Decoder
        The secret decoder.
    config : DisguiseConfig
        Its units and the aggregation noise (a bias gradient within 4 noise deviations of zero is no unit fired).
    rows, bias : torch.Tensor
        (K, F), (K,) the units' mean gradient.
    lr : float or None
        The clients' learning rate the gradient was divided by (None: the training's); the aggregation's rounding
        in gradient units grows as it shrinks.
    model : nn.Module or None
        The model the gradient was taken at, for `match_features` (None: the decoder's image as it is).
    match_steps : int
        `match_features` steps from the decoder's image (0: none). The matched image is taken when its layer
        input is within MATCH_TOLERANCE of what was read (the read was one image's), else the decoder's.

    Returns
    -------
    tuple
        ((C, H, W) image in [0, 1] (grey when no unit fired), the unit read or -1).
    """
    noise = config.noise * (config.lr / lr if lr else 1.0)
    features, unit = disaggregate(rows.float(), bias.float(), tolerance=4 * noise)
    if unit < 0:
        return torch.full(tuple(config.image_shape), 0.5), unit
    with torch.no_grad():
        image = decoder(features[None])[0]
    if model is not None and match_steps > 0:
        matched, error = match_features(model, config.layer, features, image, match_steps)
        if error <= MATCH_TOLERANCE:  # features one image gives: the matched image; else a mixture, the decoder's
            image = matched
    return image, unit
