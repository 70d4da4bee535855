"""The defense x attack matrix: every cell a small real Flower federation (`fl-sim run`), cached in its own folder.

    .venv/bin/fl-sim pretrain --dataset mnist --data-root ../shared/data --model cnn --train-examples 6000 \
      --epochs 1 --seed 0 --out out/cnn-mnist.pt
    .venv/bin/python benchmarks/defense_matrix.py --data-root ../shared/data --init out/cnn-mnist.pt --out out/matrix
    .venv/bin/python benchmarks/defense_matrix.py ... --rows none,dpsgd-eps1 --cols ig   # a subset

Rows are what the clients (or the server's Flower wrapper) do, columns the server's attack; ROWS and COLUMNS
below hold their flags. Each cell runs `fl-sim run` (Ray simulation: 3 clients, 2 rounds, MNIST, the ConvNet,
plain SGD at lr 0.01, shards of 64 examples; from the --init checkpoint, except IG's column, which starts
untrained: IG recovers little from a trained model at this budget, docs/findings.md) into
OUT/cells/<row>__<col>/, then writes cell.json there: the share of the attacked clients' images recovered at >=
30 and 40 dB (over both rounds; IG, the slow one, reads round 1 only: one step of one image, the setting where
it works), the federation's final test accuracy, the largest DP-SGD epsilon spent by the end, and the command. A
cell whose cell.json holds the same command is not run again; `--redo` runs the named cells again (after a merge
changes what a flag does).

The DP-SGD rows aim at a budget, not a noise multiplier: `dpsgd-eps1` and `dpsgd-eps8` take the noise multiplier
Opacus' `get_noise_multiplier` (RDP accountant) finds for epsilon 1 and 8 at delta 1e-5 after the cell's steps
(2 rounds x K steps) at its sample rate (B / 64); the cells report the epsilon the clients themselves computed.

A row or column whose flag this checkout does not know (`--defense inspect`, `--attack mosaic`, from branches
not merged yet) is printed `pending`, never run; a cell whose run fails is printed `failed` (its error in
cell.json), not cached. OUT/matrix.md holds the table, OUT/matrix.json the cells, OUT/defense-matrix.png the
heat map (share at 30 dB; each cell also says 40 dB, accuracy and epsilon).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import common

from fl_sim.commands.run import NOTHING_WORKED
from fl_sim.contract.attacks import attack_names
from fl_sim.contract.defenses import DefenseSpec
from fl_sim.contract.records import ReplyStatus
from fl_sim.contract.setting import ConfigError
from fl_sim.results.outputs import write_json
from fl_sim.results.rows import read_global, read_metrics
from fl_sim.results.summary import RECOVERED_DB, largest_epsilon, recovered_key, summarise

CLIENTS, ROUNDS, SHARD, DELTA = 3, 2, 64, 1e-5
RETRIES = 1  # a cell whose Ray workers died under it (a shared machine) is run once more
TASK = ["--dataset", "mnist", "--model", "cnn", "--num-clients", str(CLIENTS), "--rounds", str(ROUNDS),
        "--train-mode", "steps", "--lr", "0.01", "--momentum", "0", "--min-shard", str(SHARD), "--max-shard",
        str(SHARD), "--seed", "0"]


@dataclass(frozen=True)
class Column:
    """An attack and the round's training it reads (K steps of B examples), with its own flags."""

    attack: str
    local_steps: int
    batch_size: int
    flags: tuple[str, ...] = ()
    targets: bool = True  # attack client 0 only (--attack-clients 0), as trap needs; not under secure aggregation
    trained: bool = True  # start from --init (IG works on untrained models only at this budget: docs/findings.md)

    @property
    def sample_rate(self) -> float:
        return self.batch_size / SHARD

    @property
    def steps(self) -> int:
        return ROUNDS * self.local_steps


# Row: the flags of a defense. A DP-SGD row names its target epsilon instead (its noise is the column's).
ROWS: dict[str, list[str] | float] = {
    "none": [],
    "dpsgd-eps1": 1.0,
    "dpsgd-eps8": 8.0,
    "ldp": ["--defense", "ldp:clip=1:eps=8:delta=1e-5"],  # Flower's LocalDpMod: sigma = sqrt(2 ln(1.25/d)) / 8
    "clip": ["--defense", "clip:1"],
    "prune": ["--defense", "prune:0.9"],
    "fp16": ["--defense", "fp16"],
    # Flower's SecAgg+ with Flower's default settings: the server sees the sum of 3 clients' updates, 96 images in
    # the imprint columns, more than --max-attack-images' default 64
    "secagg": ["--defense", "secagg", "--max-attack-images", "128"],
    # SecAgg+ with the settings a malicious server picks (its ServerApp sets them): max weight = the examples a
    # client reports (K x B = 32), so every weight is 1; 2^24 levels over +-8 (exact in Flower's float32 arithmetic:
    # the mosaic arms on that grid, fl_sim/server/mosaic.py)
    "secagg-server": ["--defense", "secagg", "--max-attack-images", "128", "--secagg-max-weight", "32",
                      "--secagg-quantization-range", str(2**24), "--secagg-clipping-range", "8"],
    "inspect": ["--defense", "inspect"],  # the client checks the model it is sent and refuses one that fails
}
COLUMNS: dict[str, Column] = {
    "ig": Column("ig", 1, 1, ("--iterations", "100", "--restarts", "1", "--attack-every", "2"), trained=False),
    "imprint": Column("imprint", 4, 8),
    "trap": Column("trap", 4, 8),
    # the attack through secure aggregation: 12 rows an image of the round (clients x K x B), the block the matrix
    # was measured with (the arming of then sent every row twice; today's sizing builds 6 an image for K > 1)
    "mosaic": Column("mosaic", 4, 8, ("--imprint-bins", str(12 * CLIENTS * 4 * 8)), targets=False),
}


def noise_for(epsilon: float, column: Column) -> float:
    """The noise multiplier that spends `epsilon` at DELTA over the column's steps and sample rate (Opacus)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=column.sample_rate,
                                      steps=column.steps, accountant="rdp", epsilon_tolerance=0.005))


def defense_flags(row: str, column: Column) -> list[str]:
    spec = ROWS[row]
    if isinstance(spec, float):
        return ["--defense", f"dpsgd:noise={noise_for(spec, column):.4g}:clip=1:delta={DELTA:g}"]
    return list(spec)


def missing(row: str, column: Column) -> str | None:
    """Why this checkout cannot run the cell (a flag from another branch), or None."""
    if column.attack not in attack_names():
        return f"--attack {column.attack} is not in this checkout"
    flags = ROWS[row]
    if isinstance(flags, list) and "--defense" in flags:
        try:
            DefenseSpec.parse(flags[flags.index("--defense") + 1])
        except ConfigError:
            return f"--defense {flags[flags.index('--defense') + 1]} is not in this checkout"
    return None


def cell_command(row: str, name: str, folder: Path, data_root: str, init: str) -> list[str]:
    column = COLUMNS[name]
    flags = defense_flags(row, column)
    secure = "secagg" in " ".join(flags)
    return [str(common.ROOT / ".venv" / "bin" / "fl-sim"), "run", *TASK, "--data-root", data_root,
            "--init", init if column.trained else "default",
            "--local-steps", str(column.local_steps), "--batch-size", str(column.batch_size),
            "--attack", column.attack, *column.flags,
            *(["--attack-clients", "0"] if column.targets and not secure else []), *flags, "--out", str(folder)]


def run_cell(row: str, name: str, out: Path, data_root: str, init: str, redo: bool, lock: str | None,
             table_only: bool = False) -> dict:
    """The cell's figures: from its cell.json when it ran with the same command, else from a new run."""
    folder = out / "cells" / f"{row}__{name}"
    reason = missing(row, COLUMNS[name])
    if reason is not None:
        return {"row": row, "column": name, "status": "pending", "reason": reason}
    command = cell_command(row, name, folder / "run", data_root, init)
    shown = " ".join(command[command.index("run"):]).replace(str(folder / "run"), "OUT")
    record = folder / "cell.json"
    if record.exists() and not redo:
        cached = json.loads(record.read_text())
        if cached.get("command") == shown and cached.get("status") == "ok":
            return cached
    if table_only:
        failed = json.loads((folder / "failed.json").read_text()) if (folder / "failed.json").exists() else {}
        return failed if failed.get("command") == shown else {"row": row, "column": name, "status": "not run"}
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished or outdated cell of this script's own folder
    folder.mkdir(parents=True)
    started = time.perf_counter()
    print(f"[{row} x {name}] fl-sim {shown}", flush=True)
    for attempt in range(1 + RETRIES):
        if (folder / "run").exists():
            shutil.rmtree(folder / "run")
        with open(folder / "log.txt", "w") as log:
            done = subprocess.run((["flock", lock] if lock else []) + command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode == 0 or "ray" not in (folder / "log.txt").read_text().lower().split("fl-sim run:")[-1]:
            break
        print(f"  Ray failed under the run (attempt {attempt + 1}); once more", flush=True)
    cell: dict = {"row": row, "column": name, "command": shown, "seconds": time.perf_counter() - started}
    refused_all = done.returncode == NOTHING_WORKED and (folder / "run" / "metrics.jsonl").exists()
    if done.returncode != 0 and not refused_all:
        lines = [line for line in (folder / "log.txt").read_text().splitlines() if line.strip()]
        cell.update(status="failed", reason=lines[-1] if lines else f"exit {done.returncode}")
        print(f"  failed: {cell['reason']}", flush=True)
        write_json(folder / "failed.json", cell)  # not cell.json: a failed cell runs again next time
        return cell
    rows = read_metrics(folder / "run" / "metrics.jsonl")
    history = read_global(folder / "run" / "global.jsonl")
    summary = summarise(rows)
    refused = sum(row.status == ReplyStatus.REFUSED.value for row in rows)
    # a run in which every attacked client refused the model (exit 3) is a measured cell: nothing recovered
    cell.update(status="ok", accuracy=history[-1].accuracy if history else None, epsilon=largest_epsilon(rows),
                images=summary["images"], psnr_median=summary["psnr_median"], refused=refused,
                **{recovered_key(db): summary[recovered_key(db)] or 0.0 for db in RECOVERED_DB})
    write_json(record, cell)
    print(f"  {_text(cell)} ({cell['seconds']:.0f} s)", flush=True)
    return cell


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _text(cell: dict) -> str:
    """A cell as the table shows it: recovered at 30 / 40 dB, accuracy, epsilon."""
    if cell["status"] != "ok":
        return cell["status"]
    low, high = (cell[recovered_key(db)] for db in RECOVERED_DB)
    eps = "" if cell.get("epsilon") is None else f", eps {cell['epsilon']:.2g}"
    psnr = "" if cell.get("psnr_median") is None else f", {cell['psnr_median']:.0f} dB"
    refused = f", refused {cell['refused']}" if cell.get("refused") else ""
    accuracy = "-" if cell.get("accuracy") is None else f"{cell['accuracy']:.0%}"
    return f"{_share(low)} / {_share(high)}{psnr}, acc {accuracy}{eps}{refused}"


def table(cells: dict[tuple[str, str], dict], rows: list[str], cols: list[str]) -> str:
    head = "| defense | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    return head + "".join(f"| {row} | " + " | ".join(_text(cells[row, col]) for col in cols) + " |\n"
                          for row in rows)


def heat_map(cells: dict[tuple[str, str], dict], rows: list[str], cols: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    low = recovered_key(RECOVERED_DB[0])
    values = np.array([[cells[r, c][low] if cells[r, c]["status"] == "ok" else np.nan for c in cols] for r in rows])
    figure, axes = plt.subplots(figsize=(2.3 * len(cols) + 1.5, 0.62 * len(rows) + 1.4))
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            cell = cells[row, col]
            text = _text(cell).replace(", acc", "\nacc").replace(", eps", ", eps") if cell["status"] == "ok" \
                else cell["status"]
            dark = cell["status"] == "ok" and values[i, j] < 0.6
            axes.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    axes.set_xticks(range(len(cols)), cols)
    axes.set_yticks(range(len(rows)), rows)
    axes.set_title(f"Images recovered at >= {RECOVERED_DB[0]} / {RECOVERED_DB[1]} dB (colour: {RECOVERED_DB[0]} dB)\n"
                   f"MNIST, ConvNet, {CLIENTS} clients, {ROUNDS} rounds; accuracy and DP-SGD epsilon after the run",
                   fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.04, label=f"share at >= {RECOVERED_DB[0]} dB")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def names(text: str | None, known: dict, flag: str) -> list[str]:
    chosen = list(known) if text is None else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        print(f"defense_matrix: {flag} {text!r}: choose from {', '.join(known)}", file=sys.stderr)
        raise SystemExit(2)
    return chosen


def main() -> int:
    parser = common.make_parser(__doc__)
    common.add_out(parser, help="the matrix's folder (cells are cached there)")
    common.add_data_root(parser, "where MNIST lies")
    parser.add_argument("--rows", help=f"defenses to run, comma-separated (default all: {', '.join(ROWS)})")
    parser.add_argument("--cols", help=f"attacks to run, comma-separated (default all: {', '.join(COLUMNS)})")
    parser.add_argument("--init", default="default",
                        help="the federation's starting weights (fl-sim run --init): a checkpoint of `fl-sim pretrain "
                             "--model cnn` makes the accuracy column mean something in 2 rounds (default: untrained)")
    parser.add_argument("--redo", action="store_true", help="run the chosen cells again even when cached")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: the table and heat map of the cells finished so far (others: 'not run')")
    parser.add_argument("--parallel", type=int, default=1,
                        help="cells run at once (each a Ray simulation of about 3 GB; default 1)")
    parser.add_argument("--lock", help="run each cell under `flock LOCK` (a machine shared with other runs)")
    args = parser.parse_args()
    rows, cols = names(args.rows, ROWS, "--rows"), names(args.cols, COLUMNS, "--cols")
    out = Path(args.out)
    order = [(row, col) for col in sorted(cols, key=lambda col: col == "ig") for row in rows]  # slow IG last
    with ThreadPoolExecutor(args.parallel) as pool:  # each cell is its own fl-sim process
        futures = {key: pool.submit(run_cell, *key, out, args.data_root, args.init, args.redo, args.lock,
                                    args.table_only) for key in order}
        cells = {key: future.result() for key, future in futures.items()}
    markdown = table(cells, rows, cols)
    (out / "matrix.md").write_text(markdown)
    write_json(out / "matrix.json", [cells[row, col] for row in rows for col in cols])
    heat_map(cells, rows, cols, out / "defense-matrix.png")
    print(markdown)
    return 0 if all(cell["status"] != "failed" for cell in cells.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
