"""`lone-units`: the share of a hidden ReLU linear layer's firing units that exactly one example of the client's batch
fires.

Trap weights read an image out of a linear layer's update where one row's gradient comes from one image alone: the
trap's rows and QBI's rows (each bias set so that a row fires for about 1 in B images) are built so that most of the
units a batch fires fire for one example alone. (The imprint's and the mosaic's bins are cumulative, each firing for
every image above its threshold: only the top bins are lone, and this check does not see them.) An honest layer's
ReLU units fire for a share of the batch near a half at initialisation, and training does not make them
single-example detectors: of the units a batch fires at all, few fire for one example alone. The 2025 detection
papers argue that such structure cannot both leak and hide: Wang and Li, "Hear No Evil: Detecting Gradient Leakage
by Malicious Servers in Federated Learning" (arXiv 2506.20651), with a client-side check of the model before local
training, and Carletti et al., "On the Detectability of Active Gradient Inversion Attacks in Federated Learning"
(arXiv 2511.10502), with checks of improbable weight structures and of loss and gradient dynamics. Neither paper's
exact statistic is reproduced here; this one is fl-sim's: for every linear layer but the model's last (the logits),
in module order, of the units whose pre-activation is positive for at least one example of the batch, the share
positive for exactly one (one forward pass, the model in training mode; a layer the batch does not fire scores 0),
the largest over layers. Convolutions are not counted. (Over all the layer's units instead of the firing ones,
honest and trap layers overlap: an untrained ConvNet's classifier.0 has up to 13% of its 128 units lone, a trap's a
median of 18%, benchmarks/detectors.py.) The threshold is a margin above the largest share of honest FedAvg
federations at B = 16 (benchmarks/detectors.py), never set from an attack.
"""
import copy

import torch
from torch import nn

from . import Sent, Verdict

THRESHOLD = 0.3  # honest FedAvg, B = 16: see benchmarks/detectors.py and docs/findings.md


def lone_unit_shares(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Each hidden linear layer's share of its firing units that exactly one of `images` fires (name -> share).

    Parameters
    ----------
    model : nn.Module
        The model as sent (a copy runs, in training mode).
    images : torch.Tensor
        The client's batch.

    Returns
    -------
    dict
        Layer name -> of its units with a positive pre-activation for some image, the share positive for exactly
        one (0 when none fires); every nn.Linear but the last one in module order.
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
    fired = {name: (out.flatten(1) > 0).sum(0) for name, out in seen.items()}
    return {name: float((count == 1).sum() / (count >= 1).sum().clamp_min(1)) for name, count in fired.items()}


def lone_units(sent: Sent) -> Verdict:
    """The largest share of a hidden linear layer's firing units that one example of the batch alone fires.

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
    return Verdict(shares[layer], THRESHOLD,
                   f"{shares[layer]:.1%} of {layer}'s firing units fire for one example alone")
