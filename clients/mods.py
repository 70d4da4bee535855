"""The run's defense and fault injection as Flower client mods, around the honest ClientApp.

A mod wraps the ClientApp's handling of a message (`mod(msg, context, call_next) -> reply`), as Flower's
own LocalDpMod does; these act on train messages only and pass everything else through. `DefenseMod`
changes the trained weights before they leave the client (clients/defenses.py); `FaultMod` spoils the
reply, or raises, on purpose (clients/faults.py). Each reads its setting from the run config (Flower's,
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
composable in any order, and usable by `fl-sim attack`, which has no Flower message chain); for a model
without batch norm `clip:C` does what fixedclipping_mod does.

For a known config (`fl-sim run`) `mods_for` lists Flower's mods themselves; `flwr run` builds its ClientApp
before any run config exists, so there `FlowerDpMods` reads the run config per message and runs the same mods.
"""
import functools

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from fl_sim.contract.protocol import ARRAYS, CONFIG, METRICS, server_round_of
from fl_sim.contract.run_config import Fault, LocalDp, RunConfig, ServerDpSide
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import parameter_names

from .context import node_partition, run_config_of
from .defenses import defense_seed, sent_weights
from .faults import InjectedCrash, spoil_reply


class DefenseMod:
    """Applies the run's `--defense` client steps to the weights a train reply sends."""

    def __init__(self, defaults: RunConfig | None = None):
        self.defaults = defaults

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
                              defense_seed(config.seed, partition_id, server_round))
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
        chain = call_next
        for mod in reversed(flower_mods(run_config_of(context, self.defaults))):
            chain = _link(mod, chain)
        return chain(msg, context)


def _link(mod: Mod, call_next: ClientAppCallable) -> ClientAppCallable:
    """`mod` in front of `call_next`: one link of a mod chain, as Flower's ClientApp builds its own."""
    def handle(msg: Message, context: Context) -> Message:
        return mod(msg, context, call_next)
    return handle


def mods_for(config: RunConfig | None) -> list[Mod]:
    """The mods a ClientApp needs, outermost first: for a known config only those it turns on (Flower's own
    for ldp and client-side clipping); else ours, which read the run config of each message."""
    if config is None:
        return [FaultMod(), FlowerDpMods(), DefenseMod()]
    faults: list[Mod] = [FaultMod(config)] if config.inject_faults else []
    defense: list[Mod] = [DefenseMod(config)] if config.defense.steps else []
    return faults + flower_mods(config) + defense


def with_content(reply: Message, arrays: dict, metrics: dict) -> Message:
    """The same reply with other arrays and metrics (a Message's content is replaced, not edited)."""
    reply.content = RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics)})
    return reply


@functools.lru_cache(maxsize=8)
def _parameter_names(model: str, dataset: str, data_root: str | None, imprint: int) -> tuple[str, ...]:
    (channels, size, _), classes = image_spec(cached_dataset(dataset, data_root, True))
    return tuple(parameter_names(build_model(model, channels, size, classes, imprint=imprint)))


def model_parameters(config: RunConfig) -> list[str]:
    """The names of the model's trained entries: the defense changes those, never batch-norm statistics."""
    return list(_parameter_names(config.model, config.dataset, config.data_root, config.imprint_rows))
