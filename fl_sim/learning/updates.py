"""A client's update as the server computes it: the weights it sent back minus the weights it was sent.

Shared by the server (which attacks and records updates), the clients' defenses (which change the update
before it is sent) and `fl-sim attack`; plain torch, no Flower.
"""
import torch
from torch import nn

Weights = dict[str, torch.Tensor]


def weights(model: nn.Module) -> Weights:
    """A detached copy of every parameter and buffer (what a Flower client sends)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def parameter_names(model: nn.Module) -> list[str]:
    """The trained entries of a state dict, without batch-norm statistics and other buffers."""
    return [name for name, _ in model.named_parameters()]


def weight_change(before: Weights, after: Weights) -> Weights:
    """after - before for every floating-point entry (the update the server computes)."""
    return {name: after[name] - before[name] for name in before if before[name].is_floating_point()}


def update_norm(update: Weights, names) -> float:
    """The size of an update: the L2 norm of its `names` entries (its parameters, not BatchNorm statistics)."""
    return float(torch.stack([(update[name].double() ** 2).sum() for name in names]).sum().sqrt())


def mean_update(updates: list[Weights]) -> Weights:
    """The clients' mean update: all that secure aggregation (the sum over a known count) reveals."""
    return {name: torch.stack([update[name] for update in updates]).mean(0) for name in updates[0]}
