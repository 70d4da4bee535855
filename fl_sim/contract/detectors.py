"""The detector registry: every check a client may run on the model it is sent, by name (`--defense NAME`).

One `DetectorSpec` per detector says what it measures, whether it needs the client's own batch, the bit of a
reply's `inspect-flags` mask that names it (`InspectionCheck`, fl_sim/contract/protocol.py) and where its
implementation lives (a pure-torch function in clients/detectors/, named by an import path and imported only
when a client runs it, so this module, like the rest of the contract, imports nothing but the standard
library). `--defense` reads the names here (fl_sim/contract/defenses.py); clients/mods.py `DetectMod` runs
each one named, refusing the model or flagging it; benchmarks/detectors.py measures every registered one.

`inspect` is the suite's first member and keeps its own grammar and mod (`inspect[:refuse|flag]`,
`InspectMod`); the others are written `NAME` (refuse) or `NAME:refuse` / `NAME:flag`.

A new detector: its function in clients/detectors/ (`(Sent) -> Verdict`), an `InspectionCheck` bit, and one
`register(DetectorSpec(...))` here.
"""
from dataclasses import dataclass

from fl_sim.contract.protocol import InspectionCheck
from fl_sim.contract.setting import ConfigError


@dataclass(frozen=True)
class DetectorSpec:
    """One registry entry.

    Parameters
    ----------
    name : str
        What `--defense` calls it.
    factory : str
        "module:callable", the check: a function of a `clients.detectors.Sent` returning a `Verdict`.
    measures : str
        One line: what it measures, and against what.
    check : InspectionCheck or None
        The bit that names it in a flagged reply's `inspect-flags` (and in metrics.jsonl); None for the
        inspection, whose every check has a bit of its own.
    needs_batch : bool
        Whether it runs the sent model on the client's own batch (else it reads the weights alone).
    """

    name: str
    factory: str
    measures: str
    check: InspectionCheck | None
    needs_batch: bool = False

    def __post_init__(self) -> None:
        if ":" not in self.factory:
            raise ValueError(f"detector {self.name!r}: factory must be 'module:callable', got {self.factory!r}")


INSPECT = "inspect"  # the inspection's own entry: its grammar and mod are its own (clients/mods.py InspectMod)
_REGISTRY: dict[str, DetectorSpec] = {}


def register(spec: DetectorSpec) -> DetectorSpec:
    """Adds `spec` to the registry; a name (or a bit) taken already is an error, not an override."""
    if spec.name in _REGISTRY or (spec.check is not None and
                                  any(other.check == spec.check for other in _REGISTRY.values())):
        raise ValueError(f"a detector named {spec.name!r}, or one with its flag, is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def detector_specs() -> list[DetectorSpec]:
    """Every registered detector, in registration order (the inspection first)."""
    return list(_REGISTRY.values())


def detector_names() -> tuple[str, ...]:
    """The names `--defense` accepts as a detector of its own (every one but the inspection's)."""
    return tuple(name for name in _REGISTRY if name != INSPECT)


def detector_spec(name: str) -> DetectorSpec:
    """The entry named `name`; any other name is a ConfigError in one line naming the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"no detector is named {name!r}; the detectors are {', '.join(_REGISTRY)}") from None


register(DetectorSpec(
    INSPECT, "clients.detectors:inspection",
    "the inspection's checks of the weights: architecture, non-finite, exact zeros, zero biases, peaked rows, "
    "duplicate rows, a jump or a frozen layer since the last model that passed", None))
register(DetectorSpec(
    "dsnr", "clients.detectors.dsnr:dsnr",
    "disaggregation signal-to-noise ratio (Garov et al., ICLR 2024): per weight layer, the largest example "
    "gradient norm of the client's batch over the sum of the others', the largest over layers",
    InspectionCheck.DSNR, needs_batch=True))
register(DetectorSpec(
    "strict-load", "clients.detectors.agreed:strict_load",
    "the weights load strictly into the model the client agreed to (names, shapes, dtypes)",
    InspectionCheck.STRICT_LOAD))
register(DetectorSpec(
    "size", "clients.detectors.agreed:size",
    "what it was sent (bytes, entries) over the model it agreed to", InspectionCheck.SIZE))
register(DetectorSpec(
    "lone-units", "clients.detectors.lone_units:lone_units",
    "of the units of a hidden ReLU linear layer the client's batch fires, the share one example alone fires, the "
    "largest over layers", InspectionCheck.LONE_UNITS, needs_batch=True))
