"""The evaluation path: scoring the engine's answers against the truth and keeping the evidence.

Only this side ever holds ground truth; the engine never does. Figures over victims are in
fl_sim/results/summary.py (`summarise`, re-exported here), which counts failed attacks rather than skipping them.
"""
from pathlib import Path
from typing import Any

from attacker import Reconstruction, Status
from attacker.analytic import UNRECOVERED
from fl_sim.results import metrics
from fl_sim.results.outputs import save_images
from fl_sim.results.rows import RECOVERED_DB, recovered_key
from fl_sim.results.summary import summarise

__all__ = ["score_and_save", "summarise"]


def failure_status(result: Reconstruction) -> str:
    """A failed victim's row status: "diverged", "skipped" (not attacked: too many images) or "attack-error"."""
    return {Status.DIVERGED: "diverged", Status.SKIPPED: "skipped"}.get(result.status, "attack-error")


def score_and_save(result: Reconstruction, true_images, true_labels, folder: Path | None) -> dict[str, Any]:
    """One victim's scores, by the name of their field in its metrics row (fl_sim/results/rows.py `metrics_row`
    builds the row with them); with `folder`, its truth.png and (matched) reconstruction.png too.

    A failed attack has no PSNR, SSIM or MSE (None) and recovered nothing: none of its images, none of its
    labels."""
    row: dict[str, Any]  # JSON values
    if not result.ok:
        row = {"status": failure_status(result), "reason": result.reason,
               **{recovered_key(db): 0.0 for db in RECOVERED_DB},
               "label_share": 0.0, "label_exact": 0.0, "label_acc": 0.0}
    else:
        row = {"status": "ok", **metrics.score(result.images, result.labels, true_images, true_labels)}
        row["labels"] = result.labels[row["order"]].tolist()
        if result.image_status is not None:
            mark_unrecovered(row, result.image_status)
    row.update(true_labels=true_labels.tolist(), loss=result.loss, redraws=result.redraws)
    if folder is not None and result.status is not Status.SKIPPED:  # not attacked: no strip of a whole shard
        save_images(folder / "truth.png", true_images)
        if result.ok:
            save_images(folder / "reconstruction.png", result.images[row["order"]])
    return row


def mark_unrecovered(row: dict, status: list[str]) -> None:
    """An analytic attack's per-image status, in matched order; a placeholder the attack marked
    unrecovered scores as a failed image (0 dB), whatever truth it was matched to."""
    matched = [status[i] for i in row["order"]]
    row["image_status"] = matched
    row["psnr_images"] = [0.0 if state == UNRECOVERED else value for state, value in zip(matched, row["psnr_images"])]
    row["psnr"] = sum(row["psnr_images"]) / len(matched)
    for db in RECOVERED_DB:
        row[recovered_key(db)] = sum(value >= db for value in row["psnr_images"]) / len(matched)
