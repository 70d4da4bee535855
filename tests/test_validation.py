"""Reply validation, property-based: whatever a client sends, the check never raises, never lets through a
reply that would spoil FedAvg's average, and names what is wrong."""
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays as np_arrays

from fl_sim.server.flower_private import aggregate_arrayrecords, validate_message_reply_consistency
from fl_sim.server.validation import ExpectedReply, reply_problem

MODEL: dict[str, np.ndarray] = {"conv.weight": np.zeros((2, 1, 3, 3), np.float32), "conv.bias": np.zeros(2, np.float32),
         "fc.weight": np.zeros((3, 4), np.float32), "bn.steps": np.zeros((), np.int64)}
EXPECTED = ExpectedReply.like(ArrayRecord({name: Array(value) for name, value in MODEL.items()}),
                              {"num-examples": 4, "train-loss": None, "partition-id": 1})
FLOATS = st.floats(-1e3, 1e3, width=32)
NAMES = st.sampled_from(sorted(MODEL))
Metrics = dict[str, int | float | list[int] | list[float]]
HEALTHY_METRICS: Metrics = {"num-examples": 4, "train-loss": 0.5, "partition-id": 1}
examples = settings(max_examples=60, deadline=None)


@st.composite
def healthy_weights(draw) -> dict[str, np.ndarray]:
    return {name: draw(np_arrays(value.dtype, value.shape,
                                 elements=FLOATS if value.dtype.kind == "f" else st.integers(0, 100)))
            for name, value in MODEL.items()}


def reply(weights: dict, metrics: Metrics | None = None) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({name: Array(np.asarray(v)) for name, v in weights.items()}),
                       "metrics": MetricRecord(HEALTHY_METRICS if metrics is None else metrics)})


def averages_cleanly(content: RecordDict) -> bool:
    """Flower's own consistency check and FedAvg's average accept it beside a healthy reply, with a finite result."""
    healthy = reply(MODEL)
    validate_message_reply_consistency([healthy, content], "num-examples", check_arrayrecord=True)
    average = aggregate_arrayrecords([healthy, content], "num-examples")
    return all(np.isfinite(array.numpy()).all() for array in average.values())


@examples
@given(healthy_weights())
def test_a_healthy_reply_passes_and_averages(weights):
    content = reply(weights)
    assert reply_problem(content, EXPECTED) is None
    assert averages_cleanly(content)


@examples
@given(healthy_weights(), st.sampled_from(sorted(n for n in MODEL if MODEL[n].dtype.kind == "f")), st.data(),
       st.sampled_from([np.nan, np.inf, -np.inf]))
def test_one_non_finite_value_anywhere_is_named(weights, name, data, bad):
    flat = weights[name].reshape(-1)
    flat[data.draw(st.integers(0, flat.size - 1))] = bad
    assert reply_problem(reply(weights), EXPECTED) == f"array {name!r} is not finite (NaN or infinity)"


@examples
@given(healthy_weights(), NAMES, st.lists(st.integers(1, 4), max_size=4))
def test_any_other_shape_is_named(weights, name, shape):
    if tuple(shape) == MODEL[name].shape:
        shape = [*shape, 1]
    weights[name] = np.zeros(shape, MODEL[name].dtype)
    problem = reply_problem(reply(weights), EXPECTED)
    assert problem == f"array {name!r} has shape {tuple(shape)}, the model's is {MODEL[name].shape}"


@examples
@given(healthy_weights(), NAMES, st.sampled_from(["float64", "float16", "int32", "uint8", "bool", "complex64"]))
def test_any_other_dtype_is_named(weights, name, dtype):
    if np.dtype(dtype) == MODEL[name].dtype:
        dtype = "float16"
    weights[name] = weights[name].astype(dtype)
    assert reply_problem(reply(weights), EXPECTED) == f"array {name!r} is {dtype}, the model's is {MODEL[name].dtype}"


@examples
@given(healthy_weights(), st.sets(NAMES, min_size=1), st.sets(st.text(min_size=1, max_size=20)))
def test_missing_and_extra_arrays_are_named(weights, dropped, added):
    for name in dropped:
        del weights[name]
    for name in added:
        weights.setdefault(name, np.zeros(1, np.float32))
    problem = reply_problem(reply(weights), EXPECTED)
    missing = sorted(set(dropped) - set(added), key=list(MODEL).index)
    if missing:
        assert problem.startswith("arrays missing: ") and all(repr(name)[:40] in problem for name in missing[:1])
    elif set(weights) != set(MODEL):
        assert problem.startswith("arrays the model does not have: ")
    else:
        assert problem is None


@examples
@given(st.one_of(st.integers(-2**62, 2**62), st.floats(allow_nan=True, allow_infinity=True),
                 st.lists(st.integers(0, 10), max_size=3)))
@example(4.0)  # the right count as a float: FedAvg would take it, but no ClientApp of this run sends one
@example(10**9)  # absurd: it would outweigh every other client in the average
def test_any_num_examples_but_the_rounds_is_refused(count):
    metrics = {**HEALTHY_METRICS, "num-examples": count}
    problem = reply_problem(reply(MODEL, metrics), EXPECTED)
    if type(count) is int and count == 4:
        assert problem is None
    else:
        assert problem.startswith("num-examples is ") and problem.endswith("the round asked for 4")


@examples
@given(st.sampled_from(["num-examples", "train-loss", "partition-id"]))
def test_a_missing_metric_is_named(key):
    metrics = {k: v for k, v in HEALTHY_METRICS.items() if k != key}
    assert reply_problem(reply(MODEL, metrics), EXPECTED) == f"no {key} in the reply's metrics"


@examples
@given(st.sampled_from([np.nan, np.inf, -np.inf]))
def test_a_non_finite_loss_is_refused(loss):
    problem = reply_problem(reply(MODEL, {**HEALTHY_METRICS, "train-loss": float(loss)}), EXPECTED)
    assert problem.startswith("train-loss is ") and problem.endswith("not a finite number")


def test_an_array_that_cannot_be_decoded_is_refused():
    content = reply(MODEL)
    content["arrays"]["conv.bias"] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"garbage")
    assert reply_problem(content, EXPECTED).startswith("array 'conv.bias' cannot be read (")


METRIC_VALUES = st.one_of(st.integers(-10, 10), st.floats(allow_nan=True), st.lists(st.integers(0, 3), max_size=2))
ARRAY_RECORDS = st.builds(lambda d: ArrayRecord({k: Array(v) for k, v in d.items()}),
                          st.dictionaries(st.sampled_from([*MODEL, "x"]),
                                          st.sampled_from(list(MODEL.values()) + [np.full(2, np.nan, np.float32)]),
                                          max_size=5))
METRIC_RECORDS = st.builds(MetricRecord, st.dictionaries(st.sampled_from([*HEALTHY_METRICS, "other"]), METRIC_VALUES,
                                                         max_size=4))
RECORDS = st.one_of(ARRAY_RECORDS, METRIC_RECORDS,
                    st.builds(ConfigRecord, st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)))
# Half the replies are shaped right (one array record, one metric record), so the checks past the first run too.
REPLIES = st.one_of(st.dictionaries(st.sampled_from(["arrays", "metrics", "config", "more"]), RECORDS, max_size=4),
                    st.fixed_dictionaries({"arrays": ARRAY_RECORDS, "metrics": METRIC_RECORDS}))
FULL_MODEL = ArrayRecord({name: Array(value) for name, value in MODEL.items()})


@settings(max_examples=150, deadline=None)
@given(REPLIES)
@example({"arrays": FULL_MODEL, "metrics": MetricRecord({"num-examples": 4})})
@example({"arrays": FULL_MODEL, "metrics": MetricRecord({**HEALTHY_METRICS, "train-loss": [1, 2]})})
@example({"arrays": ArrayRecord({"conv.bias": Array(MODEL["conv.bias"])}), "metrics": MetricRecord(HEALTHY_METRICS)})
def test_whatever_a_client_sends_the_check_answers_and_what_passes_averages(records):
    """reply_problem never raises by construction (it catches everything), so that cannot be the test: every
    reply must be judged by a named check, never fall through to the catch-all, and what passes must average."""
    content = RecordDict(records)
    problem = reply_problem(content, EXPECTED)
    assert problem is None or not problem.startswith("the reply cannot be read"), problem
    if problem is None:
        assert averages_cleanly(content)
