"""The faults a client can be told to inject (`--inject-faults`): their names, what each does, their grammar.

clients/faults.py does them and clients/mods.py applies them as a Flower mod. Standard library only.
"""
from collections.abc import Mapping
from enum import StrEnum

from fl_sim.contract.setting import ConfigError, coerce_scalar


class Fault(StrEnum):
    """What a faulty client does every round (`--inject-faults`, clients/mods.py)."""

    NAN = "nan"
    INF = "inf"
    WRONG_SHAPE = "wrong-shape"
    WRONG_DTYPE = "wrong-dtype"
    MISSING_ARRAY = "missing-array"
    EXTRA_ARRAY = "extra-array"
    BAD_NUM_EXAMPLES = "bad-num-examples"
    NO_NUM_EXAMPLES = "no-num-examples"
    CRASH = "crash"


FAULT_HELP = {
    Fault.NAN: "a NaN in the first weight",
    Fault.INF: "an infinity in the first weight",
    Fault.WRONG_SHAPE: "the first weight one row longer than the model's",
    Fault.WRONG_DTYPE: "the first weight as float64",
    Fault.MISSING_ARRAY: "the last weight left out",
    Fault.EXTRA_ARRAY: "an array the model does not have",
    Fault.BAD_NUM_EXAMPLES: "num-examples 10^9 (it would outweigh every other client in FedAvg)",
    Fault.NO_NUM_EXAMPLES: "no num-examples",
    Fault.CRASH: "the client raises instead of training (an error reply)",
}


def parse_faults(text: str) -> dict[int, Fault]:
    """'0=nan,2=crash' -> {0: Fault.NAN, 2: Fault.CRASH}; '' -> {}.

    Parameters
    ----------
    text : str
        client=kind pairs joined by commas.

    Returns
    -------
    dict[int, Fault]
        Partition id -> its fault; a malformed pair, an unknown kind or a client named twice is a ConfigError.
    """
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        client, _, kind = item.partition("=")
        try:
            client_id = int(client)
        except ValueError:
            raise ConfigError(f"--inject-faults wants client=kind pairs like 0=nan,2=crash, got {item!r}") from None
        if kind not in set(Fault):
            raise ConfigError(f"--inject-faults: unknown fault {kind!r} for client {client_id}: "
                              f"choose one of {', '.join(Fault)}")
        if client_id in faults:
            raise ConfigError(f"--inject-faults names client {client_id} twice")
        faults[client_id] = Fault(kind)
    return faults


def format_faults(faults: Mapping[int, Fault]) -> str:
    """The inverse of parse_faults: {0: Fault.NAN} -> '0=nan'."""
    return ",".join(f"{client}={kind}" for client, kind in sorted(faults.items()))


def faults_value(value: object, flag: str) -> dict[int, Fault]:
    """The `inject_faults` field's parser: the text form, or a mapping of partition ids to fault names."""
    if isinstance(value, Mapping):
        value = ",".join(f"{client}={fault}" for client, fault in value.items())
    return parse_faults(str(coerce_scalar(str, value, flag)))
