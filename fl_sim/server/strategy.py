"""The malicious server as a wrapper of any Flower strategy: `InvertingStrategy(FedAvg(...), attack=...)`.

Like Flower's own DifferentialPrivacyServerSideFixedClipping, it holds the strategy it wraps and passes
every hook through to it; before the wrapped strategy aggregates a round, it checks every reply
(fl_sim/server/validation.py), computes each attacked client's update (the weights it got back minus the weights it
was sent), has the attack (fl_sim/server/attacks.py) read them with the training settings the wrapped strategy
sent, and reports the reconstructions to a recorder (the evaluation path, fl_sim/server/server_app.py),
which alone may compare them with the truth. The wrapped strategy (FedAvg, FedProx, FedAdam, FedYogi,
Krum or a user's own) then aggregates the accepted replies exactly as it would without the wrapper, and
its aggregate is cast back to the dtypes of the model it sent (`in_sent_dtypes`).

A reply that is an error, missing, or would poison the average is neither attacked nor aggregated; the recorder
gets its client and reason. A client that refused the model it was sent (`--defense inspect`) sent an error of code
INSPECTION_REFUSED: it is recorded as refused. Under `inspect:flag` every reply carries `inspect-flags` (the failed
checks, a bit mask); the strategy takes it off the reply before aggregating and tells the recorder.

With `secure_aggregation` the server learns only the clients' mean update. Under `--defense secagg` that is
Flower's real SecAgg+ (fl_sim/server/secagg.py: the protocol runs on the legacy hooks, and its face there passes
every round to this strategy's configure_train and hands the attack the revealed aggregate). Under
`--defense secagg-emulated` this strategy emulates it: `aggregate_train` gets every reply, and the attack targets
the plain mean of the accepted updates as one victim holding all their clients' examples (no quantization, no
masks, no dropouts of the protocol's; faster at many clients).

With `--defense dpsgd:...` each client's reply also holds the epsilon its DP-SGD spent (`dp-epsilon-round`,
`dp-epsilon`): the strategy expects them (`reported_metrics`), and tells the recorder each round's values by
client before the attack's reading, so the rows of metrics.jsonl carry them.

`--server-dp` wraps the Flower strategy in Flower's own central DP wrapper (`flower_strategy`):
DifferentialPrivacyServerSideFixedClipping, or DifferentialPrivacyClientSideFixedClipping with Flower's
fixedclipping_mod on the clients. The malicious wrapper sits outside it, as a server that wants the clients'
updates would put it: it sees every reply before Flower's wrapper clips and noises the aggregate, so the
central wrappers protect the updates from whoever sees only the aggregate (other clients, the final model's
users), never from the server, which can skip them (docs/threat-models.md). Client-side clipping does act
before the server: the attack then reads clipped updates.

Every attack takes one path. In `configure_train` of an attacked round the attack `arm`s what its targets
(--attack-clients) are sent: a passive attack nothing (everyone gets the global model), an active one
(fl_sim/server/active.py: --attack imprint|trap) weights of its own, per client; `SentRound.sent_to` keeps what
each client was sent. In `aggregate_train` the replies are screened, each target's update is taken against
what it was sent, and the round ends as every round does (fl_sim/server/round.py `end_round`, which the SecAgg+
face calls too): `attack_round` reads the updates (the same function `fl-sim attack` runs), the recorder hears
of it, and only what `Attack.aggregated` keeps of an armed target's reply enters the average.

With `background` (`--attack-async`, fl_sim/server/background.py) an attack the registry lets run in the
background (a passive one) does not block the round: `aggregate_train` screens the replies and computes the
updates as always, then hands what the recorder is to hear of the round (its left-out replies, then the
reading) to the background queue as one job and returns the aggregate at once; the same code records the same
rows, later. An active attack is part of the round (it arms what is sent and decides what enters the
average), so it cannot run in the background.
"""
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from logging import INFO, WARNING
from typing import Any, cast

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Result,
    Strategy,
)

from fl_sim.contract.attacks import find_attack
from fl_sim.contract.defenses import ServerDpSide
from fl_sim.contract.names import StrategyName
from fl_sim.contract.protocol import (
    ARRAYS,
    CONFIG,
    INSPECT_FLAGS,
    INSPECTION_REFUSED,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    TRAIN_LOSS,
    TrainingSettings,
    TrainMode,
)
from fl_sim.contract.records import ReplyStatus
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.updates import Weights, weight_change
from fl_sim.server import round as rounds
from fl_sim.server.attacks import Victim, arm_round
from fl_sim.server.background import AttackQueue
from fl_sim.server.round import (
    AttackPlan,
    Reading,
    ReplyFault,
    RoundRecorder,
    RoundServer,
    SentRound,
    ServerAttack,
    in_sent_dtypes,
    round_seed,
    shared_record,
)
from fl_sim.server.validation import ExpectedReply, reply_problem

__all__ = ["AttackPlan", "ClientApps", "InvertingStrategy", "NodeNames", "ReplyFault", "RoundOffset", "RoundRecorder",
           "ServerAttack", "SentRound", "Victim", "flower_strategy", "in_sent_dtypes", "round_seed", "server_dp_caveat",
           "short_error"]

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
CLIENT_APP_MESSAGE = "ClientAppException occurred. Message: "  # flwr.clientapp.client_app.ClientAppException
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class ClientApps:
    """What the federation's ClientApps send and read, as the strategy checks and reads their replies.

    Parameters
    ----------
    settings
        The local training a train message's config asks for (a user's app: fl_sim/server/audit.py's reader).
    metrics
        The metrics every reply holds besides the example count (fl-sim's ClientApp: its train loss).
    named_by_partition
        Replies name their client by `partition-id`, checked and taken off (False: by Flower node id).
    open_metrics
        Other metrics are allowed in a reply (a user's ClientApp reports what it likes).
    expands_rows
        The ClientApp expands a tensor sent as its distinct rows (fl-sim's own: clients/transport.py), so the attack's
        `Armed.distinct_rows` travel so; a user's ClientApp is sent every tensor whole.
    """

    settings: Callable[[Any], TrainingSettings] = TrainingSettings.from_config
    metrics: tuple[str, ...] = (TRAIN_LOSS,)
    named_by_partition: bool = True
    open_metrics: bool = False
    expands_rows: bool = True


class NodeNames(Mapping[int, int]):
    """Clients named by their Flower node id: every node is its own client (a user's ClientApp names no partition)."""

    def __getitem__(self, node: int) -> int:
        return node

    def __contains__(self, node: object) -> bool:
        return isinstance(node, int)

    def __iter__(self) -> Iterator[int]:  # no node is known before it replies
        return iter(())

    def __len__(self) -> int:
        return 0


class InvertingStrategy(Strategy):
    """`strategy`, whose server inverts the attacked clients' updates before `strategy` aggregates them.

    `partitions` maps each node id to its client (partition) id, as the nodes said when asked
    (server_app.identify_clients): error replies carry nothing else to name their sender.
    `attack=None` leaves only the reply checks. See the module docstring for `secure_aggregation` and
    `background`.
    """

    def __init__(self, strategy: Strategy, attack: ServerAttack | None, recorder: RoundRecorder, *,
                 partitions: Mapping[int, int], secure_aggregation: bool = False, max_shard: int = 10**6,
                 background: AttackQueue | None = None, reported_metrics: Sequence[str] = (),
                 apps: ClientApps = ClientApps()):
        """`max_shard`: the most examples a client may say it trained on in epochs mode (its shard's size).
        `background`: where a round's recording and passive attack run, instead of before the aggregate.
        `reported_metrics`: numbers every reply must also hold (DP-SGD's epsilons), handed to the recorder.
        `apps`: what the ClientApps send and read (fl-sim's own by default)."""
        spec = find_attack(attack.name) if attack is not None else None
        if background is not None and attack is not None and (spec is None or not spec.may_run_async):
            raise ValueError(f"the active attack {attack.name} arms the weights it sends and decides what enters "
                             "the average: it cannot run in the background")
        self.strategy, self.attack, self.recorder = strategy, attack, recorder
        self.partitions: Mapping[int, int] = partitions if isinstance(partitions, NodeNames) else dict(partitions)
        self.secure_aggregation, self.max_shard, self.apps = secure_aggregation, max_shard, apps
        self.weighted_by_key = getattr(strategy, "weighted_by_key", NUM_EXAMPLES)
        self.reported_metrics = tuple(reported_metrics)
        self.round_server = RoundServer(strategy, attack, recorder, self.partitions, background, self.weighted_by_key)
        self._sent: SentRound | None = None

    @property
    def sent_round(self) -> SentRound | None:
        """What the last configured round sent (fl_sim/server/secagg.py reads the SecAgg+ aggregate against it)."""
        return self._sent

    def summary(self) -> None:
        log(INFO, "\t├── InvertingStrategy: %s, secure aggregation %s, around:", self.attack.name if self.attack
            else "no attack", self.secure_aggregation)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sends the round as the wrapped strategy does, each attacked client what the attack arms for it (by
        default the same global weights), keeping what it sent to check and attack the replies."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sent_config = messages[0].content[CONFIG] if messages else config  # with what the strategy added (FedProx)
        settings = self.apps.settings(sent_config)
        count = range(1, self.max_shard + 1) if settings.mode == TrainMode.EPOCHS else settings.num_images
        expected = ExpectedReply.like(arrays, {**dict.fromkeys(self.apps.metrics), self.weighted_by_key: count,
                                               **dict.fromkeys(self.reported_metrics)}, open=self.apps.open_metrics)
        global_weights = arrays.to_torch_state_dict()
        sent_to: dict[int, Weights] = {}
        armed = None
        attack = self.attack
        if attack and attack.plan.round_attacked(server_round):
            sampled = (self.partitions.get(msg.metadata.dst_node_id) for msg in messages)
            targets = attack.plan.targets(client for client in sampled if client is not None)  # this round's
            design = settings.for_shard(self.design_images(settings))
            armed = arm_round(attack.attack, global_weights, design, len(messages), targets, self.secure_aggregation)
            sent_to = {client: armed.weights[client] if armed and client in armed.weights else global_weights
                       for client in targets}
            records: dict[int, ArrayRecord] = {}  # one record per distinct armed model, not per message
            arrays_of: dict[int, Array] = {}  # and one serialised array per distinct tensor, shared by the records
            for index, msg in enumerate(messages):
                client = self.partitions.get(msg.metadata.dst_node_id)
                if armed is not None and client is not None and client in armed.weights:
                    weights = armed.weights[client]
                    if id(weights) not in records:
                        records[id(weights)] = shared_record(
                            weights, arrays_of, narrow=armed.narrow,
                            distinct_rows=armed.distinct_rows if self.apps.expands_rows else ())
                    messages[index] = with_arrays(msg, records[id(weights)])
        self._sent = SentRound(server_round, global_weights, settings, expected,
                               tuple(msg.metadata.dst_node_id for msg in messages), sent_to, armed)
        return messages

    def design_images(self, settings: TrainingSettings) -> int:
        """What an active attack arms for in epochs mode (images behind an update): the largest shard it reads."""
        return self.attack.max_images if self.attack is not None else 1

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Attacks the replies that pass the checks, records the others, then lets the strategy aggregate
        (fl_sim/server/round.py `end_round`)."""
        sent = self._sent
        if sent is None or sent.server_round != server_round:
            raise RuntimeError(f"replies of round {server_round} arrived, but that round was not configured")
        accepted, faults = self._screen(sent, list(replies))
        flags = {client: int(cast(float, reply.content.metric_records[METRICS].pop(INSPECT_FLAGS)))
                 for client, reply in accepted.items() if INSPECT_FLAGS in reply.content.metric_records[METRICS]}
        first: list[Callable[[], None]] = []  # what the recorder hears before the attack's reading
        spent = {client: {key: float(reply.content[METRICS][key]) for key in self.reported_metrics}  # type: ignore[arg-type]
                 for client, reply in sorted(accepted.items())}
        if self.reported_metrics and spent:
            first.append(partial(self.recorder.record_privacy, server_round, spent))
        attack = self.attack
        # the replies as tensors and the updates are computed when read, one at a time: the messages are the
        # one copy of the replies the server holds (100 clients' armed replies are gigabytes)
        replied = LazyWeights({client: accepted[client].content.array_records[ARRAYS]
                               for client in sorted(accepted) if client in sent.sent_to})
        first += rounds.flags_heard(self.recorder, server_round, flags, frozenset(replied) if attack else frozenset())
        reading = None
        if attack and replied:
            emulated = (" as their EMULATED secure aggregate (the server's own mean of the replies, not SecAgg+)"
                        if self.secure_aggregation else "")
            reading = Reading(LazyUpdates(replied, sent.sent_to),
                              {client: example_count(accepted[client], self.weighted_by_key) for client in replied},
                              self.secure_aggregation, what=f"{len(replied)} update(s){emulated}")
        armed = sent.armed.weights if sent.armed is not None else {}
        kept = [(reply, sent.sent_to[client] if client in replied and client in armed else None)
                for client, reply in accepted.items()]  # an armed target's reply: what the attack keeps of it
        return rounds.end_round(self.round_server, sent, kept, faults=faults, reading=reading, first=first)

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
                refused = reply.error.code == INSPECTION_REFUSED
                faults.append(ReplyFault(client, ReplyStatus.REFUSED if refused else ReplyStatus.CLIENT_ERROR,
                                         f"{'refused' if refused else 'error reply'}: "
                                         f"{short_error(reply.error.reason or '')}"))
                continue
            flagged = INSPECT_FLAGS in reply.content.metric_records.get(METRICS, {})
            named = {PARTITION_ID: client} if self.apps.named_by_partition else {}
            expected = ExpectedReply(sent.expected.arrays, {**sent.expected.metrics, **named,
                                                            **({INSPECT_FLAGS: range(0, 2**31)} if flagged else {})},
                                     sent.expected.open)
            problem = reply_problem(reply.content, expected)
            if problem:
                faults.append(ReplyFault(client, ReplyStatus.REJECTED, problem))
                continue
            if named:
                del reply.content[METRICS][PARTITION_ID]  # aggregate exactly what a real client would have sent
            accepted[client] = reply
        for node in sorted(set(sent.nodes) - answered):
            if node in self.partitions:  # a node that joined after the clients were identified names no client
                faults.append(ReplyFault(self.partitions[node], ReplyStatus.NO_REPLY,
                                         "no reply before the round's timeout"))
        return accepted, sorted(faults, key=lambda fault: fault.client)


class RoundOffset(Strategy):
    """Runs `strategy` for rounds `done + 1 ..`: a resumed run goes on with the run's own round numbers.

    Flower's `Strategy.start` counts its rounds from 1; this wrapper adds the rounds done before to the
    round number of every hook and of `evaluate_fn` (whose round 0 stays the initial model), so clients,
    the attack and the records see the run's true rounds. A server-side optimiser (FedAdam, FedYogi)
    starts its moments afresh on resume.
    """

    def __init__(self, strategy: Strategy, done: int):
        self.strategy, self.done = strategy, done

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        def evaluate_in_run_rounds(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            assert evaluate_fn is not None
            return evaluate_fn(flower_round + self.done if flower_round else 0, arrays)

        return super().start(grid, initial_arrays, num_rounds=num_rounds - self.done, timeout=timeout,
                             train_config=train_config, evaluate_config=evaluate_config,
                             evaluate_fn=evaluate_in_run_rounds if evaluate_fn else None)

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
    of them for each round (Flower's own sampling); with --server-dp inside Flower's central DP wrapper."""
    options: dict[str, Any] = dict(  # Flower's keyword arguments, the same for every strategy
        fraction_train=config.fraction_train, min_train_nodes=1, min_available_nodes=config.num_clients,
        fraction_evaluate=1.0 if config.client_eval else 0.0, min_evaluate_nodes=config.num_clients)
    strategy: Strategy
    if config.strategy == StrategyName.FEDPROX:
        strategy = FedProx(proximal_mu=config.proximal_mu, **options)
    elif config.strategy == StrategyName.FEDADAM:
        strategy = FedAdam(eta=config.server_lr, **options)
    elif config.strategy == StrategyName.FEDYOGI:
        strategy = FedYogi(eta=config.server_lr, **options)
    else:
        strategy = FedAvg(**options)
    dp = config.server_dp
    if dp.side is None:
        return strategy
    wrapper = DifferentialPrivacyServerSideFixedClipping if dp.side == ServerDpSide.SERVER \
        else DifferentialPrivacyClientSideFixedClipping
    sampled = max(1, int(config.num_clients * config.fraction_train))  # as FedAvg samples them
    return wrapper(strategy, noise_multiplier=dp.noise, clipping_norm=dp.clip, num_sampled_clients=sampled)


SERVER_DP_CAVEAT = ("--server-dp {dp}: Flower's {wrapper} clips and noises the aggregate on the server, after the "
                    "attack has read every reply: a malicious server skips it at will. It protects the clients' "
                    "updates only from those who see the aggregate alone (the other clients, the final model's users), "
                    "if the server runs it.{client}")
CLIENT_CLIPPING = (" The clients clip their own updates (Flower's fixedclipping_mod), so the attack reads clipped "
                   "updates; but the clipping norm is the server's to send.")


def server_dp_caveat(config: RunConfig) -> str | None:
    """What --server-dp does and does not protect, in plain words for the log and run.json (None: off)."""
    dp = config.server_dp
    if dp.side is None:
        return None
    wrapper = "DifferentialPrivacyServerSideFixedClipping" if dp.side == ServerDpSide.SERVER \
        else "DifferentialPrivacyClientSideFixedClipping"
    return SERVER_DP_CAVEAT.format(dp=dp, wrapper=wrapper,
                                   client=CLIENT_CLIPPING if dp.side == ServerDpSide.CLIENT else "")


def short_error(reason: str) -> str:
    """Flower's error reason in one line: the ClientApp's own message where the simulation wraps it in a
    Ray traceback ("... ClientAppException occurred. Message: <it>'>"), else the whole reason, cut short."""
    text = " ".join(ANSI_ESCAPE.sub("", reason).split())
    _, wrapped, message = text.rpartition(CLIENT_APP_MESSAGE)
    text = message.removesuffix("'>") if wrapped else text
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def example_count(reply: Message, key: str) -> int:
    """How many examples a (checked) reply says it trained on."""
    value = reply.content.metric_records[METRICS][key]
    if not isinstance(value, int | float):
        raise ValueError(f"{key} is {value!r}, not a count")
    return int(value)


class LazyWeights(Mapping[int, Weights]):
    """Each client's reply as tensors, read from its ArrayRecord when asked and not kept."""

    def __init__(self, records: Mapping[int, ArrayRecord]):
        self.records = records

    def __getitem__(self, client: int) -> Weights:
        return self.records[client].to_torch_state_dict()

    def __iter__(self) -> Iterator[int]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


class LazyUpdates(Mapping[int, Weights]):
    """Each client's update against what it was sent, computed when asked and not kept: a secure aggregate's
    mean is summed one update at a time (fl_sim.learning.updates.mean_update)."""

    def __init__(self, replies: Mapping[int, Weights], sent_to: Mapping[int, Weights]):
        self.replies, self.sent_to = replies, sent_to

    def __getitem__(self, client: int) -> Weights:
        return weight_change(self.sent_to[client], self.replies[client])

    def __iter__(self) -> Iterator[int]:
        return iter(self.replies)

    def __len__(self) -> int:
        return len(self.replies)


def with_arrays(message: Message, arrays: ArrayRecord) -> Message:
    """`message` with other arrays: a new content record, as Flower's strategies share one across messages."""
    content = RecordDict({key: value for key, value in message.content.items()})
    content[ARRAYS] = arrays
    return Message(content=content, message_type=message.metadata.message_type,
                   dst_node_id=message.metadata.dst_node_id, group_id=message.metadata.group_id)

