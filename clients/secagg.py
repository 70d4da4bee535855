"""The client's side of Flower's SecAgg+ (`--defense secagg`): Flower's own `secaggplus_mod`, around the honest
ClientApp.

In flwr 1.41 SecAgg+ runs on the legacy path: the server's SecAggPlusWorkflow sends each client a legacy fit
instruction (`fitins.parameters` as an unnamed list of arrays, `fitins.config`) and `secaggplus_mod` reads the
client's reply as a legacy FitRes (`fitres.parameters`, `fitres.num_examples`, `fitres.metrics`). The ClientApp
(clients/app.py) speaks the Message API (a named `arrays` record, a `config` and a `metrics` record), so
`SecAggPlusMod` puts a translation between the two, inside Flower's mod:

    secaggplus_mod -> legacy <-> Message API -> FaultMod -> DefenseMod -> the ClientApp's train

The mod alone sees the client's trained weights; what leaves the client is what Flower's protocol makes of them
(each parameter times num-examples / max-weight, clipped, stochastically quantized, masked). Stages other than
"collect masked vectors" (setup, key sharing, unmasking) never reach the ClientApp, so an injected crash
(`--inject-faults N=crash`) drops the client after it has shared its keys, the dropout SecAgg+ is built for.
Evaluate messages of the legacy path (with --client-eval) are translated the same way.
"""
import functools
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat  # flwr's own legacy records (not public API: pinned)

from fl_sim.contract.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model

from .context import run_config_of

FIT_INS, EVALUATE_INS = "fitins", "evaluateins"  # the legacy records' prefixes (flwr.compat.common)
LOSS = "loss"


class SecAggPlusMod:
    """Flower's `secaggplus_mod` for a run whose --defense is `secagg`; any other run's messages pass through.

    `defaults`: `fl-sim run`'s config; under `flwr run` the run config is read from the context each message.
    """

    def __init__(self, defaults: RunConfig | None = None):
        self.defaults = defaults

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        config = run_config_of(context, self.defaults)
        if not config.defense.protocol:
            return call_next(msg, context)
        if msg.metadata.message_type == MessageType.EVALUATE:
            return legacy_evaluate(msg, context, call_next, state_names(config))
        if msg.metadata.message_type != MessageType.TRAIN:  # the server's query for the partition id
            return call_next(msg, context)
        return secaggplus_mod(msg, context, functools.partial(legacy_fit, call_next=call_next,
                                                              names=state_names(config)))


def legacy_fit(msg: Message, context: Context, call_next, names: tuple[str, ...]) -> Message:
    """The ClientApp's train handler (through `call_next`) answering a legacy fit instruction with a legacy FitRes."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    reply = modern_call(msg, context, call_next, fitins.parameters, fitins.config, names)
    if reply.has_error():
        return reply
    arrays = reply.content.array_records[ARRAYS]
    metrics = cast(dict[str, Scalar], dict(reply.content.metric_records[METRICS]))  # fl-sim's metrics are scalars
    count = cast(float, metrics.pop(NUM_EXAMPLES))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([arrays[name].numpy() for name in arrays]),
                    int(count), metrics)
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=False)
    return reply


def legacy_evaluate(msg: Message, context: Context, call_next, names: tuple[str, ...]) -> Message:
    """The ClientApp's evaluate handler answering a legacy evaluate instruction with a legacy EvaluateRes."""
    if f"{EVALUATE_INS}.parameters" not in msg.content.array_records:
        return call_next(msg, context)
    ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    reply = modern_call(msg, context, call_next, ins.parameters, ins.config, names)
    if reply.has_error():
        return reply
    metrics = cast(dict[str, Scalar], dict(reply.content.metric_records[METRICS]))
    loss, count = metrics[LOSS], metrics[NUM_EXAMPLES]
    if not isinstance(loss, int | float) or not isinstance(count, int | float):
        raise ValueError(f"the evaluate reply's {LOSS} and {NUM_EXAMPLES} are {loss!r} and {count!r}, not numbers")
    res = EvaluateRes(Status(Code.OK, ""), float(loss), int(count), metrics)
    reply.content = compat.evaluateres_to_recorddict(res)
    return reply


def modern_call(msg: Message, context: Context, call_next, parameters: Parameters, config: dict,
                names: tuple[str, ...]) -> Message:
    """`call_next` (the Message-API ClientApp) on a legacy instruction's parameters and config, as named arrays."""
    msg.content = RecordDict({ARRAYS: named(parameters_to_ndarrays(parameters), names),
                              CONFIG: ConfigRecord(dict(config))})
    return call_next(msg, context)


def named(arrays: list[np.ndarray], names: tuple[str, ...]) -> ArrayRecord:
    """The legacy path's unnamed arrays as the model's named state dict (the order the server sent them in)."""
    if len(arrays) != len(names):
        raise ValueError(f"the server sent {len(arrays)} arrays; the model has {len(names)}")
    return ArrayRecord({name: torch.from_numpy(np.array(array)) for name, array in zip(names, arrays, strict=True)})


def state_names(config: RunConfig) -> tuple[str, ...]:
    """The names of the run's model's state-dict entries, in order (the legacy path's arrays come in it)."""
    return _state_names(config.model, config.dataset, config.data_root, config.imprint_rows)


@functools.lru_cache(maxsize=8)
def _state_names(model: str, dataset: str, data_root: str | None, imprint: int) -> tuple[str, ...]:
    (channels, size, _), classes = image_spec(cached_dataset(dataset, data_root, True))
    return tuple(build_model(model, channels, size, classes, imprint=imprint).state_dict())

