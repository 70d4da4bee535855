"""Defenses against the curious server: what a client does to its weight change before sending it.

`--defense SPEC` (run config `defense`) names steps joined by `+`, applied in the order written:

    none        send the update as trained
    noise:SIGMA add Gaussian noise N(0, SIGMA^2) to every entry of the change
    clip:C      scale the whole change down to L2 norm C when it is longer (flat clipping)
    prune:P     zero the fraction P of each tensor's smallest-magnitude entries (DLG's gradient pruning)
    fp16        round the change to half precision (what a client sending float16 updates reveals)
    secagg      secure aggregation: the server learns only the sum of the clients' updates

`clip:C+noise:SIGMA` is the mechanism of Flower's LocalDpMod (clip the update, then add noise); it is
computed here in torch, seeded, and on the parameters only: LocalDpMod draws from numpy's global,
unseeded generator (a sweep could not be repeated), also noises BatchNorm statistics and integer
buffers, and runs only inside a Flower message chain, which `fl-sim attack` does not have.

The client applies its steps to the change of its parameters (new - global) and sends global + the
defended change; buffers (BatchNorm statistics) go as trained. `secagg` is no client step: the
server (fl_sim/strategy.py) and `fl-sim attack` then see only the clients' mean update (the sum that
secure aggregation reveals, over the known count), which the attack treats as one client whose
batches hold every client's examples (`aggregate_settings`).
"""
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from attacker.settings import TrainingSettings

from .training import update_norm

Change = dict[str, torch.Tensor]
SECURE_AGGREGATION = "secagg"
NO_DEFENSE = "none"


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


def half_precision(change: Change, value: None, generator: torch.Generator) -> Change:
    return {name: tensor.half().to(tensor.dtype) for name, tensor in change.items()}


def _positive(value: float) -> bool:
    return 0 < value < math.inf


# kind -> (function, what its number means, the check it must pass); None: the kind takes no number.
STEPS = {
    "noise": (add_noise, "SIGMA, a positive number", _positive),
    "clip": (clip, "C, a positive number", _positive),
    "prune": (prune, "P, a fraction in [0, 1) (1 would send no update)", lambda value: 0 <= value < 1),
    "fp16": (half_precision, None, None),
}
KINDS = (NO_DEFENSE, "noise:SIGMA", "clip:C", "prune:P", "fp16", SECURE_AGGREGATION)


@dataclass(frozen=True)
class Defense:
    """A parsed --defense: the client's steps in order, and whether the server sees only the sum."""

    steps: tuple[tuple[str, float | None], ...] = ()
    secure_aggregation: bool = False

    def defend(self, change: Change, seed: int) -> Change:
        """The change as the client's steps leave it; `seed` fixes the noise."""
        generator = torch.Generator().manual_seed(seed)
        for kind, value in self.steps:
            change = STEPS[kind][0](change, value, generator)
        return change

    def sent_weights(self, global_weights: Change, trained: Change, parameters: list[str], seed: int) -> Change:
        """What the client sends: global + the defended change of each parameter, buffers as trained.

        Without client steps the trained weights go as they are (global + change would round them).
        """
        if not self.steps:
            return trained
        change = self.defend({name: trained[name] - global_weights[name] for name in parameters}, seed)
        return {**trained, **{name: global_weights[name] + change[name] for name in parameters}}


def parse_defense(text: str) -> Defense:
    """'clip:4+noise:0.01' -> Defense; for anything else a ValueError says what is wrong, in one sentence."""
    if text.strip() == NO_DEFENSE:
        return Defense()
    steps, secure = [], False
    for part in text.split("+"):
        kind, colon, number = part.strip().partition(":")
        if kind == SECURE_AGGREGATION:
            if colon or secure:
                raise ValueError(f"--defense {text!r}: secagg takes no number and comes once")
            secure = True
            continue
        if kind not in STEPS:
            raise ValueError(f"--defense {text!r}: {part.strip()!r} is not a defense; write steps joined by '+', "
                              f"each one of {', '.join(KINDS)} (none alone)")
        _, meaning, valid = STEPS[kind]
        if meaning is None:
            if colon:
                raise ValueError(f"--defense {text!r}: {kind} takes no number")
            steps.append((kind, None))
            continue
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not valid(value):
            raise ValueError(f"--defense {text!r}: {kind} needs {meaning}, got {number!r}")
        steps.append((kind, value))
    return Defense(tuple(steps), secure)


def defense_seed(*keys: int) -> int:
    """A seed for one update's defense, from the run's seed and whose update it is (client, round)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def aggregate_settings(settings: TrainingSettings, clients: int) -> TrainingSettings:
    """The training behind a mean of `clients` updates, as the attack sees it: each step on all their batches.

    Exact for one local step (the mean of the clients' gradients is the gradient of their union); with
    more steps it ignores that each client's model moved on its own.
    """
    return replace(settings, batch_size=settings.batch_size * clients)
