"""The malicious server's strategy: FedAvg that first inverts the updates it is about to average.

`InvertingFedAvg` is honest-but-curious: the federation trains exactly as with FedAvg, but before
every aggregation the server computes each client's update (the weights it got back minus the global
weights it sent) and hands all of them, with the training settings it configured, to the inversion
engine in one call. It sees only what a Flower server sees; the reconstructions go to a recorder
(the evaluation path, fl_sim/server_app.py), which alone may compare them with the truth.

Every reply is checked first (fl_sim/validation.py): an error reply, no reply, or a reply that would
poison the average is neither attacked nor averaged, and the recorder gets its client and reason.

With `secure_aggregation` (`--defense secagg`) the server learns only the average of the replies, as
Flower's SecAgg+ would hand it to a strategy. SecAgg+ itself is not used: in flwr 1.41 its workflow
needs the legacy strategies and FitRes-shaped replies, not the Message API this project uses. So the
sum is simulated: the checked replies are averaged first, and the attack targets that average as one
victim, the tuple of the clients in it, whose batches hold all their examples.
"""

import re
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from attacker import AttackConfig, Reconstruction, Status, TrainingSettings, invert
from clients.app import LOSS_KEY, PARTITION_KEY
from clients.defenses import aggregate_settings
from clients.training import update_norm, weight_change

from .federation import settings_from_config
from .validation import ExpectedReply, reply_problem

# A client-round left out of the average, and why; the statuses its metrics.jsonl row carries.
REJECTED, CLIENT_ERROR, NO_REPLY = "rejected", "client-error", "no-reply"
REPLY_FAULTS = (REJECTED, CLIENT_ERROR, NO_REPLY)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
CLIENT_APP_MESSAGE = "ClientAppException occurred. Message: "  # flwr.clientapp.client_app.ClientAppException
MAX_REASON_CHARS = 300
Victim = int | tuple[int, ...]  # a client, or the clients in a secure aggregate


@dataclass(frozen=True)
class ReplyFault:
    client: int
    status: str  # one of REPLY_FAULTS
    reason: str


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

    def victims(self, server_round: int, partition_ids: Iterable[int]) -> list[int]:
        if not self.round_attacked(server_round):
            return []
        return sorted(p for p in partition_ids if self.clients is None or p in self.clients)


@dataclass(frozen=True)
class SentRound:
    """What the server sent in a round: all it may compare the replies with."""

    server_round: int
    global_weights: dict[str, torch.Tensor]
    settings: TrainingSettings
    expected: ExpectedReply
    nodes: tuple[int, ...]


class InvertingFedAvg(FedAvg):
    """FedAvg whose server inverts every attacked client's update before aggregating it.

    `partitions` maps each node id to its client (partition) id, as the nodes said when asked
    (server_app.identify_clients): error replies carry nothing else to name their sender.
    `attack=None` makes it plain FedAvg. `replay=False` attacks as if the update were one gradient
    (TrainingSettings.as_single_gradient) instead of replaying the K local steps. `secure_aggregation`
    attacks only the round's average (see the module docstring).
    """

    def __init__(self, model: nn.Module, attack: AttackConfig | None, recorder: RoundRecorder, *,
                 partitions: Mapping[int, int], image_shape: tuple[int, int, int], num_classes: int,
                 iterations: int, seed: int = 0, plan: AttackPlan = AttackPlan(), replay: bool = True,
                 secure_aggregation: bool = False, device: str | torch.device = "auto", progress: bool = False,
                 **fedavg_options):
        super().__init__(**fedavg_options)
        self.model, self.attack, self.recorder, self.plan = model, attack, recorder, plan
        self.secure_aggregation = secure_aggregation
        self.partitions = dict(partitions)
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        self.iterations, self.seed, self.replay = iterations, seed, replay
        self.device, self.progress = device, progress
        self.rounds_done_before = 0  # rounds a resumed run finished before this start()
        self._sent: SentRound | None = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *, first_round: int = 1,
              evaluate_fn=None, **options):
        """Flower's round loop over rounds `first_round`..`num_rounds` (a resumed run skips the ones it has).

        Flower counts its rounds from 1; every hook adds the rounds done before, so clients, the attack
        and `evaluate_fn` see the run's true round numbers (evaluate_fn's 0 stays the initial model).
        """
        self.rounds_done_before = first_round - 1

        def evaluate_in_run_rounds(flower_round: int, arrays: ArrayRecord):
            return evaluate_fn(flower_round + self.rounds_done_before if flower_round else 0, arrays)

        return super().start(grid, initial_arrays, num_rounds=num_rounds - self.rounds_done_before,
                             evaluate_fn=evaluate_fn and evaluate_in_run_rounds, **options)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sends the round as FedAvg does, keeping what it sent to check and attack the replies."""
        server_round += self.rounds_done_before
        settings = settings_from_config(config)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        expected = ExpectedReply.like(arrays, {LOSS_KEY: None, self.weighted_by_key: settings.num_images})
        self._sent = SentRound(server_round, arrays.to_torch_state_dict(), settings, expected,
                               tuple(msg.metadata.dst_node_id for msg in messages))
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.rounds_done_before, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round + self.rounds_done_before, replies)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Attacks and averages the replies that pass the checks; records the others with their reason."""
        server_round += self.rounds_done_before
        sent = self._sent
        if sent is None or sent.server_round != server_round:
            raise RuntimeError(f"replies of round {server_round} arrived, but that round was not configured")
        accepted, faults = self._screen(sent, list(replies))
        if faults:
            for fault in faults:
                log(WARNING, "round %s: client %s left out (%s): %s", server_round, fault.client, fault.status,
                    fault.reason)
            self.recorder.record_faults(server_round, faults)
        if self.secure_aggregation:
            return self._aggregate_securely(sent, accepted)
        victims = self.plan.victims(server_round, accepted) if self.attack else []
        if victims:
            self._attack(sent, victims, [accepted[p].content["arrays"] for p in victims], sent.settings)
        return super().aggregate_train(server_round, list(accepted.values()))

    def _aggregate_securely(self, sent: SentRound,
                            accepted: dict[int, Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's average of the accepted replies, then the attack on it: all the server learns under SecAgg."""
        arrays, metrics = super().aggregate_train(sent.server_round, list(accepted.values()))
        if arrays is not None and self.attack and self.plan.round_attacked(sent.server_round):
            self._attack(sent, [tuple(sorted(accepted))], [arrays], aggregate_settings(sent.settings, len(accepted)))
        return arrays, metrics

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
                faults.append(ReplyFault(client, CLIENT_ERROR, f"error reply: {short_error(reply.error.reason)}"))
                continue
            expected = ExpectedReply(sent.expected.arrays, {**sent.expected.metrics, PARTITION_KEY: client})
            problem = reply_problem(reply.content, expected)
            if problem:
                faults.append(ReplyFault(client, REJECTED, problem))
                continue
            del reply.content["metrics"][PARTITION_KEY]  # aggregate exactly what a real client would have sent
            accepted[client] = reply
        for node in sorted(set(sent.nodes) - answered):
            if node in self.partitions:  # a node that joined after the clients were identified names no client
                faults.append(ReplyFault(self.partitions[node], NO_REPLY, "no reply before the round's timeout"))
        return accepted, sorted(faults, key=lambda fault: fault.client)

    def _attack(self, sent: SentRound, victims: list[Victim], replies: list[ArrayRecord],
                settings: TrainingSettings) -> None:
        updates = [weight_change(sent.global_weights, reply.to_torch_state_dict()) for reply in replies]
        assumed = settings if self.replay else settings.as_single_gradient()
        log(INFO, "attack round %s: inverting %s client(s) %s with %s", sent.server_round, len(victims), victims,
            self.attack.name)
        started = time.perf_counter()
        try:
            results = invert(self.model, sent.global_weights, updates, assumed, self.attack,
                             image_shape=self.image_shape, num_classes=self.num_classes, iterations=self.iterations,
                             seed=round_seed(self.seed, sent.server_round), victim_ids=victims, device=self.device,
                             progress=self.progress)
        except Exception as error:  # a failed attack must not stop the federation: report it per victim
            log(WARNING, "attack round %s failed:\n%s", sent.server_round, traceback.format_exc())
            results = [failed(f"{type(error).__name__}: {error}") for _ in victims]
        names = [name for name, _ in self.model.named_parameters()]
        self.recorder.record_attack(sent.server_round, victims, results, [update_norm(u, names) for u in updates],
                                    time.perf_counter() - started)


def short_error(reason: str) -> str:
    """Flower's error reason in one line: the ClientApp's own message where the simulation wraps it in a
    Ray traceback ("... ClientAppException occurred. Message: <it>'>"), else the whole reason, cut short."""
    text = " ".join(ANSI_ESCAPE.sub("", reason).split())
    _, wrapped, message = text.rpartition(CLIENT_APP_MESSAGE)
    text = message.removesuffix("'>") if wrapped else text
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def round_seed(seed: int, server_round: int) -> int:
    """Each round gets its own restarts' random draws, still fixed by the run's seed."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])


def failed(reason: str, status: Status = Status.FAILED) -> Reconstruction:
    return Reconstruction(torch.empty(0), torch.empty(0, dtype=torch.long), float("nan"), status, reason)
