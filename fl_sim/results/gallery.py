"""OUT/gallery.html: every attacked client's truth beside its reconstruction, round by round (over 450 lines: one
page's parts, the settings of fl-sim's runs and of audited apps, the rounds, the clients, the paging, drawn together).

Built only from what the run already wrote (run.json, global.jsonl, metrics.jsonl and the PNGs), so it
can be rebuilt after every round, or at any time later. Every value from those files is escaped, and
only rows whose round is a non-negative integer and whose client is one too (or the secure aggregate)
name an image (so no path leaves OUT).

What a person reads, at any scale:

- The header lists the settings that shaped the run (its train mode with its own epochs or steps, the
  shards, the attack with only its own settings, the defense), then the run's counts (`update_counts`:
  attacked, recovered, skipped, failed and left out add up) and the share of images recovered.
- Each client's batch is a wrapped grid of pairs: its true image over the reconstruction matched to it,
  cut from the run's strips (truth.png, reconstruction.png) by CSS, each tile the strip's own size (the
  strips are written at twice the images' size), a recovered pair framed in green, its PSNR a caption
  under the pair and a tooltip. Images load lazily.
- A run that fits one page (PAGE_CLIENTS client rows and PAGE_IMAGES pairs) is one page. A bigger one
  is an overview (gallery.html: settings, counts, plots and a table of rounds with links) and pages per
  round, split every PAGE_CLIENTS clients or PAGE_IMAGES pairs: OUT/round-RRR/gallery.html, gallery-2.html,
  ..., each with links to the overview, its neighbours and the round's other pages. A client's batch
  is never split. A page's HTML stays near PAGE_IMAGES x ~250 bytes (about half a megabyte).
"""
import hashlib
import json
import math
import operator
import struct
from dataclasses import dataclass
from html import escape
from numbers import Real
from pathlib import Path
from typing import TypeGuard

from fl_sim.contract.attacks import find_attack
from fl_sim.contract.run_config import RunConfig
from fl_sim.results.outputs import atomic_write_bytes
from fl_sim.results.plots import plot_rounds
from fl_sim.results.rows import GlobalRow, MetricsRow, read_global, read_metrics, recorded_config
from fl_sim.results.summary import (
    RECOVERED_DB,
    attacked,
    image_count,
    image_psnrs,
    recovered_key,
    succeeded,
    summarise,
    update_counts,
)

AGGREGATE = "aggregate"  # the client of a row that attacked a secure aggregate (--defense secagg)
EMULATED = "emulated"  # a secure aggregate row's `secure_aggregation` under --defense secagg-emulated (else "secagg+")
ROUNDS_PLOT = "leakage-by-round.png"  # images recovered, accuracy and the rest against the round
PAGE = "gallery.html"  # the run's page (the overview of a run split into pages); a round's first page
PAGE_CLIENTS = 50  # client rows on one page at most
PAGE_IMAGES = 2000  # pairs of images on one page at most (one client's batch may exceed it: it is never split)
RECOVERED_MARK_DB = RECOVERED_DB[0]  # a pair at this PSNR or more is framed in green and checked
NO_IMAGE = "\u2014"
# page -> digest of what this process drew it from: a run rebuilds its gallery each round, not earlier rounds' pages
_DRAWN: dict[Path, str] = {}
YES, NO = "\u2713", "\u2717"  # a pair recovered, or not

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 100%; }
nav { margin: 0.5em 0 1em; }
nav a, nav span { margin-right: 1em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
.settings { columns: 3 18em; margin: 0 0 1em; }
.plot { max-width: 100%; height: auto; }
.failed { color: #a00; }
.client { margin: 1.2em 0 2em; }
.client h3 { margin: 0 0 0.2em; }
.client p { margin: 0 0 0.4em; }
.pairs { display: flex; flex-wrap: wrap; gap: 6px; }
.pairs figure { margin: 0; padding: 2px; border: 2px solid #ddd; background: #fafafa; }
.pairs figure.recovered { border-color: #1a1; }
.pairs img { display: block; width: var(--w); height: var(--h); object-fit: none;
             object-position: calc(var(--i) * var(--w) * -1) 0; image-rendering: pixelated; }
.pairs img + img { margin-top: 2px; }
.pairs .missing { display: block; width: var(--w); height: var(--h); margin-top: 2px; background: #eee; }
.pairs figcaption { font-size: 11px; line-height: 14px; text-align: center; width: var(--w); overflow: hidden;
                    white-space: nowrap; }
.pairs .recovered figcaption { color: #1a1; font-weight: bold; }
"""


@dataclass(frozen=True)
class Page:
    """One page of a round: its file (relative to OUT), its rows, its number among the round's pages."""

    server_round: int
    number: int
    rows: tuple[MetricsRow, ...]

    @property
    def path(self) -> str:
        name = PAGE if self.number == 1 else f"gallery-{self.number}.html"
        return f"round-{self.server_round:03d}/{name}"


def client_folder(server_round: int, client: int | str) -> str:
    """Where a client's images of a round lie, relative to the run's output folder (AGGREGATE: the
    secure aggregate's)."""
    server_round = operator.index(server_round)  # ints only, never other text
    if client == AGGREGATE and server_round >= 0:
        return f"round-{server_round:03d}/{AGGREGATE}"
    if isinstance(client, str):
        raise ValueError(f"client {client!r} is neither a client number nor {AGGREGATE!r}")
    client = operator.index(client)
    if server_round < 0 or client < 0:
        raise ValueError(f"round {server_round} and client {client} must be non-negative")
    return f"round-{server_round:03d}/client-{client:03d}"


def write_gallery(out: str | Path) -> Path:
    """(Re)writes OUT/gallery.html (and, for a run too big for one page, its round pages) from the run's
    files; returns the path of gallery.html. A page whose content has not changed is not rewritten."""
    out = Path(out)
    run = _read_run(out)
    config = recorded_config(run)
    global_rows = {row.round: row for row in read_global(out / "global.jsonl") if _count(row.round)}
    rows = [row for row in read_metrics(out / "metrics.jsonl") if _count(row.round)]
    rounds = sorted(set(global_rows) | {row.round for row in rows if _count(row.round)})
    by_round = {r: sorted((row for row in rows if row.round == r), key=_client_order) for r in rounds}
    accuracy = {r: row.accuracy for r, row in global_rows.items() if row.accuracy is not None and _real(row.accuracy)}
    audit = run.get("audit")
    attack_name = config.attack if config is not None else audit.get("attack") if isinstance(audit, dict) else None
    spec = find_attack(attack_name) if isinstance(attack_name, str) else None
    passive = spec is None or not spec.active
    plot = len(rounds) > 1 and plot_rounds(rows, accuracy, out / ROUNDS_PLOT, passive) is not None
    head = [_settings(run), _run_counts(rows)]
    if plot:
        head.append(f"<p><img class='plot' src='{ROUNDS_PLOT}' alt='leakage by round'></p>")
    pages = {r: _split(r, by_round[r]) for r in rounds}
    one_page = len(rows) <= PAGE_CLIENTS and sum(_images(row) for row in rows) <= PAGE_IMAGES
    if one_page:
        body = [*head] if rounds else [*head, "<p>No round has finished yet.</p>"]
        for server_round in rounds:
            body.append(_round_head(server_round, global_rows.get(server_round), by_round[server_round], 2))
            body.extend(_client(out, "", row) for row in by_round[server_round])
        return _write(out, PAGE, _page(f"fl-sim run: {out.name}", out.name, body))
    overview = [*head, _round_table(rounds, global_rows, by_round, pages)]
    for index, server_round in enumerate(rounds):
        neighbours = (rounds[index - 1] if index else None, rounds[index + 1] if index + 1 < len(rounds) else None)
        round_head = _round_head(server_round, global_rows.get(server_round), by_round[server_round], 1)
        for page in pages[server_round]:
            path = out / page.path
            drawn = hashlib.blake2b(repr((page.rows, neighbours, len(pages[server_round]), round_head)).encode(),
                                    digest_size=16).hexdigest()
            if _DRAWN.get(path) == drawn and path.is_file():
                continue  # drawn by this process from the same rows and links: the file holds it
            body = [_navigation(page, pages[server_round], neighbours), round_head]
            if len(pages[server_round]) > 1:
                body.append(f"<p>Page {page.number} of {len(pages[server_round])}: clients "
                            f"{escape(str(page.rows[0].client))} to {escape(str(page.rows[-1].client))}"
                            "</p>")
            body.extend(_client(out, "../", row) for row in page.rows)
            _write(out, page.path, _page(f"fl-sim run: {out.name}, round {server_round}", out.name, body))
            _DRAWN[path] = drawn
        _remove_stale_pages(out, server_round, len(pages[server_round]))
    return _write(out, PAGE, _page(f"fl-sim run: {out.name}", out.name, overview))


def _read_run(out: Path) -> dict:
    try:
        run = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


def _page(heading: str, name: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>fl-sim run {escape(name)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{escape(heading)}</h1>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _write(out: Path, relative: str, html: str) -> Path:
    path = out / relative
    data = html.encode("utf-8")
    if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        atomic_write_bytes(path, data)
    return path


def _remove_stale_pages(out: Path, server_round: int, count: int) -> None:
    """A round's pages beyond `count` (left by an earlier build with other page limits)."""
    for path in (out / f"round-{server_round:03d}").glob("gallery-*.html"):
        number = path.stem.removeprefix("gallery-")
        if number.isdigit() and int(number) > count:
            path.unlink(missing_ok=True)


def _split(server_round: int, rows: list[MetricsRow]) -> list[Page]:
    """The round's rows in pages of at most PAGE_CLIENTS rows and PAGE_IMAGES pairs (a row never split)."""
    pages: list[list[MetricsRow]] = [[]]
    images = 0
    for row in rows:
        if pages[-1] and (len(pages[-1]) >= PAGE_CLIENTS or images + _images(row) > PAGE_IMAGES):
            pages.append([])
            images = 0
        pages[-1].append(row)
        images += _images(row)
    return [Page(server_round, number, tuple(rows)) for number, rows in enumerate(pages, 1)]


def _images(row: MetricsRow) -> int:
    """The pairs a row draws: its images if it was attacked, none if it was skipped or left out."""
    return image_count(row) if attacked(row) else 0


def _settings(run: dict) -> str:
    """The settings that shaped the run (run.json's config, read by `RunConfig.from_flower`), each shown only
    where it played a part."""
    audit = run.get("audit")
    if isinstance(audit, dict):  # a user's own Flower app, audited (fl_sim/server/audit.py)
        items = "".join(f"<li>{escape(str(key).replace('_', ' '))}: {escape(str(value))}</li>"
                        for key, value in audit.items() if value is not None and key != "out")
        return f"<ul class='settings'>{items}</ul>"
    c = recorded_config(run)
    if c is None:
        return ""
    shown: list[tuple[str, object]] = [("dataset", c.dataset), ("model", c.model), ("init", c.init)]
    shown += [("clients", c.num_clients), ("rounds", c.rounds)]
    shown.append(("partition", f"dirichlet, alpha {c.alpha}" if c.partition == "dirichlet" else c.partition))
    shown.append(("shards", f"{c.min_shard} to {c.max_shard} examples a client" if c.max_shard > 0
                   else "each client's whole partition"))
    extra = {"fedprox": f", mu {c.proximal_mu}", "fedadam": f", server lr {c.server_lr}",
             "fedyogi": f", server lr {c.server_lr}"}.get(str(c.strategy), "")
    shown.append(("strategy", f"{c.strategy}{extra}"))
    if c.fraction_train != 1:
        shown.append(("clients sampled a round", c.fraction_train))
    mode = c.train_mode
    if mode == "epochs":
        training = f"epochs: {c.epochs} pass(es) over the shard in batches of {c.batch_size}"
    elif mode == "steps":
        training = (f"steps: {c.local_steps} step(s) of {c.batch_size} examples"
                    + (f", {c.epochs} times over" if c.epochs != 1 else ""))
    else:
        training = f"{mode}: one step of {c.batch_size} examples"
    shown += [("local training", training), ("lr", c.lr)]
    shown += [(key, value) for key, value in (("momentum", c.momentum), ("weight-decay", c.weight_decay)) if value]
    if c.batchnorm != "train":
        shown.append(("batchnorm", c.batchnorm))
    shown.append(("defense", c.defense))
    if c.server_dp.side is not None:
        shown.append(("server DP", f"{c.server_dp}: {run.get('server_dp') or 'Flower central DP wrapper'}"))
    shown.append(("attack", _attack(c)))
    if find_attack(c.attack) is not None:
        shown.append(("max attack images", c.max_attack_images))
        if c.attack_every != 1:
            shown.append(("attack every", f"{c.attack_every} rounds"))
        if c.attack_clients:
            shown.append(("attacked clients", ",".join(map(str, c.attack_clients))))
    if c.inject_faults:
        faults = sorted(c.inject_faults.items())
        shown.append(("injected faults", ",".join(f"{client}={kind}" for client, kind in faults)))
    shown.append(("seed", c.seed))
    items = "".join(f"<li>{escape(key)}: {escape(str(value))}</li>" for key, value in shown if value is not None)
    return f"<ul class='settings'>{items}</ul>"


def _attack(c: RunConfig) -> str:
    """The attack with only its own settings (those its registry entry says it reads), those left at
    'the preset's' (None) or off left out."""
    spec = find_attack(c.attack)
    if spec is None:
        return c.attack
    parts = []
    for name in spec.options:
        value = getattr(c, name, None)
        if value in (None, "", False, 0) and name != "imprint_bins":
            continue
        if name == "imprint_bins":  # 0: the rows the attack builds (its preset block, or sized for the round)
            value = c.imprint_rows
        parts.append(name.replace("_", " ") if value is True else f"{name.replace('_', ' ')} {value}")
    return f"{c.attack} ({spec.kind}{': ' + ', '.join(parts) if parts else ''})"


def _run_counts(rows: list[MetricsRow]) -> str:
    """The run's client updates, each counted once, and the share of images recovered."""
    if not rows:
        return ""
    return f"<p><b>Whole run</b>: {escape(_counts_text(rows))}</p>"


def _counts_text(rows: list[MetricsRow]) -> str:
    counts, summary = update_counts(rows), summarise(rows)
    text = (f"{counts['updates']} client update(s): {counts['attacked']} attacked ({counts['recovered']} with images "
            f"recovered at \u2265 {RECOVERED_MARK_DB} dB, {counts['unrecovered']} without, {counts['failed']} failed), "
            f"{counts['skipped']} skipped (not read by the attack), {counts['left_out']} left out (faulty replies)")
    if summary["images"]:
        shares = ", ".join(f"{_number(summary[recovered_key(db)], '.0%')} at \u2265 {db} dB" for db in RECOVERED_DB)
        text += f"; images recovered: {shares} (of {summary['images']})"
    if summary["epsilon"] is not None:
        text += f"; DP-SGD epsilon spent by then: up to {_number(summary['epsilon'], '.3g')}"
    return text


def _round_head(server_round: int, global_row: GlobalRow | None, rows: list[MetricsRow], level: int) -> str:
    """A round's summary first: images recovered, accuracy, what became of each client update."""
    title = f"Round {server_round}"
    if global_row is not None:
        title += (f": global accuracy {_number(global_row.accuracy, '.2%')}, "
                  f"loss {_number(global_row.loss)}")
    html = [f"<h{level + 1} id='round-{server_round}'>{escape(title)}</h{level + 1}>"]
    if not rows:
        html.append("<p>No client update was recorded in this round.</p>")
        return "\n".join(html)
    html.append(f"<p>{escape(_counts_text(rows))}. Each pair: the client's true image over the reconstruction "
                f"matched to it, framed in green (\u2713) at \u2265 {RECOVERED_MARK_DB} dB; hover for details.</p>")
    return "\n".join(html)


def _round_table(rounds: list[int], global_rows: dict[int, GlobalRow], by_round: dict[int, list[MetricsRow]],
                 pages: dict[int, list[Page]]) -> str:
    """The overview of a run split into pages: a line per round, with links to its pages."""
    low, high = RECOVERED_DB
    head = ("<tr><th>round</th><th>global accuracy</th>"
            f"<th>images recovered \u2265 {low} dB</th><th>\u2265 {high} dB</th>"
            "<th>updates</th><th>attacked</th><th>with images recovered</th><th>failed</th><th>skipped</th>"
            "<th>left out</th><th>pages</th></tr>")
    lines = []
    for server_round in rounds:
        rows = by_round[server_round]
        counts, summary = update_counts(rows), summarise(rows)
        links = " ".join(f"<a href='{escape(page.path)}'>{page.number}</a>" for page in pages[server_round])
        accuracy = global_rows[server_round].accuracy if server_round in global_rows else None
        cells = [str(server_round), _number(accuracy, ".2%"),
                 _number(summary[recovered_key(low)], ".0%"), _number(summary[recovered_key(high)], ".0%"),
                 *(str(counts[key]) for key in ("updates", "attacked", "recovered", "failed", "skipped", "left_out"))]
        lines.append("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells) + f"<td>{links}</td></tr>")
    return ("<h2>Rounds</h2><p>Each round's clients are on its own page(s): truth over reconstruction, image by "
            f"image.</p><table>{head}{''.join(lines)}</table>")


def _navigation(page: Page, pages: list[Page], neighbours: tuple[int | None, int | None]) -> str:
    previous, following = neighbours
    links = [f"<a href='../{PAGE}'>\u2191 overview</a>"]
    if previous is not None:
        links.append(f"<a href='../round-{previous:03d}/{PAGE}'>\u2190 round {previous}</a>")
    if following is not None:
        links.append(f"<a href='../round-{following:03d}/{PAGE}'>round {following} \u2192</a>")
    if len(pages) > 1:
        links.append("pages: " + " ".join(
            f"<span>{other.number}</span>" if other.number == page.number else
            f"<a href='{escape(Path(other.path).name)}'>{other.number}</a>" for other in pages))
    return f"<nav>{' '.join(links)}</nav>"


def _client(out: Path, base: str, row: MetricsRow) -> str:
    """A client's section: its figures in a line, then its batch as a wrapped grid of pairs."""
    named = _count(row.client) or row.client == AGGREGATE
    folder = client_folder(row.round, row.client) if named and row.round is not None and row.client is not None \
        else None
    status = str(row.status)
    name = f"client {row.client}"
    if row.client == AGGREGATE:  # emulated: the server's own mean of the replies, not SecAgg+'s
        name = "secure aggregate (emulated)" if row.secure_aggregation == EMULATED else "secure aggregate"
    summary = summarise([row])
    if succeeded(row):
        images = summary["images"]
        recovered = ", ".join(f"{round(summary[recovered_key(db)] * images)} \u2265 {db} dB" for db in RECOVERED_DB)
        label_share = row.label_share if row.label_share is not None else row.label_acc
        figures = (f"{images} image(s), recovered {recovered}; PSNR {_number(row.psnr, '.1f')} dB, "
                   f"SSIM {_number(row.ssim, '.3f')}, labels right {_number(label_share, '.0%')}, "
                   f"update norm {_number(row.update_norm, '.3g')}")
        if _real(row.epsilon):
            figures += (f", DP-SGD epsilon {_number(row.epsilon_round, '.3g')} this round, "
                        f"{_number(row.epsilon, '.3g')} in rounds 1..{row.round}")
    else:
        kind = "failed" if attacked(row) else "not attacked"
        figures = f"{kind} ({status}): {row.reason or 'no reason given'}"
    html = [f"<section class='client'><h3>{escape(name)}</h3>",
            f"<p class='{'' if status == 'ok' else 'failed'}'>{escape(figures)}</p>"]
    if folder is not None and attacked(row):
        html.append(_pairs(out, base, folder, row))
    html.append("</section>")
    return "\n".join(html)


def _pairs(out: Path, base: str, folder: str, row: MetricsRow) -> str:
    """The batch as pairs (truth over matched reconstruction), tiles cut from the two strips by CSS."""
    size = _png_size(out / folder / "truth.png")
    listed = any(isinstance(values, list) and values for values in (row.true_labels, row.psnr_images))
    # a row that lists no images (written before rows named their labels): square images side by side
    count = image_count(row) if listed or size is None else max(1, size[0] // max(1, size[1]))
    truth = _strip(out, folder, "truth", count)
    if truth is None:
        return f"<p>{NO_IMAGE} (no truth.png)</p>"
    psnrs = image_psnrs(row) or []  # rows written before per-image PSNRs were kept have none
    reconstruction = _strip(out, folder, "reconstruction", count) if succeeded(row) else None
    width, height = truth
    true_labels, labels = row.true_labels, row.labels
    pairs = []
    for index in range(count):
        tile = f" style='--i:{index}' loading='lazy' alt=''>"
        parts = [f"<img src='{escape(base + folder)}/truth.png'{tile}"]
        details = [f"image {index + 1}"]
        if isinstance(true_labels, list) and index < len(true_labels):
            details.append(f"label {true_labels[index]}")
        done, caption = False, NO_IMAGE
        if reconstruction is not None:
            parts.append(f"<img src='{escape(base + folder)}/reconstruction.png'{tile}")
            if isinstance(labels, list) and index < len(labels):
                details.append(f"reconstructed label {labels[index]}")
            if index < len(psnrs):
                done = psnrs[index] >= RECOVERED_MARK_DB
                details.append(f"PSNR {psnrs[index]:.1f} dB")
                caption = f"{YES if done else NO} {psnrs[index]:.0f}"
        else:
            parts.append("<span class='missing'></span>")
        pairs.append(f"<figure{' class=recovered' if done else ''} title='{escape(', '.join(map(str, details)))}'>"
                     f"{''.join(parts)}<figcaption>{escape(caption)}</figcaption></figure>")
    return f"<div class='pairs' style='--w:{width}px;--h:{height}px'>{''.join(pairs)}</div>"


def _strip(out: Path, folder: str, name: str, count: int) -> tuple[int, int] | None:
    """The size of one tile of OUT/folder/name.png, a strip of `count` images side by side; None when the
    file is missing or is not such a strip."""
    size = _png_size(out / folder / f"{name}.png")
    if size is None or count < 1 or size[0] % count:
        return None
    return size[0] // count, size[1]


def _png_size(path: Path) -> tuple[int, int] | None:
    """A PNG's width and height from its header (the image itself is not decoded)."""
    try:
        with open(path, "rb") as file:
            header = file.read(24)
    except OSError:
        return None
    if len(header) < 24 or header[:8] != b"\x89PNG\r\n\x1a\n" or header[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def _client_order(row: MetricsRow) -> float:
    return row.client if isinstance(row.client, int) and _count(row.client) else math.inf


def _count(value: object) -> TypeGuard[int]:
    """A non-negative int, as rounds and client ids are (JSON floats, text and booleans are not)."""
    return type(value) is int and value >= 0


def _real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _number(value: object, spec: str = ".4f") -> str:
    """Plain text, escaped where it is placed; what is not a number is shown as it is."""
    if value is None:
        return NO_IMAGE
    return format(value, spec) if _real(value) else str(value)
