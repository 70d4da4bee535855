"""`fl-sim report OUT`: rebuilds the HTML page of a run (gallery.html) or a sweep (results.csv, plots, index.html).

Everything is rebuilt from the files the run or sweep wrote, so a page can be remade after a crash,
after more points finish, or after the page code changes. Every value shown is HTML-escaped.
"""
import argparse
import csv
import io
import json
import sys
from html import escape
from numbers import Real
from pathlib import Path

from fl_sim.contract.setting import ConfigError
from fl_sim.results import plots
from fl_sim.results.gallery import write_gallery
from fl_sim.results.outputs import atomic_write_bytes

# Summary figures, in the order results.csv lists them after the swept settings.
METRICS = ["psnr_median", "psnr_mean", "psnr_min", "psnr_max", "ssim_mean", "recovered_at_30db", "recovered_at_40db",
           "label_share", "label_exact", "label_acc", "update_norm_median", "accuracy", "parameters", "victims",
           "failed", "images", "attack_seconds", "attack_seconds_per_victim", "seconds"]
LEAKAGE_PLOT = "leakage-vs-accuracy.png"  # run sweeps: attack PSNR against the global model's accuracy
# Summary entries that echo a point's settings (already columns when swept) or are not figures.
NOT_FIGURES = {"iterations", "batch_size", "local_steps", "epochs", "lr", "momentum", "replay", "restarts", "seed",
               "rounds", "label_deals"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="the output folder of an fl-sim run or fl-sim sweep")


def build_sweep(out: str | Path, damaged: list[str] | None = None) -> list[dict]:
    """Writes OUT/results.csv, OUT/<key>.png per swept key (and OUT/leakage-vs-accuracy.png for a run sweep)
    and OUT/index.html; returns the finished points' rows. A point's summary.json that cannot be read is left
    out of the page and named in `damaged`."""
    out = Path(out)
    record = json.loads((out / "sweep.json").read_text())
    grid, rows = record["grid"], []
    for point in record["points"]:
        summary_path = out / "points" / point["folder"] / "summary.json"
        if summary_path.exists():
            try:
                summary = json.loads(summary_path.read_text(encoding="utf-8"))
                if not isinstance(summary, dict):
                    raise ValueError(f"a JSON {type(summary).__name__}, not a summary")
            except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if damaged is None:
                    raise
                damaged.append(f"{summary_path}: cannot be read ({str(error)[:80]}), point left out")
                continue
            rows.append({**point["settings"], **_figures(summary), "folder": point["folder"]})
    columns = list(grid) + [c for c in METRICS if any(c in row for row in rows)]
    columns += sorted({c for row in rows for c in row} - set(columns) - {"folder"})
    text_rows = [{column: _cell(row.get(column)) for column in columns} for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(text_rows)
    atomic_write_bytes(out / "results.csv", buffer.getvalue().encode())
    figures = [plots.plot_against(text_rows, grid, key, out / f"{_file_name(key)}.png") for key in grid] if rows else []
    leakage = plots.plot_leakage_against_accuracy(text_rows, grid, out / LEAKAGE_PLOT) \
        if record.get("mode") == "run" else None
    if leakage:
        figures.append(leakage)
    _write_index(out, record, columns, text_rows, [row["folder"] for row in rows], figures)
    return text_rows


def _figures(summary: dict) -> dict:
    return {key: value for key, value in summary.items()
            if key not in NOT_FIGURES and (value is None or (isinstance(value, Real) and not isinstance(value, bool)))}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _file_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


def _write_index(out: Path, record: dict, columns: list[str], rows: list[dict], folders: list[str],
                 figures: list[Path]) -> None:
    grid = " ".join(f"{key}={','.join(values)}" for key, values in record["grid"].items())
    head = "".join(f"<th>{escape(column)}</th>" for column in columns) + "<th>point</th>"
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(row[column])}</td>" for column in columns)
        + f"<td><a href='points/{escape(folder)}/'>{escape(folder)}</a></td></tr>"
        for row, folder in zip(rows, folders))
    images = "".join(f"<p><img src='{escape(figure.name)}' alt='{escape(figure.stem)}'></p>" for figure in figures)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>fl-sim sweep {escape(out.name)}</title>"
            "<style>body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse} "
            "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
            f"<h1>fl-sim sweep: {escape(out.name)}</h1><p>mode {escape(str(record.get('mode')))}, grid "
            f"<code>{escape(grid)}</code>, {len(rows)} of {len(record['points'])} point(s) finished</p>"
            f"<table><tr>{head}</tr>{body}</table>{images}</body></html>\n")
    atomic_write_bytes(out / "index.html", page.encode("utf-8"))


def check_records(out: Path) -> None:
    """run.json and sweep.json, when there, must be the JSON objects fl-sim wrote: a damaged one is named in one
    line (exit code 2) instead of a traceback from deep inside the page code."""
    for name, keys in (("run.json", ()), ("sweep.json", ("grid", "points"))):
        path = out / name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            whole = isinstance(record, dict) and all(key in record for key in keys)
        except (ValueError, UnicodeDecodeError) as error:
            raise ConfigError(f"{str(path)!r} is damaged ({type(error).__name__}: {str(error)[:80]}): it is not the "
                              "record fl-sim wrote; restore it, or rebuild the folder") from None
        if not whole:
            raise ConfigError(f"{str(path)!r} is not a record fl-sim wrote (a JSON object with "
                              f"{', '.join(keys) or 'the run'}): restore it, or rebuild the folder")


# The rows a run's page is built from (fl_sim/results/gallery.py reads them, skipping what is no row).
RUN_ROWS = ("global.jsonl", "metrics.jsonl")


def skipped_lines(path: Path) -> tuple[list[str], list[str]]:
    """What reading the JSON-lines file `path` skips, each as "file line N: why": (damaged lines, the torn last
    line). A kill mid-append leaves only the last line torn, without its newline: that one is said apart, as
    the rows it lost are the ones a resume retrains; any other line that is no JSON object is damage. A file
    that cannot be read at all is one damaged entry."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return [f"{path}: cannot be read ({error.strerror or error})"], []
    lines = data.split(b"\n")
    last = lines.pop()  # what follows the last newline: b"" in a whole file
    damaged, torn = [], []
    for number, line in enumerate([*lines, last], 1):
        if not line.strip():
            continue
        why = _why_no_row(line)
        if why is None:
            continue
        if number == len(lines) + 1:  # no newline after it: the torn end of an append
            torn.append(f"{path} line {number}: torn (the end of a write cut short: {why}), skipped")
        else:
            damaged.append(f"{path} line {number}: {why}, skipped")
    return damaged, torn


def _why_no_row(line: bytes) -> str | None:
    """Why a line of a JSON-lines file is no row (None: it is one)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return f"not text (binary bytes {line[:24]!r})"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        return f"not JSON ({error.msg} at column {error.colno}: {text[:40]!r})"
    return None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not a row"


def main(args) -> int:
    out = Path(args.out)
    check_records(out)
    damaged: list[str] = []
    if (out / "sweep.json").is_file():
        rows = build_sweep(out, damaged)
        print(f"fl-sim report: {len(rows)} point(s) -> {out / 'index.html'}, {out / 'results.csv'}")
    elif (out / "run.json").is_file() or (out / "global.jsonl").is_file():
        torn = []
        for name in RUN_ROWS:
            if (out / name).exists():
                lost, cut = skipped_lines(out / name)
                damaged += lost
                torn += cut
        for line in torn:
            print(f"fl-sim report: {line}", file=sys.stderr)
        print(f"fl-sim report: {write_gallery(out)}")
    else:
        raise ConfigError(f"{str(out)!r} holds neither a sweep (sweep.json) nor a run (run.json, global.jsonl)")
    if damaged:
        for line in damaged:
            print(f"fl-sim report: {line}", file=sys.stderr)
        print(f"fl-sim report: the page lacks what {len(damaged)} damaged line(s) or file(s) held (named above): "
              f"restore them, or rerun", file=sys.stderr)
        return 2
    return 0
