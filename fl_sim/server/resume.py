"""Continuing a killed run (`fl-sim run --resume OUT`) from the last round it finished.

A round is committed in this order: its metrics.jsonl rows and images, then its global.jsonl row and
the gallery, and last OUT/checkpoint.pt (the new global model and the round's number), written to a
temporary name and renamed. The checkpoint is the commit point: a kill before its rename loses the
round as a whole (on resume `rewind` drops its rows and images and the round runs again), a kill
after it loses nothing. So a resumed run has every round once, whenever the kill came.

With `--attack-async` (fl_sim/server/background.py) a round's attack rows may still be being written after its
global row; the checkpoint then names the last round whose attack is done as well, so it can lag the
round that just ended by one. `rewind` is the same: everything after the checkpoint's round goes (the
global row of the round it lags included), and the resumed run trains and attacks that round again.
"""
import io
import json
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_sim.contract.setting import ConfigError
from fl_sim.results.outputs import DamagedFileError, atomic_write_bytes, read_jsonl_strict, rewrite_jsonl

CHECKPOINT = "checkpoint.pt"
ROUND_FILES = ("metrics.jsonl", "global.jsonl")
ROUND_FOLDER = re.compile(r"round-(\d+)")
# An interrupted run (fl_sim/commands/run.py) freezes its commits: under COMMIT_LOCK it sets STOPPED and reads
# the last committed round, so the round it names is the one a resume goes on from.
COMMIT_LOCK = threading.Lock()
STOPPED = threading.Event()


@dataclass
class Checkpoint:
    server_round: int  # the last round finished
    weights: dict[str, torch.Tensor]  # the global model after it
    elapsed_seconds: float  # run time up to it, so a resumed run's clock goes on


def save_checkpoint(out, checkpoint: Checkpoint) -> None:
    buffer = io.BytesIO()
    torch.save({"round": checkpoint.server_round, "model": checkpoint.weights,
                "elapsed_seconds": checkpoint.elapsed_seconds}, buffer)
    with COMMIT_LOCK:
        if STOPPED.is_set():  # the run was interrupted: rounds after the one it reported stay uncommitted
            return
        atomic_write_bytes(Path(out) / CHECKPOINT, buffer.getvalue())


def freeze_commits(out) -> int:
    """Stops every later commit and returns the last round committed (0: none)."""
    with COMMIT_LOCK:
        STOPPED.set()
        checkpoint = load_checkpoint(out) if (Path(out) / CHECKPOINT).exists() else None
        return checkpoint.server_round if checkpoint else 0


def load_checkpoint(out) -> Checkpoint | None:
    """OUT's checkpoint (tensors and numbers only: weights_only), or None before round 1 finished."""
    path = Path(out) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        server_round, weights = state["round"], state["model"]
        if type(server_round) is not int or server_round < 1 or not all(
                isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in weights.items()):
            raise ValueError("unexpected contents")
        return Checkpoint(server_round, dict(weights), float(state.get("elapsed_seconds", 0.0)))
    except Exception as error:  # torch's own text runs to many lines (how to load untrusted files): its first
        reason = (str(error).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"{str(path)!r} is not a checkpoint fl-sim run wrote ({type(error).__name__}: {reason}): "
                          f"restore it, or start the run again with a new --out") from None


def round_rows(out) -> dict[str, list[dict]]:
    """The rows of OUT's round files (metrics.jsonl, global.jsonl), each with its round number, read strictly:
    a damaged line is a ConfigError naming the file and line (checked before a resume starts)."""
    out, found = Path(out), {}
    for name in ROUND_FILES:
        if (out / name).exists():
            try:
                rows = read_jsonl_strict(out / name)
            except DamagedFileError as error:
                raise ConfigError(f"{error}: repair or remove that line to resume (nothing was changed)") from None
            for number, row in rows:
                if type(row.get("round")) is not int or row["round"] < 1:
                    raise ConfigError(f"{str(out / name)!r} line {number} is not a row of a round "
                                      f"(no round number): repair or remove it to resume (nothing was changed)")
            found[name] = [row for _, row in rows]
    return found


def torn_last_line(path: Path) -> tuple[int, bytes] | None:
    """(line number, bytes) of a JSON-lines file's last line when it lacks its newline and is no row (torn by a
    kill mid-append), else None."""
    if not path.exists():
        return None
    lines = path.read_bytes().split(b"\n")
    last = lines[-1]
    if not last.strip():
        return None
    try:
        whole = isinstance(json.loads(last.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        whole = False
    return None if whole else (len(lines), last)


def rewind(out, last_round: int) -> list[str]:
    """Makes OUT hold rounds 1..last_round only: later (unfinished) rows, images and temporary files go. Returns
    what it dropped and why, one sentence each (every row, the torn last line, every round folder).

    Only a last line without its newline is taken for one torn by a kill (and dropped): any other line that
    is not a row of a round is damage, which stops the resume with its file and line number before anything is
    rewritten, instead of a committed row lost in silence.
    """
    out, dropped = Path(out), []
    for name, rows in round_rows(out).items():
        kept = [row for row in rows if row["round"] <= last_round]
        for row in rows:
            if row["round"] > last_round:
                who = f", client {row['client']}" if "client" in row else ""
                dropped.append(f"{name}: the row of round {row['round']}{who} dropped: the checkpoint names round "
                               f"{last_round}, so round {row['round']} runs again")
        torn = torn_last_line(out / name)
        if torn is not None:
            number, text = torn
            found = re.search(rb'"round":\s*(\d+)', text)
            held = int(found.group(1)) if found else None
            lost = (f"; it held a row of round {held}, which had finished: that row is lost"
                    if held is not None and held <= last_round else "")
            dropped.append(f"{name} line {number}: torn (a write cut short), dropped{lost}")
        if len(kept) != len(rows) or torn is not None:
            rewrite_jsonl(out / name, kept)
    for folder in sorted(out.iterdir()):
        match = ROUND_FOLDER.fullmatch(folder.name)
        if match and int(match.group(1)) > last_round and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
            dropped.append(f"{folder.name}/ removed: round {int(match.group(1))} runs again")
    for leftover in out.rglob(".*.tmp"):  # atomic_write_bytes's temporary names, left by a kill
        leftover.unlink()
    return dropped
