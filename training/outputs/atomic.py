"""Whole files or none: every file a command leaves under its final name is complete.

Each writer writes a temporary file next to the target (same folder, so same file system),
flushes and fsyncs it, then renames it over the target with os.replace. A kill at any moment
leaves the old file or the new one, never a torn one under the final name; a failure (a full
disk, Ctrl-C, any exception) removes the temporary file and re-raises, so nothing half-written
is left behind either. Only SIGKILL or a power cut can leave a `NAME.tmp` beside the target.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from PIL import Image

TMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """Writing an output failed (a full disk, a read-only folder); `filename` is the output's
    final name. An OSError, so that code catching those still does; its own type lets a command
    tell a failed write from a failed read."""


def _write_error(exc: OSError, path: str | os.PathLike) -> WriteError:
    error = WriteError(exc.errno, exc.strerror or str(exc), os.fspath(path))
    error.__cause__ = exc
    return error


def make_parent(path: str | os.PathLike) -> Path:
    """Create the folder of `path` (and its parents); a failure is a WriteError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(exc, path.parent) from None
    return path


def temporary_path(path: str | os.PathLike) -> Path:
    """Where `path` is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True) -> Iterator[IO]:
    """`with atomic_file(path) as handle: ...` writes `path` whole or not at all (see the module
    docstring). The parent folder must exist."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk, Ctrl-C, a bug: no temporary file stays behind
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise _write_error(exc, path) from None     # named by the file the user asked for
        raise


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    with atomic_file(path, "wb", fsync=fsync) as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    with atomic_file(path, "w", fsync=fsync) as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data, *, indent: int | None = 2,
               fsync: bool = True) -> Path:
    """Strict JSON (allow_nan=False: a NaN is refused here, before anything is written)."""
    text = json.dumps(data, indent=indent, allow_nan=False) + "\n"
    return write_text(path, text, fsync=fsync)


PNG_COMPRESS_LEVEL = 1   # flat label maps compress well at level 1 too, at a fraction of the time


def write_png(path: str | os.PathLike, array, *, compress_level: int = PNG_COMPRESS_LEVEL,
              fsync: bool = True) -> Path:
    """A uint8 (H, W) or (H, W, 3) array as a PNG."""
    image = Image.fromarray(array)      # before the file: a bad array leaves nothing behind
    with atomic_file(path, "wb", fsync=fsync) as handle:
        image.save(handle, format="PNG", compress_level=compress_level)
    return Path(path)
