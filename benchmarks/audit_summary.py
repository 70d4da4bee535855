"""What an audit of a Flower app (fl_sim.malicious) read, in the field's terms, from its output folders.

For each folder: the client-rounds recorded (and how many were attacked, skipped, failed or left out), the share of
the images behind the attacked updates that some reconstruction reaches at >= 20 / 30 / 40 dB against its nearest
reference image (each reference image counted once per update; a failed or skipped update recovered nothing), and
the median and worst nearest-match PSNR over the attacked rows.

    python benchmarks/audit_summary.py out/audit-quickstart out/audit-mlp
"""
import argparse
import statistics
import sys
from pathlib import Path

from fl_sim.results.nearest import recovered_share
from fl_sim.results.rows import MetricsRow, read_metrics

THRESHOLDS = (20, 30, 40)
LEFT_OUT = {"rejected", "client-error", "no-reply", "refused"}


def images_behind(row: MetricsRow) -> int:
    return row.num_examples or len(row.true_labels or row.psnr_images or []) or 1


def summary(out: Path) -> dict[str, object]:
    rows = read_metrics(out / "metrics.jsonl")
    if not rows:
        raise SystemExit(f"{out}: no metrics.jsonl rows")
    left_out = [row for row in rows if row.status in LEFT_OUT]
    skipped = [row for row in rows if row.status == "skipped"]
    attacked = [row for row in rows if row not in left_out and row not in skipped]
    ok = [row for row in attacked if row.status == "ok"]
    counted = attacked + skipped
    total = sum(images_behind(row) for row in counted)
    shares = {}
    for db in THRESHOLDS:
        reached = 0.0
        for row in ok:
            if row.psnr_images is None:
                continue
            if row.nearest is not None:
                reached += recovered_share(row.psnr_images, row.nearest, images_behind(row), db) * images_behind(row)
            else:  # scored after optimal matching (disclosed truth): one reconstruction per image
                reached += sum(value >= db for value in row.psnr_images)
        shares[db] = reached / total if total else 0.0
    psnrs = [row.psnr for row in ok if row.psnr is not None]
    return {"folder": str(out), "rows": len(rows), "rounds": len({row.round for row in rows}),
            "attacked": len(attacked), "failed": len(attacked) - len(ok), "skipped": len(skipped),
            "left_out": len(left_out), "images": total, **{f">={db}dB": shares[db] for db in THRESHOLDS},
            "psnr_median": statistics.median(psnrs) if psnrs else None, "psnr_worst": min(psnrs) if psnrs else None,
            "scored_against": sorted({row.scored_against or "" for row in ok})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="audit output folders (each holds metrics.jsonl)")
    args = parser.parse_args(argv)
    header = ("folder", "rows", "rounds", "attacked", "failed", "skipped", "left_out", "images", ">=20dB", ">=30dB",
              ">=40dB", "psnr_median", "psnr_worst")
    print(" | ".join(header))
    for folder in args.folders:
        found = summary(folder)
        cells = []
        for key in header:
            value = found[key]
            cells.append(f"{value:.1%}" if key.startswith(">=") and isinstance(value, float) else
                         f"{value:.1f}" if isinstance(value, float) else "n/a" if value is None else str(value))
        print(" | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
