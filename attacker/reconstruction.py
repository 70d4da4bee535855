"""What an attack answers for one victim (`Reconstruction`, `Status`), and the device it computes on.

Shared by the inversion engine (attacker/engine.py) and the analytic readouts (attacker/analytic.py).
"""
from dataclasses import dataclass, field
from enum import Enum

import torch

Params = dict[str, torch.Tensor]


class Status(Enum):
    """How a victim's attack ended; `Reconstruction.reason` says why in words."""

    OK = "ok"
    DIVERGED = "diverged"  # every restart diverged, even re-drawn
    BAD_UPDATE = "bad-update"  # the observed update does not fit the model, or is not finite
    OUT_OF_MEMORY = "out-of-memory"  # not even this victim alone fits
    FAILED = "failed"  # the attack as a whole raised (set by callers that catch it)
    SKIPPED = "skipped"  # not attacked: more images behind the update than the caller attacks (set by callers)


class BadUpdate(ValueError):
    """An observed update that cannot be attacked: that victim fails, the others go on."""


@dataclass
class Reconstruction:
    """The attack's answer for one victim: its best restart, and how the restarts went."""

    images: torch.Tensor  # (K*B, C, H, W) in [0, 1], on the CPU
    labels: torch.Tensor  # (K*B,), in step order
    loss: float  # the attack's own objective at the kept restart
    status: Status = Status.OK
    reason: str = ""  # why there is no result, when status is not OK
    restart_losses: list[float] = field(default_factory=list)  # per (label assignment, restart)
    redraws: int = 0  # restarts re-drawn after diverging
    # per image, for the analytic attacks (attacker/analytic.py): confirmed, unconfirmed or unrecovered
    image_status: list[str] | None = None
    # per image, for an attack that reads each client of a secure aggregate apart (mosaic): the client it came from
    image_clients: list[int] | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @classmethod
    def failure(cls, status: Status, reason: str) -> "Reconstruction":
        return cls(torch.empty(0), torch.empty(0, dtype=torch.long), float("inf"), status, reason)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`device` as torch's ("auto": CUDA when there is one, else the CPU); asking for CUDA without one is a
    ValueError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return device


def weight_change_from_gradient(gradient: Params, lr: float) -> Params:
    """The weight change of one SGD step, for callers who observed a raw gradient instead."""
    return {name: -lr * g for name, g in gradient.items()}
