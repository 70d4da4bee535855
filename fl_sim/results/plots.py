"""Plots of a sweep's metrics against each swept key, of leakage against accuracy for run sweeps, and of
a run's leakage round by round (matplotlib, Agg: no display needed)."""
import itertools
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fl_sim.contract.attacks import find_attack  # noqa: E402
from fl_sim.results.rows import MetricsRow  # noqa: E402
from fl_sim.results.summary import (  # noqa: E402
    RECOVERED_DB,
    attacked,
    image_count,
    psnr_of,
    recovered_count,
    recovered_key,
    summarise,
)

# (column, axis label): drawn when at least one row has a number there.
PANELS = [
    ("psnr_median", "PSNR median (dB)"),
    ("ssim_mean", "SSIM mean"),
    ("label_share", "labels right (share)"),
    *((recovered_key(db), f"images recovered (\u2265 {db} dB)") for db in RECOVERED_DB),
    ("attack_seconds_per_victim", "attack seconds per victim"),
    ("update_norm_median", "update L2 norm (median)"),
    ("accuracy", "global test accuracy"),
]

MAX_BOXES = 60  # the per-client panel's boxes at most (beyond, each box pools consecutive rounds)
FRACTIONS = {"ssim_mean", "label_share", *(recovered_key(db) for db in RECOVERED_DB), "accuracy"}
LOG_SCALE = {"update_norm_median", "attack_seconds_per_victim"}


def plot_against(rows: list[dict], grid: dict[str, list[str]], key: str, path: Path) -> Path:
    """One figure, a panel per metric, `key`'s values on x (in grid order); one line per setting of the other keys.

    Values are drawn as categories, so names (models, checkpoints) and numbers are handled alike.
    """
    panels = [(column, label) for column, label in PANELS if any(_number(row.get(column)) is not None for row in rows)]
    others = [other for other in grid if other != key]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    values = [value for value in grid[key] if any(row.get(key) == value for row in rows)]  # finished points only
    positions: dict[object, int] = {value: index for index, value in enumerate(values)}
    for combination in itertools.product(*(grid[other] for other in others)):
        fixed = dict(zip(others, combination, strict=True))
        line = sorted((row for row in rows if all(row.get(k) == v for k, v in fixed.items())),
                      key=lambda row: positions.get(row.get(key), len(positions)))
        if not line:
            continue
        legend = ", ".join(_setting(k, v) for k, v in fixed.items()) or None
        for axis, (column, _) in zip(axes[0], panels, strict=True):
            points = [(positions[row[key]], _number(row.get(column))) for row in line if row.get(key) in positions]
            points = [(x, y) for x, y in points if y is not None]
            if column == "psnr_median":
                _psnr_range(axis, line, positions, key)
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=legend)
    for axis, (column, label) in zip(axes[0], panels, strict=True):
        axis.set_xticks(range(len(values)), values, rotation=30 if len(values) > 4 else 0)
        axis.set_xlabel(key)
        axis.set_ylabel(label)
        if column in FRACTIONS:
            axis.set_ylim(-0.05, 1.05)
        if column in LOG_SCALE:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    if others:
        axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_leakage_against_accuracy(rows: list[dict], grid: dict[str, list[str]], path: Path) -> Path | None:
    """Each point of a run sweep at (global accuracy, attack PSNR median), its bar the victims' PSNR range,
    named in the legend by its settings: what a defense costs against what it protects. None without such points.
    """
    points = [(row, _number(row.get("accuracy")), _number(row.get("psnr_median"))) for row in rows]
    points = [(row, x, y) for row, x, y in points if x is not None and y is not None]
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for (row, x, y), marker in zip(points, itertools.cycle("osD^v<>ph*")):
        low, high = _number(row.get("psnr_min")), _number(row.get("psnr_max"))
        spread = [[y - low], [high - y]] if low is not None and high is not None and y is not None else None
        axis.errorbar([float(x or 0)], [float(y or 0)], yerr=spread, marker=marker, markersize=8, capsize=4, alpha=0.8,
                      label=", ".join(f"{key}={row.get(key)}" for key in grid))
    axis.set_xlabel("global test accuracy after the last round")
    axis.set_ylabel("attack PSNR median (dB), bar: min to max")
    axis.margins(x=0.25, y=0.1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_rounds(rows: list[MetricsRow], accuracy_by_round: dict[int, float], path: Path, passive: bool = True
                ) -> Path | None:
    """A run's leakage over its rounds, led by the field's figure: the share of the attacked updates' images
    recovered at >= 30 and >= 40 dB per round (pooled), then the same share per client as a distribution
    (a box per round), then the global model's accuracy: does the attack weaken as the model trains?
    With `passive` (an optimisation attack, whose PSNR varies smoothly) also the PSNR median with its
    min-max band and the share of labels right; an active attack's images are exact copies or nothing, so
    its PSNR median says little beside the shares. `rows` are metrics rows of any status; only attacked
    updates count (a failed attack recovered nothing). None when there is nothing to draw."""
    by_round: dict[int, list[MetricsRow]] = {}
    for row in rows:
        if attacked(row) and row.round is not None:
            by_round.setdefault(row.round, []).append(row)
    evaluated = sorted(accuracy_by_round)
    if not by_round and not evaluated:
        return None
    rounds = sorted(by_round)
    summaries = {r: summarise(by_round[r]) for r in rounds}
    panels = ["recovered", "per-client", "accuracy"] + (["psnr", "labels"] if passive and rounds else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    axis_of = dict(zip(panels, axes[0], strict=True))
    axis = axis_of["recovered"]
    for db, marker in zip(RECOVERED_DB, "os", strict=True):
        axis.plot(rounds, [summaries[r][recovered_key(db)] for r in rounds], marker=marker, label=f"\u2265 {db} dB")
    axis.set_ylabel("images recovered (share of all)")
    axis.legend(fontsize="small")
    axis = axis_of["per-client"]
    low = RECOVERED_DB[0]
    shares = [[recovered_count(row, low) / image_count(row) for row in by_round[r]] for r in rounds]
    if rounds:
        # at most MAX_BOXES boxes, each pooling the clients of consecutive rounds: hundreds of boxes cannot be read
        # apart, and drawing them cost a long run seconds per rebuild, each round
        width = -(-len(rounds) // MAX_BOXES)
        spans = [range(start, min(start + width, len(rounds))) for start in range(0, len(rounds), width)]
        axis.boxplot([[share for i in span for share in shares[i]] for span in spans],
                     positions=[statistics.fmean(rounds[i] for i in span) for span in spans],
                     widths=0.5 * width, manage_ticks=False)
        # the clients themselves, where few enough to see: one scatter for every round (one call per round cost
        # a run of hundreds of rounds seconds per rebuild, each round)
        seen = [(r, value) for r, values in zip(rounds, shares, strict=True) if len(values) <= 50 for value in values]
        if seen:
            axis.scatter(*zip(*seen, strict=True), s=10, alpha=0.5)
    axis.set_ylabel(f"per client: share recovered \u2265 {low} dB")
    axis = axis_of["accuracy"]
    axis.plot(evaluated, [accuracy_by_round[r] for r in evaluated], marker="o", color="tab:green")
    axis.set_ylabel("global test accuracy")
    if "psnr" in axis_of:
        psnrs = {r: [psnr_of(row) for row in by_round[r]] for r in rounds}
        axis = axis_of["psnr"]
        axis.fill_between(rounds, [min(psnrs[r]) for r in rounds], [max(psnrs[r]) for r in rounds], alpha=0.15)
        axis.plot(rounds, [statistics.median(psnrs[r]) for r in rounds], marker="o")
        axis.set_ylabel("PSNR (dB): median, min-max band")
        axis_of["labels"].plot(rounds, [summaries[r]["label_share"] for r in rounds], marker="o")
        axis_of["labels"].set_ylabel("labels right (share)")
    for name, axis in axis_of.items():
        if name != "psnr":
            axis.set_ylim(-0.05, 1.05)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _setting(key: str, value: str) -> str:
    """A legend entry; an attack is marked passive (inverts honest training) or active (a malicious server)."""
    if key == "attack":
        spec = find_attack(str(value))
        return f"{value} ({spec.kind})" if spec else str(value)
    return f"{key}={value}"


def _psnr_range(axis, line: list[dict], positions: dict, key: str) -> None:
    """The spread over victims (min to max PSNR) behind the median."""
    spread = [(positions[row[key]], _number(row.get("psnr_min")), _number(row.get("psnr_max"))) for row in line
              if row.get(key) in positions]
    spread = [point for point in spread if None not in point]
    if spread:
        axis.fill_between([x for x, _, _ in spread], [low for _, low, _ in spread], [high for _, _, high in spread],
                          alpha=0.15)


def _number(value) -> float | None:
    """CSV cells are text: a number, or None for blanks and anything else."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
