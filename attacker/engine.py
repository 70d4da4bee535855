"""The inversion engine: finds the images (and labels) behind each victim's update.

All victims x restarts are rows of one optimisation. The loss of a row replays the client's local
training on that row's candidate images (see replay.py) and compares the weight change with the
victim's observed one; torch.func's vmap evaluates every row in one vectorised call sharing the
global weights. Rows are independent (per-row optimiser state and random draws), so a victim's
result does not depend on who else is attacked with it or how the rows are chunked.

The engine sees only what a server has: the model and global weights, the observed updates, the
training settings it sent, the input shape and the class count. Never the clients' data.
"""
import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import grad_and_value, vmap
from tqdm.auto import tqdm

from .labels import mean_softmax, recover_labels
from .objectives import OBJECTIVES, total_variation
from .optim import make_optimizer
from .replay import LocalTraining
from .settings import AttackConfig, TrainingSettings

Params = dict[str, torch.Tensor]
DIVERGENCE_FACTOR = 1e4  # a row whose loss grows this much above its start has diverged


@dataclass
class Reconstruction:
    """The attack's answer for one victim: its best restart, and how the restarts went."""

    images: torch.Tensor  # (K*B, C, H, W) in [0, 1], on the CPU
    labels: torch.Tensor  # (K*B,)
    loss: float  # the attack's own objective at the kept restart
    status: str = "ok"  # "ok", or why there is no result ("diverged", "error: ...")
    restart_losses: list[float] = field(default_factory=list)
    redraws: int = 0  # restarts re-drawn after diverging
    # per image, for the analytic attacks (attacker/analytic.py): confirmed, unconfirmed or unrecovered
    image_status: list[str] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return device


def weight_change_from_gradient(gradient: Params, lr: float) -> Params:
    """The weight change of one SGD step, for callers who observed a raw gradient instead."""
    return {name: -lr * g for name, g in gradient.items()}


def _row_seed(seed: int, victim: int, restart: int, redraw: int) -> int:
    digest = hashlib.sha256(f"{seed}/{victim}/{restart}/{redraw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class _Problem:
    """The rows' shared loss: replay on candidate data, distance to the observed update, prior."""

    def __init__(self, model, params, buffers, settings, attack, image_shape, num_classes):
        self.replay = LocalTraining(model, params, settings, buffers)
        self.objective = OBJECTIVES[attack.objective]
        self.attack, self.settings = attack, settings
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        self.count = settings.num_images
        self.image_dims = self.count * int(torch.Size(image_shape).numel())
        self.dims = self.image_dims + (self.count * num_classes if attack.labels == "joint" else 0)
        self.batched = vmap(grad_and_value(self._row_loss))
        self.model = model
        # the global model's mean prediction, shared by every victim's label recovery
        self.p_mean = mean_softmax(model, {**params, **buffers}, image_shape, settings.batchnorm) \
            if attack.labels == "analytic" else None

    def split(self, z_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = z_row[..., : self.image_dims].reshape(*z_row.shape[:-1], self.count, *self.image_shape)
        if self.attack.labels != "joint":
            return images, None
        logits = z_row[..., self.image_dims:].reshape(*z_row.shape[:-1], self.count, self.num_classes)
        return images, logits

    def _row_loss(self, z_row, fixed_targets, observed):
        images, logits = self.split(z_row)
        targets = logits.softmax(-1) if logits is not None else fixed_targets
        change = self.replay(images, targets)
        scale = -1.0 / self.settings.lr  # compare as gradients: better conditioned than tiny changes
        loss = self.objective({n: change[n] * scale for n in observed}, {n: observed[n] * scale for n in observed})
        if self.attack.tv_weight:
            loss = loss + self.attack.tv_weight * total_variation(images)
        return loss

    def project(self, z: torch.Tensor) -> torch.Tensor:
        if not self.attack.box:
            return z
        z = z.clone()
        z[:, : self.image_dims] = z[:, : self.image_dims].clamp(0, 1)
        return z

    def initial_row(self, seed: int, device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        images = torch.rand(self.image_dims, generator=generator)
        parts = [images]
        if self.attack.labels == "joint":
            parts.append(torch.randn(self.dims - self.image_dims, generator=generator))
        return torch.cat(parts).to(device)


def invert(
    model: nn.Module,
    global_params: Params,
    updates: list[Params],
    settings: TrainingSettings,
    attack: AttackConfig,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    iterations: int,
    seed: int = 0,
    victim_ids: list[int] | None = None,
    device: str | torch.device = "auto",
    max_rows: int | None = None,
    progress: bool = False,
) -> list[Reconstruction]:
    """Reconstructs the K x B images and labels behind each update (weight change = new - global).

    `victim_ids` name the victims for seeding (default 0..V-1): the same id, seed and update give the
    same reconstruction whatever else is in the call. `max_rows` caps victim-restarts optimised at once;
    on out-of-memory the engine halves it and goes on. A victim whose update cannot be attacked (it
    does not fit the model, or its attack raises) gets status "error: ..." and the others go on.
    """
    if not updates:
        return []
    device = resolve_device(device)
    victim_ids = list(range(len(updates))) if victim_ids is None else list(victim_ids)
    if len(victim_ids) != len(updates):
        raise ValueError("victim_ids and updates differ in length")
    names = [name for name, _ in model.named_parameters()]
    params = {name: global_params[name].detach().to(device, torch.float32) for name in names}
    buffers = {name: global_params[name].detach().to(device)
               for name, _ in model.named_buffers() if name in global_params}
    problem = _Problem(model, params, buffers, settings, attack, image_shape, num_classes)
    errors: dict[int, str] = {}
    observed, targets = {}, {}
    for v, update in enumerate(updates):
        try:
            observed[v], targets[v] = _prepare(problem, params, update, names)
        except Exception as error:  # a malformed update must not stop the other victims
            errors[v] = _describe(error)
    budget = iterations * attack.updates_per_iteration
    bar = tqdm(total=len(observed) * attack.restarts * budget, desc=f"{attack.name} x{len(updates)}",
               unit="it", disable=not progress, leave=False)
    results: dict[tuple[int, int], tuple[torch.Tensor, float, int]] = {}
    pending = list(observed)
    per_chunk = max(1, (max_rows or len(pending) * attack.restarts) // attack.restarts)  # whole victims
    while pending:
        part = pending[:per_chunk]
        rows = [(v, r) for v in part for r in range(attack.restarts)]
        try:
            results.update(_optimise(problem, rows, victim_ids, observed, targets, attack, budget, seed, device, bar))
        except Exception as error:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if len(part) > 1:  # out of memory: halve the chunk; any other error: isolate the victim
                per_chunk = max(1, per_chunk // 2) if isinstance(error, torch.OutOfMemoryError) else 1
                continue
            errors[part[0]] = _describe(error)
        pending = pending[len(part):]
    bar.close()
    return [Reconstruction(torch.empty(0), torch.empty(0, dtype=torch.long), float("inf"), errors[v])
            if v in errors else _best(problem, v, attack, results, targets[v]) for v in range(len(updates))]


def _prepare(problem: _Problem, params, update, names):
    """A victim's observed update on the device, checked against the model, and its label targets."""
    observed = {}
    for name in names:
        if name not in update:
            raise ValueError(f"update has no {name!r}")
        tensor = update[name].detach().to(params[name].device, torch.float32)
        if tensor.shape != params[name].shape:
            raise ValueError(f"{name!r} has shape {tuple(tensor.shape)}, the model {tuple(params[name].shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name!r} is not finite")
        observed[name] = tensor
    if problem.attack.labels == "analytic":
        labels = recover_labels(problem.model, params, observed, problem.settings, problem.image_shape,
                                problem.num_classes, problem.p_mean)
        return observed, nn.functional.one_hot(labels, problem.num_classes).float()
    return observed, torch.zeros(problem.count, problem.num_classes)


def _describe(error: Exception) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "error: out of memory even for one victim"
    return f"error: {error.__class__.__name__}: {error}"


def _optimise(problem, rows, victim_ids, observed, targets, attack, budget, seed, device, bar):
    """Runs one chunk of rows to the end; returns {(victim, restart): (z, loss, redraws)}."""
    row_targets = torch.stack([targets[v] for v, _ in rows]).to(device)
    row_observed = {name: torch.stack([observed[v][name] for v, _ in rows]) for name in observed[rows[0][0]]}
    redraws = [0] * len(rows)

    def draw(i: int) -> torch.Tensor:
        v, r = rows[i]
        return problem.initial_row(_row_seed(seed, victim_ids[v], r, redraws[i]), device)

    def evaluate(z_rows: torch.Tensor, which: torch.Tensor):
        if len(which) == len(rows):
            gradient, loss = problem.batched(z_rows, row_targets, row_observed)
        else:
            subset = {name: tensor[which] for name, tensor in row_observed.items()}
            gradient, loss = problem.batched(z_rows, row_targets[which], subset)
        return loss.detach(), gradient.detach()

    z = problem.project(torch.stack([draw(i) for i in range(len(rows))]))
    everyone = torch.arange(len(rows), device=device)
    loss, gradient = evaluate(z, everyone)
    reference = loss.clone()
    optimizer = make_optimizer(attack.optimizer, z, attack.lr, budget, attack.lr_decay)
    steps = torch.zeros(len(rows), dtype=torch.long, device=device)
    alive = torch.ones(len(rows), dtype=torch.bool, device=device)
    while (active := alive & (steps < budget) & ~optimizer.converged).any():
        z, loss, gradient = optimizer.step(z, loss, gradient, evaluate, active, problem.project)
        steps[active] += 1
        bar.update(int(active.sum()) + int((budget - steps[active & optimizer.converged]).sum()))
        diverged = active & (~torch.isfinite(loss) | ~torch.isfinite(z).all(1)
                             | (loss > DIVERGENCE_FACTOR * reference.abs().clamp_min(1e-12)))
        for i in diverged.nonzero().flatten().tolist():
            bar.update(-int(steps[i]))
            if redraws[i] >= attack.max_redraws:
                alive[i] = False
                continue
            redraws[i] += 1
            z[i] = problem.project(draw(i).unsqueeze(0))[0]
            optimizer.reset(torch.tensor([i], device=device))
            steps[i] = 0
            loss[i:i + 1], gradient[i:i + 1] = evaluate(z[i:i + 1], torch.tensor([i], device=device))
            reference[i] = loss[i]
    loss = torch.where(alive, loss, torch.full_like(loss, float("inf")))
    return {rows[i]: (z[i].detach().cpu(), float(loss[i]), redraws[i]) for i in range(len(rows))}


def _best(problem: _Problem, victim: int, attack: AttackConfig, results, targets) -> Reconstruction:
    candidates = [results[(victim, r)] for r in range(attack.restarts)]
    losses = [loss for _, loss, _ in candidates]
    redraws = sum(n for _, _, n in candidates)
    best = min(range(len(candidates)), key=lambda r: losses[r])
    z = candidates[best][0]
    images, logits = problem.split(z)
    labels = (logits if logits is not None else targets).argmax(-1)
    status = "ok" if torch.isfinite(torch.tensor(losses[best])) else "diverged"
    return Reconstruction(images.clamp(0, 1), labels, losses[best], status, losses, redraws)
