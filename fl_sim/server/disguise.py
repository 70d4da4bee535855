"""`--attack disguise`: a SEER-class disguised attack (attacker/disguise.py), loaded from its training's checkpoint.

The server sends its targets a model of the agreed architecture (every parameter name, shape and dtype of the
registry's model: strict load and size pass) whose values were trained together with a secret decoder
(benchmarks/disguise_train.py). In its first round the attack sends the checkpoint's weights; the federation
then trains them (the replies are aggregated by the wrapped strategy as usual), and later rounds send the global
model with one change (`backbone_slowed`): on the convolutions before the units' layer and on the units' own rows,
the server takes only BACKBONE_RATE of the round's step. Those are all the read depends on, so the checkpoint's
thresholds and decoder go on reading the later rounds, while the federation trains the rest at the full rate: to a
client, a pretrained feature extractor fine-tuned slowly under a head trained fully (every parameter still moves,
as the inspection's `frozen` check asks). From each round's update (one client's, or secure aggregation's mean
over the round's clients) the decoder reads the one image of the round with the chosen property: one image per
update (its `Reconstruction` holds it first, then black placeholders marked unrecovered for the update's other
images). The decoder's image is then matched to the features read, through the sent model (MATCH_STEPS steps of
`match_features`), and the match is kept where those features are one image's. Should the convolutions move
further than READ_DRIFT from the checkpoint's, the server first refits a copy of the decoder to the sent model on
its public images (REFIT_STEPS Adam steps, `refit_decoder`).

The checkpoint is a torch file holding the model's and the decoder's state dicts, with its `DisguiseConfig` as
JSON beside it (same name, `.json`); `--disguise-checkpoint` names it. A missing checkpoint, or one trained for
another model or image shape, is a one-line ConfigError.
"""
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Self

import torch
from torch import nn

from attacker import Reconstruction
from attacker.disguise import Decoder, DisguiseConfig, decode_round, refit_decoder
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.updates import Weights
from fl_sim.results.preflight import disguise_config
from fl_sim.server.attacks import Armed, Attack, AttackContext, Observed

# the models the attack reaches: the hidden ReLU linear layer whose units disaggregate, and the module whose output
# is that layer's input before it is flattened (its shape is the decoder's input)
LAYERS = {"cnn": ("classifier.0", "features")}
# the decoder's refit to a model the federation has trained, on the server's public images (benchmarks/disguise.py
# --refit: 200 steps brought the decoder's ceiling from 16-18 dB back to 22-27 dB over rounds 2-7, seed 0)
REFIT_STEPS = 200
# the read refined by matching its layer input through the sent model (attacker/disguise.py `match_features`)
MATCH_STEPS = 200
# the share of each round's step the server takes on the convolutions before the units' layer and on the units' rows
# (`backbone_slowed`): small enough that the checkpoint's decoder and thresholds still read the later rounds
BACKBONE_RATE = 0.01
# the convolutions' relative change from the checkpoint's up to which the checkpoint's own decoder reads an update
# (further, the decoder is refit to the sent model first)
READ_DRIFT = 0.05


def feature_shape(model: nn.Module, model_name: str, image_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the disaggregating layer's input for one image, as the convolutions leave it.

    Parameters
    ----------
    model : nn.Module
        The registry's model.
    model_name : str
        Its registry name (a key of LAYERS; another is a ConfigError).
    image_shape : sequence of int
        (C, H, W).

    Returns
    -------
    tuple of int
        (C, S, S) of the features.
    """
    if model_name not in LAYERS:
        raise ConfigError(f"--attack disguise reaches {', '.join(LAYERS)}, not {model_name}: it needs a hidden ReLU "
                          "linear layer after convolutions (docs/attacks.md)")
    with torch.no_grad():
        out = model.get_submodule(LAYERS[model_name][1])(torch.zeros(1, *image_shape))
    return tuple(out.shape[1:])


def save_checkpoint(path: str | Path, model: nn.Module, decoder: Decoder, config: DisguiseConfig) -> None:
    """Writes the model's and decoder's states to `path` and the config to `path` with suffix `.json`.

    Parameters
    ----------
    path : str or Path
        The checkpoint file.
    model, decoder : nn.Module
        The model to send and the secret decoder.
    config : DisguiseConfig
        What they were trained for.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "decoder": decoder.state_dict()}, path)
    path.with_suffix(".json").write_text(json.dumps(config.to_json(), indent=1))


def load_checkpoint(path: str | Path, model_name: str, image_shape: Sequence[int]
                    ) -> tuple[dict[str, torch.Tensor], Decoder, DisguiseConfig]:
    """The model state, the decoder and the config of a disguise checkpoint trained for `model_name`.

    Parameters
    ----------
    path : str or Path
        The checkpoint (`--disguise-checkpoint`).
    model_name : str
        The run's model.
    image_shape : sequence of int
        The run's (C, H, W).

    Returns
    -------
    tuple
        (the model's state dict, the decoder in eval mode, the config).

    Raises
    ------
    ConfigError
        In one line: no path, a missing file or config, or one trained for another model or image shape.
    """
    raw = disguise_config(path, model_name)
    try:
        config = DisguiseConfig(**{f.name: raw[f.name] for f in fields(DisguiseConfig) if f.name in raw})
        states = torch.load(path, map_location="cpu", weights_only=True)
        state, decoder_state = states["model"], states["decoder"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"disguise checkpoint {str(path)!r} cannot be read ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if list(config.image_shape) != list(image_shape):
        raise ConfigError(f"disguise checkpoint {str(path)!r} was trained for images {tuple(config.image_shape)}, "
                          f"not {tuple(image_shape)}")
    decoder = Decoder(config.feature_shape, config.image_shape, config.width)
    decoder.load_state_dict(decoder_state)
    return state, decoder.eval(), config


def backbone_slowed(weights: Weights, sent: Weights, config: DisguiseConfig, rate: float = BACKBONE_RATE) -> Weights:
    """`weights` with the federation's step on the parts the read depends on taken at `rate` of its size.

    The decoder reads the units' layer input, and the units' thresholds rank the images by their property; both stay
    the checkpoint's as long as the convolutions before the layer (LAYERS' second name) and the units' own rows and
    biases do. On those the server takes `rate` of the round's step (the global model's change from what it sent);
    every other value (the layer's other rows, the layers after it) is the federation's. To a client it is a
    pretrained feature extractor fine-tuned at a small learning rate under a head trained at the full one.

    Parameters
    ----------
    weights : Weights
        The global model after the round (the wrapped strategy's aggregate).
    sent : Weights
        What the server sent in the round.
    config : DisguiseConfig
        The checkpoint's model, layer and units.
    rate : float
        The share of the step taken on the read's parts (0: they stay as sent, which the inspection's `frozen` check
        flags).

    Returns
    -------
    Weights
        A copy of `weights` (each entry in its own dtype).
    """
    inputs = LAYERS[config.model][1] + "."

    def slowed(name: str) -> torch.Tensor:
        before = sent[name].to(weights[name].dtype)
        return before + rate * (weights[name] - before)

    out = {name: slowed(name) if name.startswith(inputs) else tensor for name, tensor in weights.items()}
    units = torch.as_tensor(config.units)
    for name in (f"{config.layer}.weight", f"{config.layer}.bias"):
        rows = weights[name].clone()
        rows[units] = slowed(name)[units]
        out[name] = rows
    return out


class DisguiseAttack(Attack):
    """The disguised attack (module docstring): the checkpoint's model sent first, the decoder reads every update."""

    name = "disguise"

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor], decoder: Decoder, config: DisguiseConfig,
                 public: Callable[[], torch.Tensor] | None = None):
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ConfigError(f"the disguise checkpoint does not load into the run's {config.model}: "
                              f"{str(error).splitlines()[0]}") from None
        self.model, self.state, self.decoder, self.config = model.eval(), state, decoder, config
        self.public = public  # the server's images, for the decoder's refit (None: no refit)
        self.fitted: tuple[tuple[float, ...], Decoder] | None = None  # the last refit: (its model's key, decoder)
        self.sent: Weights | None = None  # what the last round was sent

    @classmethod
    def build(cls, context: AttackContext) -> Self:
        state, decoder, config = load_checkpoint(context.config.disguise_checkpoint, context.config.model,
                                                 context.image_shape)
        return cls(context.model, state, decoder, config, context.public)

    def arm(self, global_weights: Weights, settings: TrainingSettings, targets: Sequence[int]) -> Armed:
        """The checkpoint's weights the first time (in the global model's dtypes); after, the global model with the
        round's step taken at BACKBONE_RATE on the convolutions and the units' rows (`backbone_slowed`)."""
        if self.sent is None:
            weights = {name: self.state[name].to(tensor.dtype) for name, tensor in global_weights.items()}
        else:
            weights = backbone_slowed(global_weights, self.sent, self.config)
        self.sent = weights
        return Armed({target: weights for target in targets})

    def read(self, observed: Sequence[Observed], armed: Armed | None, seed: int) -> list[Reconstruction]:
        """Each update's chosen image: the units' gradient (-update / (lr x steps)) through the decoder; first of
        the update's images, the rest black placeholders marked unrecovered."""
        del armed, seed
        layer, units = self.config.layer, torch.as_tensor(self.config.units)
        found = []
        for each in observed:
            scale = -1.0 / (each.settings.lr * each.settings.total_steps)
            rows = each.update[f"{layer}.weight"].double()[units] * scale
            bias = each.update[f"{layer}.bias"].double()[units] * scale
            self.model.load_state_dict(each.sent, strict=True)
            image, unit = decode_round(self.reader(each.sent), self.config, rows, bias, each.settings.lr,
                                       self.model, MATCH_STEPS)
            with torch.no_grad():
                label = self.model(image[None]).argmax(1)
            # one image of the update's n; the others are black placeholders, marked unrecovered (the scoreboard
            # matches the n true images to n reconstructions)
            others = each.settings.num_images - 1
            images = torch.cat([image[None], torch.zeros(others, *image.shape)])
            labels = torch.cat([label, torch.zeros(others, dtype=label.dtype)])
            status = ["unconfirmed" if unit >= 0 else "unrecovered"] + ["unrecovered"] * others
            found.append(Reconstruction(images, labels, float(unit), image_status=status))
        return found

    def reader(self, sent: Weights) -> Decoder:
        """The decoder for an update taken against `sent` (loaded into self.model): the checkpoint's own while the
        convolutions before the units' layer are within READ_DRIFT of the checkpoint's, else a copy refitted to
        `sent`'s features on the public images (one fit per model)."""
        inputs = LAYERS[self.config.model][1] + "."
        drift = max(float((sent[name].double() - tensor.double()).norm() / tensor.double().norm().clamp_min(1e-30))
                    for name, tensor in self.state.items() if name.startswith(inputs))
        if drift <= READ_DRIFT or self.public is None:
            return self.decoder
        key = tuple(float(tensor.double().sum()) for tensor in sent.values())
        if self.fitted is None or self.fitted[0] != key:
            self.fitted = (key, refit_decoder(self.decoder, self.model, self.config.layer, self.public(), REFIT_STEPS,
                                              seed=self.config.seed))
        return self.fitted[1]

    def resolved(self) -> dict[str, int | float | None]:
        return {"units": len(self.config.units), "round_images": self.config.round_images}
