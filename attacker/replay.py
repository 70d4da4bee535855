"""The client's local training, replayed as a differentiable function of its (dummy) data.

The server knows the global weights and the settings it sent, so it can run the client's SGD on any
candidate images and compare the weight change with the one it received. With torch.func the replay
is a pure function of (images, labels), so it can be differentiated end to end (K unrolled steps)
and vectorised over victims with vmap.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from fl_sim.contract.protocol import TrainingSettings

Params = dict[str, torch.Tensor]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against label distributions; equals F.cross_entropy for one-hot targets."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def functional_model(model: nn.Module, device: torch.device | None = None, batchnorm: str = "train") -> nn.Module:
    """A copy (on `device`) whose batch-norm layers behave as the client's do in training: with
    batchnorm "train" they always use batch statistics (running statistics are buffers, not gradients,
    and updating them in place cannot be vmapped); "frozen", they use the running statistics the caller
    passes to functional_call. The caller's model is left as it was.
    """
    model = copy.deepcopy(model).to(device).train()
    if batchnorm == "train":
        torch.func.replace_all_batch_norm_modules_(model)
    else:
        freeze_batchnorm(model)
    return model


def freeze_batchnorm(model: nn.Module) -> None:
    """Batch-norm layers to eval mode (running statistics, none updated); the rest stays as it is."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class LocalTraining:
    """Replays `settings` on given data from the global weights and returns the weight change."""

    def __init__(self, model: nn.Module, global_params: Params, settings: TrainingSettings,
                 buffers: Params | None = None):
        """`buffers`: the global model's running statistics, which frozen batch-norm layers use."""
        self.params = {name: tensor.detach() for name, tensor in global_params.items()}
        self.buffers = {name: tensor.detach() for name, tensor in (buffers or {}).items()}
        self.model = functional_model(model, next(iter(self.params.values())).device, settings.batchnorm)
        self.settings = settings
        self._grad = grad(self._loss, has_aux=True)
        # batch-norm layers in train mode: the running statistics each one updates, with its momentum
        self.norms = {name: module.momentum for name, module in self.model.named_modules()
                      if isinstance(module, nn.modules.batchnorm._BatchNorm)} if settings.batchnorm == "train" else {}
        self._inputs: dict[str, torch.Tensor] = {}
        for name, module in self.model.named_modules():
            if name in self.norms:
                module.register_forward_pre_hook(self._keep_input(name))

    def _keep_input(self, name: str):
        def hook(module, inputs):
            self._inputs[name] = inputs[0]
        return hook

    def _loss(self, params: Params, images: torch.Tensor, targets: torch.Tensor):
        """The loss, and per batch-norm layer the batch's mean and unbiased variance (what the client's
        running statistics are blended with)."""
        self._inputs.clear()
        loss = soft_cross_entropy(functional_call(self.model, {**params, **self.buffers}, (images,)), targets)
        dims = lambda x: [0] + list(range(2, x.dim()))  # noqa: E731 - every axis but the channels
        statistics = {name: (x.mean(dims(x)), x.var(dims(x), unbiased=True)) for name, x in self._inputs.items()}
        self._inputs.clear()
        return loss, statistics

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> Params:
        return self.run(images, targets)[0]

    def run(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[Params, Params]:
        """images (n, C, H, W) in step order, targets (n, classes) -> (weight change per parameter, the
        running batch-norm statistics after training, by buffer name; empty unless batch norm trains).

        Each epoch visits the same n images in the same order, in the settings' batches (the last one short
        when B does not divide n): the client's own shuffle in epochs mode is unknown, so this is the order
        the attack assumes. Given E x n images and targets (E the settings' epochs), epoch e trains on its own
        block e instead: per-epoch copies of the n images, each in the order of that epoch's batches (the
        FedAvg attack's view of a client that reshuffles every epoch, attacker/fedavg.py).
        """
        s = self.settings
        n = s.num_images
        if images.shape[0] not in (n, s.epochs * n):
            raise ValueError(f"the replay takes {n} images, or {s.epochs} x {n} (one copy per epoch), "
                             f"got {images.shape[0]}")
        copies = images.shape[0] // n
        params, velocity = self.params, None
        running = {f"{name}.{kind}": self.buffers[f"{name}.{kind}"] for name in self.norms
                   for kind in ("running_mean", "running_var") if f"{name}.{kind}" in self.buffers}
        for epoch in range(s.epochs):
            offset = n * epoch if copies > 1 else 0
            for batch in s.batch_slices():
                batch = slice(batch.start + offset, batch.stop + offset)
                gradient, statistics = self._grad(params, images[batch], targets[batch])
                for name, (mean, var) in statistics.items():
                    m = self.norms[name]
                    if m is None or f"{name}.running_mean" not in running:
                        continue  # cumulative averages (momentum None) or no statistics known: not replayed
                    running[f"{name}.running_mean"] = (1 - m) * running[f"{name}.running_mean"] + m * mean
                    running[f"{name}.running_var"] = (1 - m) * running[f"{name}.running_var"] + m * var
                if s.proximal_mu:  # FedProx: the gradient of mu/2 ||w - w_global||^2 joins the loss's
                    gradient = {name: gradient[name] + s.proximal_mu * (params[name] - self.params[name])
                                for name in gradient}
                if s.weight_decay:  # torch.optim.SGD's weight decay, before momentum
                    gradient = {name: gradient[name] + s.weight_decay * params[name] for name in gradient}
                if s.momentum:
                    velocity = gradient if velocity is None else {
                        name: s.momentum * velocity[name] + gradient[name] for name in gradient}
                    gradient = velocity
                params = {name: params[name] - s.lr * gradient[name] for name in params}
        return {name: params[name] - self.params[name] for name in params}, running


def step_weights(settings: TrainingSettings) -> list[float]:
    """How much each step's gradient counts in the total weight change (1 each without momentum)."""
    total = settings.total_steps
    if not settings.momentum:
        return [1.0] * total
    return [sum(settings.momentum ** j for j in range(total - s)) for s in range(total)]
