"""Read-only access to a cache: frame lists, shapes, and windows that touch only their tiles."""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np

from cache.lock import lock_cache
from cache.tiles import CorruptFile, MissingFile, TileArray, Unsupported, open_windows
from cache.format import (
    DONE,
    IMAGES,
    MASKS,
    SCALE_ATTR,
    CacheError,
    check_root_attrs,
    open_group,
    split_group_names,
)


@dataclass(frozen=True)
class SplitInfo:
    name: str
    frames: tuple[str, ...]
    height: int
    width: int
    has_masks: bool
    scale: float = 1.0  # the stored frames are `scale` times the raw ones (dataprep build --scale)

    def __len__(self) -> int:
        return len(self.frames)


class CacheReader:
    """Opens a cache lazily, so that one instance can be pickled into worker processes.

    A reader holds the cache's shared lock (cache/lock.py) from its creation until close() or
    its garbage collection: a build cannot change the cache under it, and it is refused (a
    CacheBusy line naming the writer) while a build runs, or waits for it with wait=True.
    A copy pickled into a worker process holds no lock of its own: its parent's covers it (and
    the loaders' workers die with their parent). A complete split is checked at open for
    every file it needs (one stat per file), and read with missing files as errors, so a
    deleted shard never reads as zeros (zarr's fill value)."""

    def __init__(self, path: str | os.PathLike, *, wait: bool = False, lock: bool = True,
                 on_wait=None):
        self.path = os.fspath(path)
        self._root = None
        self._arrays: dict[tuple[str, str], object] = {}
        self._splits: dict[str, SplitInfo] = {}
        self._strict: set[str] = set()  # complete splits: a missing file is an error
        self._lock = None
        self.attrs = dict(self._group().attrs)  # refuses a non-cache before any lock file is made
        if lock:
            self._lock = lock_cache(self.path, exclusive=False, wait=wait, what="read the cache",
                                    on_wait=on_wait)
            weakref.finalize(self, self._lock.release)
            self._root = None  # read again under the lock: a build may have just finished
            self.attrs = dict(self._group().attrs)

    def close(self) -> None:
        """Give the shared lock back (also done when the reader is garbage-collected)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- opening -------------------------------------------------------------
    def _group(self):
        if self._root is None:
            if not os.path.isdir(self.path):
                raise CacheError(f"{self.path}: no cache there (not a directory); "
                                 "make one with `dataprep build`")
            try:
                root = open_group(self.path)
                attrs = dict(root.attrs)
            except Exception as exc:  # zarr raises several kinds for "not a group"
                meta = os.path.join(self.path, "zarr.json")
                if os.path.isfile(meta):
                    raise CacheError(f"{meta}: cannot be read as Zarr v3 group metadata "
                                     f"({type(exc).__name__}); the cache is damaged: rebuild it with "
                                     "`dataprep build --force`") from None
                raise CacheError(f"{self.path}: not a Zarr v3 group ({type(exc).__name__}); "
                                 "make one with `dataprep build`") from None
            check_root_attrs(self.path, attrs)
            self._root = root
        return self._root

    def __getstate__(self):
        return {"path": self.path, "attrs": self.attrs, "_splits": self._splits,
                "_strict": self._strict}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._root = None
        self._arrays = {}
        self._lock = None
        self.__dict__.setdefault("_strict", set())

    # -- metadata ------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def ignore_index(self) -> int:
        return int(self.attrs["ignore_index"])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    def split_names(self) -> list[str]:
        return split_group_names(self._group())

    def split(self, name: str, *, require_complete: bool = True, check_files: bool = True) -> SplitInfo:
        """Frames and frame size of a split; refuses an unknown or unfinished split, and a
        complete one with files missing (check_files=False: leave that to the caller, as
        verify does, which names each row)."""
        if name in self._splits:
            return self._splits[name]
        root = self._group()
        names = self.split_names()
        if name not in names:
            have = ", ".join(names) or "none"
            raise CacheError(f"{self.path}: no split {name!r} in this cache (it has: {have})")
        try:
            group = root[name]
            attrs = dict(group.attrs)
        except Exception as exc:
            raise CacheError(f"{os.path.join(self.path, name, 'zarr.json')}: split {name!r} cannot be "
                             f"opened ({type(exc).__name__}: {str(exc)[:120]}); the cache is damaged: "
                             f"rebuild the split with `dataprep build --force --splits {name}`") from None
        if require_complete and not attrs.get("complete", False):
            raise CacheError(f"{self.path}: split {name!r} is incomplete (an interrupted build?); "
                             "run `dataprep build` again to finish it")
        frames = attrs.get("frames")
        try:
            names = dict(group.arrays())
            n, h, w, _ = names[IMAGES].shape
        except Exception as exc:
            raise CacheError(f"{os.path.join(self.path, name, IMAGES)}: cannot be opened "
                             f"({type(exc).__name__}: {str(exc)[:120]}); the cache is damaged: rebuild "
                             f"the split with `dataprep build --force --splits {name}`") from None
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            raise CacheError(f"{os.path.join(self.path, name, 'zarr.json')}: attribute 'frames' is not "
                             f"a list of names; rebuild the split with `dataprep build --force --splits {name}`")
        info = SplitInfo(name, tuple(frames), int(h), int(w), MASKS in names,
                         float(attrs.get(SCALE_ATTR, 1.0)))
        if len(info.frames) != n:
            raise CacheError(f"{self.path}/{name}: {len(info.frames)} frame names for {n} rows")
        if attrs.get("complete", False) is True:
            if not check_files:
                return info
            self._check_files(info)
            self._strict.add(name)  # complete: a missing file is an error
        self._splits[name] = info
        return info


    def _check_files(self, info: SplitInfo) -> None:
        """CacheError naming the frames whose files are missing in a complete split."""
        missing = missing_frames(self.path, info.name, len(info), info.has_masks)
        if missing:
            raise CacheError(_missing_message(self.path, info, missing))

    def array(self, split: str, kind: str):
        """The zarr array `images` or `masks` of a split (cached per process)."""
        key = (split, kind)
        if key not in self._arrays:
            self._arrays[key] = self._group()[split][kind]
        return self._arrays[key]

    def _window_reader(self, split: str, kind: str):
        """read(row, y, x, h, w): direct tile reads where the layout allows (cache/tiles.py); in a
        complete split a missing or damaged file is a CacheError naming the split and frame."""
        key = ("tiles", split, kind)
        if key not in self._arrays:
            info = self.split(split, require_complete=False)
            windows = open_windows(os.path.join(self.path, split, kind),
                                   missing="error" if split in self._strict else "fill")
            self._arrays[key] = _named_errors(windows.read, self.path, info, kind)
        return self._arrays[key]

    def done_rows(self, split: str) -> np.ndarray:
        return np.asarray(self._group()[split][DONE][:]).astype(bool)

    # -- pixels --------------------------------------------------------------
    def read_window(self, split: str, row: int, y: int, x: int, h: int, w: int):
        """(image uint8 (h, w, 3), mask uint8 (h, w) or None) of a window inside the frame.

        Only the tiles the window covers are read and decoded.
        """
        info = self.split(split, require_complete=False)
        mask = self.read_mask_window(split, row, y, x, h, w) if info.has_masks else None
        return self.read_image_window(split, row, y, x, h, w), mask

    def read_image_window(self, split: str, row: int, y: int, x: int, h: int, w: int):
        return self._window_reader(split, IMAGES)(row, y, x, h, w)

    def read_mask_window(self, split: str, row: int, y: int, x: int, h: int, w: int):
        return self._window_reader(split, MASKS)(row, y, x, h, w)

    def read_frame(self, split: str, row: int):
        info = self.split(split, require_complete=False)
        return self.read_window(split, row, 0, 0, info.height, info.width)


def missing_frames(path: str, split: str, rows: int, has_masks: bool) -> dict[int, list[str]]:
    """row -> the files (images, masks) of that row that are not there, for the layouts
    cache.tiles knows (others: {})."""
    missing: dict[int, list[str]] = {}
    for kind in (IMAGES, MASKS) if has_masks else (IMAGES,):
        try:
            layout = TileArray(os.path.join(path, split, kind))
        except (Unsupported, OSError, ValueError, KeyError):
            continue
        for row, file in layout.missing_files():
            if row < rows:
                missing.setdefault(row, []).append(file)
    return missing


def _missing_message(path: str, info: SplitInfo, missing: dict[int, list[str]]) -> str:
    rows = sorted(missing)
    named = ", ".join(f"{info.frames[r]} (row {r})" for r in rows[:3])
    more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    first = missing[rows[0]][0]
    return (f"{path}: split {info.name!r} is marked complete but the files of {len(rows)} "
            f"frame(s) are missing: {named}{more} (e.g. {first}); they would read as zeros. Run "
            "`dataprep build` again (same options) to write them again")


def _named_errors(read, path: str, info: SplitInfo, kind: str):
    """read() whose missing-file and damaged-file errors name the split and the frame."""
    def named(row, y, x, h, w):
        try:
            return read(row, y, x, h, w)
        except MissingFile as exc:
            raise CacheError(_missing_message(path, info, {row: [exc.path]})) from None
        except CorruptFile as exc:
            raise CacheError(f"{path}: split {info.name!r}, frame {info.frames[row]} (row {row}): "
                             f"{kind} file damaged: {exc}") from None
    named.windows = getattr(read, "__self__", None)  # the TileArray (benchmarks, tests)
    return named
