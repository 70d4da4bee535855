"""The model registry: every model a run may name, with the facts the rest of the program must know of it.

One `ModelSpec` per model holds its name, its builder and its facts (`ModelTrait`s: batch norm, a fully
connected layer that sees the whole image), so each is said once: the run config's checks (DP-SGD needs a
model without batch norm), the attacks' reach (trap weights need the whole-image layer), the help texts and
the builders (fl_sim/learning/models) all read this entry. As in the attack registry, the builder is an
import path, imported only when a model is built, so this module imports nothing but the standard library.
Every model takes any channel count, image size and class count (`builder(channels=, image_size=,
num_classes=)`). A new model: its module in fl_sim/learning/models/ and one `register(ModelSpec(...))` here.
"""
from dataclasses import dataclass
from enum import StrEnum

from fl_sim.contract.setting import ConfigError, coerce_scalar


class ModelTrait(StrEnum):
    """A fact about a model's architecture that decides what may run on it."""

    # batch statistics mix a batch's examples: Opacus cannot give each example its own gradient (DP-SGD)
    BATCH_NORM = "batch norm"
    # a ReLU fully connected layer whose input holds every pixel: what trap weights rewrite
    # (the model class names it: `TRAP_LAYER`, and the convolutions that pass the image on: `PASS_THROUGH`)
    DENSE_SEES_IMAGE = "a ReLU linear layer that sees the whole image"
    # the first layer is linear on the raw pixels: its update mixes the batch's images themselves (cocktail's ICA)
    LINEAR_FIRST = "a linear first layer on the raw image"


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: a model's name, its builder ("module:callable") and its facts.

    Parameters
    ----------
    name : str
        What `--model` calls it.
    factory : str
        "module:callable" building it from `channels`, `image_size` and `num_classes`.
    summary : str
        One line for help texts.
    traits : frozenset[ModelTrait]
        Its architecture's facts.
    """

    name: str
    factory: str
    summary: str
    traits: frozenset[ModelTrait] = frozenset()

    def __post_init__(self) -> None:
        if ":" not in self.factory:
            raise ValueError(f"model {self.name!r}: factory must be 'module:callable', got {self.factory!r}")

    @property
    def batchnorm(self) -> bool:
        return ModelTrait.BATCH_NORM in self.traits


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Adds `spec` to the registry; a name taken already is an error, not an override."""
    if spec.name in _REGISTRY:
        raise ValueError(f"a model named {spec.name!r} is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def model_names() -> tuple[str, ...]:
    """Every registered model's name, in registration order."""
    return tuple(_REGISTRY)


def model_specs(trait: ModelTrait | None = None) -> tuple[ModelSpec, ...]:
    """Every registered model's entry (those with `trait`, if given), in registration order."""
    return tuple(spec for spec in _REGISTRY.values() if trait is None or trait in spec.traits)


def model_spec(name: str) -> ModelSpec:
    """The registry entry of `name`; an unknown name raises ConfigError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(_REGISTRY)}") from None


def model_value(value: object, flag: str) -> str:
    """The `model` field's parser: a registered model's name."""
    return model_spec(str(coerce_scalar(str, value, flag))).name


register(ModelSpec("lenet", "fl_sim.learning.models.lenet:LeNet",
                   "DLG's LeNet: sigmoid convolutions and one linear layer (Zhu et al. 2019)"))
register(ModelSpec("cnn", "fl_sim.learning.models.cnn:ConvNet",
                   "a small ReLU ConvNet, as federations train", frozenset({ModelTrait.DENSE_SEES_IMAGE})))
register(ModelSpec("mlp", "fl_sim.learning.models.mlp:MLP",
                   "a fully connected ReLU network",
                   frozenset({ModelTrait.DENSE_SEES_IMAGE, ModelTrait.LINEAR_FIRST})))
register(ModelSpec("resnet20", "fl_sim.learning.models.resnet:ResNet20",
                   "the CIFAR ResNet-20 of He et al. (2016)", frozenset({ModelTrait.BATCH_NORM})))
register(ModelSpec("resnet18", "fl_sim.learning.models.resnet:resnet18",
                   "torchvision's ResNet-18 with a CIFAR stem", frozenset({ModelTrait.BATCH_NORM})))
