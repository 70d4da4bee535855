"""fl-sim's inversion engine: gradient-inversion attacks on federated updates. Pure torch.

It receives only what a server has (model, global weights, observed updates, the training settings
it sent) and never ground truth. Entry point: `invert`; attacks: `get_attack` (the preset registered with
each passive attack in fl_sim/contract/attacks.py).
"""
from fl_sim.contract.attacks import get_attack
from fl_sim.contract.presets import AttackConfig
from fl_sim.contract.protocol import TrainingSettings

from .engine import invert
from .labels import recover_labels
from .reconstruction import Reconstruction, Status, resolve_device, weight_change_from_gradient
from .replay import LocalTraining

__all__ = [
    "AttackConfig", "LocalTraining", "Reconstruction", "Status", "TrainingSettings", "get_attack",
    "invert", "recover_labels", "resolve_device", "weight_change_from_gradient",
]
