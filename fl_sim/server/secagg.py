"""The malicious server behind Flower's real SecAgg+ (`--defense secagg`): the protocol's rounds, and the attack
reading only what the protocol reveals.

In flwr 1.41 SecAgg+ runs only on the legacy path: `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` over a
`LegacyContext` whose strategy has the legacy hooks (configure_fit / aggregate_fit / evaluate ...). `SecAggPlusFace`
is the malicious strategy's face there. It holds the run's `InvertingStrategy` (fl_sim/server/strategy.py) and
passes each hook to it in Message-API form, so sampling, arming, the records and the wrapped Flower strategy are
the same code as without secure aggregation:

- `configure_fit` has the strategy configure the round (`configure_train`, which arms each target's own weights)
  and turns every message into that client's FitIns: per-client weights reach each client.
- SecAggPlusWorkflow then runs the protocol's four stages (setup, key sharing, masked vectors, unmasking) with
  the clients' `secaggplus_mod` (clients/secagg.py), and hands `aggregate_fit` only what it reveals: every
  survivor's FitRes carries the same unmasked aggregate, its own num-examples and its metrics.
- `aggregate_fit` takes the attack's view of that aggregate (`revealed_update`) and has `attack_round` read it
  as one victim (`Victim(clients, secure_aggregate=True)`), recorded and scored as every secure aggregate is;
  then the wrapped strategy aggregates it as a single reply holding all the survivors' examples.

What the aggregate is, exactly (flwr/client/mod/secure_aggregation/secaggplus_mod.py and
flwr/server/workflow/secure_aggregation/secaggplus_workflow.py): client i weighs in with
w_i = round(n_i / max_weight x Q) / Q (n_i its num-examples, Q the quantization range); it sends its *full*
parameters p_i (not its update) as w_i p_i clipped to +-clipping_range, mapped to Q levels over that range with
stochastic rounding, plus masks modulo 2^32. The server unmasks the sum of the survivors' quantized vectors
and dequantizes it to

    aggregate = sum_i clip(w_i p_i, +-c) / sum_i w_i      (each term off by up to one level, 2c/Q)

the example-weighted mean of the survivors' parameters, to within len(survivors) x 2c / Q / sum_i w_i per entry
(`SecAggParameters.resolution`). The attack's update is that aggregate minus the same weighted mean of what the
survivors were sent; a dropped client (an error reply, or no reply within --secagg-timeout) is in neither.
The server cannot check a survivor's weights (it never sees them), only its metrics.
"""
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    log,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fl_sim.contract.defenses import SECAGG_MODULUS
from fl_sim.contract.protocol import ARRAYS, CONFIG, INSPECT_FLAGS, METRICS, PARTITION_ID, TRAIN_LOSS
from fl_sim.contract.records import ReplyStatus
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.updates import Weights
from fl_sim.server import round as rounds
from fl_sim.server.flower_private import (
    SECAGG_CONFIGS,
    GridClientProxy,
    InMemoryGrid,
    Run,
    SecAggKey,
    dequantize,
    quantize,
)
from fl_sim.server.flower_private import recorddict_compat as compat
from fl_sim.server.round import Reading, ReplyFault, RoundServer
from fl_sim.server.strategy import InvertingStrategy, short_error

FLOAT32_EPSILON = 2.0**-24  # float32's relative rounding: Flower's client quantizes float32 parameters in float32
RoundEndFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass(frozen=True)
class SecAggParameters:
    """SecAggPlusWorkflow's parameters as the run declares them (--secagg-*), and what follows from them."""

    shares: int | float
    threshold: int | float
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 1000.0
    timeout: float | None = None
    in_flight: int | None = None  # the stages' messages with Flower's simulation at once (SummingGrid; None: all)

    @classmethod
    def of(cls, config: RunConfig) -> "SecAggParameters":
        """A count is an int, a fraction (at most 1) a float, as SecAggPlusWorkflow tells them apart."""
        def count_or_share(value: float) -> int | float:
            return int(value) if value > 1 else float(value)

        return cls(count_or_share(config.secagg_shares), count_or_share(config.secagg_threshold),
                   config.secagg_clipping_range, config.secagg_quantization_range, config.secagg_max_weight,
                   config.secagg_timeout or None, config.secagg_in_flight or None)

    def workflow(self) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(self.shares, self.threshold, max_weight=self.max_weight,
                                  clipping_range=self.clipping_range, quantization_range=self.quantization_range,
                                  modulus_range=SECAGG_MODULUS, timeout=self.timeout)

    def weight(self, num_examples: int) -> float:
        """The weight a client of `num_examples` examples gets in the aggregate (its quantized ratio)."""
        return round(num_examples / self.max_weight * self.quantization_range) / self.quantization_range

    @property
    def level(self) -> float:
        """One quantization level: what a client's stochastic rounding may move an entry by."""
        return 2 * self.clipping_range / self.quantization_range

    def clipped(self, tensor: torch.Tensor) -> torch.Tensor:
        """What a client of weight 1 (`num_examples` = `max_weight`) quantizes of an unchanged entry: clipped to
        the range, as Flower's client clips it."""
        return tensor.clamp(-self.clipping_range, self.clipping_range)

    def on_grid(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`'s entries within the clipping range rounded to the nearest quantization level, in its dtype
        (entries beyond it stay: the client clips them to the range's edge, a level). An entry the client leaves
        unchanged then quantizes to exactly that level (stochastic rounding of a value on the grid has nothing
        to round) when the client's weight is 1 (`num_examples` = `max_weight`) and Flower's float32 arithmetic
        is exact: the clipping range a power of two and at most 2^24 levels, a power of two. Other settings
        leave it within float32's rounding of a level. Only floating-point tensors move."""
        if not tensor.is_floating_point():
            return tensor
        wide = tensor.double()
        levels = ((wide + self.clipping_range) / self.level).round()
        inside = wide.abs() <= self.clipping_range
        return torch.where(inside, levels * self.level - self.clipping_range, wide).to(tensor.dtype)

    def resolution(self, counts: Sequence[int]) -> float:
        """The most by which an entry of the aggregate of clients with `counts` examples may differ from their
        example-weighted mean (unclipped): per client one quantization level, plus the float32 rounding of the
        client's quantization arithmetic (values up to 2c, rounded twice; it caps the useful levels near 2^23),
        over the summed weights."""
        rounding = 2 * 2 * self.clipping_range * FLOAT32_EPSILON
        return len(counts) * (self.level + rounding) / sum(map(self.weight, counts))


def protocol_mean(weights: Sequence[Weights], factors: Sequence[float]) -> Weights:
    """sum_i factors_i weights_i / sum_i factors_i, in float64 (one pass, no stack of copies). A tensor that several
    entries share (the same object: an attack's base model, sent to every client) is scaled and added once, with
    its entries' factors summed: at 1000 clients sharing a 25-million-entry block that is one pass, not 1000."""
    total = sum(factors)
    shared: dict[str, dict[int, tuple[torch.Tensor, float]]] = {}  # by name, by tensor: (tensor, its factors)
    for entry, factor in zip(weights, factors, strict=True):
        for name, tensor in entry.items():
            held = shared.setdefault(name, {}).get(id(tensor))
            shared[name][id(tensor)] = (tensor, factor + (held[1] if held is not None else 0.0))
    mean: Weights = {}
    for name, tensors in shared.items():
        for tensor, factor in tensors.values():
            term = tensor.double() * (factor / total)
            mean[name] = term if name not in mean else mean[name].add_(term)
    return mean


def revealed_update(aggregate: Weights, sent: Sequence[Weights], factors: Sequence[float],
                    protocol: SecAggParameters | None = None) -> tuple[Weights, Weights]:
    """The attack's view of a SecAgg+ aggregate: (aggregate - mean sent, mean sent), the mean weighted as the
    aggregate is, in the dtypes of the model (float32 parameters). With `protocol`, the update is taken against
    the mean of what the clients' quantization makes of the sent weights (clipped to its range): an entry no
    client changed then reads 0 even where the server sent it beyond the range (the mosaic's switched-off rows)."""
    mean_sent = protocol_mean(sent, factors)
    reference = mean_sent
    if protocol is not None:
        clipped: dict[int, torch.Tensor] = {}  # by tensor: clients share all but a few tensors, clipped once each

        def clip(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in clipped:
                clipped[id(tensor)] = protocol.clipped(tensor) if tensor.is_floating_point() else tensor
            return clipped[id(tensor)]

        reference = protocol_mean([{name: clip(tensor) for name, tensor in each.items()} for each in sent], factors)
        del clipped
    update = {name: (aggregate[name].double() - reference[name]).to(sent[0][name].dtype)
              if sent[0][name].is_floating_point() else aggregate[name] - sent[0][name] for name in aggregate}
    return update, {name: mean_sent[name].to(sent[0][name].dtype) for name in mean_sent}


class SecAggPlusFace(LegacyStrategy):
    """The malicious strategy (`InvertingStrategy`) on Flower's legacy hooks, for SecAggPlusWorkflow.

    `strategy` configures each round and evaluates; `server` (the strategy's `round_server`) ends each round, as
    it ends the plain strategy's (fl_sim/server/round.py).
    `names`: the model's state-dict names (the legacy path's arrays are unnamed, in that order); `initial`:
    the weights round 1 is sent; `done`: rounds finished before (a resumed run); `round_end`: fl-sim's
    evaluate_fn (the global model scored and the round committed, fl_sim/server/server_app.py).
    """

    def __init__(self, strategy: InvertingStrategy, server: RoundServer, grid: Grid, protocol: SecAggParameters, *,
                 names: Sequence[str], initial: Weights, train_config: ConfigRecord, round_end: RoundEndFn,
                 done: int = 0):
        self.strategy, self.server, self.grid, self.protocol = strategy, server, grid, protocol
        self.names, self.initial, self.train_config = tuple(names), initial, train_config
        self.round_end, self.done = round_end, done
        self.proxies: dict[int, ClientProxy] = {}
        self.configured: int | None = None  # the last round configured, until it is aggregated

    def __repr__(self) -> str:
        return f"SecAggPlusFace({self.server.attack.name if self.server.attack else 'no attack'})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([self.initial[name].numpy() for name in self.names])

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The strategy's train messages (each target's armed weights) as each client's FitIns."""
        run_round = server_round + self.done
        messages = self.strategy.configure_train(run_round, self.arrays(parameters), self.train_config, self.grid)
        self.configured = run_round
        as_parameters: dict[int, Parameters] = {}  # one serialisation per distinct model sent
        instructions = []
        for msg in messages:
            record = msg.content.array_records[ARRAYS]
            sent = as_parameters.setdefault(id(record), compat.arrayrecord_to_parameters(record, keep_input=True))
            config: dict[str, Scalar] = dict(msg.content[CONFIG])  # type: ignore[arg-type]
            instructions.append((self.proxy(msg.metadata.dst_node_id), FitIns(sent, config)))
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Attacks the revealed aggregate, records the dropouts, then lets the wrapped strategy aggregate it."""
        run_round = server_round + self.done
        self.configured = None
        # SecAggPlusWorkflow lists a client's error once per loop over the replies: each reason once
        reasons = list(dict.fromkeys(failure_reason(failure) for failure in failures
                                     if isinstance(failure, BaseException)))
        survivors = {proxy.node_id: fitres for proxy, fitres in results}
        arrays, metrics = self.aggregate_revealed(run_round, survivors, reasons)
        if arrays is None:
            return None, {}
        scalars: dict[str, Scalar] = dict(metrics) if metrics is not None else {}  # type: ignore[arg-type]
        return compat.arrayrecord_to_parameters(arrays, keep_input=True), scalars

    def aggregate_revealed(self, run_round: int, survivors: Mapping[int, FitRes],
                           reasons: list[str]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's aggregate (the same in every survivor's FitRes) read by the attack, then aggregated as one
        reply holding all the survivors' examples (fl_sim/server/round.py `end_round`)."""
        server, sent = self.server, self.strategy.sent_round
        if sent is None or sent.server_round != run_round:
            raise RuntimeError(f"SecAgg+ revealed round {run_round}, but that round was not configured")
        partitions = server.partitions
        dropped = [node for node in sent.nodes if node not in survivors and node in partitions]
        why = f": {reasons[0]}" if len(reasons) == 1 == len(dropped) else ""
        faults = [ReplyFault(partitions[node], ReplyStatus.CLIENT_ERROR if reasons else ReplyStatus.NO_REPLY,
                             f"dropped out of the SecAgg+ round (the protocol unmasked the others' sum without "
                             f"it){why}") for node in dropped]
        if not survivors:
            return rounds.end_round(server, sent, [], faults=faults)
        first = next(iter(survivors.values()))
        aggregate = dict(zip(self.names, (torch.from_numpy(np.array(array))
                                          for array in parameters_to_ndarrays(first.parameters)), strict=True))
        clients = {node: partitions[node] for node in survivors}
        counts = {clients[node]: fitres.num_examples for node, fitres in survivors.items()}
        for node, fitres in survivors.items():
            said = fitres.metrics.get(PARTITION_ID)
            if said != clients[node]:  # its weights are in the sum all the same: SecAgg+ cannot leave them out
                log(WARNING, "round %s: node %s says partition %r, not %s", run_round, node, said, clients[node])
        factors = [self.protocol.weight(counts[client]) for client in sorted(counts)]
        global_weights = sent.global_weights
        sent_to = [sent.sent_to.get(client, global_weights) for client in sorted(counts)]
        update, mean_sent = revealed_update(aggregate, sent_to, factors, self.protocol)
        reading = Reading({}, counts, True, revealed=(update, mean_sent),
                          what=f"the SecAgg+ aggregate of {len(counts)} client(s)") if sent.sent_to else None
        kept = {name: tensor.to(global_weights[name].dtype) if global_weights[name].is_floating_point()
                else tensor for name, tensor in aggregate.items()}  # integers: rounded by in_sent_dtypes
        losses = [float(fitres.metrics.get(TRAIN_LOSS, 0.0)) for fitres in survivors.values()]
        total = sum(counts.values())
        reply = Message(RecordDict({ARRAYS: ArrayRecord(kept), METRICS: MetricRecord({
            TRAIN_LOSS: sum(loss * count for loss, count in zip(losses, counts.values(), strict=True)) / total,
            server.weighted_by_key: total})}), dst_node_id=0, message_type=MessageType.TRAIN)
        # inspect:flag: each survivor's flags (its FitRes metrics); the attack reads only the aggregate, so every
        # flagging client gets a row of its own
        flags = {clients[node]: int(cast(float, fitres.metrics[INSPECT_FLAGS])) for node, fitres in survivors.items()
                 if INSPECT_FLAGS in fitres.metrics}
        return rounds.end_round(server, sent, [(reply, mean_sent)], faults=faults, reading=reading,
                                first=rounds.flags_heard(server.recorder, run_round, flags, frozenset()))

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        messages = self.strategy.configure_evaluate(server_round + self.done, self.arrays(parameters),
                                                    ConfigRecord(), self.grid)
        return [(self.proxy(msg.metadata.dst_node_id),
                 EvaluateIns(compat.arrayrecord_to_parameters(msg.content.array_records[ARRAYS], keep_input=True),
                             dict(msg.content[CONFIG])))  # type: ignore[arg-type]
                for msg in messages]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        replies = [Message(RecordDict({METRICS: MetricRecord(dict(res.metrics))}),  # type: ignore[arg-type]
                           dst_node_id=proxy.node_id, message_type=MessageType.EVALUATE) for proxy, res in results]
        metrics = self.strategy.aggregate_evaluate(server_round + self.done, replies)
        if metrics is None:
            return None, {}
        loss = metrics.get("loss")
        return (float(loss) if isinstance(loss, int | float) else None), dict(metrics)  # type: ignore[arg-type]

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """fl-sim's evaluate_fn at the end of each round (round 0: the initial model), in the run's rounds. A round
        the protocol halted (too few clients left to unmask) aggregated nothing: its clients get a row saying so."""
        run_round = server_round + self.done if server_round else 0
        if server_round and self.configured == run_round:
            self.configured = None
            sent = self.strategy.sent_round
            if sent is not None and sent.server_round == run_round:
                partitions = self.server.partitions
                self.server.recorder.record_faults(run_round, [
                    ReplyFault(partitions[node], ReplyStatus.NO_REPLY,
                               "the SecAgg+ round halted: too few clients were left to unmask the sum "
                               "(--secagg-threshold)") for node in sent.nodes if node in partitions])
        metrics = self.round_end(run_round, self.arrays(parameters))
        if metrics is None:
            return None
        loss = metrics.get("loss")
        scalars: dict[str, Scalar] = dict(metrics)  # type: ignore[arg-type]
        return (float(loss) if isinstance(loss, int | float) else 0.0), scalars

    def arrays(self, parameters: Parameters) -> ArrayRecord:
        """The legacy path's unnamed arrays as the model's named ArrayRecord."""
        arrays = parameters_to_ndarrays(parameters)
        if len(arrays) != len(self.names):
            raise RuntimeError(f"{len(arrays)} arrays for a model of {len(self.names)}")
        return ArrayRecord({name: torch.from_numpy(np.array(array)) for name, array in zip(self.names, arrays,
                                                                                           strict=True)})

    def proxy(self, node: int) -> ClientProxy:
        """SecAggPlusWorkflow names each client by a proxy; it only reads its node id."""
        return self.proxies.setdefault(node, GridClientProxy(node, self.grid, 0))


def failure_reason(failure: BaseException) -> str:
    """The reason of a client's error as SecAggPlusWorkflow keeps it (an Exception around the reply's Error)."""
    error = failure.args[0] if failure.args else None
    return short_error(error.reason or "") if isinstance(error, Error) else short_error(str(failure))


IN_FLIGHT_PER_CORE = 4  # Flower's simulation: the SecAgg+ stage messages with its engine at once, a core


def fold(running: np.ndarray, added: np.ndarray, modulus: int) -> None:
    """running <- (running + added) mod `modulus`, in place (both int64 in [0, modulus), so the sum cannot
    overflow): no temporary the size of a masked vector, and a bit mask where the modulus is a power of two."""
    np.add(running, added, out=running)
    if modulus & (modulus - 1) == 0:
        np.bitwise_and(running, modulus - 1, out=running)
    else:
        np.remainder(running, modulus, out=running)


class SummingGrid(Grid):
    """The grid SecAggPlusWorkflow talks through, summing the masked vectors as they arrive (server memory).

    Flower's workflow collects every client's masked vector (one int64 per parameter: twice the model's bytes)
    and only then sums them, so a round of N clients holds N of them at once: ~12 GB for 100 clients of a
    15M-parameter imprint. This grid's `send_and_receive` pulls the replies as they come and, in each reply of
    the masked-vector stage, folds the vector into one running sum (modulo the protocol's modulus, which the
    workflow reduces by anyway) and leaves a zero in its place; the first such reply then carries the sum. The
    workflow's own code runs unchanged on these replies and computes the same sum (the zeros add nothing), so
    the protocol, its masks and its unmasking are Flower's; only the order of the additions differs.
    Everything else goes to the wrapped grid.

    When a stage waits for every reply (no timeout), the grid also keeps at most `in_flight` of the stage's
    messages with the wrapped grid at once, handing it the next as each reply comes back. Flower's simulation
    engine looks, every 0.1 s, for each node's next instruction among all the instructions stored, so 1000
    messages pushed at once cost it 1000 x 1000 checks a sweep, one core of a 1000-client round (docs/benchmarks.md,
    "At 1000 clients"); a few more messages in flight than ClientApps running keeps them busy at a fraction of it.
    With a timeout every message goes out at once: a client counts as dropped only if it did not answer in time.
    """

    def __init__(self, grid: Grid, modulus: int = SECAGG_MODULUS, in_flight: int | None = None):
        if in_flight is not None and in_flight < 1:
            raise ValueError(f"in_flight must be a positive count of messages, not {in_flight}")
        self.grid, self.modulus, self.in_flight = grid, modulus, in_flight

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The replies to `messages` (those that came within `timeout` seconds; None: all), masked vectors summed."""
        queued = list(messages)
        window = len(queued) if timeout is not None or self.in_flight is None else self.in_flight
        waiting: set[str] = set()

        def push() -> None:  # up to the window's worth of messages with the wrapped grid (one it refuses is lost)
            nonlocal queued
            while queued and len(waiting) < window:
                room = window - len(waiting)
                waiting.update(self.grid.push_messages(queued[:room]))
                queued = queued[room:]

        push()
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = float(getattr(self.grid, "pull_interval", 0.1))
        replies: list[Message] = []
        total: list[np.ndarray] | None = None
        carrier: Message | None = None  # the first reply with a masked vector: it carries the sum
        while waiting and (deadline is None or time.monotonic() < deadline):
            arrived = list(self.grid.pull_messages(waiting))
            for reply in arrived:
                waiting.discard(reply.metadata.reply_to_message_id)
                vector = self._masked(reply)
                if vector is not None:
                    arrays = [bytes_to_ndarray(entry) for entry in vector]
                    if total is None:
                        total = arrays
                    else:
                        for running, added in zip(total, arrays, strict=True):
                            fold(running, added, self.modulus)
                    self._replace(reply, [np.zeros((), dtype=np.int64)] * len(arrays))
                    carrier = carrier or reply
                replies.append(reply)
            push()
            if waiting and not arrived:
                time.sleep(interval)
        if carrier is not None and total is not None:
            self._replace(carrier, total)
        return replies

    @staticmethod
    def _masked(reply: Message) -> list[bytes] | None:
        if reply.has_error() or SECAGG_CONFIGS not in reply.content.config_records:
            return None
        value = reply.content.config_records[SECAGG_CONFIGS].get(SecAggKey.MASKED_PARAMETERS)
        return cast(list[bytes], value) if isinstance(value, list) else None

    @staticmethod
    def _replace(reply: Message, arrays: list[np.ndarray]) -> None:
        reply.content.config_records[SECAGG_CONFIGS][SecAggKey.MASKED_PARAMETERS] = [
            ndarray_to_bytes(array) for array in arrays]


def run_secagg(grid: Grid, face: SecAggPlusFace, rounds: int) -> None:
    """Runs `rounds` rounds of Flower's DefaultWorkflow with SecAggPlusWorkflow as its fit workflow."""
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=rounds), strategy=face)
    log(INFO, "SecAgg+: %s shares, threshold %s, clipping +-%s, %s levels, max weight %s", face.protocol.shares,
        face.protocol.threshold, face.protocol.clipping_range, face.protocol.quantization_range,
        face.protocol.max_weight)
    in_flight = face.protocol.in_flight
    if in_flight is None and isinstance(grid, InMemoryGrid):  # Flower's simulation: a few messages a core at once
        in_flight = IN_FLIGHT_PER_CORE * (os.cpu_count() or 1)
    DefaultWorkflow(fit_workflow=face.protocol.workflow())(SummingGrid(grid, in_flight=in_flight), context)


def protocol_aggregate(replies: Sequence[Weights], counts: Sequence[int], protocol: SecAggParameters) -> Weights:
    """What SecAgg+ reveals of `replies` (clients' full weights, with `counts` examples): Flower's own client-side
    weighting, clipping and stochastic quantization and its server-side dequantization, without the masks (they
    cancel exactly modulo 2^32). For checks and `fl-sim attack`, which run no federation."""
    names = list(replies[0])
    ratios = [round(count / protocol.max_weight * protocol.quantization_range) for count in counts]
    total: list[np.ndarray] | None = None
    for reply, ratio in zip(replies, ratios, strict=True):
        # in the reply's dtype (float32), as Flower's client computes: its rounding is part of the aggregate
        scaled = [reply[name].numpy() * (ratio / protocol.quantization_range) for name in names]
        levels = [array.astype(np.int64) for array in quantize(scaled, protocol.clipping_range,
                                                                protocol.quantization_range)]
        total = levels if total is None else [a + b for a, b in zip(total, levels, strict=True)]
    assert total is not None
    summed = dequantize([array % SECAGG_MODULUS for array in total], protocol.clipping_range,
                        protocol.quantization_range)
    offset = -(len(replies) - 1) * protocol.clipping_range
    scale = protocol.quantization_range / sum(ratios)
    return {name: torch.from_numpy((array + offset) * scale) for name, array in zip(names, summed, strict=True)}
