"""The client's detectors: checks it may run on the model it is sent before it trains, each a pure-torch function.

Every detector takes what a client holds in a round (`Sent`: the weights it received, the model it agreed to
train, that model holding the weights, its own batch, the last model that passed its inspection) and returns a
`Verdict`: a score, the threshold above which the model is flagged, and what the score is of. The registry
(fl_sim/contract/detectors.py) names them; `run_detector` imports one by its entry and runs it. No Flower here:
clients/mods.py `DetectMod` runs them in a ClientApp (refusing or flagging), benchmarks/detectors.py calls them
directly on honest federations (the thresholds) and on every attack's armed models (the detection rates).

- `inspect` (this module, `inspection`): clients/inspection.py `inspect_model`, unchanged; its score is the count
  of failed checks, flagged above 0.
- `dsnr` (dsnr.py): SEER's disaggregation signal-to-noise ratio on the client's batch.
- `strict-load`, `size` (agreed.py): the weights against the model the client agreed to.
- `lone-units` (lone_units.py): the share of a hidden ReLU linear layer's units one example alone fires.
"""
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fl_sim.contract.detectors import detector_spec

from ..inspection import Architecture, inspect_model

Weights = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Sent:
    """What a client holds when it decides whether to train the model it was sent.

    Parameters
    ----------
    received : Weights
        The weights (and buffers) the server sent.
    agreed : nn.Module
        The model the client agreed to train, as the registry builds it (only its entries' names, shapes and
        dtypes are read).
    model : nn.Module or None
        The model the client would train (its run's architecture) holding `received`; None when they do not load
        into it.
    images, labels : torch.Tensor or None
        The client's own batch (its first batch of the round); None where no detector needs it.
    previous : Weights or None
        The last model the client accepted (the inspection's reference; None in its first round).
    """

    received: Weights
    agreed: nn.Module
    model: nn.Module | None = None
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    previous: Weights | None = None


@dataclass(frozen=True)
class Verdict:
    """A detector's answer: `score` against `threshold` (flagged above it) and what the score is of (`detail`).

    Parameters
    ----------
    score : float
        The detector's figure for this model (and batch).
    threshold : float
        The largest score an honest federation's model may have.
    detail : str
        What the score is of: the layer, the entries, the figures.
    """

    score: float
    threshold: float
    detail: str

    @property
    def flagged(self) -> bool:
        return not self.score <= self.threshold  # a NaN score is flagged

    def __str__(self) -> str:
        return f"{self.detail} (score {self.score:.4g}, threshold {self.threshold:g})"


Detector = Callable[[Sent], Verdict]


def run_detector(name: str, sent: Sent) -> Verdict:
    """The verdict of the registered detector `name` on `sent`.

    Parameters
    ----------
    name : str
        A name of fl_sim/contract/detectors.py's registry (a ConfigError names the registered ones otherwise).
    sent : Sent
        What the client holds.

    Returns
    -------
    Verdict
        Its score, threshold and detail.
    """
    module, _, function = detector_spec(name).factory.partition(":")
    detector: Detector = getattr(importlib.import_module(module), function)
    return detector(sent)


def inspection(sent: Sent) -> Verdict:
    """`--defense inspect`'s checks (clients/inspection.py) as a detector: the count of failed checks.

    Parameters
    ----------
    sent : Sent
        What the client holds (the weights, the agreed model, the last model that passed).

    Returns
    -------
    Verdict
        Flagged when any check fails; the detail names the failed checks.
    """
    findings = inspect_model(sent.received, Architecture.of(sent.agreed), sent.previous)
    return Verdict(len(findings), 0, "; ".join(map(str, findings[:3])) or "every check passed")
