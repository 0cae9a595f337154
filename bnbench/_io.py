"""The one place bnbench writes files: every writer here is atomic (a temporary file in the same folder, then
``os.replace``), so an interrupted run never leaves a half-written CSV, JSON, PNG or page behind.

Also here: :func:`folder_lock`, one writer per results folder (a second command writing the same folder is
refused with a message, never interleaved), and :func:`read_csv`, which reads a CSV whole or not at all (a row
with a missing or extra field, such as a file cut mid-row, is an error naming the file and line).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_NAME",
    "RESULTS_ROOT",
    "FolderBusy",
    "atomic_path",
    "describe_entries",
    "folder_entries",
    "folder_lock",
    "read_csv",
    "write_bytes",
    "write_csv",
    "write_figure",
    "write_json",
    "write_text",
]

#: the lock file a writing command holds in its output folder (removed when it finishes)
LOCK_NAME = ".bnbench.lock"
#: where commands write when --out is not given (git-ignored); committed results live under reports/, added deliberately
RESULTS_ROOT = Path("results")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are ordinary files
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV (no index; floats unrounded)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def write_figure(path: str | os.PathLike, fig, **savefig_kwargs) -> Path:
    """Save a matplotlib Figure (format from the suffix: .png, .svg) and close nothing: the caller owns it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return path


def folder_entries(folder: str | os.PathLike, option: str = "--out") -> list[str]:
    """The visible entries of an output folder, sorted ([] when it does not exist yet); ValueError when it is a
    file. Each command then decides which of them it may write beside."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder}: is a file, not a folder")
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def describe_entries(entries: list[str], limit: int = 5) -> str:
    """A few entry names for a message: ``a, b, c, ...``."""
    return ", ".join(entries[:limit]) + (", ..." if len(entries) > limit else "")


class FolderBusy(ValueError):
    """Another process holds the folder's lock (a ValueError: the CLI turns it into exit code 2)."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str = "bnbench") -> Iterator[Path]:
    """Hold ``folder``'s lock (created with the folder) while writing into it; raise :class:`FolderBusy` at once,
    naming the holder, when another process holds it.

    The lock is an advisory ``flock`` on ``folder/.bnbench.lock``: the kernel releases it when its holder exits,
    even on SIGKILL, so a crashed run never leaves the folder locked. The file names its holder (pid, command,
    start time) for the message; it is removed on release."""
    import fcntl  # POSIX only, like Triton

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise FolderBusy(
                f"{folder} is being written by another bnbench command ({holder}); wait for it to finish or "
                "choose another output folder"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the holder removed it between our open and our lock
            same = False
        if same:
            break
        os.close(fd)  # we locked a file that is no longer the lock file: try again
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, {command}, since {started}\n".encode())
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a waiter that opened it retries on a fresh file
        os.close(fd)


def _csv_error(path: Path, line: int, what: str) -> ValueError:
    return ValueError(f"{path}: line {line}: {what} (a truncated or corrupted file; rerun the command that wrote it)")


def read_csv(path: str | os.PathLike, *, text_columns: Iterable[str] = ()):
    """Read a CSV into a pandas DataFrame, whole or not at all: ValueError naming the file (and the line) when it
    is empty, not text, ends mid-row, or has a row whose field count differs from the header's.
    ``text_columns`` present in the file are read as text (a commit like 1234567 stays a string)."""
    import pandas as pd

    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text CSV file ({err})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty (no header)")
    records = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(records)
        for record in records:
            if record and len(record) != len(header):
                raise _csv_error(path, records.line_num, f"{len(record)} field(s) where the header has {len(header)}")
    except csv.Error as err:
        raise _csv_error(path, records.line_num, str(err)) from None
    if not text.endswith(("\n", "\r")):
        raise _csv_error(path, records.line_num, "the last row has no line end: the file stops mid-row")
    text_columns = {c: str for c in text_columns if c in header}
    try:
        return pd.read_csv(io.StringIO(text), dtype=text_columns, keep_default_na=True)
    except pd.errors.ParserError as err:
        raise ValueError(f"{path}: not a valid CSV file ({err})") from None
