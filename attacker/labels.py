"""Label recovery from the last layer's update, before any optimisation.

With softmax cross-entropy the gradient of the last layer's bias for one example is p - onehot(y):
negative only at the true class. So for one image (iDLG, Zhao et al. 2020) the label is the one
negative entry, exactly. For a batch, the bias update summed over all steps is
    -delta_b / lr  =  sum_steps w_s * mean_batch(p - onehot(y)),
so the count of class c among the K x B images is about K*B*(p_c - g_c / W) with W the sum of the
step weights (Geng et al. 2021's estimator, extended to K steps): we estimate the model's mean
softmax p from its outputs on random images, force every class with a negative entry to appear at
least once, and fill the remaining slots greedily by the largest estimated count.

It fails when p is not the same for all examples: a trained model that is confident on some images
and not on others, or several steps with a learning rate large enough to move the model's
predictions within the round (measured on MNIST LeNet, K=3 x B=2: 10/10 batches right at lr 0.01 from
PyTorch's initialisation, 0/10 at lr 0.05 or from the DLG paper's U(-0.5, 0.5) initialisation, whose
large weights move p at once); or a last layer without a bias (then the weight rows' sums rank the
classes, which assumes non-negative features).
"""
import itertools

import torch
from torch import nn
from torch.func import functional_call

from fl_sim.contract.protocol import TrainingSettings

from .replay import functional_model, step_weights


def find_last_layer(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            last = (name, module)
    if last is None:
        raise ValueError(f"no linear layer with {num_classes} outputs: labels cannot be recovered")
    return last


def mean_softmax(model: nn.Module, state: dict, image_shape: tuple, batchnorm: str = "train",
                 samples: int = 64) -> torch.Tensor:
    """The model's mean prediction on uniform random images: a stand-in for its mean on real ones.
    `state`: the global parameters, and the buffers that frozen batch-norm layers use."""
    device = next(iter(state.values())).device
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((samples, *image_shape), generator=generator).to(device)
    with torch.no_grad():
        return functional_call(functional_model(model, device, batchnorm), state, (noise,)).softmax(-1).mean(0)


def recover_labels(model: nn.Module, global_params: dict, update: dict, settings: TrainingSettings,
                   image_shape: tuple, num_classes: int, p_mean: torch.Tensor | None = None) -> torch.Tensor:
    """The labels of the K x B images behind `update`, as a sorted tensor (their order is unknown).

    `p_mean` is `mean_softmax` at the global weights; it is the same for every victim of a round, so
    callers that recover many victims' labels pass it once computed.
    """
    name, layer = find_last_layer(model, num_classes)
    signal = update[f"{name}.bias"] if layer.bias is not None else update[f"{name}.weight"].sum(1)
    signal = -signal.detach().double() / settings.lr  # the summed (weighted) gradient
    if layer.bias is None:
        return _fill(signal, -signal / signal.abs().max().clamp_min(1e-30), settings.num_images)
    if p_mean is None:
        p_mean = mean_softmax(model, global_params, image_shape, settings.batchnorm)
    p_mean = p_mean.double().to(signal.device)
    estimate = settings.num_images * (p_mean - signal / sum(step_weights(settings)))
    return _fill(signal, estimate, settings.num_images)


def _fill(signal: torch.Tensor, estimate: torch.Tensor, count: int) -> torch.Tensor:
    """Every class with a negative signal at least once, then the rest greedily by estimated count."""
    counts = torch.zeros(len(signal), dtype=torch.long)
    for c in torch.argsort(signal)[: min(count, int((signal < 0).sum()))]:
        counts[c] = 1
    estimate = estimate.cpu()
    while counts.sum() < count:
        counts[torch.argmax(estimate - counts)] += 1
    return torch.repeat_interleave(torch.arange(len(signal)), counts)


def label_assignments(labels: torch.Tensor, steps: int, batch: int, limit: int, seed: int) -> list[torch.Tensor]:
    """Distinct ways to deal the recovered K x B labels into K steps of B (the last one shorter when B does
    not divide their count, as in epochs mode), at most `limit`.

    The bias update gives the multiset of labels, not which step saw which; with K > 1 the replay
    depends on it. The first assignment is the sorted one; the others are all distinct ones when
    there are few, else distinct random ones drawn from `seed`. Each is returned in step order.
    """
    labels = labels.cpu()

    def canonical(order) -> tuple:
        return tuple(tuple(sorted(order[s * batch:min((s + 1) * batch, len(order))])) for s in range(steps))

    found = {canonical(labels.tolist()): None}
    if steps > 1 and limit > 1:
        if len(labels) <= 7:  # at most 5040 orders: enumerate them all, in a seeded order
            candidates = list(itertools.permutations(labels.tolist()))
            order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
            draws = (candidates[i] for i in order.tolist())
        else:
            generator = torch.Generator().manual_seed(seed)
            draws = (labels[torch.randperm(len(labels), generator=generator)].tolist() for _ in range(50 * limit))
        for candidate in draws:
            found.setdefault(canonical(candidate), None)
            if len(found) >= limit:
                break
    return [torch.tensor([label for step in assignment for label in step]) for assignment in found]


PATH_POINTS = 32  # most points on the path from the global to the client's final weights that label recovery visits


def path_mean_softmax(model: nn.Module, global_params: dict, update: dict, settings: TrainingSettings,
                      image_shape: tuple, buffers: dict | None = None, samples: int = 64) -> torch.Tensor:
    """The model's mean prediction on random images along the client's training, for label recovery over
    many steps (after Dimitrov et al. 2022, who estimate the label-count parameters at every FedAvg step).

    Step s of S computes its gradient at weights the server never sees; it takes them on the straight line
    from the global weights to the client's final ones (global + update, which it has): w_s = w + (s/S) x update.
    The mean softmax at each step (at most PATH_POINTS distinct points, each step counted at the nearest one)
    is averaged with the steps' weights in the total update (step_weights: momentum counts early steps more),
    so recover_labels' estimate n (p - signal / W) compares like with like. `buffers`: the running statistics
    frozen batch-norm layers use.
    """
    total = settings.total_steps
    weights = torch.tensor(step_weights(settings), dtype=torch.float64)
    points = min(total, PATH_POINTS)
    nearest = torch.round(torch.arange(total, dtype=torch.float64) * (points - 1) / max(1, total - 1)).long()
    mass = torch.zeros(points, dtype=torch.float64).index_add_(0, nearest, weights)
    mean = None
    for j in range(points):
        fraction = (j * (total - 1) / max(1, points - 1)) / total
        state = {name: tensor + fraction * update[name].to(tensor) if name in update else tensor
                 for name, tensor in global_params.items()}
        p = mean_softmax(model, {**state, **(buffers or {})}, image_shape, settings.batchnorm, samples).double()
        mean = mass[j] * p if mean is None else mean + mass[j] * p
    assert mean is not None
    return (mean / weights.sum()).float()
