"""`fl_sim.malicious` on Flower's legacy path, the one SecAgg+ runs on in flwr 1.41: a user's ServerApp that builds a
`LegacyContext` around a legacy strategy (flwr.server.strategy.FedAvg, ...) and runs
`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`, as Flower's secure-aggregation example does.

`LegacyAuditStrategy` wraps the user's legacy strategy and passes every hook through to it. In `configure_fit` the
attack arms what the sampled clients are sent (a parameter-only attack: new values in the user's own arrays, the
same for every client); in `aggregate_fit` it reads what the round revealed before the user's strategy aggregates:

- under SecAgg+, every survivor's FitRes carries the same unmasked aggregate: the attack reads it as one secure
  aggregate of the survivors (their example-weighted mean, against the same mean of what they were sent), and the
  row names every client behind it;
- without secure aggregation (a legacy app that sends its own weights), each client's reply is read apart.

What the attack replays, what a row holds and how it is scored are the Message-API audit's
(fl_sim/server/audit.py, fl_sim/server/auditor.py). An armed round whose attack keeps nothing of its targets'
replies (trap weights) leaves the global model as it was.
"""
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy

from fl_sim.contract.protocol import TrainingSettings
from fl_sim.contract.records import ReplyStatus
from fl_sim.learning.updates import Weights, weight_change
from fl_sim.server.attacks import Armed, arm_round, attack_round
from fl_sim.server.auditor import AuditRecorder
from fl_sim.server.round import ReplyFault, ServerAttack, round_seed
from fl_sim.server.secagg import failure_reason, revealed_update

__all__ = ["LegacyAuditStrategy", "design_images"]


def design_images(seen_counts: Sequence[int], settings: TrainingSettings, most: int) -> int:
    """What an audit's active attack arms for: the clients' median num-examples of the last round read (the server
    learns them from the replies), before any reply one epoch's batches; never more than `most` (max_images)."""
    seen = sorted(seen_counts)
    guess = seen[len(seen) // 2] if seen else settings.batch_size * settings.epochs
    return max(1, min(most, guess))


@dataclass
class LegacyRound:
    """What a legacy round sent: the global weights, the training read from its config, the clients and what each
    was sent (only those the attack armed differ from the global weights)."""

    server_round: int
    global_weights: Weights
    settings: TrainingSettings
    nodes: tuple[int, ...]
    sent_to: dict[int, Weights] = field(default_factory=dict)
    armed: Armed | None = None


class LegacyAuditStrategy(LegacyStrategy):
    """A user's legacy Flower strategy with a malicious server around it (the module docstring).

    Parameters
    ----------
    strategy
        The user's legacy strategy, which still samples, aggregates and evaluates.
    attack
        The attack and its plan.
    recorder
        Where the rounds are reported.
    names
        The model's state_dict names, in the order of the legacy path's unnamed arrays.
    settings
        The clients' training as a round's config (and the run config) tells it.
    out
        The audit's output folder (logged).
    """

    def __init__(self, strategy: LegacyStrategy, attack: ServerAttack, recorder: AuditRecorder, names: Sequence[str],
                 settings: Callable[[dict], TrainingSettings], out: str):
        self.strategy, self.attack, self.recorder, self.names = strategy, attack, recorder, tuple(names)
        self.settings, self.out = settings, out
        self.sent: LegacyRound | None = None
        self.seen_counts: list[int] = []  # the num-examples of the last round's replies: what the attack arms for

    def __repr__(self) -> str:
        return f"LegacyAuditStrategy({self.attack.name}, {self.strategy!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The user's strategy's instructions, each target sent what the attack armed for it."""
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        global_weights = self.named(parameters)
        config = dict(instructions[0][1].config) if instructions else {}
        settings = self.settings(config)
        nodes = tuple(proxy.node_id for proxy, _ in instructions)
        sent = LegacyRound(server_round, global_weights, settings, nodes)
        if self.attack.plan.round_attacked(server_round) and nodes:
            design = settings.for_shard(design_images(self.seen_counts, settings, self.attack.max_images))
            armed = arm_round(self.attack.attack, global_weights, design, len(nodes), nodes, secure_aggregation=True)
            sent.armed = armed
            serialised: dict[int, Parameters] = {}
            for index, (proxy, fit_ins) in enumerate(instructions):
                weights = armed.weights.get(proxy.node_id, global_weights) if armed else global_weights
                sent.sent_to[proxy.node_id] = weights
                if weights is not global_weights:
                    if id(weights) not in serialised:
                        serialised[id(weights)] = ndarrays_to_parameters([weights[n].numpy() for n in self.names])
                    instructions[index] = (proxy, FitIns(serialised[id(weights)], fit_ins.config))
        self.sent = sent
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Reads the round (a secure aggregate, or each reply), then lets the user's strategy aggregate."""
        sent = self.sent
        if sent is None or sent.server_round != server_round:
            raise RuntimeError(f"replies of round {server_round} arrived, but that round was not configured")
        try:
            counts = {proxy.node_id: int(fitres.num_examples) for proxy, fitres in results}
            if counts:
                self.seen_counts = list(counts.values())
            self.recorder.counts[server_round] = dict(counts)
            reasons = list(dict.fromkeys(failure_reason(failure) if isinstance(failure, BaseException)
                                         else failure[1].status.message for failure in failures))
            dropped = [node for node in sent.nodes if node not in counts]
            if dropped:
                why = f": {reasons[0]}" if len(reasons) == 1 == len(dropped) else ""
                self.recorder.record_faults(server_round, [
                    ReplyFault(node, ReplyStatus.CLIENT_ERROR if reasons else ReplyStatus.NO_REPLY,
                               f"no usable reply this round{why}") for node in dropped])
            if sent.sent_to and results:
                self.read(sent, results, counts)
            if sent.armed is not None and results:
                kept = self.attack.attack.aggregated(sent.global_weights, sent.global_weights, sent.global_weights)
                if kept is None:  # nothing of an armed reply is averaged: the global model stays
                    log(INFO, "round %s: %s keeps nothing of its targets' replies; the global model stays",
                        server_round, self.attack.name)
                    return ndarrays_to_parameters([sent.global_weights[n].numpy() for n in self.names]), {}
            return self.strategy.aggregate_fit(server_round, results, failures)
        finally:
            self.recorder.round_done(server_round)

    def read(self, sent: LegacyRound, results: list[tuple[ClientProxy, FitRes]], counts: dict[int, int]) -> None:
        replies = {proxy.node_id: parameters_to_ndarrays(fitres.parameters) for proxy, fitres in results}
        first = next(iter(replies.values()))
        secure = len(replies) > 1 and all(len(arrays) == len(first) and all(np.array_equal(a, b) for a, b in
                                                                                 zip(arrays, first, strict=True))
                                          for arrays in replies.values())
        clients = sorted(replies)
        if secure:  # SecAgg+ revealed one aggregate, the same in every survivor's reply
            aggregate = dict(zip(self.names, (torch.from_numpy(np.array(a)) for a in first), strict=True))
            update, mean_sent = revealed_update(aggregate, [sent.sent_to.get(c, sent.global_weights) for c in clients],
                                                [float(counts[c]) for c in clients])
            done = attack_round(self.attack.attack, {}, sent.sent_to, {c: counts[c] for c in clients}, sent.settings,
                                armed=sent.armed, secure_aggregation=True, max_images=self.attack.max_images,
                                seed=round_seed(self.attack.seed, sent.server_round), parameters=self.attack.parameters,
                                label=f"audit round {sent.server_round}", revealed=(update, mean_sent))
        else:
            updates = {c: weight_change(sent.sent_to.get(c, sent.global_weights), self.named_arrays(replies[c]))
                       for c in clients}
            done = attack_round(self.attack.attack, updates, {c: sent.sent_to.get(c, sent.global_weights)
                                                              for c in clients}, counts, sent.settings,
                                armed=sent.armed, secure_aggregation=False, max_images=self.attack.max_images,
                                seed=round_seed(self.attack.seed, sent.server_round), parameters=self.attack.parameters,
                                label=f"audit round {sent.server_round}")
        self.recorder.record_attack(sent.server_round, done.victims, done.results, done.update_norms, done.seconds)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.strategy.evaluate(server_round, parameters)

    def named(self, parameters: Parameters) -> Weights:
        return self.named_arrays(parameters_to_ndarrays(parameters))

    def named_arrays(self, arrays: Sequence[np.ndarray]) -> Weights:
        """The legacy path's unnamed arrays as the model's named tensors."""
        if len(arrays) != len(self.names):
            raise RuntimeError(f"{len(arrays)} arrays for a model of {len(self.names)}: the model given to "
                               "fl_sim.malicious is not the one the strategy sends")
        return {name: torch.from_numpy(np.array(array)) for name, array in zip(self.names, arrays, strict=True)}
