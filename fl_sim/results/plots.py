"""Plots of a sweep's metrics against each swept key, of leakage against accuracy for run sweeps, and of
a run's leakage round by round (matplotlib, Agg: no display needed)."""
import itertools
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from fl_sim.contract.attacks import find_attack  # noqa: E402
from fl_sim.results.summary import RECOVERED_DB, psnr_of, recovered_key, summarise  # noqa: E402

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
    positions = {value: index for index, value in enumerate(values)}
    for combination in itertools.product(*(grid[other] for other in others)):
        fixed = dict(zip(others, combination))
        line = sorted((row for row in rows if all(row.get(k) == v for k, v in fixed.items())),
                      key=lambda row: positions.get(row.get(key), len(positions)))
        if not line:
            continue
        legend = ", ".join(_setting(k, v) for k, v in fixed.items()) or None
        for axis, (column, _) in zip(axes[0], panels):
            points = [(positions[row[key]], _number(row.get(column))) for row in line if row.get(key) in positions]
            points = [(x, y) for x, y in points if y is not None]
            if column == "psnr_median":
                _psnr_range(axis, line, positions, key)
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=legend)
    for axis, (column, label) in zip(axes[0], panels):
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
        spread = [[y - low], [high - y]] if low is not None and high is not None else None
        axis.errorbar([x], [y], yerr=spread, marker=marker, markersize=8, capsize=4, alpha=0.8,
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


def plot_rounds(attack_rows: list[dict], accuracy_by_round: dict[int, float], path: Path) -> Path | None:
    """A run's attack over its rounds: PSNR (median, band min to max; a failed attack at 0 dB), labels
    right, the update norm (median) and the global model's accuracy, side by side: does the attack weaken
    as the model trains? `attack_rows` are attacked updates only. None before any round has one."""
    by_round: dict[int, list[dict]] = {}
    for row in attack_rows:
        by_round.setdefault(row["round"], []).append(row)
    if not by_round:
        return None

    def per_round(column: str) -> dict[int, list[float]]:
        values = {r: [_number(row.get(column)) for row in rows] for r, rows in sorted(by_round.items())}
        return {r: [v for v in vs if v is not None] for r, vs in values.items() if any(v is not None for v in vs)}

    psnrs = {r: [psnr_of(row) for row in rows] for r, rows in sorted(by_round.items())}
    labels = {r: [summarise(rows)["label_share"]] for r, rows in sorted(by_round.items())}
    norms = per_round("update_norm")
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    axes[0].fill_between(list(psnrs), [min(v) for v in psnrs.values()], [max(v) for v in psnrs.values()], alpha=0.15)
    axes[0].plot(list(psnrs), [statistics.median(v) for v in psnrs.values()], marker="o")
    axes[0].set_ylabel("PSNR (dB): median, min-max band")
    axes[1].plot(list(labels), [statistics.mean(v) for v in labels.values()], marker="o")
    axes[1].set_ylabel("labels right (share)")
    axes[2].plot(list(norms), [statistics.median(v) for v in norms.values()], marker="o")
    axes[2].set_ylabel("update L2 norm (median)")
    axes[2].set_yscale("log")
    evaluated = sorted(accuracy_by_round)
    axes[3].plot(evaluated, [accuracy_by_round[r] for r in evaluated], marker="o")
    axes[3].set_ylabel("global test accuracy")
    for axis in axes[1::2]:
        axis.set_ylim(-0.05, 1.05)
    for axis in axes:
        axis.set_xlabel("round")
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
