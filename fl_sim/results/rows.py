"""The rows of a run's JSON-lines files, typed: `MetricsRow` (metrics.jsonl) and `GlobalRow` (global.jsonl).

A metrics row is built by `metrics_row` alone and a global row by `global_row` alone; `to_json` writes one, and
`read_metrics` / `read_global` (through `MetricsRow.from_json` / `GlobalRow.from_json`) read a file back into
them, the one place that handles keys a row lacks (None) or holds beyond its type (kept in `extra`, read by
no one); `recorded_config` reads run.json's config as a `RunConfig`. Readers use attributes, so mypy names a
reader that asks for a key the type does not declare.

The keys on disk: a field is written when it holds a value, in the order declared here; the scores every
metrics row carries (`SCORES`: PSNR, SSIM, MSE, label_acc) are written even when empty (null: nothing was
reconstructed), a row of a client the attack did not read or could not reconstruct also says why (`reason`),
and a row of an attacked update always has its optimiser's `loss` (null for an analytic attack).
"""
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fl_sim.contract.run_config import ConfigError, RunConfig
from fl_sim.results.outputs import read_jsonl

__all__ = ["RECOVERED_DB", "GlobalRow", "MetricsRow", "global_row", "metrics_row", "read_global", "read_metrics",
           "recorded_config", "recovered_key"]

RECOVERED_DB = (30, 40)  # thresholds of the recovered_at_<T>db figures: MetricsRow declares a field for each
OK = "ok"  # the status of a reconstruction that succeeded
SCORES = ("psnr", "ssim", "mse", "label_acc")  # written in every metrics row, null when nothing was reconstructed
Flags = list[str] | dict[str, list[str]]  # inspect:flag's failed checks: a client's, or by client of an aggregate


@dataclass(frozen=True)
class MetricsRow:
    """One line of metrics.jsonl: a client-round of `fl-sim run` (or a victim of `fl-sim attack`) and what became
    of it.

    Parameters
    ----------
    round, victim, client, clients
        Whose update: the round and client of `fl-sim run` (`client` "aggregate" for a secure aggregate, whose
        `clients` are listed), the victim of `fl-sim attack`.
    secure_aggregation, through_secure_aggregate
        "secagg+" or "emulated" for a secure aggregate; True for a client read apart from one (mosaic).
    status
        "ok", a failure of the attack ("diverged", "attack-error"), "skipped", "flagged", or a left-out reply
        ("rejected", "client-error", "no-reply", "refused").
    reason
        Why the row has no reconstruction.
    psnr, psnr_images, ssim, mse, recovered_at_30db, recovered_at_40db, label_share, label_exact, label_acc
        The scores after optimal matching (fl_sim/results/metrics.py); label_acc is the old name of label_exact.
    order, labels, image_status, true_labels
        The matching, the recovered labels in matched order, an analytic attack's per-image status, the truth's
        labels.
    loss, redraws
        The optimisation's final loss and its re-drawn restarts.
    update_norm, seconds, round_attack_seconds
        The update's parameter norm; the attack's seconds per victim and for the round.
    epsilon, epsilon_round
        DP-SGD's epsilon spent in rounds 1..round and in the round alone.
    inspect_flags
        inspect:flag's failed checks.
    scored_against, nearest, num_examples
        A user's own federation (fl_sim/server/audit.py), which sends no truth: what the row was scored against
        (the nearest image of a reference set, or what the client disclosed), each reconstruction's nearest
        reference image, and the images behind the update (the reply's num-examples).
    extra
        Keys of a row on disk that this type does not declare (never written by this code).
    """

    round: int | None = None
    victim: int | None = None
    client: int | str | None = None
    clients: list[int] | None = None
    secure_aggregation: str | None = None
    through_secure_aggregate: bool | None = None
    status: str | None = None
    reason: str | None = None
    psnr: float | None = None
    psnr_images: list[float] | None = None
    ssim: float | None = None
    mse: float | None = None
    recovered_at_30db: float | None = None
    recovered_at_40db: float | None = None
    label_share: float | None = None
    label_exact: float | None = None
    label_acc: float | None = None
    order: list[int] | None = None
    labels: list[int] | None = None
    image_status: list[str] | None = None
    true_labels: list[int] | None = None
    loss: float | None = None
    redraws: int | None = None
    update_norm: float | None = None
    seconds: float | None = None
    round_attack_seconds: float | None = None
    epsilon: float | None = None
    epsilon_round: float | None = None
    inspect_flags: Flags | None = None
    scored_against: str | None = None
    nearest: list[int] | None = None
    num_examples: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def recovered(self, db: int) -> float | None:
        """The share of the row's images recovered at `db` dB (a threshold of summary.RECOVERED_DB)."""
        return getattr(self, recovered_key(db), None)

    def to_json(self) -> dict[str, Any]:
        """The row as written to metrics.jsonl (the module docstring says which keys)."""
        written = {}
        for entry in fields(self):
            value = getattr(self, entry.name)
            if entry.name == "extra":
                continue
            if value is not None or entry.name in SCORES or (entry.name == "reason" and self.status != OK) \
                    or (entry.name == "loss" and self.true_labels is not None):
                written[entry.name] = value
        return written

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "MetricsRow":
        """A row as read from metrics.jsonl: a key it lacks is None, one it holds beyond the type goes to `extra`."""
        return cls(**{key: value for key, value in row.items() if key in METRICS_KEYS},
                   extra={key: value for key, value in row.items() if key not in METRICS_KEYS})


METRICS_KEYS = frozenset(entry.name for entry in fields(MetricsRow)) - {"extra"}


def recovered_key(db: int) -> str:
    """The name of the share of images recovered at `db` dB (a key of rows and summaries)."""
    return f"recovered_at_{db}db"


def metrics_row(status: str, **values: Any) -> MetricsRow:
    """The one builder of a metrics.jsonl row: `status` and the row's other fields by name (a name the row does not
    declare is an error). A row without a reconstruction carries the empty scores (`to_json` writes them)."""
    unknown = set(values) - METRICS_KEYS
    if unknown:
        raise TypeError(f"a metrics row has no field {', '.join(sorted(unknown))}")
    return MetricsRow(status=status, **values)


@dataclass(frozen=True)
class GlobalRow:
    """One line of global.jsonl: the global model after a round, scored on the whole test split.

    Parameters
    ----------
    round
        The round that ended.
    accuracy, loss
        The global model's test accuracy and loss.
    elapsed_seconds
        Seconds since the run began (its earlier part included, for a resumed run).
    model_changed
        Whether the round changed the global model (a round with every reply left out does not).
    extra
        Keys of a row on disk that this type does not declare.
    """

    round: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    elapsed_seconds: float | None = None
    model_changed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The row as written to global.jsonl."""
        return {entry.name: getattr(self, entry.name) for entry in fields(self) if entry.name != "extra"}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "GlobalRow":
        """A row as read from global.jsonl: a key it lacks is None, one it holds beyond the type goes to `extra`."""
        return cls(**{key: value for key, value in row.items() if key in GLOBAL_KEYS},
                   extra={key: value for key, value in row.items() if key not in GLOBAL_KEYS})


GLOBAL_KEYS = frozenset(entry.name for entry in fields(GlobalRow)) - {"extra"}


def global_row(server_round: int, accuracy: float, loss: float, elapsed_seconds: float,
               model_changed: bool) -> GlobalRow:
    """The one builder of a global.jsonl row."""
    return GlobalRow(server_round, accuracy, loss, elapsed_seconds, model_changed)


def recorded_config(run: dict) -> RunConfig | None:
    """run.json's config as `RunConfig` reads Flower's run config: a key this version does not know (an older run's)
    is left out, a missing one takes its default; None when run.json holds no config or one that does not parse."""
    config = run.get("config")
    if not isinstance(config, dict) or not config:
        return None
    known = RunConfig().to_flower()
    try:
        return RunConfig.from_flower({key: value for key, value in config.items() if key in known})
    except (ConfigError, TypeError, ValueError):
        return None


def read_metrics(path: str | Path) -> list[MetricsRow]:
    """metrics.jsonl's rows (none when the file is missing; a torn line skipped, as `read_jsonl` does)."""
    return [MetricsRow.from_json(row) for row in read_jsonl(path)]


def read_global(path: str | Path) -> list[GlobalRow]:
    """global.jsonl's rows (none when the file is missing; a torn line skipped)."""
    return [GlobalRow.from_json(row) for row in read_jsonl(path)]
