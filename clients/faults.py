"""Faulty clients on purpose: `--inject-faults "0=nan,1=wrong-shape,2=crash"` (run config `inject-faults`).

A client named there trains as usual, then spoils its reply in the named way (or raises instead of
training) in every round, so the server's defences can be tested and shown. Each kind is something a
broken or hostile client could send; the server must neither attack nor average it. The kinds are
fl_sim.contract.run_config.Fault; clients/mods.py applies them as a Flower mod.
"""
import torch

from fl_sim.contract.faults import Fault
from fl_sim.contract.protocol import NUM_EXAMPLES

ABSURD_NUM_EXAMPLES = 10**9
EXTRA_ARRAY = "injected.extra"


class InjectedCrash(RuntimeError):
    """The `crash` fault: raised by the ClientApp, so Flower sends the server an error reply."""


def spoil_reply(kind: Fault, arrays: dict[str, torch.Tensor], metrics: dict) -> tuple[dict, dict]:
    """The reply a client with fault `kind` sends instead of (arrays, metrics); the inputs are left as they are."""
    arrays, metrics = dict(arrays), dict(metrics)
    first = next(iter(arrays))
    if kind in (Fault.NAN, Fault.INF):
        spoiled = arrays[first].clone()
        spoiled.view(-1)[0] = float(kind)
        arrays[first] = spoiled
    elif kind == Fault.WRONG_SHAPE:
        arrays[first] = torch.cat([arrays[first], arrays[first][:1]])
    elif kind == Fault.WRONG_DTYPE:
        arrays[first] = arrays[first].double()
    elif kind == Fault.MISSING_ARRAY:
        del arrays[list(arrays)[-1]]
    elif kind == Fault.EXTRA_ARRAY:
        arrays[EXTRA_ARRAY] = torch.zeros(3)
    elif kind == Fault.BAD_NUM_EXAMPLES:
        metrics[NUM_EXAMPLES] = ABSURD_NUM_EXAMPLES
    elif kind == Fault.NO_NUM_EXAMPLES:
        del metrics[NUM_EXAMPLES]
    else:
        raise ValueError(f"{kind!r} is not a fault that spoils a reply")
    return arrays, metrics
