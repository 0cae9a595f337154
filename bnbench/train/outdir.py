"""The output folder of ``bnbench train``: one writer at a time, and no file of an earlier run left behind.

:func:`claim` holds the folder's lock (:func:`bnbench._io.folder_lock`, the one every bnbench command takes),
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

from bnbench import _io

__all__ = ["TRAIN_KIND", "claim"]

#: results.json's "kind" for a training run
TRAIN_KIND = "train"
_TRAIN_FILES = ("results.csv", "results.json", "summary.md")


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
    with _io.folder_lock(folder, "bnbench train"):
        present = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
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
