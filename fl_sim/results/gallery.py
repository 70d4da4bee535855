"""OUT/gallery.html: every attacked client's truth beside its reconstruction, round by round.

Built only from what the run already wrote (run.json, global.jsonl, metrics.jsonl and the PNGs), so it
can be rebuilt after every round, or at any time later. Every value from those files is escaped, and
only rows whose round is a non-negative integer and whose client is one too (or the secure aggregate)
name an image (so no path leaves OUT).
"""
import json
import math
import operator
from html import escape
from numbers import Real
from pathlib import Path

from fl_sim.results.outputs import atomic_write_bytes, read_jsonl
from fl_sim.results.plots import plot_rounds
from fl_sim.results.summary import RECOVERED_DB, attacked, image_psnrs, recovered_key, summarise

AGGREGATE = "aggregate"  # the client of a row that attacked a secure aggregate (--defense secagg)
ROUNDS_PLOT = "leakage-by-round.png"  # PSNR, update norm and accuracy against the round

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: center; vertical-align: middle; }
img { image-rendering: pixelated; max-width: 60em; }
.failed { color: #a00; }
.batch { display: inline-block; }
.pairs { position: relative; }
.pairs img { display: block; }
.frames, .marks { display: flex; }
.frames { position: absolute; inset: 0; }
.frames span, .marks span { flex: 1; box-sizing: border-box; }
.frames .recovered { border: 2px solid #1a1; }
.marks span { font-size: 0.75em; white-space: nowrap; }
.marks .recovered { color: #1a1; font-weight: bold; }
"""
RECOVERED_MARK_DB = RECOVERED_DB[0]  # a pair at this PSNR or more gets a green frame and a check mark


def client_folder(server_round: int, client: int | str) -> str:
    """Where a client's images of a round lie, relative to the run's output folder (AGGREGATE: the
    secure aggregate's)."""
    server_round = operator.index(server_round)  # ints only, never other text
    if client == AGGREGATE and server_round >= 0:
        return f"round-{server_round:03d}/{AGGREGATE}"
    client = operator.index(client)
    if server_round < 0 or client < 0:
        raise ValueError(f"round {server_round} and client {client} must be non-negative")
    return f"round-{server_round:03d}/client-{client:03d}"


def write_gallery(out: str | Path) -> Path:
    """(Re)writes OUT/gallery.html from the run's files; returns its path."""
    out = Path(out)
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    global_rows = {row["round"]: row for row in read_jsonl(out / "global.jsonl") if _count(row.get("round"))}
    attack_rows = [row for row in read_jsonl(out / "metrics.jsonl") if _count(row.get("round"))]
    rounds = sorted(set(global_rows) | {row["round"] for row in attack_rows})
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>fl-sim run {escape(out.name)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>fl-sim run: {escape(out.name)}</h1>", _summary(run)]
    if not rounds:
        parts.append("<p>No round has finished yet.</p>")
    accuracy = {r: row["accuracy"] for r, row in global_rows.items() if isinstance(row.get("accuracy"), Real)}
    if len(rounds) > 1 and plot_rounds([row for row in attack_rows if attacked(row)], accuracy, out / ROUNDS_PLOT):
        parts.append(f"<p><img src='{ROUNDS_PLOT}' alt='leakage by round'></p>")
    for server_round in rounds:
        parts.append(_round(out, server_round, global_rows.get(server_round),
                            [row for row in attack_rows if row["round"] == server_round]))
    parts.append("</body></html>\n")
    path = out / "gallery.html"
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path


def _summary(run: dict) -> str:
    config = run.get("config", {})
    shown = ["dataset", "model", "init", "num-clients", "partition", "local-steps", "batch-size", "lr", "attack",
             "iterations", "seed"]
    items = "".join(f"<li>{escape(key)}: {escape(str(config[key]))}</li>" for key in shown if key in config)
    return f"<ul>{items}</ul>" if items else ""


def _round(out: Path, server_round: int, global_row: dict | None, rows: list[dict]) -> str:
    title = f"Round {server_round}"
    if global_row is not None:
        title += f": global accuracy {_number(global_row.get('accuracy'), '.2%')}, loss {_number(global_row.get('loss'))}"
    html = [f"<h2>{escape(title)}</h2>"]
    if not rows:
        html.append("<p>No client was attacked in this round.</p>")
        return "\n".join(html)
    summary = summarise(rows)
    shares = ", ".join(f"{_number(summary[recovered_key(db)], '.0%')} at {db} dB" for db in RECOVERED_DB)
    html.append(f"<p>{escape(str(len(rows)))} client(s), {summary['victims']} attacked, {summary['failed']} failed; "
                f"PSNR median {escape(_number(summary['psnr_median'], '.1f'))} dB (a failed attack counts as 0 dB); "
                f"images recovered: {escape(shares)}</p>")
    html.append(f"<table><tr><th>client</th><th>truth (top) and matched reconstruction; "
                f"\u2713 and green: \u2265 {RECOVERED_MARK_DB} dB</th><th>PSNR (dB)</th><th>SSIM</th>"
                f"<th>MSE</th><th>recovered \u2265 {RECOVERED_DB[0]} / {RECOVERED_DB[1]} dB</th><th>labels right</th>"
                "<th>update norm</th><th>status</th><th>reason</th></tr>")
    for row in sorted(rows, key=lambda r: r["client"] if _count(r.get("client")) else math.inf):
        named = _count(row.get("client")) or row.get("client") == AGGREGATE
        folder = client_folder(server_round, row["client"]) if named else None
        status = str(row.get("status"))
        recovered = " / ".join(_number(row.get(recovered_key(db)), ".0%") for db in RECOVERED_DB)
        html.append(
            f"<tr><td>{escape(str(row.get('client')))}</td><td>{_batch(out, folder, row)}</td>"
            f"<td>{escape(_number(row.get('psnr'), '.1f'))}</td><td>{escape(_number(row.get('ssim'), '.3f'))}</td>"
            f"<td>{escape(_number(row.get('mse'), '.2e'))}</td><td>{escape(recovered)}</td>"
            f"<td>{escape(_number(row.get('label_share', row.get('label_acc')), '.0%'))}</td>"
            f"<td>{escape(_number(row.get('update_norm'), '.3g'))}</td>"
            f"<td class='{'' if status == 'ok' else 'failed'}'>{escape(status)}</td>"
            f"<td>{escape(str(row.get('reason', '')))}</td></tr>")
    html.append("</table>")
    return "\n".join(html)


def _batch(out: Path, folder: str | None, row: dict) -> str:
    """The truth strip over the matched reconstruction strip, each pair framed in green and checked when
    recovered (from the row's per-image PSNRs, which follow the strips' order)."""
    truth, reconstruction = _image(out, folder, "truth"), _image(out, folder, "reconstruction")
    if truth == reconstruction == "\u2014":
        return truth
    psnrs = image_psnrs(row) if reconstruction != "\u2014" else None
    if not psnrs:
        return f"<div class='batch'><div class='pairs'>{truth}{reconstruction}</div></div>"
    frames = "".join(f"<span class='{'recovered' if value >= RECOVERED_MARK_DB else ''}'></span>" for value in psnrs)
    marks = "".join(
        f"<span class='recovered'>\u2713 {value:.0f}</span>" if value >= RECOVERED_MARK_DB else
        f"<span>\u2717 {value:.0f}</span>" for value in psnrs)
    return (f"<div class='batch'><div class='pairs'>{truth}{reconstruction}<div class='frames'>{frames}</div></div>"
            f"<div class='marks'>{marks}</div></div>")


def _image(out: Path, folder: str | None, name: str) -> str:
    relative = f"{folder}/{name}.png"
    if folder is None or not (out / relative).is_file():
        return "\u2014"
    return f"<img src='{escape(relative)}' alt='{escape(name)}'>"


def _count(value) -> bool:
    """A non-negative int, as rounds and client ids are (JSON floats, text and booleans are not)."""
    return type(value) is int and value >= 0


def _number(value, spec: str = ".4f") -> str:
    """Plain text, escaped where it is placed; what is not a number is shown as it is."""
    if value is None:
        return "\u2014"
    return format(value, spec) if isinstance(value, Real) and not isinstance(value, bool) else str(value)
