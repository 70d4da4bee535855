"""A client's update as the server computes it: the weights it sent back minus the weights it was sent.

Shared by the server (which attacks and records updates), the clients' defenses (which change the update
before it is sent) and `fl-sim attack`; plain torch, no Flower.
"""
from collections.abc import Iterable

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


def mean_update(updates: Iterable[Weights]) -> Weights:
    """The clients' mean update: all that secure aggregation (the sum over a known count) reveals.

    Summed one update at a time (in float64, then cast back), so a lazy iterable of updates costs one
    update beside the sum, never all of them at once."""
    total: Weights = {}
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for update in updates:
        if not count:
            dtypes = {name: tensor.dtype for name, tensor in update.items()}
            total = {name: tensor.double() if tensor.is_floating_point() else tensor.clone()
                     for name, tensor in update.items()}
        else:
            for name, tensor in update.items():
                total[name] += tensor
        count += 1
    if not count:
        raise ValueError("the mean of no updates")
    return {name: (tensor / count).to(dtypes[name]) if tensor.is_floating_point() else tensor // count
            for name, tensor in total.items()}
