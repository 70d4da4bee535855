"""A client's local training: plain SGD over its round examples, as the server configured it.

The K x B round examples are split into K batches of B, visited in order, `epochs` times; with FedProx
the loss also holds mu/2 ||w - w_global||^2. This is the training the attacker replays
(attacker/replay.py), so the two must agree (tests/test_replay.py checks they do, to float tolerance).
"""
import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.protocol import BatchNormMode, TrainingSettings


def local_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: TrainingSettings) -> float:
    """Trains `model` in place on images (K*B, C, H, W) and labels (K*B,); returns the mean loss."""
    if len(images) != settings.num_images:
        raise ValueError(f"local training needs {settings.num_images} examples (K x B), got {len(images)}")
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    start = [parameter.detach().clone() for parameter in model.parameters()]
    model.train()
    if settings.batchnorm == BatchNormMode.FROZEN:
        for module in model.modules():  # running statistics used and left as they are; the weights still train
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    losses = []
    for _ in range(settings.epochs):
        for step in range(settings.local_steps):
            batch = slice(step * settings.batch_size, (step + 1) * settings.batch_size)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            losses.append(loss.item())
            if settings.proximal_mu:
                loss = loss + settings.proximal_mu / 2 * sum(
                    ((parameter - origin) ** 2).sum() for parameter, origin in zip(model.parameters(), start))
            loss.backward()
            optimizer.step()
    return sum(losses) / len(losses)
