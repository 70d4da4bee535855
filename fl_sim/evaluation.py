"""The evaluation path: scoring the engine's answers against the truth and keeping the evidence.

Only this side ever holds ground truth; the engine never does.
"""
from pathlib import Path

import numpy as np

from attacker import Reconstruction, Status

from . import metrics
from .outputs import save_images


def score_and_save(result: Reconstruction, true_images, true_labels, folder: Path | None) -> dict:
    """One victim's metrics row; with `folder`, its truth.png and (matched) reconstruction.png too."""
    if not result.ok:
        row = {"status": "diverged" if result.status is Status.DIVERGED else "attack-error", "reason": result.reason,
               "psnr": None, "ssim": None, "mse": None, "label_acc": 0.0}
    else:
        row = {"status": "ok", **metrics.score(result.images, result.labels, true_images, true_labels)}
        row["labels"] = result.labels[row["order"]].tolist()
    row.update(true_labels=true_labels.tolist(), loss=result.loss, redraws=result.redraws)
    if folder is not None:
        save_images(folder / "truth.png", true_images)
        if result.ok:
            save_images(folder / "reconstruction.png", result.images[row["order"]])
    return row


def summarise(rows: list[dict]) -> dict:
    """Medians and worst cases over victims; failed victims count as wrong labels and are counted."""
    psnrs = [row["psnr"] for row in rows if row.get("psnr") is not None]
    ssims = [row["ssim"] for row in rows if row.get("ssim") is not None]

    def stat(fn, values):
        return float(fn(values)) if values else None

    return {
        "psnr_median": stat(np.median, psnrs),
        "psnr_mean": stat(np.mean, psnrs),
        "psnr_min": stat(np.min, psnrs),
        "psnr_max": stat(np.max, psnrs),
        "ssim_mean": stat(np.mean, ssims),
        "label_acc": stat(np.mean, [row.get("label_acc", 0.0) for row in rows]),
        "victims": len(rows),
        "failed": sum(row.get("status") != "ok" for row in rows),
    }
