"""The one interface every attack of the malicious server implements, and the one round of an attack.

An `Attack` answers three questions, whatever kind it is:

- what it sends each targeted client (`arm`): nothing of its own (a passive attack: everyone gets the
  global model), or per-client weights, possibly different for each client, which may presuppose an
  architecture the clients build (the imprint block: `AttackSpec.needs_imprint`);
- how it reads the updates it gets into `Reconstruction`s (`read`): one client's update, or an aggregate of
  many (secure aggregation reveals only their mean);
- how its targets' replies enter the average (`aggregated`): unchanged, in part, or not at all.

Which attacks exist, and what the rest of the program must know of each before torch is imported, is the
registry in fl_sim/contract/attacks.py; `build_attack` imports the class an entry names and builds it from an
`AttackContext`. `arm_round` and `attack_round` are the round itself, shared by the Flower strategy
(fl_sim/server/strategy.py) and `fl-sim attack` (fl_sim/commands/attack.py), so both run the same code.
"""
import copy
import importlib
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from typing import Self

import torch
from flwr.common import log
from torch import nn

from attacker import Reconstruction, Status
from attacker.analytic import Readout
from fl_sim.contract.attacks import attack_spec
from fl_sim.contract.protocol import TrainingSettings, TrainMode
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.updates import Weights, mean_update, update_norm

SettingValue = int | float | None


@dataclass(frozen=True)
class Victim:
    """Whose update is attacked: one client, or the clients whose sum secure aggregation revealed."""

    clients: tuple[int, ...]
    secure_aggregate: bool = False

    @property
    def seed_key(self) -> int | tuple[int, ...]:
        """What names the victim to the engine's per-victim seeding."""
        return self.clients if self.secure_aggregate else self.clients[0]


@dataclass(frozen=True)
class Armed:
    """What an attack sends this round instead of the global model: each target's weights (by client), which
    may differ per client, and the readout that recovers the images from the updates (analytic attacks).
    `narrow`: tensors sent in a narrower dtype (name -> dtype) that holds their values exactly (the attack rounded
    them to it), so they travel in fewer bytes; the client trains them in its model's dtype and the server reads
    against the same values. `distinct_rows`: 2-D tensors that are a few distinct rows repeated, which travel to
    fl-sim's ClientApp as those rows and each row's index (fl_sim/learning/transport.py), a transport encoding:
    the ClientApp expands them before anything reads the model, so the client holds the full tensor."""

    weights: Mapping[int, Weights]
    readout: Readout | None = None
    narrow: Mapping[str, torch.dtype] = field(default_factory=dict)
    distinct_rows: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Observed:
    """One victim's update as the server has it: the change against `sent` (the weights its clients were
    sent; for a secure aggregate, their mean), after the training `settings` (for a secure aggregate: every
    step on all its clients' batches)."""

    victim: Victim
    update: Weights
    sent: Weights
    settings: TrainingSettings


@dataclass(frozen=True)
class AttackContext:
    """What an attack is built from: the run's settings and what the server itself has, never client data.

    `model` is the architecture the server sends, the attack's own copy (it may load weights into it);
    `public()` gives the server's own images (its test split), loaded when an attack first asks.
    `victims_at_once`: a cap on victims the engine optimises together (fl-sim attack's flag; None: all).
    """

    name: str
    config: RunConfig
    model: nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    public: Callable[[], torch.Tensor]
    progress: bool = False
    victims_at_once: int | None = None


class Attack(ABC):
    """An attack of the malicious server (see the module docstring); registered in fl_sim/contract/attacks.py."""

    name: str

    @classmethod
    @abstractmethod
    def build(cls, context: AttackContext) -> Self:
        """The attack a run configures (`context.config`), on the server's model and data."""

    def arm(self, global_weights: Weights, settings: TrainingSettings, targets: Sequence[int]) -> Armed | None:
        """What each of `targets` (client ids) is sent this round, designed for `settings` (the most images an
        update may hold); None: the global model, to everyone (a passive attack, the default)."""
        return None

    @abstractmethod
    def read(self, observed: Sequence[Observed], armed: Armed | None, seed: int) -> list[Reconstruction]:
        """One reconstruction per observed update. All of `observed` share their training settings and the
        weights they were taken against; `armed` is what `arm` returned this round; `seed` fixes the draws."""

    def aggregated(self, reply: Weights, sent: Weights, global_weights: Weights) -> Weights | None:
        """What of a target's reply (it was sent `sent`) enters the average; None: nothing. By default all of it."""
        return reply

    def resolved(self) -> dict[str, SettingValue]:
        """The attack's own parameters as it resolved them (fl-sim attack's summary records them)."""
        return {}


def build_attack(context: AttackContext) -> Attack:
    """The registered attack `context.name`: its class imported (only now) and built."""
    spec = attack_spec(context.name)
    module, _, qualified = spec.factory.partition(":")
    found: object = importlib.import_module(module)
    for part in qualified.split("."):
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, Attack)):
        raise TypeError(f"attack {spec.name!r}: {spec.factory} is not a subclass of fl_sim.server.attacks.Attack")
    return found.build(context)


def attack_context(config: RunConfig, model: nn.Module, image_shape: tuple[int, int, int], num_classes: int,
                   device: torch.device, public: Callable[[], torch.Tensor], *, progress: bool = False,
                   victims_at_once: int | None = None) -> AttackContext:
    """The context of `config.attack`, with its own copy of the model and public images loaded once, if asked."""
    cache: list[torch.Tensor] = []

    def public_once() -> torch.Tensor:
        if not cache:
            cache.append(public())
        return cache[0]

    return AttackContext(config.attack, config, copy.deepcopy(model), image_shape, num_classes, device, public_once,
                         progress, victims_at_once)


def arm_round(attack: Attack, global_weights: Weights, design: TrainingSettings, clients: int,
              targets: Collection[int], secure_aggregation: bool) -> Armed | None:
    """What the round's `targets` are sent: the attack's arming for updates of `design`'s images, or, under
    secure aggregation, for the mean of `clients` such updates (every image of the round behind one update),
    unless the attack reads each client apart even then (`AttackSpec.reads_each_client`)."""
    whole = secure_aggregation and not attack_spec(attack.name).reads_each_client
    return attack.arm(global_weights, design.for_mean_of(clients) if whole else design, sorted(targets))


@dataclass(frozen=True)
class AttackedRound:
    """The attack of one round: the victims, their reconstructions and update norms, and its wall time."""

    victims: list[Victim]
    results: list[Reconstruction]
    update_norms: list[float]
    seconds: float


def attack_round(attack: Attack, updates: Mapping[int, Weights], sent: Mapping[int, Weights],
                 counts: Mapping[int, int], settings: TrainingSettings, *, armed: Armed | None,
                 secure_aggregation: bool, max_images: int | None, seed: int, parameters: Sequence[str],
                 label: str = "attack", revealed: tuple[Weights, Weights] | None = None) -> AttackedRound:
    """Reads one round's updates (client -> its update against `sent[client]`, what it was sent).

    The victims are the clients, or with `secure_aggregation` one victim, their mean update, holding all their
    examples. Each client trained on `counts[client]` examples (epochs mode: its shard). An update of more than
    `max_images` images (None: no cap) is not read, nor, by an attack that replays the training, a secure aggregate
    of epochs-mode updates (no one training to replay); their rows say so. Victims that share their training and
    sent weights are read in one `attack.read` call; one that raises fails only its own victims (a failed attack
    must not stop the federation).

    `revealed`: (update, sent) of the secure aggregate that Flower's SecAgg+ revealed (fl_sim/server/secagg.py):
    its weighted mean of the replies against the same mean of what they were sent; `updates` is then empty and
    `counts` names the clients behind it. Without it, a secure aggregate is the plain mean of `updates` (the
    emulation, --defense secagg-emulated, and fl-sim attack).
    """
    started = time.perf_counter()
    clients = sorted(counts) if revealed is not None else sorted(updates)
    observed: list[tuple[Victim, Weights, Weights, TrainingSettings | None]]
    if secure_aggregation:
        if revealed is not None:
            mean, mean_sent = revealed
        else:
            mean_sent = sent[clients[0]] if all(sent[c] is sent[clients[0]] for c in clients) else \
                mean_update(sent[c] for c in clients)
            mean = mean_update(updates[c] for c in clients)
        assumed: TrainingSettings | None
        if settings.mode != TrainMode.EPOCHS:
            assumed = settings.for_mean_of(len(clients))
        else:  # nothing to replay; an analytic readout reads the sum of every client's epochs as it is
            replays = attack_spec(attack.name).preset is not None
            assumed = None if replays else settings.for_shard(sum(counts[c] for c in clients))
        observed = [(Victim(tuple(clients), secure_aggregate=True), mean, mean_sent, assumed)]
    else:  # each client's own count of images: its shard in epochs mode
        observed = [(Victim((c,)), updates[c], sent[c], settings.for_shard(counts[c])) for c in clients]
    results: list[Reconstruction | None] = [None] * len(observed)
    # an attack that reads each client of a secure aggregate apart is capped by one client's images
    per_update = len(clients) if secure_aggregation and attack_spec(attack.name).reads_each_client else 1
    groups: dict[tuple[TrainingSettings, int], list[int]] = {}
    for index, (_, _, weights, assumed) in enumerate(observed):
        if assumed is None:
            results[index] = Reconstruction.failure(
                Status.SKIPPED, "secure aggregation of epochs-mode updates: their mean has no one training to replay")
        elif max_images is not None and assumed.num_images // per_update > max_images:
            results[index] = too_many_images(assumed.num_images // per_update, max_images)
        else:
            groups.setdefault((assumed, id(weights)), []).append(index)
    for (assumed, _), members in groups.items():
        group = [Observed(observed[i][0], observed[i][1], observed[i][2], assumed) for i in members]
        try:
            found = attack.read(group, armed, seed)
            if len(found) != len(group):
                raise RuntimeError(f"{attack.name} read {len(group)} update(s) into {len(found)} reconstruction(s)")
        except Exception as error:  # reported per victim, in its row
            log(WARNING, "%s failed:\n%s", label, traceback.format_exc())
            found = [Reconstruction.failure(Status.FAILED, f"{type(error).__name__}: {error}") for _ in members]
        for index, result in zip(members, found, strict=True):
            results[index] = result
    read = [result for result in results if result is not None]
    assert len(read) == len(observed), "every victim has its row"
    return AttackedRound([victim for victim, _, _, _ in observed], read,
                         [update_norm(update, parameters) for _, update, _, _ in observed],
                         time.perf_counter() - started)


def too_many_images(count: int, cap: int) -> Reconstruction:
    """The row of an update that is not attacked because more images are behind it than the server reads."""
    return Reconstruction.failure(Status.SKIPPED, f"{count} images behind the update, more than "
                                                  f"--max-attack-images {cap}")
