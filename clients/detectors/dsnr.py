"""`dsnr`: the disaggregation signal-to-noise ratio of SEER (Garov et al., "Hiding in Plain Sight: Disguising Data
Stealing Attacks in Federated Learning", ICLR 2024; their detectability/ code), on the client's own batch.

A server that reads one example out of a batch's (or a secure aggregate's) update needs that example's gradient
to stand out of the others'. The client measures exactly that before it trains: the gradient of each example's
loss of its batch, under the model it was sent (cross-entropy, the model in training mode, so batch-norm layers
normalise by the batch as in training), and, for every weight layer W (the conv and linear weights, every
parameter of two or more dimensions),

    D-SNR(W) = max_i |dL_i/dW| / (sum_j |dL_j/dW| - max_i |dL_i/dW|),

the largest example's gradient norm over the sum of the others'; the score is the largest over layers. SEER's
detectability code reports 79 down to 8.7 for a fishing attack on one image (its multipliers 16 to 13) and 0.65
for SEER's own model. SEER's own script takes the final linear
weight and the blocks' convolutions of its ResNet-18 (not the stem convolution, which its name filter misses);
this one takes every weight layer, the stem included, which can only raise the score. The threshold is a margin
above the largest score of honest FedAvg federations at B = 16 (benchmarks/detectors.py), never set from an
attack.
"""
import copy

import torch
import torch.nn.functional as F

from . import Sent, Verdict

THRESHOLD = 2.0  # honest FedAvg, B = 16: see benchmarks/detectors.py and docs/findings.md
EPSILON = 1e-6  # SEER's: a layer no example moves scores 0, not 0 / 0


def example_gradient_norms(model: torch.nn.Module, images: torch.Tensor,
                           labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each weight layer's per-example gradient norms (name -> (B,)) of the examples' cross-entropy losses,
    computed in one forward pass of the whole batch (so batch norm mixes them as training does).

    Parameters
    ----------
    model : torch.nn.Module
        The model as sent (a copy is run in training mode; `model` itself is left as it was).
    images, labels : torch.Tensor
        The client's batch.

    Returns
    -------
    dict
        Parameter name -> the B examples' gradient norms, for every parameter of 2 or more dimensions.
    """
    model = copy.deepcopy(model).train()
    named = [(name, parameter) for name, parameter in model.named_parameters()
             if parameter.requires_grad and parameter.dim() >= 2]
    losses = F.cross_entropy(model(images), labels, reduction="none")
    weights = [parameter for _, parameter in named]
    try:  # one batched backward pass (vmap), as SEER's code
        grads = torch.autograd.grad(losses, weights, grad_outputs=torch.eye(len(losses), dtype=losses.dtype),
                                    is_grads_batched=True, allow_unused=True)
        norms = [torch.zeros(len(losses)) if grad is None else grad.flatten(1).norm(dim=1) for grad in grads]
    except RuntimeError:  # an operation vmap cannot batch: one backward pass per example
        rows = []
        for i in range(len(losses)):
            each = torch.autograd.grad(losses[i], weights, retain_graph=True, allow_unused=True)
            rows.append(torch.stack([torch.zeros(()) if grad is None else grad.norm() for grad in each]))
        norms = list(torch.stack(rows, 1))
    return {name: norm.detach().double() for (name, _), norm in zip(named, norms)}


def layer_dsnr(norms: torch.Tensor) -> float:
    """One layer's D-SNR from its per-example gradient norms: the largest over the sum of the rest."""
    largest = norms.max()
    return float(largest / (norms.sum() - largest + EPSILON))


def dsnr(sent: Sent) -> Verdict:
    """SEER's D-SNR of the sent model on the client's batch (module docstring).

    Parameters
    ----------
    sent : Sent
        Needs `model` (the client's model holding the sent weights) and the batch (`images`, `labels`).

    Returns
    -------
    Verdict
        Score: the largest layer D-SNR, flagged above THRESHOLD; a model that does not load is flagged (inf).
    """
    if sent.images is None or sent.labels is None:
        raise ValueError("dsnr needs the client's batch")
    if sent.model is None:
        return Verdict(float("inf"), THRESHOLD, "the sent weights do not load into the client's model")
    scores = {name: layer_dsnr(norms) for name, norms in
              example_gradient_norms(sent.model, sent.images, sent.labels).items()}
    layer = max(scores, key=lambda name: scores[name])
    return Verdict(scores[layer], THRESHOLD, f"{layer}: one example's gradient norm is {scores[layer]:.3g} of the "
                                             f"other {len(sent.images) - 1}'s sum")
