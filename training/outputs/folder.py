"""Output folders: a command writes only into a folder that it made.

One rule for every command that writes a folder of results (`train --out`, `evaluate
--visualize`, `evaluate --export`, `predict --out`): a folder is taken when it is new, empty, or
holds the marker file `.cityscapes-output` that an earlier run of the same kind wrote there
first (as scripts/demo.sh does with `.cityscapes-demo`). Any other folder, even one holding a
single file, is refused with one line before anything is written, so that pointing an output
option at the raw tree or at a user's own folder costs nothing.

A folder that must hold nothing but its results (`--export`: the benchmark server takes the
folder as it is) gets no marker (`mark=False`); it is then only ever taken new or empty.

`check_output_dir` only looks (every rank of a torchrun job may call it); `claim_output_dir`
checks, creates the folder and writes the marker, before anything else goes in.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cache.errors import UserError
from training.outputs.atomic import TMP_SUFFIX, write_json

MARKER = ".cityscapes-output"


@dataclass
class OutputFolder:
    path: Path
    exists: bool
    entries: list[str]          # what the folder holds besides the marker (sorted names)
    marker: dict | None         # the marker's contents ({} if unreadable); None without one
    legacy: bool = False        # no marker, but files only we write (an older version's folder)

    @property
    def ours(self) -> bool:
        return self.marker is not None or self.legacy

    @property
    def empty(self) -> bool:
        return not self.entries


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of `folder` as a dict ({} if it cannot be read), None if there is none."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(folder: str | os.PathLike, kind: str, command: str, **fields) -> Path:
    """Write (or rewrite) the marker of `folder`, atomically."""
    record = {"kind": kind, "by": command,
              "note": f"written by `{command}`: it writes into this folder again, and into no "
                      "non-empty folder without this file", **fields}
    return write_json(Path(folder) / MARKER, record)


def update_marker(folder: str | os.PathLike, **fields) -> None:
    """Add `fields` to the marker of `folder` (which must have one)."""
    record = {**(read_marker(folder) or {}), **fields}
    write_json(Path(folder) / MARKER, record)


def inspect_output_dir(path: str | os.PathLike, legacy: Sequence[str] = ()) -> OutputFolder:
    """What `path` is, without touching it. `legacy`: file names whose presence (without a
    marker) shows that an older version of the command wrote the folder."""
    path = Path(path)
    if not path.exists():
        return OutputFolder(path, False, [], None)
    own = {MARKER, MARKER + TMP_SUFFIX}      # a marker being written by another rank
    entries = sorted(name for name in os.listdir(path) if name not in own)
    marker = read_marker(path)
    old = marker is None and bool(legacy) and any((path / name).is_file() for name in legacy)
    return OutputFolder(path, True, entries, marker, old)


def check_output_dir(path: str | os.PathLike, kind: str, *, option: str = "--out",
                     command: str | None = None, legacy: Sequence[str] = (),
                     mark: bool = True, why: str = "") -> OutputFolder:
    """Refuse (UserError, one line) a folder that this kind of output may not write into; see
    the module docstring. Writes nothing."""
    command = command or kind
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: exists and is not a directory; give a folder")
    folder = inspect_output_dir(path, legacy)
    if not folder.exists or folder.empty and folder.marker is None:
        return folder
    if not mark:
        raise UserError(f"{option} {path}: folder is not empty; give a new or empty folder{why}")
    if folder.marker is not None:
        other = folder.marker.get("kind")
        if other not in (None, kind):
            raise UserError(f"{option} {path}: is a folder of `{folder.marker.get('by', other)}` "
                            f"({other}), not a {kind} folder; give a new or empty folder")
        return folder
    if folder.legacy:
        return folder
    shown = ", ".join(folder.entries[:3]) + (", ..." if len(folder.entries) > 3 else "")
    raise UserError(f"{option} {path}: holds files that `{command}` did not write ({shown}; no "
                    f"{MARKER}); give a new or empty folder{why}")


def claim_output_dir(path: str | os.PathLike, kind: str, *, option: str = "--out",
                     command: str | None = None, legacy: Sequence[str] = (),
                     mark: bool = True, why: str = "") -> Path:
    """Check `path` (check_output_dir), create it, and mark it as `kind`'s before anything else
    is written there (with mark=False: only create it). Returns the folder."""
    folder = check_output_dir(path, kind, option=option, command=command, legacy=legacy,
                              mark=mark, why=why)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if mark and folder.marker is None:
        write_marker(path, kind, command or kind)
    return path
