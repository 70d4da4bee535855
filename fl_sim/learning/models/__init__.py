"""Models by name, for any channel count, image size and class count.

The names, builders and facts are the model registry's (fl_sim/contract/models.py); `MODELS` holds each
registered builder, imported.

`build_model(name, ...)` returns a fresh model; `--init` chooses its weights: `default` (PyTorch's
initialisation, seeded), `paper` (every weight and bias from U(-0.5, 0.5), as the DLG paper does) or the
path of a checkpoint (a state dict, loaded with weights_only=True). `imprint` rows > 0 put the
server's imprint block (models/imprint.py) in front of the model; `init` still names the base model's
weights.
"""
import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fl_sim.contract.models import model_specs
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.models.imprint import Imprinted


def _builder(factory: str) -> Callable[..., nn.Module]:
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)


MODELS: dict[str, Callable[..., nn.Module]] = {spec.name: _builder(spec.factory) for spec in model_specs()}


def build_model(
    name: str, channels: int, image_size: int, num_classes: int, init: str = "default", seed: int = 0,
    imprint: int = 0,
) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name](channels=channels, image_size=image_size, num_classes=num_classes)
        if init == "paper":
            for tensor in model.parameters():
                nn.init.uniform_(tensor, -0.5, 0.5)
    if init not in ("default", "paper"):
        load_checkpoint(model, init)
    if imprint:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Imprinted(model, channels, image_size, imprint, num_classes)
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Loads a state dict saved by `fl-sim pretrain` (or torch.save(model.state_dict())), weights only.

    A file that is not such a checkpoint, or one of another model, is a ConfigError naming the file and what is
    wrong (never torch's advice to load it with weights_only=False, which would run any code the file holds).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--init {str(path)!r} is neither 'default', 'paper' nor a checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights-only errors alike: the file is not a weights file
        reason = str(error).strip().splitlines()[0][:80] if str(error).strip() else type(error).__name__
        if "weights_only" in reason or "WeightsUnpickler" in reason:
            reason = "it holds objects other than tensors"
        raise ConfigError(f"--init {str(path)!r} is not a checkpoint of weights ({reason}): give a file fl-sim "
                          "pretrain wrote") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConfigError(f"--init {str(path)!r} holds no state dict (names to tensors): give a file fl-sim "
                          "pretrain wrote")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(name for name in set(expected) & set(state) if expected[name].shape != state[name].shape)
    if missing or unexpected or wrong:
        said = [f"{label} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("other shapes:", wrong))
                if names]
        raise ConfigError(f"--init {str(path)!r} holds the weights of another model ({'; '.join(said)}): give "
                          f"the --model (and data set) it was trained for, or a checkpoint of this one")
    model.load_state_dict(state)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
