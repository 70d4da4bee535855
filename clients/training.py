"""A client's local training: plain SGD over its examples, as the server configured it.

In `steps` (and `fedsgd`) mode the K x B round examples are split into K batches of B, visited in order,
`epochs` times. In `epochs` mode the examples are the client's whole shard, reshuffled every epoch by a
generator only the client holds (`order_seed`), in batches of B with a smaller last one, as a PyTorch
DataLoader with shuffle=True does. With FedProx the loss also holds mu/2 ||w - w_global||^2. This is the
training the attacker replays (attacker/replay.py), with an order it must assume in epochs mode; the two
agree to float tolerance when the order is the same (tests/test_replay.py).
"""
import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.contract.protocol import BatchNormMode, TrainingSettings, TrainMode


def local_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: TrainingSettings,
                order_seed: int | None = None) -> float:
    """Trains `model` in place on images (n, C, H, W) and labels (n,); returns the mean loss.

    `order_seed` (epochs mode) seeds the client's private shuffle; None keeps the given order every epoch.
    """
    settings = settings.for_shard(len(images))
    if len(images) != settings.num_images:
        raise ValueError(f"local training needs {settings.num_images} examples (K x B), got {len(images)}")
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    shuffle = torch.Generator().manual_seed(order_seed) if settings.mode == TrainMode.EPOCHS and \
        order_seed is not None else None
    start = [parameter.detach().clone() for parameter in model.parameters()]
    model.train()
    if settings.batchnorm == BatchNormMode.FROZEN:
        for module in model.modules():  # running statistics used and left as they are; the weights still train
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    losses = []
    for _ in range(settings.epochs):
        order = torch.randperm(len(images), generator=shuffle) if shuffle else torch.arange(len(images))
        for batch in settings.batch_slices():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images[order[batch]]), labels[order[batch]])
            losses.append(loss.item())
            if settings.proximal_mu:
                loss = loss + settings.proximal_mu / 2 * sum(
                    ((parameter - origin) ** 2).sum() for parameter, origin in zip(model.parameters(), start))
            loss.backward()
            optimizer.step()
    return sum(losses) / len(losses)
