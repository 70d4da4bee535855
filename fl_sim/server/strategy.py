"""The malicious server as a wrapper of any Flower strategy: `InvertingStrategy(FedAvg(...), attack=...)`.

Like Flower's own DifferentialPrivacyServerSideFixedClipping, it holds the strategy it wraps and passes
every hook through to it; before the wrapped strategy aggregates a round, it checks every reply
(fl_sim/server/validation.py), computes each client's update (the weights it got back minus the global weights
it sent), hands all of them with the training settings the wrapped strategy sent to the inversion engine
in one call, and reports the reconstructions to a recorder (the evaluation path, fl_sim/server/server_app.py),
which alone may compare them with the truth. The wrapped strategy (FedAvg, FedProx, FedAdam, FedYogi,
Krum or a user's own) then aggregates the accepted replies exactly as it would without the wrapper, and
its aggregate is cast back to the dtypes of the model it sent (`in_sent_dtypes`).

A reply that is an error, missing, or would poison the average is neither attacked nor aggregated;
the recorder gets its client and reason.

With `secure_aggregation` (`--defense secagg`) the server learns only the clients' mean update, as
Flower's SecAgg+ would hand it over. SecAgg+ itself is not used (in flwr 1.41 its workflow needs the
legacy strategies, not the Message API), so the sum is simulated: the attack targets the mean of the
accepted updates as one victim holding all their clients' examples.

A malicious server (`ServerAttack.active`, fl_sim/server/active.py: --attack imprint|trap) sends its targets
(--attack-clients, in the attacked rounds) armed weights in place of the global ones and everyone else
the honest model; a target's update is taken against what it was sent, read by the analytic attack, and
only what `active.aggregated` keeps of its reply enters the average.

With `background` (`--attack-async`, fl_sim/server/background.py) a passive attack does not block the round:
`aggregate_train` screens the replies and computes the updates as always, then hands what the recorder is
to hear of the round (its left-out replies, then the inversion) to the background queue as one job and
returns the aggregate at once; the same code records the same rows, later. An active attack is part of the
round (it arms what is sent and decides what enters the average), so it cannot run in the background.
"""
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from logging import INFO, WARNING
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy
from torch import nn

from attacker import AttackConfig, Reconstruction, Status, invert
from fl_sim.contract.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    TRAIN_LOSS,
    TrainingSettings,
    TrainMode,
)
from fl_sim.contract.records import ReplyStatus
from fl_sim.contract.run_config import ACTIVE_ATTACKS, RunConfig, StrategyName
from fl_sim.learning.updates import mean_update, parameter_names, update_norm, weight_change
from fl_sim.server.background import AttackQueue
from fl_sim.server.validation import ExpectedReply, reply_problem

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
CLIENT_APP_MESSAGE = "ClientAppException occurred. Message: "  # flwr.clientapp.client_app.ClientAppException
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class ReplyFault:
    client: int
    status: ReplyStatus
    reason: str


@dataclass(frozen=True)
class Victim:
    """Whose update is attacked: one client, or the clients whose sum secure aggregation revealed."""

    clients: tuple[int, ...]
    secure_aggregate: bool = False

    @property
    def seed_key(self) -> int | tuple[int, ...]:
        """What names the victim to the engine's per-victim seeding."""
        return self.clients if self.secure_aggregate else self.clients[0]


class RoundRecorder(Protocol):
    """Where the strategy reports each round: the replies it left out, then the reconstructions."""

    def record_faults(self, server_round: int, faults: list[ReplyFault]) -> None: ...

    def record_attack(self, server_round: int, victims: list[Victim], results: list[Reconstruction],
                      update_norms: list[float], seconds: float) -> None: ...


@dataclass(frozen=True)
class AttackPlan:
    """Which rounds and clients are attacked: every `every`-th round from round 1, `clients` (None: all)."""

    every: int = 1
    clients: frozenset[int] | None = None

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"attack every must be at least 1, got {self.every}")

    def round_attacked(self, server_round: int) -> bool:
        return (server_round - 1) % self.every == 0

    def victims(self, server_round: int, partition_ids: Iterable[int]) -> list[Victim]:
        if not self.round_attacked(server_round):
            return []
        return [Victim((p,)) for p in sorted(partition_ids) if self.clients is None or p in self.clients]


@dataclass(frozen=True)
class ServerAttack:
    """What the server attacks with: the architecture it sent, the attack and its budget, where it runs.

    `replay=False` attacks as if the update were one gradient (TrainingSettings.as_single_gradient)
    instead of replaying the client's local steps. An update of more than `max_images` images (in epochs
    mode: a client whose shard is larger) is not attacked: its row says so.
    """

    model: nn.Module
    attack: AttackConfig | None  # None for an active attack
    image_shape: tuple[int, int, int]
    num_classes: int
    iterations: int
    seed: int = 0
    plan: AttackPlan = AttackPlan()
    replay: bool = True
    device: str | torch.device = "auto"
    progress: bool = False
    max_images: int = 64
    active: object | None = None  # fl_sim.server.active.ActiveAttack: arms the targets' weights, reads their updates

    @property
    def name(self) -> str:
        return self.active.name if self.active else self.attack.name


@dataclass(frozen=True)
class SentRound:
    """What the server sent in a round: all it may compare the replies with."""

    server_round: int
    global_weights: dict[str, torch.Tensor]
    settings: TrainingSettings
    expected: ExpectedReply
    nodes: tuple[int, ...]
    armed: dict[str, torch.Tensor] | None = None  # what an active attack sent its targets instead
    readout: object | None = None
    targets: frozenset[int] = frozenset()  # the clients (partition ids) sent `armed`


class InvertingStrategy(Strategy):
    """`strategy`, whose server inverts the attacked clients' updates before `strategy` aggregates them.

    `partitions` maps each node id to its client (partition) id, as the nodes said when asked
    (server_app.identify_clients): error replies carry nothing else to name their sender.
    `attack=None` leaves only the reply checks. See the module docstring for `secure_aggregation` and
    `background`.
    """

    def __init__(self, strategy: Strategy, attack: ServerAttack | None, recorder: RoundRecorder, *,
                 partitions: Mapping[int, int], secure_aggregation: bool = False, max_shard: int = 10**6,
                 background: AttackQueue | None = None):
        """`max_shard`: the most examples a client may say it trained on in epochs mode (its shard's size).
        `background`: where a round's recording and passive attack run, instead of before the aggregate."""
        if background is not None and attack is not None and attack.active is not None:
            raise ValueError(f"the active attack {attack.name} arms the weights it sends and decides what enters "
                             "the average: it cannot run in the background")
        self.strategy, self.attack, self.recorder, self.background = strategy, attack, recorder, background
        self.partitions, self.secure_aggregation, self.max_shard = dict(partitions), secure_aggregation, max_shard
        self.weighted_by_key = getattr(strategy, "weighted_by_key", NUM_EXAMPLES)
        self._sent: SentRound | None = None

    def summary(self) -> None:
        log(INFO, "\t├── InvertingStrategy: %s, secure aggregation %s, around:",
            self.attack.name if self.attack else "no attack", self.secure_aggregation)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sends the round as the wrapped strategy does, keeping what it sent to check and attack the replies."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sent_config = messages[0].content[CONFIG] if messages else config  # with what the strategy added (FedProx)
        settings = TrainingSettings.from_config(sent_config)
        count = range(1, self.max_shard + 1) if settings.mode == TrainMode.EPOCHS else settings.num_images
        expected = ExpectedReply.like(arrays, {TRAIN_LOSS: None, self.weighted_by_key: count})
        global_weights = arrays.to_torch_state_dict()
        armed = readout = None
        targets = frozenset()
        if self.attack and self.attack.active and self.attack.plan.round_attacked(server_round):
            design = settings.for_shard(self.attack.max_images)  # epochs mode: the largest shard it will read
            armed, readout = self.attack.active.arm(global_weights, design.for_mean_of(len(messages))
                                                    if self.secure_aggregation else design)
            chosen = self.attack.plan.clients
            targets = frozenset(p for node, p in self.partitions.items() if chosen is None or p in chosen)
            messages = [with_arrays(msg, ArrayRecord(armed)) if self.partitions.get(msg.metadata.dst_node_id) in targets
                        else msg for msg in messages]
        self._sent = SentRound(server_round, global_weights, settings, expected,
                               tuple(msg.metadata.dst_node_id for msg in messages), armed, readout, targets)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Attacks the replies that pass the checks, records the others, then lets the strategy aggregate."""
        sent = self._sent
        if sent is None or sent.server_round != server_round:
            raise RuntimeError(f"replies of round {server_round} arrived, but that round was not configured")
        accepted, faults = self._screen(sent, list(replies))
        work: list[Callable[[], None]] = []  # what the recorder is to hear of the round, in order
        if faults:
            for fault in faults:
                log(WARNING, "round %s: client %s left out (%s): %s", server_round, fault.client, fault.status,
                    fault.reason)
            work.append(partial(self.recorder.record_faults, server_round, faults))
        if sent.armed is not None:
            run_all(work)  # an active attack is part of the round: never in the background
            work = []
            self._attack_active(sent, accepted)
        elif self.attack and accepted and self.attack.plan.round_attacked(server_round):
            updates = {client: weight_change(sent.global_weights, reply.content[ARRAYS].to_torch_state_dict())
                       for client, reply in accepted.items()}
            if self.secure_aggregation:
                victim = Victim(tuple(sorted(updates)), secure_aggregate=True)
                settings = None if sent.settings.mode == TrainMode.EPOCHS else sent.settings.for_mean_of(len(updates))
                work.append(partial(self._attack, sent, [victim], [mean_update(list(updates.values()))], [settings]))
            else:
                victims = self.attack.plan.victims(server_round, accepted)
                settings = [sent.settings.for_shard(accepted[v.clients[0]].content[METRICS][self.weighted_by_key])
                            for v in victims]
                if victims:
                    work.append(partial(self._attack, sent, victims, [updates[victim.clients[0]] for victim in victims],
                                        settings))
        if work and self.background is not None:
            self.background.submit(server_round, partial(run_all, work))
        else:
            run_all(work)
        arrays, metrics = self.strategy.aggregate_train(server_round, list(accepted.values()))
        return (arrays if arrays is None else in_sent_dtypes(arrays, sent.global_weights)), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def _screen(self, sent: SentRound, replies: list[Message]) -> tuple[dict[int, Message], list[ReplyFault]]:
        """The usable replies by client, and a fault for every client whose reply is unusable or missing."""
        accepted, faults, answered = {}, [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            client = self.partitions.get(node)
            if client is None or node not in sent.nodes or node in answered:
                log(WARNING, "round %s: ignored an unasked-for reply from node %s", sent.server_round, node)
                continue
            answered.add(node)
            if reply.has_error():
                faults.append(ReplyFault(client, ReplyStatus.CLIENT_ERROR,
                                         f"error reply: {short_error(reply.error.reason)}"))
                continue
            expected = ExpectedReply(sent.expected.arrays, {**sent.expected.metrics, PARTITION_ID: client})
            problem = reply_problem(reply.content, expected)
            if problem:
                faults.append(ReplyFault(client, ReplyStatus.REJECTED, problem))
                continue
            del reply.content[METRICS][PARTITION_ID]  # aggregate exactly what a real client would have sent
            accepted[client] = reply
        for node in sorted(set(sent.nodes) - answered):
            if node in self.partitions:  # a node that joined after the clients were identified names no client
                faults.append(ReplyFault(self.partitions[node], ReplyStatus.NO_REPLY,
                                         "no reply before the round's timeout"))
        return accepted, sorted(faults, key=lambda fault: fault.client)

    def _attack_active(self, sent: SentRound, accepted: dict[int, Message]) -> None:
        """Reads the targets' updates (against the armed weights they got), then keeps of each reply only
        what the active attack lets into the average; a target it keeps nothing of is left out."""
        active, names = self.attack.active, parameter_names(self.attack.model)
        replies = {client: accepted[client].content[ARRAYS].to_torch_state_dict()
                   for client in sorted(accepted) if client in sent.targets}
        updates = {client: weight_change(sent.armed, reply) for client, reply in replies.items()}
        if updates:
            if self.secure_aggregation:
                victims = [Victim(tuple(sorted(updates)), secure_aggregate=True)]
                observed, settings = [mean_update(list(updates.values()))], [sent.settings.for_mean_of(len(updates))]
            else:  # each target's own count of images: its shard in epochs mode
                victims = [Victim((client,)) for client in updates]
                observed = [updates[v.clients[0]] for v in victims]
                settings = [sent.settings.for_shard(accepted[v.clients[0]].content[METRICS][self.weighted_by_key])
                            for v in victims]
            started = time.perf_counter()
            cap = self.attack.max_images
            try:  # the rows were armed for at most `cap` images: a larger update is not read (as for passive attacks)
                results = [too_many_images(each.num_images, cap) if each.num_images > cap else
                           active.recover(sent.readout, [update], each, sent.armed, self.attack.num_classes)[0]
                           for each, update in zip(settings, observed)]
            except Exception as error:  # a failed attack must not stop the federation
                log(WARNING, "attack round %s failed:\n%s", sent.server_round, traceback.format_exc())
                results = [Reconstruction.failure(Status.FAILED, f"{type(error).__name__}: {error}") for _ in victims]
            self.recorder.record_attack(sent.server_round, victims, results, [update_norm(u, names) for u in observed],
                                        time.perf_counter() - started)
        for client, reply in replies.items():
            kept = active.aggregated(reply, sent.global_weights)
            if kept is None:
                del accepted[client]
            else:
                accepted[client].content[ARRAYS] = ArrayRecord(kept)

    def _attack(self, sent: SentRound, victims: list[Victim], updates: list[dict[str, torch.Tensor]],
                settings: list[TrainingSettings | None]) -> None:
        """Inverts every update whose training the server can replay, in one engine call per distinct training
        (epochs-mode clients differ in shard size); the others get a row that says why they were not attacked."""
        attack = self.attack
        log(INFO, "attack round %s: inverting %s update(s) with %s", sent.server_round, len(victims), attack.name)
        started = time.perf_counter()
        results: list[Reconstruction | None] = [None] * len(victims)
        groups: dict[TrainingSettings, list[int]] = {}
        for index, assumed in enumerate(settings):
            if assumed is None:
                results[index] = Reconstruction.failure(
                    Status.SKIPPED, "secure aggregation of epochs-mode updates: their mean has no one training to replay")
            elif assumed.num_images > attack.max_images:
                results[index] = too_many_images(assumed.num_images, attack.max_images)
            else:
                groups.setdefault(assumed if attack.replay else assumed.as_single_gradient(), []).append(index)
        for assumed, members in groups.items():
            try:
                found = invert(attack.model, sent.global_weights, [updates[i] for i in members], assumed,
                               attack.attack, image_shape=attack.image_shape, num_classes=attack.num_classes,
                               iterations=attack.iterations, seed=round_seed(attack.seed, sent.server_round),
                               victim_ids=[victims[i].seed_key for i in members], device=attack.device,
                               progress=attack.progress)
            except Exception as error:  # a failed attack must not stop the federation: report it per victim
                log(WARNING, "attack round %s failed:\n%s", sent.server_round, traceback.format_exc())
                found = [Reconstruction.failure(Status.FAILED, f"{type(error).__name__}: {error}") for _ in members]
            for index, result in zip(members, found):
                results[index] = result
        names = parameter_names(attack.model)
        self.recorder.record_attack(sent.server_round, victims, results, [update_norm(u, names) for u in updates],
                                    time.perf_counter() - started)


class RoundOffset(Strategy):
    """Runs `strategy` for rounds `done + 1 ..`: a resumed run goes on with the run's own round numbers.

    Flower's `Strategy.start` counts its rounds from 1; this wrapper adds the rounds done before to the
    round number of every hook and of `evaluate_fn` (whose round 0 stays the initial model), so clients,
    the attack and the records see the run's true rounds. A server-side optimiser (FedAdam, FedYogi)
    starts its moments afresh on resume.
    """

    def __init__(self, strategy: Strategy, done: int):
        self.strategy, self.done = strategy, done

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *, evaluate_fn=None, **options):
        def evaluate_in_run_rounds(flower_round: int, arrays: ArrayRecord):
            return evaluate_fn(flower_round + self.done if flower_round else 0, arrays)

        return super().start(grid, initial_arrays, num_rounds=num_rounds - self.done,
                             evaluate_fn=evaluate_fn and evaluate_in_run_rounds, **options)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid):
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round + self.done, replies)


def flower_strategy(config: RunConfig) -> Strategy:
    """The Flower strategy a run names: it waits for all `num_clients` clients, then samples `fraction_train`
    of them for each round (Flower's own sampling)."""
    options = dict(fraction_train=config.fraction_train, min_train_nodes=1, min_available_nodes=config.num_clients,
                   fraction_evaluate=1.0 if config.client_eval else 0.0, min_evaluate_nodes=config.num_clients)
    if config.strategy == StrategyName.FEDPROX:
        return FedProx(proximal_mu=config.proximal_mu, **options)
    if config.strategy == StrategyName.FEDADAM:
        return FedAdam(eta=config.server_lr, **options)
    if config.strategy == StrategyName.FEDYOGI:
        return FedYogi(eta=config.server_lr, **options)
    return FedAvg(**options)


def in_sent_dtypes(arrays: ArrayRecord, sent: dict[str, torch.Tensor]) -> ArrayRecord:
    """The aggregate in the dtypes of the model that was sent: Flower's aggregation returns float64 for
    integer buffers (FedAvg's weighted mean of `num_batches_tracked`) and for everything under FedAdam or
    FedYogi, which every client's float32 reply would then contradict. Integers are rounded back."""
    weights = arrays.to_torch_state_dict()
    for name, tensor in weights.items():
        dtype = sent[name].dtype
        if tensor.dtype != dtype:
            weights[name] = (tensor if dtype.is_floating_point else tensor.round()).to(dtype)
    return ArrayRecord(weights)


def too_many_images(count: int, cap: int) -> Reconstruction:
    """The row of an update that is not attacked because more images are behind it than the server reads."""
    return Reconstruction.failure(Status.SKIPPED, f"{count} images behind the update, more than "
                                                  f"--max-attack-images {cap}")


def short_error(reason: str) -> str:
    """Flower's error reason in one line: the ClientApp's own message where the simulation wraps it in a
    Ray traceback ("... ClientAppException occurred. Message: <it>'>"), else the whole reason, cut short."""
    text = " ".join(ANSI_ESCAPE.sub("", reason).split())
    _, wrapped, message = text.rpartition(CLIENT_APP_MESSAGE)
    text = message.removesuffix("'>") if wrapped else text
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def run_all(steps: list[Callable[[], None]]) -> None:
    for step in steps:
        step()


def round_seed(seed: int, server_round: int) -> int:
    """Each round gets its own restarts' random draws, still fixed by the run's seed."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])


def with_arrays(message: Message, arrays: ArrayRecord) -> Message:
    """`message` with other arrays: a new content record, as Flower's strategies share one across messages."""
    content = RecordDict({key: value for key, value in message.content.items()})
    content[ARRAYS] = arrays
    return Message(content=content, message_type=message.metadata.message_type,
                   dst_node_id=message.metadata.dst_node_id, group_id=message.metadata.group_id)


def attack_config(args):
    """The attack preset `args.attack` (flags or a RunConfig) with its `--restarts`."""
    from attacker import get_attack  # imported late: torch is slow to import, and only an attack needs it

    if args.attack in ACTIVE_ATTACKS:  # analytic: no optimisation preset (fl_sim/server/active.py)
        return None
    return get_attack(args.attack, restarts=args.restarts, bn_statistics=args.bn_statistics,
                      tv_weight=args.tv_weight)
