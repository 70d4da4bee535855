"""Writing results so that a run that stops keeps everything it finished.

Files are written to a temporary name and renamed (atomic on POSIX); JSON-lines rows are appended
with one write each and flushed, so a kill leaves no half-written image or file, and at most a torn
last row, which readers skip and the next append does not run into. After a rename the folder itself
is fsynced: the rename lives in the directory entry, and without that a power cut can undo it.

JSON-lines files are appended, rewritten and read under one lock (`JSONL_LOCK`): with `--attack-async` the
attack thread appends metrics.jsonl rows while the main thread writes global.jsonl and rebuilds the
gallery from both, so no row is interleaved with another or read half-written.
"""
import io
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is slow to import, and readers of finished runs (fl-sim report) need none of it
    import torch

JSONL_LOCK = threading.RLock()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(folder: str | os.PathLike) -> None:
    """Makes a rename (or a new file) in `folder` durable: flushes the directory entry itself."""
    handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_plain) + "\n").encode())


def append_jsonl(path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with JSONL_LOCK, open(path, "a+b") as file:
        line = (json.dumps(row, default=_plain) + "\n").encode()
        created = file.tell() == 0
        if not created:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":  # a torn row from a kill: end it, or this row would be glued to it
                line = b"\n" + line
        file.write(line)
        file.flush()
        os.fsync(file.fileno())
    if created:  # a new file's name is in the folder, which needs its own fsync
        fsync_directory(path.parent)


def rewrite_jsonl(path, rows: list[dict]) -> None:
    """Replaces a JSON-lines file with `rows`, atomically."""
    with JSONL_LOCK:
        atomic_write_bytes(path, "".join(json.dumps(row, default=_plain) + "\n" for row in rows).encode())


def read_jsonl(path) -> list[dict]:
    """The rows (JSON objects) of a JSON-lines file; a torn line (from a kill mid-write) is skipped."""
    path = Path(path)
    with JSONL_LOCK:
        if not path.exists():
            return []
        text = path.read_text(encoding="utf-8", errors="replace")
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class DamagedFileError(ValueError):
    """A JSON-lines file with a line that is neither a row nor the torn end a kill leaves."""


def read_jsonl_strict(path) -> list[tuple[int, dict]]:
    """(line number, row) of every row of a JSON-lines file, for a file about to be rewritten.

    A kill mid-append can leave only the last line torn, and such a line lacks its newline: that one is
    skipped. Any other line that is not a JSON object raises DamagedFileError with its line number, so a
    damaged row is never dropped (and so lost) in silence.
    """
    path = Path(path)
    with JSONL_LOCK:
        data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop() if lines else b""  # what follows the last newline: b"" in a whole file
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if not isinstance(row, dict):
            raise DamagedFileError(f"{str(path)!r} line {number} is damaged (not a JSON row): {line[:60]!r}")
        rows.append((number, row))
    if torn.strip():
        try:
            row = json.loads(torn.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):  # whole, only its newline missing
            rows.append((len(lines) + 1, row))
    return rows


def inside(out, relative) -> Path:
    """OUT/relative, refused when it would resolve outside OUT (names built from config or replies)."""
    root = Path(out).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{str(relative)!r} would lie outside the output folder {str(root)!r}")
    return path


def image_strip(images: "torch.Tensor", scale: int = 2) -> Image.Image:
    """(N, C, H, W) in [0, 1] -> one PNG-ready strip, N images side by side, upscaled for viewing."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    pixels = np.concatenate(list(pixels), axis=1)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    image = Image.fromarray(pixels)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) if scale > 1 else image


def save_images(path, images: "torch.Tensor", scale: int = 2) -> None:
    buffer = io.BytesIO()
    image_strip(images, scale).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _plain(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":  # torch is not imported here
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
