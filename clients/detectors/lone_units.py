"""`lone-units`: the share of a hidden ReLU linear layer's units that exactly one example of the client's batch fires.

The analytic attacks read an image out of a linear layer's update where one row's gradient comes from one image
alone: the imprint's top bins, the trap's rows, QBI's rows (each bias set so a row fires for 1 in B images) and
the mosaic's slices are all built so that many units of the layer fire for exactly one example of a batch. An
honest layer's ReLU units fire for a share of the batch near a half at initialisation, and training does not
make them single-example detectors. The 2025 detection papers point at this activation signal: Wang and Li,
"Hear No Evil: Detecting Gradient Leakage by Malicious Servers in Federated Learning" (arXiv 2506.20651), check a
model before local training, and Carletti et al., "On the Detectability of Active Gradient Inversion Attacks in
Federated Learning" (arXiv 2511.10502), use improbable weight structures and loss and gradient dynamics. Neither
paper's exact statistic is reproduced here; this one is fl-sim's: for every linear layer but the model's last
(the logits), in module order, the share of its units whose pre-activation is positive for exactly one example
of the batch (one forward pass, the model in training mode), the largest over layers. Convolutions are not
counted. The threshold is a margin above the largest share of honest FedAvg federations at B = 16
(benchmarks/detectors.py), never set from an attack.
"""
import copy

import torch
from torch import nn

from . import Sent, Verdict

THRESHOLD = 0.1  # honest FedAvg, B = 16: see benchmarks/detectors.py and docs/findings.md


def lone_unit_shares(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Each hidden linear layer's share of units that exactly one of `images` fires (name -> share).

    Parameters
    ----------
    model : nn.Module
        The model as sent (a copy runs, in training mode).
    images : torch.Tensor
        The client's batch.

    Returns
    -------
    dict
        Layer name -> the share of its units with a positive pre-activation for exactly one image; every
        nn.Linear but the last one in module order.
    """
    model = copy.deepcopy(model).train()
    linear = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)][:-1]
    seen: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach()))
               for name, module in linear]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return {name: float(((out.flatten(1) > 0).sum(0) == 1).double().mean()) for name, out in seen.items()}


def lone_units(sent: Sent) -> Verdict:
    """The largest share of a hidden linear layer's units one example of the batch alone fires.

    Parameters
    ----------
    sent : Sent
        Needs `model` (the client's model holding the sent weights) and `images`.

    Returns
    -------
    Verdict
        Flagged above THRESHOLD; a model with no hidden linear layer scores 0; one that does not load is flagged.
    """
    if sent.images is None:
        raise ValueError("lone-units needs the client's batch")
    if sent.model is None:
        return Verdict(float("inf"), THRESHOLD, "the sent weights do not load into the client's model")
    shares = lone_unit_shares(sent.model, sent.images)
    if not shares:
        return Verdict(0.0, THRESHOLD, "no hidden linear layer")
    layer = max(shares, key=lambda name: shares[name])
    return Verdict(shares[layer], THRESHOLD, f"{shares[layer]:.1%} of {layer}'s units fire for one example alone")
