"""The output folder of ``bnbench train``: one writer at a time, and no file of an earlier run left behind.

:func:`claim` takes a lock file in the folder (created exclusively; a lock whose process is gone is taken over),
refuses a folder that holds another command's files, and refuses a folder that holds an earlier training run
unless ``overwrite``, in which case that run's files (the ones its results.json lists, or the names a training
run writes) are removed first, so no figure of another experiment survives beside the new results.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "TRAIN_KIND", "claim"]

LOCK_NAME = ".bnbench-train.lock"
#: results.json's "kind" for a training run
TRAIN_KIND = "train"
_TRAIN_FILES = ("results.csv", "results.json", "summary.md")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(folder: Path) -> Path:
    lock = folder / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = -1
            if pid > 0 and not _alive(pid):
                lock.unlink(missing_ok=True)  # its writer is gone: take the folder over
                continue
            raise ValueError(
                f"--out {folder}: another bnbench train is writing there (lock {lock}, pid {pid}); wait for it, "
                "choose another --out, or delete the lock file if no such process runs"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return lock
    raise ValueError(f"--out {folder}: could not take the lock {lock}")


def _earlier_train_files(folder: Path, present: list[Path]) -> list[Path] | None:
    """The files of an earlier training run in ``folder``, or None when the folder holds something else."""
    meta_path = folder / "results.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not (meta.get("kind") == TRAIN_KIND or "specs" in meta):
        return None
    listed = meta.get("files")
    names = set(listed) if isinstance(listed, list) else set(_TRAIN_FILES)
    return [p for p in present if p.name in names or (not isinstance(listed, list) and p.suffix == ".png")]


@contextlib.contextmanager
def claim(folder: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``folder`` for one training run (see the module docstring); ValueError names the problem."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder}: is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(folder)
    try:
        present = sorted(p for p in folder.iterdir() if p.name != LOCK_NAME and not p.name.startswith("."))
        if present:
            earlier = _earlier_train_files(folder, present)
            names = ", ".join(p.name for p in present[:5]) + (", ..." if len(present) > 5 else "")
            if earlier is None:
                raise ValueError(f"--out {folder}: holds files that are not a bnbench train run ({names}); "
                                 "choose an empty or new folder")  # fmt: skip
            if not overwrite:
                raise ValueError(f"--out {folder}: holds an earlier training run ({names}); pass --overwrite to "
                                 "replace it, or choose another --out")  # fmt: skip
            for path in earlier:
                path.unlink()
        yield folder
    finally:
        lock.unlink(missing_ok=True)
