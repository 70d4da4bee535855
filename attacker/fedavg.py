"""What the FedAvg attack adds to the engine (after Dimitrov et al., "Data Leakage in Federated Averaging", 2022).

A client in epochs mode trains E epochs over the same n images, reshuffled every epoch with a seed only it
knows. The server cannot replay that order, so the attack optimises one copy of the n images per epoch, each
in the order of that epoch's batches (attacker/replay.py runs epoch e on copy e), and ties the copies together
with a prior that does not depend on the order of the images within a copy: the truth's copies are the same
set, so every permutation-invariant function of a copy takes the same value on all of them.

The paper's prior compares the copies' mean images. Ours compares their mean images per recovered label
(`epoch_prior`): each copy carries the same label multiset (`deal_labels` deals it afresh for each epoch, as a
reshuffle would), so the per-class mean of a copy is as order-free as its mean, and it ties about n / classes
images together instead of n. At the end each copy is matched to the first, label by label, by Hungarian
assignment on pixel distance, and the matched images averaged (`merge_copies`), as the paper does.
"""
import torch
from scipy.optimize import linear_sum_assignment


def epoch_prior(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each copy's per-class mean images from their mean over the copies.

    images (E, n, C, H, W): the per-epoch copies; targets (E, n, classes): their label distributions (one-hot
    for recovered labels). Zero when every copy holds the same images with the same labels in any order.
    """
    copies, count = images.shape[:2]
    flat = images.reshape(copies, count, -1)
    sums = targets.transpose(1, 2) @ flat  # (E, classes, pixels): each class's images summed
    means = sums / targets.sum(1).clamp_min(1e-6).unsqueeze(-1)
    return (means - means.mean(0, keepdim=True)).pow(2).mean()


def tie_copies(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Every copy made of the first copy's images, label by label: the k-th image of class c in copy e becomes
    the first copy's k-th image of class c. images (E, n, ...) and targets (E, n, classes), each copy holding
    the same label multiset (`deal_labels`). The attack starts from such a tied draw, as the truth is tied
    (one set of images in E orders), instead of E independent draws the prior would first have to pull together.
    """
    labels = targets.argmax(-1)
    tied = images.clone()
    for c in labels[0].unique():
        source = images[0][labels[0] == c]
        for e in range(1, images.shape[0]):
            tied[e][labels[e] == c] = source
    return tied


def deal_labels(labels: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """The recovered labels (n,) dealt into `copies` epochs, each its own random order: (copies x n,)."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    return torch.cat([labels[torch.randperm(len(labels), generator=generator)] for _ in range(copies)])


def merge_copies(images: torch.Tensor, labels: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n images behind E per-epoch copies: every copy matched to the first within each label (Hungarian
    assignment on squared pixel distance), the matched images averaged. images (E x n, C, H, W), labels (E x n,);
    returns (n, C, H, W) and the first copy's labels (n,)."""
    count = images.shape[0] // copies
    blocks, label_blocks = images.reshape(copies, count, *images.shape[1:]), labels.reshape(copies, count)
    first, first_labels = blocks[0], label_blocks[0]
    total = first.clone()
    for e in range(1, copies):
        for label in first_labels.unique():
            mine = (first_labels == label).nonzero().flatten()
            theirs = (label_blocks[e] == label).nonzero().flatten()
            cost = torch.cdist(first[mine].flatten(1).double(), blocks[e][theirs].flatten(1).double())
            rows, cols = linear_sum_assignment(cost.numpy())
            total[mine[torch.as_tensor(rows)]] += blocks[e][theirs[torch.as_tensor(cols)]]
    return total / copies, first_labels
