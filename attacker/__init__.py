"""fl-sim's inversion engine: gradient-inversion attacks on federated updates. Pure torch.

It receives only what a server has (model, global weights, observed updates, the training settings
it sent) and never ground truth. Entry point: `invert`; attacks: `PRESETS` / `get_attack`.
"""
from .engine import Reconstruction, Status, invert, resolve_device, weight_change_from_gradient
from .labels import recover_labels
from .replay import LocalTraining
from .settings import PRESETS, AttackConfig, TrainingSettings, get_attack

__all__ = [
    "AttackConfig", "LocalTraining", "PRESETS", "Reconstruction", "Status", "TrainingSettings", "get_attack",
    "invert", "recover_labels", "resolve_device", "weight_change_from_gradient",
]
