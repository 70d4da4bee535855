"""Checking a client's train reply before the server attacks or averages it.

One bad reply (NaN weights, arrays of the wrong shape or dtype, missing or extra arrays, a missing or
absurd example count) would poison FedAvg's average for every client, or make Flower refuse the whole
round. `reply_problem` says, in one sentence, why a reply cannot be used; the strategy then leaves it
out and records the reason. It never raises, whatever a client sent.
"""
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

ARRAYS, METRICS = "arrays", "metrics"  # the record names of a reply (clients/app.py, FedAvg's defaults)
SHOWN_CHARS = 80  # a client's names and values are cut to this in a reason


@dataclass(frozen=True)
class ExpectedReply:
    """What a healthy reply holds: the sent model's arrays and the metrics the ClientApp reports.

    `metrics` maps each metric to the integer it must equal, to a range of integers it must lie in (an
    epochs-mode client's num-examples is its shard size: any from 1 to the largest shard the server was
    told of), or to None for "any finite number". `open`: other metrics are allowed too (a user's own ClientApp
    reports what it likes beside them).
    """

    arrays: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    metrics: dict[str, int | range | None]
    open: bool = False

    @classmethod
    def like(cls, sent: ArrayRecord, metrics: dict[str, int | range | None], open: bool = False) -> "ExpectedReply":
        """The reply to a round whose global model was `sent`."""
        specs = {}
        for name, array in sent.items():
            values = array.numpy()
            specs[name] = (tuple(values.shape), str(values.dtype))
        return cls(specs, dict(metrics), open)


def reply_problem(content: RecordDict, expected: ExpectedReply) -> str | None:
    """Why this train reply cannot be attacked or averaged, or None when it can."""
    try:
        return _records_problem(content) or _metrics_problem(content[METRICS], expected.metrics, expected.open) or \
            _arrays_problem(content.array_records[ARRAYS], expected.arrays)
    except Exception as error:  # a reply malformed in a way not foreseen above is still just a bad reply
        return f"the reply cannot be read ({type(error).__name__}: {_shown(error)})"


def _records_problem(content: RecordDict) -> str | None:
    arrays, metrics = list(content.array_records), list(content.metric_records)
    if arrays != [ARRAYS] or metrics != [METRICS]:
        return (f"the reply holds array records {_shown(arrays)} and metric records {_shown(metrics)}, "
                f"not one {ARRAYS!r} and one {METRICS!r}")
    return None


def _metrics_problem(metrics, expected: dict[str, int | range | None], open: bool = False) -> str | None:
    missing = [key for key in expected if key not in metrics]
    if missing:
        return f"no {', '.join(missing)} in the reply's metrics"
    extra = sorted(set(metrics) - set(expected))
    if extra and not open:
        return f"unexpected metrics {_shown(extra)}"
    for key, exact in expected.items():
        value = metrics[key]
        if isinstance(exact, range) and not (type(value) is int and value in exact):
            return f"{key} is {_shown(value)}, the round allows an integer from {exact.start} to {exact.stop - 1}"
        if isinstance(exact, int) and not (type(value) is int and value == exact):
            return f"{key} is {_shown(value)}, the round asked for {exact}"
        if exact is None and not (type(value) in (int, float) and np.isfinite(value)):
            return f"{key} is {_shown(value)}, not a finite number"
    return None


def _arrays_problem(arrays: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    missing = [name for name in expected if name not in arrays]
    if missing:
        return f"arrays missing: {_shown(missing)}"
    extra = sorted(set(arrays) - set(expected))
    if extra:
        return f"arrays the model does not have: {_shown(extra)}"
    for name, (shape, dtype) in expected.items():
        try:
            values = arrays[name].numpy()
        except Exception as error:
            return f"array {name!r} cannot be read ({type(error).__name__}: {_shown(error)})"
        if str(values.dtype) != dtype:
            return f"array {name!r} is {values.dtype}, the model's is {dtype}"
        if tuple(values.shape) != shape:
            return f"array {name!r} has shape {tuple(values.shape)}, the model's is {shape}"
        if not np.isfinite(values).all():
            return f"array {name!r} is not finite (NaN or infinity)"
    return None


def _shown(value) -> str:
    """A client-sent value as text, cut short (it may be anything, of any length)."""
    text = str(value) if isinstance(value, Exception) else repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
