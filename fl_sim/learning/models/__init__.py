"""Models by name, for any channel count, image size and class count.

`build_model(name, ...)` returns a fresh model; `--init` chooses its weights: `default` (PyTorch's
initialisation, seeded), `paper` (every weight and bias from U(-0.5, 0.5), as the DLG paper does) or the
path of a checkpoint (a state dict, loaded with weights_only=True). `imprint` rows > 0 put the
server's imprint block (models/imprint.py) in front of the model; `init` still names the base model's
weights.
"""
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fl_sim.learning.models.cnn import ConvNet
from fl_sim.learning.models.imprint import Imprinted
from fl_sim.learning.models.lenet import LeNet
from fl_sim.learning.models.mlp import MLP
from fl_sim.learning.models.resnet import ResNet20, resnet18

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "cnn": ConvNet,
    "mlp": MLP,
    "resnet20": ResNet20,
    "resnet18": resnet18,
}


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
            model = Imprinted(model, channels, image_size, imprint)
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Loads a state dict saved by `fl-sim pretrain` (or torch.save(model.state_dict())), weights only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init {str(path)!r} is neither 'default', 'paper' nor a checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {str(path)!r} does not fit this model: {error}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
