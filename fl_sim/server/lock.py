"""One writer per run folder: OUT/.fl-sim.lock, held with flock by the process that writes the run.

`fl-sim run --resume OUT` while OUT's run is still going would train and record the same rounds twice
(every row doubled). So whoever writes a run holds an exclusive flock on OUT/.fl-sim.lock for as long
as it writes; a second writer fails at once with the holder's pid, host and start time (the file says
them). The operating system drops the lock when the holder dies, even by kill -9, so a stale file never
blocks a resume; the holder deletes the file when it is done.

The lock is re-entrant within a process: `fl-sim run` takes it before Flower starts, and the ServerApp
(which `flwr run` starts without fl-sim run) takes it again in the same process at no cost.
"""
import fcntl
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from fl_sim.contract.setting import ConfigError

LOCK_FILE = ".fl-sim.lock"
_HELD: dict[Path, tuple[IO[str], int]] = {}  # folder -> (open lock file, depth), in this process
_GUARD = threading.Lock()


class RunLocked(ConfigError):
    """Another process writes this run folder."""


def holder(out: str | os.PathLike) -> str:
    """Who holds OUT's lock, in words (from what the holder wrote into the lock file)."""
    try:
        record = json.loads((Path(out) / LOCK_FILE).read_text())
        return f"pid {record['pid']} on {record['host']}, since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire(out: str | os.PathLike, command: str = "fl-sim run") -> None:
    """Takes OUT's lock (OUT must exist), or raises RunLocked naming its holder."""
    folder = Path(out).resolve()
    with _GUARD:
        if folder in _HELD:
            file, depth = _HELD[folder]
            _HELD[folder] = (file, depth + 1)
            return
        path = folder / LOCK_FILE
        while True:
            file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open past this call)
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                raise RunLocked(f"{str(out)!r} is being written by {holder(folder)} ({LOCK_FILE}): wait for that "
                                f"run to end, or stop it, before writing this folder") from None
            try:  # the holder before may have deleted the file between our open and our flock: lock the new one
                same = os.fstat(file.fileno()).st_ino == path.stat().st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            file.close()
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                               "since": datetime.now(UTC).isoformat(timespec="seconds")}) + "\n")
        file.flush()
        _HELD[folder] = (file, 1)


def release(out: str | os.PathLike, every: bool = False) -> None:
    """Gives OUT's lock back (the file goes when the outermost holder in this process lets go, or at once with
    `every`: an interrupted run whose server thread will never return)."""
    folder = Path(out).resolve()
    with _GUARD:
        if folder not in _HELD:
            return
        file, depth = _HELD[folder]
        if depth > 1 and not every:
            _HELD[folder] = (file, depth - 1)
            return
        del _HELD[folder]
        (folder / LOCK_FILE).unlink(missing_ok=True)  # still locked: no one else can have taken it
        file.close()


@contextmanager
def hold(out: str | os.PathLike, command: str = "fl-sim run") -> Iterator[None]:
    """OUT's lock for the duration of a `with` block."""
    acquire(out, command)
    try:
        yield
    finally:
        release(out)
