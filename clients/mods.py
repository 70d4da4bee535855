"""The run's defense and fault injection as Flower client mods, around the honest ClientApp.

A mod wraps the ClientApp's handling of a message (`mod(msg, context, call_next) -> reply`), as Flower's
own LocalDpMod does; these act on train messages only and pass everything else through. `DefenseMod`
changes the trained weights before they leave the client (clients/defenses.py); `InspectMod` checks the model
the server sent before the client trains it, and refuses it or flags it (clients/inspection.py); `DetectMod` runs
the other detectors the run names (clients/detectors/) on it and the client's own batch, refusing or flagging
each as the inspection does; `FaultMod`
spoils the reply, or raises, on purpose (clients/faults.py). Each reads its setting from the run config (Flower's,
over the defaults `fl-sim run` gives) and passes the reply through unchanged when the setting is off.

Two settings run Flower's own mods (flwr.clientapp.mod), not code of ours:

- `--defense ...+ldp:clip=C:eps=E:delta=D` runs Flower's `LocalDpMod(C, C, E, D)` (sensitivity C: the clipped
  update's norm), outside DefenseMod, so it clips and noises what the hand-written steps left.
- `--server-dp client:noise=Z:clip=C` runs Flower's `fixedclipping_mod`, outermost of the defenses (Flower:
  it should be the last to touch the parameters); it reads C from the config that Flower's
  DifferentialPrivacyClientSideFixedClipping wrapper adds to every train message (fl_sim/server/strategy.py).

Flower's 1.41 mods act on every message and answer one without exactly one ArrayRecord (the server's query,
an evaluate reply) with an error, so each runs inside `TrainOnly`, which hands them train messages only.
The hand-written `noise:SIGMA` and `clip:C` stay ours (clients/defenses.py says why: seeded, parameters only,
composable in any order, and repeatable in `fl-sim attack`, which refuses Flower's unseeded LocalDpMod); for a
model without batch norm `clip:C` does what fixedclipping_mod does.

`fl-sim attack` hands each victim its train message through the same mods (`defense_mods`, chained around its
training by `chained`). For a known config (`fl-sim run`) `mods_for` lists Flower's mods themselves; `flwr run`
builds its ClientApp before any run config exists, so there `FlowerDpMods` reads the run config per message and
runs the same mods.
"""
import functools
from collections.abc import Callable, Sequence
from typing import cast

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from torch import nn

from fl_sim.contract.defenses import InspectionMode, LocalDp, ServerDpSide
from fl_sim.contract.detectors import detector_spec
from fl_sim.contract.faults import Fault
from fl_sim.contract.protocol import (
    ARRAYS,
    CONFIG,
    INSPECT_FLAGS,
    INSPECTION_REFUSED,
    METRICS,
    TrainingSettings,
    server_round_of,
)
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import parameter_names

from .context import node_partition, round_examples, run_config_of
from .defenses import defense_seed, order_seed, sent_weights
from .detectors import Sent, run_detector
from .faults import InjectedCrash, spoil_reply
from .inspection import Architecture, inspect_model, mask_of
from .secagg import SecAggPlusMod
from .training import first_batch

PASSED = "inspect.passed"  # the client's context.state: the last model it was sent that passed inspection


SeedOf = Callable[[int, int, int], int]  # (the run's seed, partition id, round) -> the seed of a client's defense


class DefenseMod:
    """Applies the run's `--defense` client steps to the weights a train reply sends; `seed_of` gives the seed of
    a client's steps in a round (by default `defense_seed(seed, partition id, round)`)."""

    def __init__(self, defaults: RunConfig | None = None, seed_of: SeedOf = defense_seed):
        self.defaults, self.seed_of = defaults, seed_of

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        config = run_config_of(context, self.defaults)
        if not config.defense.steps:
            return reply
        partition_id, _ = node_partition(context)
        server_round = server_round_of(msg.content.config_records[CONFIG])
        arrays = sent_weights(config.defense, msg.content.array_records[ARRAYS].to_torch_state_dict(),
                              reply.content.array_records[ARRAYS].to_torch_state_dict(), model_parameters(config),
                              self.seed_of(config.seed, partition_id, server_round))
        return with_content(reply, arrays, dict(reply.content.metric_records[METRICS]))


class FaultMod:
    """Makes the clients named in the run's `--inject-faults` crash or spoil their train reply, every round."""

    def __init__(self, defaults: RunConfig | None = None):
        self.defaults = defaults

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        partition_id, _ = node_partition(context)
        fault = run_config_of(context, self.defaults).inject_faults.get(partition_id)
        if fault == Fault.CRASH:
            raise InjectedCrash(f"client {partition_id}: injected crash (inject-faults)")
        reply = call_next(msg, context)
        if fault is None or reply.has_error():
            return reply
        return with_content(reply, *spoil_reply(fault, reply.content.array_records[ARRAYS].to_torch_state_dict(),
                                                dict(reply.content.metric_records[METRICS])))


class InspectMod:
    """`--defense inspect`: checks the model a train message brings before the client trains it.

    A model that fails (clients/inspection.py) is refused with an error reply of code INSPECTION_REFUSED whose
    reason names the failed checks (`inspect`, `inspect:refuse`), or trained all the same, the reply's metrics
    then saying which checks failed as a bit mask, `inspect-flags`, 0 when it passed (`inspect:flag`). The last
    model that passed stays in the node's `context.state` (kept from round to round in a simulation and by a
    SuperNode) for the checks against the previous round; a model that failed is never the reference.
    """

    def __init__(self, defaults: RunConfig | None = None):
        self.defaults = defaults

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        config = run_config_of(context, self.defaults)
        mode = config.defense.inspection
        if msg.metadata.message_type != MessageType.TRAIN or mode is None:
            return call_next(msg, context)
        received = msg.content.array_records[ARRAYS].to_torch_state_dict()
        passed = context.state.array_records.get(PASSED)
        findings = inspect_model(received, honest_architecture(config),
                                 passed.to_torch_state_dict() if passed is not None else None)
        if not findings:
            context.state[PASSED] = ArrayRecord(received)
        elif mode == InspectionMode.REFUSE:
            partition_id, _ = node_partition(context)
            more = f"; and {len(findings) - 3} more" if len(findings) > 3 else ""
            reason = f"client {partition_id} refused the model it was sent (inspect): " + \
                "; ".join(map(str, findings[:3])) + more
            return Message(Error(INSPECTION_REFUSED, reason), reply_to=msg)
        reply = call_next(msg, context)
        if mode != InspectionMode.FLAG or reply.has_error():
            return reply
        metrics = dict(reply.content.metric_records[METRICS])
        metrics[INSPECT_FLAGS] = mask_of(findings)
        return with_content(reply, reply.content.array_records[ARRAYS].to_torch_state_dict(), metrics)


class DetectMod:
    """Runs the run's detectors (`--defense dsnr`, `strict-load`, `size`, `lone-units`, each `:refuse` or
    `:flag`; clients/detectors/) on the model a train message sends, before the client trains it.

    Each detector sees the weights, the model the client agreed to (the registry's `--model`, without an
    imprint block), the client's own model holding them (its run's architecture, as the ClientApp builds it) and
    its first batch of the round (clients/training.py `first_batch`). A model a `refuse` detector flags is
    refused with an error reply of code INSPECTION_REFUSED naming the detectors and their scores, as
    `InspectMod` refuses; a model only `flag` detectors flag is trained, and the reply's `inspect-flags` mask
    gets each flagging detector's bit (`InspectionCheck`; 0 when none flagged), ORed into the inspection's own
    when both run (this mod is outside `InspectMod`). Train messages only; every other message passes by.
    """

    def __init__(self, defaults: RunConfig | None = None):
        self.defaults = defaults

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        config = run_config_of(context, self.defaults)
        named = config.defense.detectors
        if msg.metadata.message_type != MessageType.TRAIN or not named:
            return call_next(msg, context)
        partition_id, num_partitions = node_partition(context)
        sent = client_sent(config, msg, partition_id, num_partitions)
        verdicts = [(name, mode, run_detector(name, sent)) for name, mode in named]
        refused = [(name, verdict) for name, mode, verdict in verdicts
                   if verdict.flagged and mode == InspectionMode.REFUSE]
        if refused:
            reason = f"client {partition_id} refused the model it was sent: " + \
                "; ".join(f"{name}: {verdict}" for name, verdict in refused)
            return Message(Error(INSPECTION_REFUSED, reason), reply_to=msg)
        reply = call_next(msg, context)
        if reply.has_error() or all(mode != InspectionMode.FLAG for _, mode, _ in verdicts):
            return reply
        metrics = dict(reply.content.metric_records[METRICS])
        mask = int(cast(int, metrics.get(INSPECT_FLAGS, 0)))
        for name, _, verdict in verdicts:
            check = detector_spec(name).check
            if verdict.flagged and check is not None:
                mask |= check
        metrics[INSPECT_FLAGS] = mask
        return with_content(reply, reply.content.array_records[ARRAYS].to_torch_state_dict(), metrics)


def client_sent(config: RunConfig, msg: Message, partition_id: int, num_partitions: int) -> Sent:
    """What a client holds of a train message for its detectors: the weights, the agreed model, its own model
    holding them (None when they do not load) and its first batch of the round.

    Parameters
    ----------
    config : RunConfig
        The run's config.
    msg : Message
        The train message.
    partition_id, num_partitions : int
        This node's partition and the partition count.

    Returns
    -------
    Sent
        The detectors' input.
    """
    received = msg.content.array_records[ARRAYS].to_torch_state_dict()
    settings = TrainingSettings.from_config(msg.content.config_records[CONFIG])
    server_round = server_round_of(msg.content.config_records[CONFIG])
    dataset, _, examples = round_examples(config, partition_id, num_partitions, settings, server_round)
    (channels, size, _), classes = image_spec(dataset)
    model: nn.Module | None = build_model(config.model, channels, size, classes, imprint=config.imprint_rows)
    try:
        cast(nn.Module, model).load_state_dict(received)
    except RuntimeError:
        model = None
    images, labels = first_batch(*dataset.tensors(examples), settings,
                                 order_seed(config.seed, partition_id, server_round))
    return Sent(received, agreed_model(config), model, images, labels)


class TrainOnly:
    """Runs `mod` (one of Flower's) on train messages only; every other message passes it by."""

    def __init__(self, mod: Mod):
        self.mod = mod

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        return self.mod(msg, context, call_next)


def local_dp_mod(spec: LocalDp) -> LocalDpMod:
    """Flower's LocalDpMod for `ldp:clip=C:eps=E:delta=D`: clipping norm C, sensitivity C."""
    return LocalDpMod(clipping_norm=spec.clip, sensitivity=spec.clip, epsilon=spec.epsilon, delta=spec.delta)


def flower_mods(config: RunConfig) -> list[Mod]:
    """Flower's own mods the config turns on, outermost first: fixedclipping_mod, then LocalDpMod."""
    mods: list[Mod] = []
    if config.server_dp.side == ServerDpSide.CLIENT:
        mods.append(TrainOnly(fixedclipping_mod))
    if config.defense.local_dp is not None:
        mods.append(TrainOnly(local_dp_mod(config.defense.local_dp)))
    return mods


class FlowerDpMods:
    """Flower's mods (`flower_mods`) for the run config of each message: `flwr run`'s ClientApp has none before."""

    def __init__(self, defaults: RunConfig | None = None):
        self.defaults = defaults

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        return chained(flower_mods(run_config_of(context, self.defaults)), call_next)(msg, context)


def _link(mod: Mod, call_next: ClientAppCallable) -> ClientAppCallable:
    """`mod` in front of `call_next`: one link of a mod chain, as Flower's ClientApp builds its own."""
    def handle(msg: Message, context: Context) -> Message:
        return mod(msg, context, call_next)
    return handle


def mods_for(config: RunConfig | None) -> list[Mod]:
    """The mods a ClientApp needs, outermost first: for a known config only those it turns on (Flower's own
    for ldp and client-side clipping); else ours, which read the run config of each message. Flower's SecAgg+
    (clients/secagg.py) is outermost: the faults and the defenses act on what it then masks. Inspection comes
    before training, the defense's steps after it, and Flower's DP mods on what the steps leave."""
    if config is None:
        return [SecAggPlusMod(), FaultMod(), DetectMod(), InspectMod(), FlowerDpMods(), DefenseMod()]
    outer: list[Mod] = [mod for mod, on in ((SecAggPlusMod(config), config.defense.protocol),
                                            (FaultMod(config), bool(config.inject_faults))) if on]
    return outer + defense_mods(config)


def defense_mods(config: RunConfig, seed_of: SeedOf = defense_seed) -> list[Mod]:
    """The mods of the config's `--defense` on a client, outermost first: the detectors and the inspection (before
    training), Flower's DP mods, then the defense's steps (`seed_of`: DefenseMod's). A ClientApp runs them inside
    SecAgg+ and the faults (`mods_for`); `fl-sim attack` runs them around each victim's training (`chained`).

    Parameters
    ----------
    config
        The run's config.
    seed_of
        The seed of a client's steps from (the run's seed, partition id, round).

    Returns
    -------
    list
        The mods the config turns on.
    """
    inspect: list[Mod] = [DetectMod(config)] if config.defense.detectors else []
    inspect += [InspectMod(config)] if config.defense.inspection is not None else []
    steps: list[Mod] = [DefenseMod(config, seed_of)] if config.defense.steps else []
    return inspect + flower_mods(config) + steps


def chained(mods: Sequence[Mod], app: ClientAppCallable) -> ClientAppCallable:
    """`app` behind `mods` (outermost first), as Flower's ClientApp chains its own.

    Parameters
    ----------
    mods
        The mods, outermost first.
    app
        What handles a message once every mod has passed it on.

    Returns
    -------
    ClientAppCallable
        The chain's first link.
    """
    chain = app
    for mod in reversed(mods):
        chain = _link(mod, chain)
    return chain


def with_content(reply: Message, arrays: dict, metrics: dict) -> Message:
    """The same reply with other arrays and metrics (a Message's content is replaced, not edited)."""
    reply.content = RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics)})
    return reply


@functools.lru_cache(maxsize=8)
def _parameter_names(model: str, dataset: str, data_root: str | None, imprint: int) -> tuple[str, ...]:
    (channels, size, _), classes = image_spec(cached_dataset(dataset, data_root, True))
    return tuple(parameter_names(build_model(model, channels, size, classes, imprint=imprint)))


@functools.lru_cache(maxsize=8)
def _agreed_model(model: str, dataset: str, data_root: str | None) -> nn.Module:
    (channels, size, _), classes = image_spec(cached_dataset(dataset, data_root, True))
    return build_model(model, channels, size, classes)


def agreed_model(config: RunConfig) -> nn.Module:
    """The model an honest client agreed to train: the registry's `--model` for the data set, without an imprint
    block (no registered model has one; only a server that reads images out of the updates needs it). Built once
    and shared: its readers (the inspection, the detectors) take its entries' names, shapes and dtypes, or a copy."""
    return _agreed_model(config.model, config.dataset, config.data_root)


@functools.lru_cache(maxsize=8)
def _architecture(model: str, dataset: str, data_root: str | None) -> Architecture:
    return Architecture.of(_agreed_model(model, dataset, data_root))


def honest_architecture(config: RunConfig) -> Architecture:
    """What an honest client knows it trains: the entries of `agreed_model`."""
    return _architecture(config.model, config.dataset, config.data_root)


def model_parameters(config: RunConfig) -> list[str]:
    """The names of the model's trained entries: the defense changes those, never batch-norm statistics."""
    return list(_parameter_names(config.model, config.dataset, config.data_root, config.imprint_rows))
