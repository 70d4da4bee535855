"""The evaluation path: scoring the engine's answers against the truth and keeping the evidence.

Only this side ever holds ground truth; the engine never does. Figures over victims are in
fl_sim/summary.py (`summarise`, re-exported here), which counts failed attacks rather than skipping them.
"""
from pathlib import Path

from attacker import Reconstruction, Status

from . import metrics
from .outputs import save_images
from .summary import RECOVERED_DB, recovered_key, summarise

__all__ = ["score_and_save", "summarise"]


def failure_status(result: Reconstruction) -> str:
    """A failed victim's row status: "diverged", "skipped" (not attacked: too many images) or "attack-error"."""
    return {Status.DIVERGED: "diverged", Status.SKIPPED: "skipped"}.get(result.status, "attack-error")


def score_and_save(result: Reconstruction, true_images, true_labels, folder: Path | None) -> dict:
    """One victim's metrics row; with `folder`, its truth.png and (matched) reconstruction.png too.

    A failed attack's row has no PSNR, SSIM or MSE (None) and recovered nothing: none of its images,
    none of its labels."""
    if not result.ok:
        row = {"status": failure_status(result), "reason": result.reason, "psnr": None, "ssim": None, "mse": None,
               **{recovered_key(db): 0.0 for db in RECOVERED_DB},
               "label_share": 0.0, "label_exact": 0.0, "label_acc": 0.0}
    else:
        row = {"status": "ok", **metrics.score(result.images, result.labels, true_images, true_labels)}
        row["labels"] = result.labels[row["order"]].tolist()
    row.update(true_labels=true_labels.tolist(), loss=result.loss, redraws=result.redraws)
    if folder is not None:
        save_images(folder / "truth.png", true_images)
        if result.ok:
            save_images(folder / "reconstruction.png", result.images[row["order"]])
    return row
