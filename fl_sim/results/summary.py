"""Figures over victims, from metrics rows: what summary.json, sweeps and the gallery report.

Plain Python and numpy (no torch), so the gallery and `fl-sim report` can use it cheaply. Conventions,
the same everywhere (docs/attacks.md, "Scores"):

- A failed attack (status other than "ok": diverged, attack-error, ...) is a victim with no
  reconstruction: PSNR 0 dB and SSIM 0 in medians and means, none of its images recovered, none of
  its labels right. `failed` says how many there were.
- An image is recovered at T dB when its PSNR to its matched truth is at least T; shares of recovered
  images and of right labels are pooled: recovered images / all images of all victims.
- Rows of clients the server never attacked are not victims: a rejected, crashed or missing reply (left
  out of the attack and of the average) and an update the attack did not read (status "skipped": more
  images behind it than --max-attack-images, say; status "flagged": a client not attacked that flagged the
  model it was sent, under --defense inspect:flag, counted with the skipped). `update_counts` counts every kind of row.
"""
import math
from numbers import Real

import numpy as np

from fl_sim.contract.records import FLAGGED, REPLY_FAULTS
from fl_sim.results.rows import OK, RECOVERED_DB, MetricsRow, recovered_key

__all__ = ["EPSILON", "EPSILON_ROUND", "RECOVERED_DB", "attacked", "image_count", "image_psnrs", "labels_right",
           "psnr_of", "recovered_count", "recovered_key", "succeeded", "summarise", "update_counts"]

FAILED_PSNR = 0.0  # dB: the field's "no reconstruction"
FAILED_SSIM = 0.0
SKIPPED = "skipped"  # an update the attack did not read (its row's reason says why)
NOT_ATTACKED = REPLY_FAULTS | {SKIPPED, FLAGGED}  # client-rounds the attack never read: not victims
# A row's DP-SGD epsilon (--defense dpsgd): spent in rounds 1..its round, and in its round alone (clients/privacy.py).
EPSILON, EPSILON_ROUND = "epsilon", "epsilon_round"
COUNT_KEYS = ("updates", "attacked", "recovered", "unrecovered", "failed", "skipped", "left_out")


def attacked(row: MetricsRow) -> bool:
    """A row of an attacked update, successful or not (not one left out or skipped before the attack)."""
    return row.status not in NOT_ATTACKED


def update_counts(rows: list[MetricsRow]) -> dict[str, int]:
    """Every row (a client-round the server recorded) counted once, by what became of it:

    updates = attacked + skipped + left_out, and attacked = recovered + unrecovered + failed, where
    recovered means at least one image at RECOVERED_DB[0] dB or more, unrecovered an attack that ran
    but recovered none, failed one that produced no reconstruction (diverged, attack-error, ...),
    skipped an update the attack did not read and left_out a faulty reply (neither attacked nor averaged).
    """
    left_out = sum(row.status in REPLY_FAULTS for row in rows)
    skipped = sum(row.status in (SKIPPED, FLAGGED) for row in rows)
    victims = [row for row in rows if attacked(row)]
    failed = sum(not succeeded(row) for row in victims)
    recovered = sum(succeeded(row) and recovered_count(row, RECOVERED_DB[0]) > 0 for row in victims)
    return {"updates": len(rows), "attacked": len(victims), "recovered": recovered,
            "unrecovered": len(victims) - failed - recovered, "failed": failed, "skipped": skipped,
            "left_out": left_out}


def succeeded(row: MetricsRow) -> bool:
    return row.status == OK and _number(row.psnr) is not None


def psnr_of(row: MetricsRow) -> float:
    """The row's PSNR, FAILED_PSNR for a failed attack."""
    return float(row.psnr) if succeeded(row) and row.psnr is not None else FAILED_PSNR


def image_psnrs(row: MetricsRow) -> list[float] | None:
    """Per-image PSNRs of a successful row (matched order), None when the row has none."""
    values = row.psnr_images
    if not succeeded(row) or not isinstance(values, list):
        return None
    # JSON numbers are ints and floats (a bool is neither here); checked by type, as rows hold thousands of them
    if not all(type(v) in (int, float) and math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def image_count(row: MetricsRow) -> int:
    """How many images the victim held: its true labels (every attacked row has them), else its PSNRs."""
    for values in (row.true_labels, row.psnr_images):
        if isinstance(values, list) and values:
            return len(values)
    return 1


def recovered_count(row: MetricsRow, db: int) -> int:
    """The victim's images at `db` dB or more; 0 for a failed attack."""
    psnrs = image_psnrs(row)
    if psnrs is not None:
        return sum(value >= db for value in psnrs)
    share = _number(row.recovered(db)) if succeeded(row) else None
    return round(share * image_count(row)) if share is not None else 0


def labels_right(row: MetricsRow) -> float:
    """The victim's labels right, as a count of images; 0 for a failed attack. Rows written before
    label_share existed have only the all-or-nothing label_acc."""
    if not succeeded(row):
        return 0.0
    share = _number(row.label_share)
    if share is None:
        share = _number(row.label_acc) or 0.0
    return share * image_count(row)


def summarise(rows: list[MetricsRow]) -> dict:
    """Medians, extremes and pooled shares over the attacked victims, failures counted as above; with
    `skipped` and `left_out`, the rows that were not victims."""
    counts = update_counts(rows)
    rows = [row for row in rows if attacked(row)]
    psnrs = [psnr_of(row) for row in rows]
    ssims = [_number(row.ssim) if succeeded(row) else None for row in rows]
    images = sum(image_count(row) for row in rows)
    exact = [float(succeeded(row) and bool(_number(row.label_exact if row.label_exact is not None
                                                   else row.label_acc))) for row in rows]

    def stat(fn, values):
        return float(fn(values)) if values else None

    summary = {
        "psnr_median": stat(np.median, psnrs),
        "psnr_mean": stat(np.mean, psnrs),
        "psnr_min": stat(np.min, psnrs),
        "psnr_max": stat(np.max, psnrs),
        "ssim_mean": stat(np.mean, [FAILED_SSIM if value is None else value for value in ssims]),
        "label_share": sum(labels_right(row) for row in rows) / images if rows else None,
        "label_exact": stat(np.mean, exact),
        "label_acc": stat(np.mean, exact),  # the old name of label_exact, kept for existing readers
    }
    for db in RECOVERED_DB:
        summary[recovered_key(db)] = sum(recovered_count(row, db) for row in rows) / images if rows else None
    summary.update(victims=len(rows), failed=counts["failed"], images=images, recovered_victims=counts["recovered"],
                   skipped=counts["skipped"], left_out=counts["left_out"], epsilon=largest_epsilon(rows))
    return summary


def largest_epsilon(rows: list[MetricsRow]) -> float | None:
    """The largest DP-SGD epsilon the rows carry (the most any victim had spent by then); None: no DP-SGD."""
    values = [value for value in (_number(row.epsilon) for row in rows) if value is not None]
    return max(values) if values else None


def _number(value) -> float | None:
    """A finite JSON number (not a boolean), else None."""
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
