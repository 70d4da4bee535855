"""The inversion engine: finds the images (and labels) behind each victim's update.

All victims x restarts are rows of one optimisation. The loss of a row replays the client's local
training on that row's candidate images (see replay.py) and compares the weight change with the
victim's observed one; torch.func's vmap evaluates every row in one vectorised call sharing the
global weights. Rows are independent (per-row optimiser state and random draws), so a victim's
result does not depend on who else is attacked with it or how the rows are chunked. Every iteration
evaluates all rows of a chunk and masks the finished ones out, so the host reads device state only
every CHECK_EVERY iterations. A victim's rows are its restarts times its label deals (which recovered
label was in which step, when K > 1).

The engine sees only what a server has: the model and global weights, the observed updates, the
training settings it sent, the input shape and the class count. Never the clients' data.
"""
import contextlib
import hashlib
import itertools
import os
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import grad_and_value, vmap
from tqdm.auto import tqdm

from fl_sim.contract.presets import AttackConfig
from fl_sim.contract.protocol import TrainingSettings, TrainMode

from .fedavg import deal_labels, epoch_prior, merge_copies, tie_copies
from .labels import label_assignments, mean_softmax, path_mean_softmax, recover_labels
from .objectives import OBJECTIVES, total_variation
from .optim import make_optimizer, optimizer_bytes_per_row
from .reconstruction import BadUpdate, Params, Reconstruction, Status, resolve_device
from .replay import LocalTraining

DIVERGENCE_FACTOR = 1e4  # a row whose loss grows this much above its start has diverged
# A row with a pixel this far outside [0, 1] has diverged too: an unboxed L2 attack on a noised update
# fits the noise with pixels in the hundreds (sigmoid LeNet, noise:0.001), and clamping those to [0, 1]
# gave black-and-white noise that scored below a random guess (3 dB against about 5): no reconstruction
# at all, reported as one. Converged unboxed rows stay within a few hundredths of the range.
PIXEL_LIMIT = 10.0
CHECK_EVERY = 10  # iterations between the engine's host syncs (divergence, progress, the end)
MEMORY_FRACTION = 0.5  # of the free memory that one chunk of rows may take


def _row_seed(seed: int, victim: int | tuple[int, ...], restart: int, redraw: int) -> int:
    digest = hashlib.sha256(f"{seed}/{victim}/{restart}/{redraw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class _Problem:
    """The rows' shared loss: replay on candidate data, distance to the observed update, prior."""

    def __init__(self, model, params, buffers, settings, attack, image_shape, num_classes, compile=False):
        self.replay = LocalTraining(model, params, settings, buffers)
        self.objective = OBJECTIVES[attack.objective]
        self.attack, self.settings = attack, settings
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        # epochs mode with the FedAvg attack: one copy of the n images per epoch (attacker/fedavg.py)
        self.copies = settings.epochs if attack.epoch_copies and settings.mode == TrainMode.EPOCHS else 1
        self.count = settings.num_images * self.copies
        self.scale = -1.0 / settings.lr  # compare updates as gradients: better conditioned than tiny changes
        self.image_dims = self.count * int(torch.Size(image_shape).numel())
        self.dims = self.image_dims + (self.count * num_classes if attack.labels == "joint" else 0)
        self.eager = self.batched = vmap(grad_and_value(self._row_loss))
        if compile:  # the memory probe stays eager: one row must not cost a compilation of its own
            self.batched = torch.compile(self.eager, dynamic=False)
        # buffer name -> momentum of the running statistics the attack matches (GradInversion's BN term)
        self.statistics = {f"{layer}.{kind}": m for layer, m in self.replay.norms.items() if m is not None
                           for kind in ("running_mean", "running_var")
                           if f"{layer}.{kind}" in self.replay.buffers} if attack.bn_statistics else {}
        self.model = model
        self.parameter_count = sum(tensor.numel() for tensor in params.values())
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
        change, running = self.replay.run(images, targets)
        update = {n: observed[n] for n in self.replay.params}  # observed: pre-scaled
        loss = self.objective({n: change[n] * self.scale for n in update}, update)
        if self.statistics:
            loss = loss + self.attack.bn_statistics * self._statistics_loss(running, observed)
        if self.attack.tv_weight:
            loss = loss + self.attack.tv_weight * total_variation(images)
        if self.copies > 1 and self.attack.epoch_prior:
            shape = (self.copies, self.settings.num_images)
            loss = loss + self.attack.epoch_prior * epoch_prior(images.reshape(*shape, *self.image_shape),
                                                                targets.reshape(*shape, self.num_classes))
        return loss

    def _statistics_loss(self, running: Params, observed: Params) -> torch.Tensor:
        """GradInversion's batch-norm term, on what a train-mode client sends: its running statistics moved
        by momentum x (batch statistic - running one) per step. Compared as changes divided by the momentum
        (for one step: the batch statistics themselves), mean squared per layer, averaged over layers."""
        terms = [((running[n] - self.replay.buffers[n] - observed[n] / self.scale) / m).pow(2).mean()
                 for n, m in self.statistics.items()]
        return sum(terms) / len(terms)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        if not self.attack.box:
            return z
        pixels = torch.arange(z.shape[-1], device=z.device) < self.image_dims
        return torch.where(pixels, z.clamp(0, 1), z)

    def out_of_range(self, z: torch.Tensor) -> torch.Tensor:
        """Rows with a pixel more than PIXEL_LIMIT outside [0, 1]: they left the image domain."""
        pixels = z[:, : self.image_dims]
        return ((pixels - 0.5).abs() > 0.5 + PIXEL_LIMIT).any(1)

    def initial_row(self, seed: int, device, targets: torch.Tensor | None = None) -> torch.Tensor:
        """A random start; with epoch copies and the row's `targets` given, the copies tied (`tie_copies`)."""
        generator = torch.Generator().manual_seed(seed)
        images = torch.rand(self.image_dims, generator=generator)
        if self.copies > 1 and targets is not None:
            shape = (self.copies, self.settings.num_images)
            images = tie_copies(images.reshape(*shape, -1), targets.cpu().reshape(*shape, -1)).flatten()
        parts = [images]
        if self.attack.labels == "joint":
            parts.append(torch.randn(self.dims - self.image_dims, generator=generator))
        return torch.cat(parts).to(device)

    def row_bytes(self, device: torch.device, observed: Params, targets: torch.Tensor) -> int:
        """Memory one row's loss and gradient take: measured on CUDA, estimated from tensor sizes on the CPU."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            z = self.initial_row(0, device).unsqueeze(0)
            scaled = {n: t.unsqueeze(0) * self.scale for n, t in observed.items()}
            self.eager(z, targets.unsqueeze(0).to(device), scaled)
            torch.cuda.synchronize(device)
            return max(1, torch.cuda.max_memory_allocated(device) - base)
        # activations of one forward on a batch, kept for the double backward of every replayed step,
        # and per-row copies of the weights (one per step, plus their gradients and the observed update);
        # 12 per activation matches the process peak measured for ResNet-20 (docs/attacks.md) within 10%
        activations = 0

        def count(module, inputs, output):
            nonlocal activations
            if isinstance(output, torch.Tensor) and not list(module.children()):
                activations += output.numel()

        model = self.replay.model
        hooks = [module.register_forward_hook(count) for module in model.modules()]
        try:
            with torch.no_grad():
                batch = torch.zeros(self.settings.batch_size, *self.image_shape, device=device)
                torch.func.functional_call(model, {**self.replay.params, **self.replay.buffers}, (batch,))
        finally:
            for hook in hooks:
                hook.remove()
        steps = self.settings.total_steps
        return 4 * (steps * (12 * activations + 4 * self.parameter_count) + 2 * self.parameter_count + 4 * self.dims)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _precision(objective: str):
    """TF32 off for the L2 objective, whose tiny differences of updates TF32's 10-bit mantissa would
    swamp; allowed for cosine (scale-free, and IG's Adam reads only the gradient's sign). Restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = objective == "cosine"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


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
    victim_ids: Sequence[int | tuple[int, ...]] | None = None,
    device: str | torch.device = "auto",
    max_rows: int | None = None,
    progress: bool = False,
    compile: bool = False,
    stats: dict | None = None,
) -> list[Reconstruction]:
    """Reconstructs the K x B images and labels behind each update (weight change = new - global).

    `victim_ids` name the victims for seeding (default 0..V-1): the same id, seed and update give the
    same reconstruction whatever else is in the call. Rows are chunked to fit MEMORY_FRACTION of the
    free memory (measured for one row first), at most `max_rows` at once; on out-of-memory the chunk
    is halved. A victim whose update does not fit the model gets status BAD_UPDATE, one that does not
    fit in memory alone OUT_OF_MEMORY, and the others go on; any other exception is a bug and raises.
    `compile` runs the batched row loss through torch.compile. `stats`, if given, receives the row
    memory, the chunk size, the rows' loss evaluations and the seconds spent in the first evaluation
    (compilation, if any).
    """
    if not updates:
        return []
    device = resolve_device(device)
    victim_ids = list(range(len(updates))) if victim_ids is None else list(victim_ids)
    if len(victim_ids) != len(updates):
        raise ValueError("victim_ids and updates differ in length")
    with _precision(attack.objective):
        return _invert(model, global_params, updates, settings, attack, image_shape, num_classes, iterations,
                       seed, victim_ids, device, max_rows, progress, compile, {} if stats is None else stats)


def _invert(model, global_params, updates, settings, attack, image_shape, num_classes, iterations, seed,
            victim_ids, device, max_rows, progress, compile, stats):
    names = [name for name, _ in model.named_parameters()]
    params = {name: global_params[name].detach().to(device, torch.float32) for name in names}
    buffers = {name: global_params[name].detach().to(device)
               for name, _ in model.named_buffers() if name in global_params}
    problem = _Problem(model, params, buffers, settings, attack, image_shape, num_classes, compile)
    failures: dict[int, Reconstruction] = {}
    observed, targets = {}, {}
    for v, update in enumerate(updates):
        try:
            observed[v] = _check_update({**params, **{n: buffers[n] for n in problem.statistics}}, update,
                                        names + list(problem.statistics))
        except BadUpdate as error:  # a malformed update must not stop the other victims
            failures[v] = Reconstruction.failure(Status.BAD_UPDATE, str(error))
            continue
        targets[v] = _targets(problem, params, observed[v], seed, victim_ids[v])
    if not observed:
        return [failures[v] for v in range(len(updates))]
    budget = iterations * attack.updates_per_iteration
    rows_of = {v: len(targets[v]) * attack.restarts for v in observed}
    first = next(iter(observed))
    row_bytes = problem.row_bytes(device, observed[first], targets[first][0])
    optimizer_bytes = optimizer_bytes_per_row(attack.optimizer, problem.dims, attack.history)
    capacity = max(1, int(MEMORY_FRACTION * _free_memory(device) // (row_bytes + optimizer_bytes)))
    capacity = min(capacity, max_rows or capacity)
    stats.update(row_bytes=row_bytes, optimizer_bytes_per_row=optimizer_bytes, rows_per_chunk=capacity,
                 rows=sum(rows_of.values()))
    bar = tqdm(total=sum(rows_of.values()) * budget, desc=f"{attack.name} x{len(updates)}",
               unit="it", disable=not progress, leave=False)
    results: dict[tuple[int, int], tuple[torch.Tensor, float, int]] = {}
    pending, limit = list(observed), capacity
    while pending:
        part = list(itertools.takewhile(_Budget(limit, rows_of), pending)) or pending[:1]  # whole victims
        rows = [(v, a, r) for v in part for a in range(len(targets[v])) for r in range(attack.restarts)]
        try:
            results.update(_optimise(problem, rows, victim_ids, observed, targets, attack, budget, seed, device,
                                     bar, stats))
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if len(part) > 1:  # halve the chunk and try again
                limit = max(1, sum(rows_of[v] for v in part) // 2)
                continue
            failures[part[0]] = Reconstruction.failure(Status.OUT_OF_MEMORY, "out of memory even for this victim alone")
            limit = capacity  # one victim too large says nothing about the next chunk
        pending = pending[len(part):]
    bar.close()
    return [failures[v] if v in failures else _best(problem, v, attack, results, targets[v])
            for v in range(len(updates))]


class _Budget:
    """takewhile predicate: victims while their rows fit in `limit`."""

    def __init__(self, limit: int, rows_of: dict[int, int]):
        self.left, self.rows_of = limit, rows_of

    def __call__(self, victim: int) -> bool:
        self.left -= self.rows_of[victim]
        return self.left >= 0


def _check_update(params: Params, update: Params, names: list[str]) -> Params:
    """A victim's observed update on the device, checked against the model, before any work."""
    if not isinstance(update, dict):
        raise BadUpdate(f"the update is a {type(update).__name__}, not a dict of tensors")
    observed = {}
    for name in names:
        if name not in update:
            raise BadUpdate(f"update has no {name!r}")
        tensor = update[name]
        if not isinstance(tensor, torch.Tensor):
            raise BadUpdate(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.shape != params[name].shape:
            raise BadUpdate(f"{name!r} has shape {tuple(tensor.shape)}, the model {tuple(params[name].shape)}")
        tensor = tensor.detach().to(params[name].device, torch.float32)
        if not torch.isfinite(tensor).all():
            raise BadUpdate(f"{name!r} is not finite")
        observed[name] = tensor
    return observed


def _targets(problem: _Problem, params, observed, seed: int, victim_id: int) -> list[torch.Tensor]:
    """The label targets of a victim's rows: one (K*B, classes) tensor per assignment of the
    recovered labels to steps (fixed), or a placeholder when the labels are learnt jointly."""
    if problem.attack.labels != "analytic":
        return [torch.zeros(problem.count, problem.num_classes, device=observed[next(iter(observed))].device)]
    p_mean = problem.p_mean
    if problem.attack.label_path:  # this victim's own path from the global weights to its final ones
        p_mean = path_mean_softmax(problem.model, params, observed, problem.settings, problem.image_shape,
                                   problem.replay.buffers)
    labels = recover_labels(problem.model, params, observed, problem.settings, problem.image_shape,
                            problem.num_classes, p_mean)
    if problem.copies > 1:  # the client reshuffles every epoch: each copy gets its own random deal
        dealt = deal_labels(labels, problem.copies, _row_seed(seed, victim_id, -1, 0))
        return [nn.functional.one_hot(dealt, problem.num_classes).float().to(labels.device)]
    assignments = label_assignments(labels, problem.settings.steps_per_epoch, problem.settings.batch_size,
                                    problem.attack.label_assignments, _row_seed(seed, victim_id, -1, 0))
    return [nn.functional.one_hot(a, problem.num_classes).float().to(labels.device) for a in assignments]


def _optimise(problem, rows, victim_ids, observed, targets, attack, budget, seed, device, bar, stats):
    """Runs one chunk of rows to the end; returns {(victim, assignment, restart): (z, loss, redraws)}.

    An iteration is the same few kernels for every row, inactive ones masked out: the host only looks
    at the rows every CHECK_EVERY iterations (to re-draw diverged ones, move the progress bar, stop).
    """
    row_targets = torch.stack([targets[v][a] for v, a, _ in rows]).to(device)
    row_observed = {name: torch.stack([observed[v][name] for v, _, _ in rows]) * problem.scale
                    for name in observed[rows[0][0]]}
    redraws = [0] * len(rows)

    def draw(i: int) -> torch.Tensor:
        v, _, r = rows[i]
        return problem.initial_row(_row_seed(seed, victim_ids[v], r, redraws[i]), device, row_targets[i])

    def evaluate(z_rows: torch.Tensor, which: torch.Tensor | None = None):
        """Every row, or the rows `which` (L-BFGS's line-search retries): one gather per tensor."""
        stats["row_evaluations"] = stats.get("row_evaluations", 0) + (len(rows) if which is None else len(which))
        if which is None:
            gradient, loss = problem.batched(z_rows, row_targets, row_observed)
        else:
            gradient, loss = problem.eager(z_rows, row_targets.index_select(0, which),
                                           {name: tensor.index_select(0, which)
                                            for name, tensor in row_observed.items()})
        return loss.detach(), gradient.detach()

    z = problem.project(torch.stack([draw(i) for i in range(len(rows))]))
    started = time.perf_counter()
    loss, gradient = evaluate(z)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.setdefault("first_evaluation_seconds", time.perf_counter() - started)
    reference = loss.clone()
    optimizer = make_optimizer(attack.optimizer, z, attack.lr, budget, attack.lr_decay, attack.history)
    steps = torch.zeros(len(rows), dtype=torch.long, device=device)
    alive = torch.ones(len(rows), dtype=torch.bool, device=device)
    diverged = torch.zeros_like(alive)
    shown, iteration = 0, 0
    while True:
        active = alive & ~diverged & (steps < budget) & ~optimizer.converged
        z, loss, gradient = optimizer.step(z, loss, gradient, evaluate, active, problem.project)
        steps = steps + active.long()
        diverged = diverged | (active & (~torch.isfinite(loss) | ~torch.isfinite(z).all(1)
                                         | (loss > DIVERGENCE_FACTOR * reference.abs().clamp_min(1e-12))
                                         | problem.out_of_range(z)))
        iteration += 1
        if iteration % CHECK_EVERY and iteration != budget:
            continue
        flagged = diverged.nonzero().flatten().tolist()  # host sync, once per CHECK_EVERY iterations
        if flagged:
            fresh = torch.zeros_like(alive)
            for i in flagged:
                if redraws[i] >= attack.max_redraws:
                    alive[i] = False
                    continue
                redraws[i] += 1
                z[i] = problem.project(draw(i).unsqueeze(0))[0]
                fresh[i] = True
            optimizer.reset(fresh)
            steps = torch.where(fresh, 0, steps)
            new_loss, new_gradient = evaluate(z)
            loss, reference = torch.where(fresh, new_loss, loss), torch.where(fresh, new_loss, reference)
            gradient = torch.where(fresh.unsqueeze(1), new_gradient, gradient)
            diverged = torch.zeros_like(diverged)
        finished = ~alive | optimizer.converged
        done = int(torch.where(finished, budget, steps.clamp(max=budget)).sum())
        bar.update(done - shown)
        shown = done
        if not bool((alive & (steps < budget) & ~optimizer.converged).any()):
            break
    loss = torch.where(alive, loss, torch.full_like(loss, float("inf")))
    z, loss = z.detach().cpu(), loss.cpu()
    return {rows[i]: (z[i], float(loss[i]), redraws[i]) for i in range(len(rows))}


def _best(problem: _Problem, victim: int, attack: AttackConfig, results, targets) -> Reconstruction:
    keys = [(victim, a, r) for a in range(len(targets)) for r in range(attack.restarts)]
    losses = [results[key][1] for key in keys]
    redraws = sum(results[key][2] for key in keys)
    best = min(range(len(keys)), key=lambda k: losses[k])
    z = results[keys[best]][0]
    images, logits = problem.split(z)
    labels = (logits if logits is not None else targets[keys[best][1]].cpu()).argmax(-1)
    if problem.copies > 1:  # the per-epoch copies matched to the first and averaged: the n images
        images, labels = merge_copies(images.clamp(0, 1), labels, problem.copies)
    if not torch.isfinite(torch.tensor(losses[best])):
        return Reconstruction(images.clamp(0, 1), labels, losses[best], Status.DIVERGED,
                              "every restart of the attack diverged (its loss grew or turned non-finite, or its "
                              f"pixels left [-{PIXEL_LIMIT:g}, {1 + PIXEL_LIMIT:g}])", losses, redraws)
    return Reconstruction(images.clamp(0, 1), labels, losses[best], Status.OK, "", losses, redraws)
