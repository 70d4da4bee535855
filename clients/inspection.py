"""Client-side inspection (`--defense inspect`): does the model the server sent look like an honest federation's?

A client of an honest federation knows the model it agreed to train by its registry name (`--model`) and its
data set's shape, so it knows every parameter's name, shape and dtype: the registry's model, WITHOUT the
server's imprint block (fl_sim/learning/models/imprint.py), which no registered model has and an honest server
never needs. It also knows the models it was sent before (the last one that passed, kept in Flower's
`context.state`, which the simulation keeps per node from round to round, as a SuperNode does). From those two it
checks, before training (`inspect_model`):

- `architecture`: the names, shapes and dtypes are the registry model's (the imprint attack adds two layers and
  a buffer that no client trains: caught here);
- `non-finite`: every entry is a number;
- `zero-entries`: no conv or linear weight holds more than ZERO_SHARE exact zeros (trained float weights are
  never exactly zero; trap weights' pass-through convolutions are 99.9% zeros, and their trap rows have zero
  columns wherever a feature carries no pixel);
- `zero-bias`: no conv or linear layer's bias is exactly zero everywhere (PyTorch initialises biases at random and
  training moves them; trap weights zero the trapped layer's biases);
- `peaked`: no output unit's weights are one or a few taps standing far out of the rest, a row kurtosis above
  PEAKED (honest rows, fresh or after 40 FedAvg rounds: at most 5; a pass-through convolution's row is a
  single 1 among zeros or noise: 286);
- `duplicate-rows`: no two output units of a layer have (nearly) the same weights, |cosine| >= DUPLICATE_COSINE
  (the imprint's rows repeat their directions; a pass-through conv's unused channels are all zero);
- `jump`: no conv or linear weight moved by more than JUMP of its norm since the last model that passed (one
  FedAvg round moves the weights of cnn, lenet and resnet20 by at most 0.27 of their norm, even three rounds
  apart; a trap layer's rows point elsewhere: 1.4 to 1.8);
- `frozen`: no parameter is exactly as it was while others moved (a layer an honest federation trains always
  moves; one the server re-sets every round does not).

The thresholds were set from honest FedAvg runs (benchmarks/inspection.py; docs/findings.md,
"Can clients detect a malicious model?"), not from the attacks' code. Pure torch, no Flower: the mod that runs it in a
ClientApp is clients/mods.py `InspectMod`; the benchmark calls it directly.
"""
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fl_sim.contract.protocol import InspectionCheck as Check

Weights = Mapping[str, torch.Tensor]

ZERO_SHARE = 0.01  # more exact zeros than this share of a weight tensor: structured, not trained
DUPLICATE_COSINE = 0.9999  # two rows of a layer this parallel are one row written twice
PEAKED = 20.0  # a row's kurtosis above this: one tap and noise (honest rows: at most 5; Gaussian 3)
JUMP = 0.75  # a weight tensor's change since the last passed model, over its norm (honest rounds: <= 0.27)


@dataclass(frozen=True)
class Finding:
    """One failed check and what failed it (the layer, the figure)."""

    check: Check
    detail: str

    def __str__(self) -> str:
        return f"{self.check.label}: {self.detail}"


@dataclass(frozen=True)
class Architecture:
    """What an honest client knows of the model it trains: every entry's shape and dtype, and which are
    parameters (the rest are buffers such as batch-norm statistics)."""

    entries: dict[str, tuple[tuple[int, ...], torch.dtype]]
    parameters: tuple[str, ...]

    @classmethod
    def of(cls, model: nn.Module) -> "Architecture":
        return cls({name: (tuple(tensor.shape), tensor.dtype) for name, tensor in model.state_dict().items()},
                   tuple(name for name, _ in model.named_parameters()))

    def layers(self) -> list[tuple[str, str | None]]:
        """(weight, its bias or None) of every conv and linear layer: parameters named *weight of 2+ dims."""
        return [(name, bias if (bias := name.removesuffix("weight") + "bias") in self.parameters else None)
                for name in self.parameters if name.endswith("weight") and len(self.entries[name][0]) >= 2]


def mask_of(findings: list[Finding]) -> int:
    """The bit mask of the checks `findings` failed (0: the model passed)."""
    mask = 0
    for finding in findings:
        mask |= finding.check
    return int(mask)


def inspect_model(received: Weights, honest: Architecture, previous: Weights | None = None) -> list[Finding]:
    """Every check `received` fails, against the honest architecture and the last model that passed (None in a
    client's first round); empty when it looks like an honest federation's model."""
    names, expected = set(received), set(honest.entries)
    if names != expected:
        return [Finding(Check.ARCHITECTURE, _other_entries(names, expected))]
    wrong = [name for name, (shape, dtype) in honest.entries.items()
             if tuple(received[name].shape) != shape or received[name].dtype != dtype]
    if wrong:
        return [Finding(Check.ARCHITECTURE, f"other shapes or dtypes: {', '.join(wrong[:3])}")]
    bad = [name for name in honest.entries if received[name].is_floating_point() and
           not bool(torch.isfinite(received[name]).all())]
    if bad:
        return [Finding(Check.NON_FINITE, ", ".join(bad[:3]))]
    findings: list[Finding] = []
    for weight, bias in honest.layers():
        rows = received[weight].detach().float().flatten(1)
        zeros = float((rows == 0).float().mean())
        if zeros > ZERO_SHARE:
            findings.append(Finding(Check.ZERO_ENTRIES, f"{weight} is {zeros:.1%} exact zeros"))
        if bias is not None and bool((received[bias] == 0).all()):
            findings.append(Finding(Check.ZERO_BIAS, f"{bias} is zero everywhere"))
        kurtosis = largest_row_kurtosis(rows)
        if kurtosis > PEAKED:
            findings.append(Finding(Check.PEAKED, f"a row of {weight} has kurtosis {kurtosis:.0f}"))
        cosine = largest_row_cosine(rows)
        if cosine >= DUPLICATE_COSINE:
            findings.append(Finding(Check.DUPLICATE_ROWS, f"two rows of {weight} have cosine {cosine:.6f}"))
    if previous is not None:
        findings += _against_previous(received, previous, honest)
    return findings


def _other_entries(names: set[str], expected: set[str]) -> str:
    """What is wrong with the entries' names: the model wrapped in another with entries of its own (the imprint
    block), or entries missing and extra."""
    def listed(found: list[str]) -> str:
        return ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")

    any_name = next(iter(expected))
    for name in names:  # a prefix under which every announced entry appears: the model sits inside another
        prefix = name.removesuffix(any_name)
        if prefix != name and prefix and {prefix + entry for entry in expected} <= names:
            own = sorted(name for name in names if not name.startswith(prefix))
            return f"the announced model sits inside another (as {prefix}*) with entries of its own: {listed(own)}"
    extra, missing = sorted(names - expected), sorted(expected - names)
    return "; ".join(f"{label} {listed(found)}" for label, found in
                     (("entries the model does not have:", extra), ("missing:", missing)) if found)


def largest_row_kurtosis(rows: torch.Tensor) -> float:
    """The largest kurtosis (4th central moment over the squared variance) of a row that is not constant."""
    centred = rows.double() - rows.double().mean(1, keepdim=True)
    variance = (centred ** 2).mean(1)
    live = variance > 0
    if not bool(live.any()):
        return 0.0
    return float(((centred[live] ** 4).mean(1) / variance[live] ** 2).max())


def largest_row_cosine(rows: torch.Tensor) -> float:
    """The largest |cosine| between two distinct rows (a zero row counts as parallel to another zero row)."""
    if len(rows) < 2:
        return 0.0
    norms = rows.norm(dim=1, keepdim=True)
    unit = rows / norms.clamp_min(1e-30)
    cosine = (unit @ unit.T).abs()
    zero = (norms[:, 0] == 0)
    cosine[zero[:, None] & zero[None, :]] = 1.0  # two zero rows are the same row
    cosine.fill_diagonal_(0.0)
    return float(cosine.max())


def _against_previous(received: Weights, previous: Weights, honest: Architecture) -> list[Finding]:
    if set(previous) != set(received) or any(previous[name].shape != received[name].shape for name in received):
        return []  # a reference of another run (a changed config): nothing to compare
    findings = []
    for weight, _ in honest.layers():
        before, now = previous[weight].double(), received[weight].double()
        change = float((now - before).norm() / before.norm().clamp_min(1e-30))
        if change > JUMP:
            findings.append(Finding(Check.JUMP, f"{weight} moved {change:.2f} of its norm since the last model"))
    unchanged = [name for name in honest.parameters if torch.equal(previous[name], received[name])]
    if unchanged and len(unchanged) < len(honest.parameters):
        findings.append(Finding(Check.FROZEN, f"{', '.join(unchanged[:3])} not trained since the last model, "
                                              "while the rest moved"))
    return findings
