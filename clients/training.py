"""A client's local training: plain SGD over its round examples, as the server configured it.

The K x B round examples are split into K batches of B, visited in order, `epochs` times. This is
the training the attacker replays, so the two must agree (a test checks they do, to float tolerance).
"""
import torch
import torch.nn.functional as F
from torch import nn

from attacker.replay import freeze_batchnorm
from attacker.settings import TrainingSettings


def local_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: TrainingSettings) -> float:
    """Trains `model` in place on images (K*B, C, H, W) and labels (K*B,); returns the mean loss."""
    if len(images) != settings.num_images:
        raise ValueError(f"local training needs {settings.num_images} examples (K x B), got {len(images)}")
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    model.train()
    if settings.batchnorm == "frozen":
        freeze_batchnorm(model)
    losses = []
    for _ in range(settings.epochs):
        for step in range(settings.local_steps):
            batch = slice(step * settings.batch_size, (step + 1) * settings.batch_size)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (what a Flower client sends)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def weight_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """after - before for every floating-point entry (the update the server computes)."""
    return {name: after[name] - before[name] for name in before if before[name].is_floating_point()}


def update_norm(update: dict[str, torch.Tensor], names) -> float:
    """The size of an update: the L2 norm of its `names` entries (its parameters, not BatchNorm statistics)."""
    return float(torch.sqrt(sum((update[name].double() ** 2).sum() for name in names)))
