"""Defenses against the curious server: what a client does to its weight change before sending it.

`--defense SPEC` (run config `defense`) names steps joined by `+`, applied in the order written:

    none        send the update as trained
    noise:SIGMA add Gaussian noise N(0, SIGMA^2) to every entry of the change
    clip:C      scale the whole change down to L2 norm C when it is longer (flat clipping)
    prune:P     zero the fraction P of each tensor's smallest-magnitude entries (DLG's gradient pruning)
    fp16        round the change to half precision (what a client sending float16 updates reveals)
    secagg      secure aggregation: the server learns only the sum of the clients' updates
    dpsgd:noise=Z:clip=C:delta=D   DP-SGD in the local training itself (Opacus; clients/training.py), not a step
    ldp:clip=C:eps=E:delta=D       Flower's own LocalDpMod on the reply, after the steps (clients/mods.py)

`clip:C+noise:SIGMA` is the mechanism of Flower's LocalDpMod (clip the update, then add noise); it is
computed here in torch, seeded, and on the parameters only: LocalDpMod draws from numpy's global,
unseeded generator (a sweep could not be repeated) and also noises BatchNorm statistics, so `fl-sim attack`
refuses it. So the two hand-written steps stay
(and keep their names); who wants Flower's code itself writes `ldp:...`, which runs LocalDpMod unchanged
(sensitivity C, its noise sigma = C sqrt(2 ln(1.25/D)) / E), and `--server-dp client:...` runs Flower's
fixedclipping_mod (for a model without batch norm it sends what `clip:C` sends: tests/test_defenses.py).

The client applies its steps to the change of its parameters (new - global) and sends global + the
defended change; buffers (BatchNorm statistics) go as trained. `secagg` is no client step: the
server (fl_sim/server/strategy.py) and `fl-sim attack` then see only the clients' mean update (the sum that
secure aggregation reveals, over the known count), which the attack treats as one client whose
batches hold every client's examples (TrainingSettings.for_mean_of).

The spec is parsed with the run config (fl_sim/contract/run_config.py DefenseSpec); in a ClientApp these steps
run as a Flower mod (clients/mods.py `defense_mod`), after the honest training.
"""
from collections.abc import Callable

import numpy as np
import torch

from fl_sim.contract.defenses import DefenseKind, DefenseSpec
from fl_sim.learning.updates import update_norm

Change = dict[str, torch.Tensor]


# Each step takes (the change, its number or None, the seeded generator) and returns the change it sends.
def add_noise(change: Change, sigma: float, generator: torch.Generator) -> Change:
    return {name: tensor + sigma * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            for name, tensor in change.items()}


def clip(change: Change, max_norm: float, generator: torch.Generator) -> Change:
    norm = update_norm(change, change)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {name: tensor * scale for name, tensor in change.items()}


def prune(change: Change, fraction: float, generator: torch.Generator) -> Change:
    pruned = {}
    for name, tensor in change.items():
        flat = tensor.flatten().clone()
        smallest = flat.abs().argsort(stable=True)[:round(fraction * flat.numel())]
        flat[smallest] = 0
        pruned[name] = flat.reshape(tensor.shape)
    return pruned


def half_precision(change: Change, value: float, generator: torch.Generator) -> Change:
    return {name: tensor.half().to(tensor.dtype) for name, tensor in change.items()}


Step = Callable[[Change, float, torch.Generator], Change]
STEPS: dict[DefenseKind, Step] = {DefenseKind.NOISE: add_noise, DefenseKind.CLIP: clip, DefenseKind.PRUNE: prune,
         DefenseKind.FP16: half_precision}


def defend(spec: DefenseSpec, change: Change, seed: int) -> Change:
    """The change as the client's steps leave it; `seed` fixes the noise."""
    generator = torch.Generator().manual_seed(seed)
    for kind, value in spec.steps:
        change = STEPS[kind](change, 0.0 if value is None else value, generator)
    return change


def sent_weights(spec: DefenseSpec, global_weights: Change, trained: Change, parameters: list[str],
                 seed: int) -> Change:
    """What the client sends: global + the defended change of each parameter, buffers as trained.

    Without client steps the trained weights go as they are (global + change would round them).
    """
    if not spec.steps:
        return trained
    change = defend(spec, {name: trained[name] - global_weights[name] for name in parameters}, seed)
    return {**trained, **{name: global_weights[name] + change[name] for name in parameters}}


def defense_seed(*keys: int) -> int:
    """A seed for one update's defense, from the run's seed and whose update it is (client, round)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


ORDER_STREAM = 2  # keeps the shuffle's draws apart from the defense's


def order_seed(seed: int, partition_id: int, server_round: int) -> int:
    """The client's private shuffle of its shard in a round (in a simulation derived from the run's seed so
    runs repeat; the server's attack never uses it)."""
    return defense_seed(seed, partition_id, server_round, ORDER_STREAM)
