"""The malicious server's strategy: FedAvg that first inverts the updates it is about to average.

`InvertingFedAvg` is honest-but-curious: the federation trains exactly as with FedAvg, but before
every aggregation the server computes each client's update (the weights it got back minus the global
weights it sent) and hands all of them, with the training settings it configured, to the inversion
engine in one call. It sees only what a Flower server sees; the reconstructions go to a callback
(the evaluation path, fl_sim/server_app.py), which alone may compare them with the truth.
"""
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from attacker import AttackConfig, Reconstruction, TrainingSettings, invert
from clients.app import PARTITION_KEY
from clients.training import weight_change

from .federation import settings_from_config

# (round, victims' partition ids, their reconstructions, seconds of the one engine call)
ReconstructionSink = Callable[[int, list[int], list[Reconstruction], float], None]


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


class InvertingFedAvg(FedAvg):
    """FedAvg whose server inverts every attacked client's update before aggregating it.

    `attack=None` makes it plain FedAvg. `replay=False` attacks as if the update were one gradient
    (TrainingSettings.as_single_gradient) instead of replaying the K local steps.
    """

    def __init__(self, model: nn.Module, attack: AttackConfig | None, sink: ReconstructionSink, *,
                 image_shape: tuple[int, int, int], num_classes: int, iterations: int, seed: int = 0,
                 plan: AttackPlan = AttackPlan(), replay: bool = True, device: str | torch.device = "auto",
                 progress: bool = False, **fedavg_options):
        super().__init__(**fedavg_options)
        self.model, self.attack, self.sink, self.plan = model, attack, sink, plan
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        self.iterations, self.seed, self.replay = iterations, seed, replay
        self.device, self.progress = device, progress
        self._sent: tuple[int, dict[str, torch.Tensor], TrainingSettings] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sends the round as FedAvg does, keeping the global weights and settings it sends."""
        settings = settings_from_config(config)
        self._sent = (server_round, arrays.to_torch_state_dict(), settings)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        received = {}
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content["metrics"]
            if PARTITION_KEY not in metrics:
                raise ValueError(f"a reply from node {reply.metadata.src_node_id} has no {PARTITION_KEY!r}: "
                                 "this strategy runs with clients.app's ClientApp")
            partition_id = int(metrics[PARTITION_KEY])
            del metrics[PARTITION_KEY]  # aggregate exactly what a real client would have sent
            received[partition_id] = reply.content["arrays"]
        victims = self.plan.victims(server_round, received) if self.attack else []
        if victims:
            self._attack(server_round, victims, [received[p] for p in victims])
        return super().aggregate_train(server_round, replies)

    def _attack(self, server_round: int, victims: list[int], replies: list[ArrayRecord]) -> None:
        sent_round, global_weights, settings = self._sent
        if sent_round != server_round:
            raise RuntimeError(f"replies of round {server_round} arrived, but round {sent_round} was configured")
        updates = [weight_change(global_weights, reply.to_torch_state_dict()) for reply in replies]
        assumed = settings if self.replay else settings.as_single_gradient()
        log(INFO, "attack round %s: inverting %s client(s) %s with %s", server_round, len(victims), victims,
            self.attack.name)
        started = time.perf_counter()
        try:
            results = invert(self.model, global_weights, updates, assumed, self.attack, image_shape=self.image_shape,
                             num_classes=self.num_classes, iterations=self.iterations,
                             seed=round_seed(self.seed, server_round), victim_ids=victims, device=self.device,
                             progress=self.progress)
        except Exception as error:  # a failed attack must not stop the federation: report it per victim
            log(WARNING, "attack round %s failed:\n%s", server_round, traceback.format_exc())
            results = [failed(f"error: {type(error).__name__}: {error}") for _ in victims]
        self.sink(server_round, victims, results, time.perf_counter() - started)


def round_seed(seed: int, server_round: int) -> int:
    """Each round gets its own restarts' random draws, still fixed by the run's seed."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])


def failed(status: str) -> Reconstruction:
    return Reconstruction(torch.empty(0), torch.empty(0, dtype=torch.long), float("nan"), status)
