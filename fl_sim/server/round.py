"""The end of an attacked round, one function for every path: `end_round` records, reads, aggregates.

`InvertingStrategy.aggregate_train` (fl_sim/server/strategy.py: each client's reply) and
`SecAggPlusFace.aggregate_revealed` (fl_sim/server/secagg.py: the aggregate SecAgg+ reveals, as one reply) each
hand it what they saw of the round; it then takes the same steps in the same order:

1. the replies left out are logged and told to the recorder (`record_faults`), then whatever else the caller
   has the recorder hear first (DP-SGD's epsilons, inspect:flag's flags);
2. the attack reads the round (`attack_round`: the victims, the secure-aggregation mean, the skips, the
   failures) and the recorder hears of it (`record_attack`); with a background queue and nothing armed, steps
   1 and 2 are one job on the queue (`--attack-async`), else they run before the aggregate;
3. of a reply whose sender the attack armed, only what `Attack.aggregated` keeps is averaged;
4. the wrapped Flower strategy aggregates the replies kept, and its aggregate is cast back to the dtypes of
   the model sent (`in_sent_dtypes`).

What a path needs of the server is one `RoundServer`, given to it explicitly: the Flower strategy that
aggregates, the attack, the recorder, which client each node is, the background queue.
"""
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from logging import INFO, WARNING
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from attacker import Reconstruction
from fl_sim.contract.protocol import ARRAYS, NUM_EXAMPLES, TrainingSettings
from fl_sim.contract.records import ReplyStatus
from fl_sim.learning.transport import packed_smaller
from fl_sim.learning.updates import Weights
from fl_sim.results.outputs import append_jsonl
from fl_sim.results.rows import metrics_row
from fl_sim.server.attacks import Armed, Attack, AttackedRound, Victim, attack_round
from fl_sim.server.background import AttackQueue
from fl_sim.server.validation import ExpectedReply

__all__ = ["AttackPlan", "Reading", "ReplyFault", "RoundRecorder", "RoundServer", "SentRound", "ServerAttack",
           "end_round", "in_sent_dtypes", "round_seed", "shared_record", "write_faults"]


@dataclass(frozen=True)
class ReplyFault:
    """A client's reply the round left out (neither attacked nor averaged): its client, status and why."""

    client: int
    status: ReplyStatus
    reason: str


def write_faults(metrics: Path, server_round: int, faults: Sequence[ReplyFault]) -> None:
    """A metrics row per client-round the strategy left out (neither attacked nor averaged), appended to `metrics`."""
    for fault in faults:
        append_jsonl(metrics, metrics_row(fault.status, round=server_round, client=fault.client,
                                          reason=fault.reason).to_json())


class RoundRecorder(Protocol):
    """Where the strategy reports each round: the replies it left out, then the reconstructions."""

    def record_faults(self, server_round: int, faults: list[ReplyFault]) -> None: ...

    def record_attack(self, server_round: int, victims: list[Victim], results: list[Reconstruction],
                      update_norms: list[float], seconds: float) -> None: ...

    def record_inspection(self, server_round: int, flags: dict[int, int], attacked: frozenset[int]) -> None:
        """Under inspect:flag, before the attack's rows: each client's `inspect-flags` (0: passed), and which of
        them the attack is about to read."""

    def record_privacy(self, server_round: int, spent: dict[int, dict[str, float]]) -> None: ...


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

    def targets(self, partition_ids: Iterable[int]) -> frozenset[int]:
        """The clients among `partition_ids` this plan attacks (in an attacked round)."""
        return frozenset(p for p in partition_ids if self.clients is None or p in self.clients)


@dataclass(frozen=True)
class ServerAttack:
    """What the server attacks with: the attack (fl_sim/server/attacks.py), the names of the model's parameters
    (an update's norm is theirs), its plan, the seed each round's draws derive from, and the most images behind
    an update it reads (in epochs mode: a client whose shard is larger is not read; its row says so)."""

    attack: Attack
    parameters: tuple[str, ...]
    plan: AttackPlan = AttackPlan()
    seed: int = 0
    max_images: int = 64

    @property
    def name(self) -> str:
        return self.attack.name


@dataclass(frozen=True)
class SentRound:
    """What the server sent in a round: all it may compare the replies with.

    `sent_to`: what each attacked client (partition id) was sent, the global weights or what the attack armed
    for it; its update is taken against that. `armed`: the attack's arming of the round (None: nothing armed).
    """

    server_round: int
    global_weights: Weights
    settings: TrainingSettings
    expected: ExpectedReply
    nodes: tuple[int, ...]
    sent_to: dict[int, Weights] = field(default_factory=dict)
    armed: Armed | None = None


@dataclass(frozen=True)
class RoundServer:
    """What ends a round on the malicious server.

    Parameters
    ----------
    strategy
        The Flower strategy that aggregates the replies kept (FedAvg, FedProx, ... or a user's own).
    attack
        What the server attacks with; None: the round is only checked and aggregated.
    recorder
        Where the round is reported (fl_sim/server/server_app.py's scoreboard).
    partitions
        Each node id's client (partition id), as the nodes said when asked.
    background
        `--attack-async`'s queue: where a round with nothing armed is recorded and read; None: before the
        aggregate.
    weighted_by_key
        The reply metric the strategy weighs replies by (Flower's `num-examples`).
    """

    strategy: Strategy
    attack: ServerAttack | None
    recorder: RoundRecorder
    partitions: Mapping[int, int]
    background: AttackQueue | None = None
    weighted_by_key: str = NUM_EXAMPLES


@dataclass(frozen=True)
class Reading:
    """What the attack reads of a round.

    Parameters
    ----------
    updates
        Each target's update against what it was sent (empty when `revealed` holds the round's view).
    counts
        The examples behind each client's update.
    secure_aggregation
        Read as the clients' mean, one victim holding all their examples.
    revealed
        SecAgg+'s revealed update and the mean of what its clients were sent (fl_sim/server/secagg.py).
    what
        How the log names what is read.
    """

    updates: Mapping[int, Weights]
    counts: dict[int, int]
    secure_aggregation: bool
    revealed: tuple[Weights, Weights] | None = None
    what: str = ""


def flags_heard(recorder: RoundRecorder, server_round: int, flags: Mapping[int, int],
                attacked: frozenset[int]) -> list[Callable[[], None]]:
    """inspect:flag: each client that flagged the model it was sent is logged, and the recorder is to hear every
    reported mask (end_round's `first`; none when no client reported one).

    Parameters
    ----------
    recorder
        The round's recorder.
    server_round
        The round.
    flags
        Each reporting client's (partition id) mask of failed checks (0: passed).
    attacked
        The clients with attack rows of their own, where their flags go (the others get rows of their own).
    """
    for client, mask in sorted(flags.items()):
        if mask:
            log(WARNING, "round %s: client %s flagged the model it was sent (inspect-flags %s)", server_round, client,
                mask)
    return [partial(recorder.record_inspection, server_round, dict(flags), attacked)] if flags else []


def end_round(server: RoundServer, sent: SentRound, replies: Sequence[tuple[Message, Weights | None]], *,
              faults: Sequence[ReplyFault] = (), reading: Reading | None = None,
              first: Sequence[Callable[[], None]] = ()) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Records the round, has the attack read it, and aggregates what the attack keeps (the module docstring).

    Parameters
    ----------
    server
        The server's strategy, attack, recorder and queue.
    sent
        What the round sent.
    replies
        The replies to aggregate, each with what its sender was armed with (None: it was sent the global model,
        so the whole reply is averaged).
    faults
        The clients left out of the round.
    reading
        What the attack reads (None: nothing).
    first
        What else the recorder hears before the attack's reading (DP-SGD's epsilons, inspect:flag's flags).

    Returns
    -------
    tuple
        The wrapped strategy's aggregate, in the sent model's dtypes (None when nothing was aggregated), and its
        metrics.
    """
    server_round, attack = sent.server_round, server.attack
    work: list[Callable[[], None]] = []  # what the recorder is to hear of the round, in order
    if faults:
        for fault in faults:
            log(WARNING, "round %s: client %s left out (%s): %s", server_round, fault.client, fault.status,
                fault.reason)
        work.append(partial(server.recorder.record_faults, server_round, sorted(faults, key=lambda f: f.client)))
    work.extend(first)
    if attack is not None and reading is not None:
        work.append(partial(read_round, server.recorder, attack, sent, reading))
    if work and server.background is not None and sent.armed is None:
        server.background.submit(server_round, partial(run_all, work))
    else:
        run_all(work)
    kept: list[Message] = []
    global_arrays: dict[int, Array] = {}  # one serialised copy of each global tensor a kept reply holds
    for reply, armed_with in replies:
        if attack is None or sent.armed is None or armed_with is None:
            kept.append(reply)
            continue
        weights = reply.content.array_records[ARRAYS].to_torch_state_dict()
        kept_weights = attack.attack.aggregated(weights, armed_with, sent.global_weights)
        if kept_weights is None:
            continue
        record = reply.content.array_records[ARRAYS]  # the reply's own serialised arrays where it keeps them
        reused = {name: record[name] for name, tensor in kept_weights.items() if tensor is weights[name]}
        reply.content[ARRAYS] = shared_record({name: tensor for name, tensor in kept_weights.items()
                                               if name not in reused}, global_arrays, reused, order=list(kept_weights))
        kept.append(reply)
    arrays, metrics = server.strategy.aggregate_train(server_round, kept)
    return (arrays if arrays is None else in_sent_dtypes(arrays, sent.global_weights)), metrics


def read_round(recorder: RoundRecorder, attack: ServerAttack, sent: SentRound, reading: Reading) -> None:
    """The attack's reading of the round (`attack_round`), told to the recorder."""
    log(INFO, "attack round %s: %s reads %s", sent.server_round, attack.name, reading.what)
    done: AttackedRound = attack_round(
        attack.attack, reading.updates, sent.sent_to, reading.counts, sent.settings, armed=sent.armed,
        secure_aggregation=reading.secure_aggregation, max_images=attack.max_images,
        seed=round_seed(attack.seed, sent.server_round), parameters=attack.parameters,
        label=f"attack round {sent.server_round}", revealed=reading.revealed)
    recorder.record_attack(sent.server_round, done.victims, done.results, done.update_norms, done.seconds)


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


def shared_record(weights: Mapping[str, torch.Tensor], arrays: dict[int, Array], ready: Mapping[str, Array] = {},
                  order: Iterable[str] | None = None, narrow: Mapping[str, torch.dtype] = {},
                  distinct_rows: Collection[str] = ()) -> ArrayRecord:
    """`weights` as an ArrayRecord whose arrays are serialised once per distinct tensor (`arrays`, by the
    tensor's id, shared across calls): per-client weights that share most tensors share their bytes too.
    `ready`: entries serialised already; `order`: the record's key order (default: `weights`'); `narrow`: entries
    serialised in a narrower dtype that holds their values exactly (`Armed.narrow`); `distinct_rows`: entries sent
    as their distinct rows and each row's index where that is smaller (`Armed.distinct_rows`, a transport encoding
    fl-sim's ClientApp expands: clients/transport.py)."""
    entries: dict[str, Array] = dict(ready)
    for name, tensor in weights.items():
        if id(tensor) not in arrays:
            plain = tensor.detach().cpu().to(narrow.get(name, tensor.dtype)).numpy()
            packed = packed_smaller(plain) if name in distinct_rows else None
            arrays[id(tensor)] = Array(packed if packed is not None else plain)
        entries[name] = arrays[id(tensor)]
    record = ArrayRecord()  # item by item: ArrayRecord(dict) would wrap every Array anew
    for name in (order if order is not None else weights):
        record[name] = entries[name]
    return record


def run_all(steps: Sequence[Callable[[], None]]) -> None:
    for step in steps:
        step()


def round_seed(seed: int, server_round: int) -> int:
    """Each round gets its own restarts' random draws, still fixed by the run's seed."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])
