"""Read-only access to a cache: frame lists, shapes, and windows that touch only their tiles."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from cache.tiles import open_windows
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
    """Opens a cache lazily, so that one instance can be pickled into worker processes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._root = None
        self._arrays: dict[tuple[str, str], object] = {}
        self._splits: dict[str, SplitInfo] = {}
        self.attrs = dict(self._group().attrs)

    # -- opening -------------------------------------------------------------
    def _group(self):
        if self._root is None:
            if not os.path.isdir(self.path):
                raise CacheError(f"{self.path}: no cache there (not a directory); "
                                 "make one with `dataprep build`")
            try:
                root = open_group(self.path)
            except Exception as exc:  # zarr raises several kinds for "not a group"
                raise CacheError(f"{self.path}: not a Zarr v3 group ({type(exc).__name__}); "
                                 "make one with `dataprep build`") from None
            check_root_attrs(self.path, dict(root.attrs))
            self._root = root
        return self._root

    def __getstate__(self):
        return {"path": self.path, "attrs": self.attrs, "_splits": self._splits}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._root = None
        self._arrays = {}

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

    def split(self, name: str, *, require_complete: bool = True) -> SplitInfo:
        """Frames and frame size of a split; refuses an unknown or unfinished split."""
        if name in self._splits:
            return self._splits[name]
        root = self._group()
        names = self.split_names()
        if name not in names:
            have = ", ".join(names) or "none"
            raise CacheError(f"{self.path}: no split {name!r} in this cache (it has: {have})")
        group = root[name]
        attrs = dict(group.attrs)
        if require_complete and not attrs.get("complete", False):
            raise CacheError(f"{self.path}: split {name!r} is incomplete (an interrupted build?); "
                             "run `dataprep build` again to finish it")
        images = group[IMAGES]
        n, h, w, _ = images.shape
        has_masks = MASKS in [k for k, _ in group.arrays()]
        info = SplitInfo(name, tuple(attrs["frames"]), int(h), int(w), has_masks,
                         float(attrs.get(SCALE_ATTR, 1.0)))
        if len(info.frames) != n:
            raise CacheError(f"{self.path}/{name}: {len(info.frames)} frame names for {n} rows")
        self._splits[name] = info
        return info

    def array(self, split: str, kind: str):
        """The zarr array `images` or `masks` of a split (cached per process)."""
        key = (split, kind)
        if key not in self._arrays:
            self._arrays[key] = self._group()[split][kind]
        return self._arrays[key]

    def _window_reader(self, split: str, kind: str):
        """read(row, y, x, h, w): direct tile reads where the layout allows (cache/tiles.py)."""
        key = ("tiles", split, kind)
        if key not in self._arrays:
            self._arrays[key] = open_windows(os.path.join(self.path, split, kind)).read
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
