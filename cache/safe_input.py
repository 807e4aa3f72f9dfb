"""Reading files that may come from anywhere, in bounded time and memory.

A raw tree or a folder of prediction inputs may hold special files (reading a FIFO blocks for
ever; a device never ends), decompression bombs (a PNG of a few KB whose header declares
100000x100000 pixels: libspng, unlike PIL, has no limit of its own), absurd JSON, symbolic-link
loops and pathological nesting. The rules, one place for `dataprep build` and `predict`:

- Only regular files are read. A file is opened non-blocking (opening a FIFO then cannot
  hang) and checked with fstat on the open descriptor, so a file swapped after a listing is
  caught too; a FIFO, device, socket or folder is refused with one line naming it.
- A file is read only up to a size cap given by the caller.
- An image's declared size (a PNG's IHDR: the 13 bytes after the chunk header that follows
  the 8-byte signature) is checked against a pixel cap before a single pixel is decoded.
  The cap is PIL's own decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 89,478,485
  pixels by default, about 0.25 GiB as RGB): a Cityscapes frame has 2,097,152.
- Symbolic links are followed (a symlinked leftImg8bit/ or dataset folder is the common
  layout), wherever they lead; a link that loops or leads nowhere is reported, never
  followed for ever. `walk_files` visits each folder once (by device and inode), so a link
  back to a parent cannot make the walk loop, and stops at MAX_DEPTH folders deep.

Everything raises `BadInput` (a `UserError`: one line, no traceback) naming the file. The module
needs only the standard library and cache.errors.
"""
from __future__ import annotations

import errno
import os
import stat
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable

from cache.errors import UserError

# PIL.Image.MAX_IMAGE_PIXELS's default (not imported: PIL is heavy and a caller may have
# changed it); more pixels than this are refused before decoding.
MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
MAX_JSON_BYTES = 4 << 20    # a Cityscapes polygon file is well under 1 MB
MAX_DEPTH = 64              # folders below an input folder that `walk_files` searches
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_HEAD = 33              # signature, IHDR length and type, 13 bytes of IHDR, its CRC


class BadInput(UserError):
    """An input file we refuse to read: not a regular file, too big, or not what it claims."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _os_problem(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link that loops"
    if exc.errno == errno.ENOENT:
        return "not found (or a symbolic link to nothing)"
    return f"cannot be read ({exc.strerror or exc})"


def check_regular(path: str | os.PathLike) -> os.stat_result:
    """The stat of `path` (links followed) if it is a regular file; else BadInput naming it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BadInput(f"{path}: {_os_problem(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{path}: {_kind(st.st_mode)}, not a regular file; only regular files are read")
    return st


def open_regular(path: str | os.PathLike, max_bytes: int | None = None):
    """A binary file object of `path`, which must be a regular file of at most `max_bytes`.
    Opened non-blocking and checked on the descriptor: a FIFO is refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadInput(f"{path}: {_os_problem(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{path}: {_kind(st.st_mode)}, not a regular file; only regular files are read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise BadInput(f"{path}: {st.st_size:,} bytes, more than the {max_bytes:,} read from such a file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The whole of a regular file of at most `max_bytes` bytes (see `open_regular`)."""
    with open_regular(path, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise BadInput(f"{path}: {_os_problem(exc)}") from None
    if len(data) > max_bytes:
        raise BadInput(f"{path}: more than the {max_bytes:,} bytes read from such a file")
    return data


def check_pixels(path, width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """BadInput unless width x height is positive and at most `max_pixels`."""
    if width <= 0 or height <= 0:
        raise BadInput(f"{path}: declares {width}x{height} pixels")
    if width * height > max_pixels:
        raise BadInput(f"{path}: declares {width}x{height} pixels, more than the {max_pixels:,} "
                       "read from one image (PIL's decompression-bomb limit)")


def png_header(path, head: bytes) -> tuple[int, int, int, int]:
    """(height, width, bit depth, colour type) from the first 33 bytes of a PNG; BadInput if
    they are not a PNG signature and IHDR chunk."""
    if len(head) < _PNG_HEAD or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise BadInput(f"{path}: not a PNG file (or truncated before its header)")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return height, width, head[24], head[25]


def read_png(path, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """The bytes of a PNG whose header declares at most `max_pixels` pixels, read only after
    that check (and only from a regular file no bigger than such a PNG can be)."""
    with open_regular(path) as f:
        try:
            head = f.read(_PNG_HEAD)
            height, width, _, _ = png_header(path, head)
            check_pixels(path, width, height, max_pixels)
            # 16-bit RGBA is 8 bytes a pixel, plus a filter byte a row; zlib adds ~0.03%
            limit = (8 * width + 1) * height * 2 + (1 << 20)
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise BadInput(f"{path}: {size:,} bytes, more than a {width}x{height} PNG needs")
            return head + f.read(size)
        except OSError as exc:
            raise BadInput(f"{path}: {_os_problem(exc)}") from None


def walk_files(root: Path, suffixes: Iterable[str], max_depth: int = MAX_DEPTH,
               match: tuple[str, ...] | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files, problems) under folder `root`: the files whose suffix (lower case) is in
    `suffixes`, sorted, and (path, problem) for each entry with such a name that cannot be
    read (a FIFO, a device, a broken or looping link) and each folder not searched.

    Links are followed; each folder is visited once (by device and inode), so links that loop
    end the walk instead of repeating it; nothing deeper than `max_depth` folders is searched.
    Hidden entries (".name") are skipped. `match`: glob components ("*", "?", "[ab]", "**")
    that the path relative to `root` must match, as glob.glob(recursive=True) reads them;
    folders that no match can lie under are not searched."""
    suffixes = tuple(s.lower() for s in suffixes)
    files, problems = [], []
    try:
        seen = {_identity(os.stat(root))}
    except OSError as exc:
        return [], [(root, _os_problem(exc))]
    stack = [(root, ())]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            problems.append((folder, f"folder {_os_problem(exc)}"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            parts = rel + (entry.name,)
            try:
                st = entry.stat()               # follows links
            except OSError as exc:
                if entry.name.lower().endswith(suffixes):
                    problems.append((Path(entry.path), _os_problem(exc)))
                continue
            if stat.S_ISDIR(st.st_mode):
                if match is not None and not _could_match(parts, match):
                    continue
                if _identity(st) in seen:
                    continue                    # a link back to a folder already searched
                if len(parts) > max_depth:
                    problems.append((Path(entry.path), f"more than {max_depth} folders deep; "
                                                       "not searched"))
                    continue
                seen.add(_identity(st))
                subfolders.append((Path(entry.path), parts))
            elif entry.name.lower().endswith(suffixes):
                if match is not None and not _matches(parts, match):
                    continue
                if stat.S_ISREG(st.st_mode):
                    files.append(Path(entry.path))
                else:
                    problems.append((Path(entry.path), f"{_kind(st.st_mode)}, not a regular file; "
                                                       "only regular files are read"))
        stack.extend(reversed(subfolders))
    return sorted(files), problems


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _component(name: str, pattern: str) -> bool:
    # as glob: a wildcard does not match a leading dot
    return fnmatchcase(name, pattern) and (not name.startswith(".") or pattern.startswith("."))


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and _component(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def _could_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether some path below the folder `parts` can match `pattern`."""
    if not parts:
        return True
    if not pattern:
        return False
    if pattern[0] == "**":
        return True
    return _component(parts[0], pattern[0]) and _could_match(parts[1:], pattern[1:])
