"""A client's local training: plain SGD over its examples, as the server configured it.

In `steps` (and `fedsgd`) mode the K x B round examples are split into K batches of B, visited in order,
`epochs` times. In `epochs` mode the examples are the client's whole shard, reshuffled every epoch by a
generator only the client holds (`order_seed`), in batches of B with a smaller last one, as a PyTorch
DataLoader with shuffle=True does. With FedProx the loss also holds mu/2 ||w - w_global||^2. This is the
training the attacker replays (attacker/replay.py), with an order it must assume in epochs mode; the two
agree to float tolerance when the order is the same (tests/test_replay.py).

With `dp` (`--defense dpsgd:...`) the same steps are DP-SGD, run by Opacus: `GradSampleModule` computes every
example's gradient, `DPOptimizer` clips each to L2 norm C, sums them, adds Gaussian noise of standard deviation
Z x C (drawn from a generator seeded by `noise_seed`, so a run repeats) and divides by B, then the same
torch.optim.SGD step follows (momentum and weight decay as configured). The batches stay the fixed ones above
(Opacus' Poisson-sampling DataLoader is not used: the server configured K x B, and the attack knows the batch
size). Models with batch norm cannot be trained so (RunConfig.check_privacy says which can).
"""
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from fl_sim.contract.defenses import DpSgd
from fl_sim.contract.protocol import BatchNormMode, TrainingSettings, TrainMode


def local_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: TrainingSettings,
                order_seed: int | None = None, dp: DpSgd | None = None, noise_seed: int = 0) -> float:
    """Trains `model` in place on images (n, C, H, W) and labels (n,); returns the mean loss.

    `order_seed` (epochs mode) seeds the client's private shuffle; None keeps the given order every epoch.
    `dp`: train with DP-SGD (module docstring), its noise drawn from a generator seeded with `noise_seed`.
    """
    settings = settings.for_shard(len(images))
    if len(images) != settings.num_images:
        raise ValueError(f"local training needs {settings.num_images} examples (K x B), got {len(images)}")
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                                       weight_decay=settings.weight_decay)
    if dp is not None:
        return _dp_train(model, images, labels, settings, order_seed, dp, noise_seed, optimizer)
    return _train(model, model, images, labels, settings, order_seed, optimizer)


def _dp_train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: TrainingSettings,
              order_seed: int | None, dp: DpSgd, noise_seed: int, optimizer: torch.optim.Optimizer) -> float:
    """local_train's steps as DP-SGD (Opacus); `model` keeps its own parameters and keys afterwards."""
    device = next(model.parameters()).device
    per_example = GradSampleModule(model, loss_reduction="mean")
    private = DPOptimizer(optimizer, noise_multiplier=dp.noise, max_grad_norm=dp.clip,
                          expected_batch_size=settings.batch_size, loss_reduction="mean",
                          generator=torch.Generator(device=device).manual_seed(noise_seed))
    try:
        with warnings.catch_warnings():  # Opacus' hooks on the first layer, whose input needs no gradient: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            return _train(per_example, model, images, labels, settings, order_seed, private)
    finally:
        per_example._close()  # removes Opacus' hooks and per-example gradients from `model`


def _train(forward: nn.Module, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
           settings: TrainingSettings, order_seed: int | None, optimizer: torch.optim.Optimizer) -> float:
    """The loop of local_train: `forward` computes the outputs (`model`, or Opacus' wrapper of it)."""
    start = [parameter.detach().clone() for parameter in model.parameters()]
    model.train()
    if settings.batchnorm == BatchNormMode.FROZEN:
        for module in model.modules():  # running statistics used and left as they are; the weights still train
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    losses = []
    for order in epoch_orders(len(images), settings, order_seed):
        for batch in settings.batch_slices():
            optimizer.zero_grad()
            loss = F.cross_entropy(forward(images[order[batch]]), labels[order[batch]])
            losses.append(loss.item())
            if settings.proximal_mu:
                loss = loss + settings.proximal_mu / 2 * sum(
                    ((parameter - origin) ** 2).sum() for parameter, origin in zip(model.parameters(), start))
            loss.backward()
            optimizer.step()
    return sum(losses) / len(losses)


def first_batch(images: torch.Tensor, labels: torch.Tensor, settings: TrainingSettings,
                order_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch `local_train` steps on (its first epoch's shuffle in epochs mode, else the first B examples):
    what the detectors that run the sent model (clients/detectors/) run it on.

    Parameters
    ----------
    images, labels : torch.Tensor
        The round's examples, as `local_train` receives them.
    settings : TrainingSettings
        The round's training (its mode and batch size).
    order_seed : int or None
        The client's private shuffle, as given to `local_train`.

    Returns
    -------
    tuple of torch.Tensor
        The batch's images and labels.
    """
    batch = next(epoch_orders(len(images), settings, order_seed))[:settings.batch_size]
    return images[batch], labels[batch]


def epoch_orders(count: int, settings: TrainingSettings, order_seed: int | None) -> Iterator[torch.Tensor]:
    """The order of the `count` examples in each epoch of `local_train`: in epochs mode with `order_seed` a fresh
    permutation every epoch from the client's private generator, else the given order every epoch."""
    shuffle = torch.Generator().manual_seed(order_seed) if settings.mode == TrainMode.EPOCHS and \
        order_seed is not None else None
    for _ in range(settings.epochs):
        yield torch.randperm(count, generator=shuffle) if shuffle else torch.arange(count)
