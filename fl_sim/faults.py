"""Faulty clients on purpose: `--inject-faults "0=nan,1=wrong-shape,2=crash"` (run config `inject-faults`).

A client named here trains as usual, then spoils its reply in the named way (or raises instead of
training) in every round, so the server's defences can be tested and shown. Each kind is something
a broken or hostile client could send; the server must neither attack nor average it.
"""
import torch

from .config import ConfigError

FAULTS = {
    "nan": "a NaN in the first weight",
    "inf": "an infinity in the first weight",
    "wrong-shape": "the first weight one row longer than the model's",
    "wrong-dtype": "the first weight as float64",
    "missing-array": "the last weight left out",
    "extra-array": "an array the model does not have",
    "bad-num-examples": "num-examples 10^9 (it would outweigh every other client in FedAvg)",
    "no-num-examples": "no num-examples",
    "crash": "the client raises instead of training (an error reply)",
}
ABSURD_NUM_EXAMPLES = 10**9
EXTRA_ARRAY = "injected.extra"


class InjectedCrash(RuntimeError):
    """The `crash` fault: raised by the ClientApp, so Flower sends the server an error reply."""


def parse_faults(text: str) -> dict[int, str]:
    """'0=nan,2=crash' -> {0: 'nan', 2: 'crash'}; '' -> {}."""
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        client, _, kind = item.partition("=")
        try:
            client_id = int(client)
        except ValueError:
            raise ConfigError(f"--inject-faults wants client=kind pairs like 0=nan,2=crash, got {item!r}") from None
        if kind not in FAULTS:
            raise ConfigError(f"--inject-faults: unknown fault {kind!r} for client {client_id}: "
                              f"choose one of {', '.join(FAULTS)}")
        if client_id in faults:
            raise ConfigError(f"--inject-faults names client {client_id} twice")
        faults[client_id] = kind
    return faults


def format_faults(faults: dict[int, str]) -> str:
    """The inverse of parse_faults (how run.json and Flower's run config hold them)."""
    return ",".join(f"{client}={kind}" for client, kind in sorted(faults.items()))


def spoil_reply(kind: str, arrays: dict[str, torch.Tensor], metrics: dict) -> tuple[dict, dict]:
    """The reply a client with fault `kind` sends instead of (arrays, metrics); the inputs are left as they are."""
    arrays, metrics = dict(arrays), dict(metrics)
    first = next(iter(arrays))
    if kind in ("nan", "inf"):
        spoiled = arrays[first].clone()
        spoiled.view(-1)[0] = float(kind)
        arrays[first] = spoiled
    elif kind == "wrong-shape":
        arrays[first] = torch.cat([arrays[first], arrays[first][:1]])
    elif kind == "wrong-dtype":
        arrays[first] = arrays[first].double()
    elif kind == "missing-array":
        del arrays[list(arrays)[-1]]
    elif kind == "extra-array":
        arrays[EXTRA_ARRAY] = torch.zeros(3)
    elif kind == "bad-num-examples":
        metrics["num-examples"] = ABSURD_NUM_EXAMPLES
    elif kind == "no-num-examples":
        del metrics["num-examples"]
    else:
        raise ValueError(f"{kind!r} is not a fault that spoils a reply")
    return arrays, metrics
