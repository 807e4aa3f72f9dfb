"""A direct reader of the tile layouts our writer produces, for the loaders' hot path.

zarr-python's general read path costs 2.5-3x the bytes it decodes for a training window
(async machinery, per-chunk scheduling; measured in the DALI loader's work), and the
loaders' CPU budget is ~1 ms per sample on a GPU box. This module reads the same files
the Zarr v3 spec describes — a regular chunk grid, the default chunk key encoding, a
`bytes` codec plus at most one of zstd / blosc, optionally wrapped in `sharding_indexed`
— straight from disk and decodes only the tiles a window covers. Anything else (another
store, codec or dtype) raises `Unsupported`, and the reader falls back to zarr itself.
"""
from __future__ import annotations

import json
import mmap
import os
from functools import lru_cache
from math import prod

import numpy as np

from cache.format import CacheError

_EMPTY = np.iinfo(np.uint64).max


class Unsupported(Exception):
    """This array's layout is not one the direct reader handles; use zarr."""


class MissingFile(CacheError):
    """A file that a complete array must have is not there (read with missing="error")."""

    def __init__(self, path: str, row: int):
        super().__init__(f"{path}: missing (row {row})")
        self.path, self.row = path, row


class CorruptFile(CacheError):
    """A tile or shard file that cannot be what the writer wrote: truncated, or its index or a
    tile does not decode."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}; the file is damaged (run `dataprep verify`)")
        self.path, self.problem = path, problem


def _decoder(codecs: list[dict]):
    """bytes -> bytes function for a codec chain of `bytes` + at most one compressor."""
    names = [c["name"] for c in codecs]
    if not names or names[0] != "bytes" or len(names) > 2:
        raise Unsupported(f"codec chain {names}")
    if len(names) == 1:
        return bytes
    name = names[1]
    if name == "zstd":
        from numcodecs import Zstd
        return Zstd().decode
    if name == "blosc":
        from numcodecs import Blosc
        return Blosc().decode
    raise Unsupported(f"compressor {name}")


def _encoder(codecs: list[dict]):
    """bytes -> bytes function that zarr's own codecs of this chain decode (see _decoder)."""
    names = [c["name"] for c in codecs]
    if not names or names[0] != "bytes" or len(names) > 2:
        raise Unsupported(f"codec chain {names}")
    if len(names) == 1:
        return bytes
    conf = codecs[1].get("configuration", {})
    if names[1] == "zstd":
        from numcodecs import Zstd
        return Zstd(level=conf.get("level", 0), checksum=conf.get("checksum", False)).encode
    if names[1] == "blosc":
        from numcodecs import Blosc
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[conf.get("shuffle", "noshuffle")]
        return Blosc(cname=conf.get("cname", "lz4"), clevel=conf.get("clevel", 5), shuffle=shuffle,
                     blocksize=conf.get("blocksize", 0)).encode
    raise Unsupported(f"compressor {names[1]}")


class _Rows:
    shape: tuple[int, ...]

    def read_row(self, row: int) -> np.ndarray:
        return self.read(row, 0, 0, *self.shape[1:3])


class ZarrWindows(_Rows):
    """TileArray's interface over zarr's own read path, for layouts TileArray does not know."""

    def __init__(self, path: str):
        import zarr

        self._array = zarr.open_array(store=path, mode="r")
        self.shape = tuple(self._array.shape)

    def read(self, row: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.asarray(self._array[row, y:y + h, x:x + w])


def open_windows(path: str, *, cache_index: bool = True, missing: str = "fill") -> "TileArray | ZarrWindows":
    """The direct reader where it knows the array's layout, else zarr's (same interface).

    missing="error": a file that is not there raises MissingFile instead of reading as the fill
    value (zarr's rule for chunks never written): for complete splits, where every file exists."""
    try:
        return TileArray(path, cache_index=cache_index, missing=missing)
    except Unsupported:
        return ZarrWindows(path)


class _Layout:
    """What the direct reader and writer need of an array's zarr.json: shape, tiles, files,
    codecs. Unsupported for anything but the layouts our writer makes."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "zarr.json")) as f:
            meta = json.load(f)
        if meta.get("data_type") != "uint8" or meta["chunk_grid"]["name"] != "regular":
            raise Unsupported("not a regular uint8 array")
        encoding = meta["chunk_key_encoding"]
        self._sep = encoding.get("configuration", {}).get("separator", "/")
        if encoding["name"] != "default":
            raise Unsupported(f"chunk key encoding {encoding['name']}")
        self.shape = tuple(meta["shape"])
        self.fill_value = int(meta["fill_value"])
        self.file_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
        if codecs and codecs[0]["name"] == "sharding_indexed":
            if len(codecs) != 1:
                raise Unsupported("codecs after sharding")
            conf = codecs[0]["configuration"]
            self.tile_shape = tuple(conf["chunk_shape"])
            self._codecs = conf["codecs"]
            index_names = [c["name"] for c in conf["index_codecs"]]
            if index_names not in (["bytes"], ["bytes", "crc32c"]) or \
                    conf["index_codecs"][0].get("configuration", {}).get("endian", "little") != "little":
                raise Unsupported(f"shard index codecs {index_names}")
            self._index_crc = len(index_names) == 2
            self._index_at_end = conf.get("index_location", "end") == "end"
            self._tiles_per_file = tuple(f // t for f, t in zip(self.file_shape, self.tile_shape))
            self._index_bytes = prod(self._tiles_per_file) * 16 + 4 * self._index_crc
            self.sharded = True
        else:
            self.tile_shape = self.file_shape
            self._codecs = codecs
            self.sharded = False
        self._decode = _decoder(self._codecs)
        self._raw = len(self._codecs) == 1     # tiles stored as plain bytes (no compressor)
        if self.tile_shape[0] != 1 or self.tile_shape[3:] != self.shape[3:]:
            raise Unsupported("tiles must hold one row and every channel")

    def _file(self, key: tuple[int, ...]) -> str:
        return os.path.join(self.path, "c" + self._sep + self._sep.join(map(str, key)))

    def row_files(self, row: int) -> list[str]:
        """The files (shards, or tiles) that hold one row."""
        extra = (0,) * (len(self.shape) - 3)
        fh, fw = self.file_shape[1:3]
        return [self._file((row, fy, fx) + extra) for fy in range(-(-self.shape[1] // fh))
                for fx in range(-(-self.shape[2] // fw))]

    def missing_files(self) -> list[tuple[int, str]]:
        """(row, path) of every file of the array that is not there (one stat per file: ~2 us on
        a local disk, ~6 ms for 3000 sharded rows)."""
        missing = []
        for row in range(self.shape[0]):
            for path in self.row_files(row):
                try:
                    os.stat(path)
                except FileNotFoundError:
                    missing.append((row, path))
        return missing

class TileArray(_Layout, _Rows):
    """One uint8 array of the cache (images or masks), read tile by tile from its files."""

    def __init__(self, path: str, *, cache_index: bool = True, missing: str = "fill"):
        """cache_index=False re-reads a shard's index on every tile: for checks of files that
        were just (re)written; readers of a finished cache keep it (one pread per tile).
        missing="error": a missing file raises MissingFile (see open_windows)."""
        super().__init__(path)
        self._cache_index = cache_index
        self._strict = missing == "error"

    def _tile(self, row: int, ty: int, tx: int) -> np.ndarray | None:
        """Decoded tile (tile_h, tile_w[, C]) at tile coordinates, or None where never written."""
        extra = (0,) * (len(self.shape) - 3)
        if not self.sharded:
            path = self._file((row, ty, tx) + extra)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                if self._strict:
                    raise MissingFile(path, row) from None
                return None
        else:
            fy, fx = self._tiles_per_file[1], self._tiles_per_file[2]
            path = self._file((row, ty // fy, tx // fx) + extra)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                if self._strict:
                    raise MissingFile(path, row) from None
                return None
            layout = (self._index_bytes, self._index_at_end, prod(self._tiles_per_file))
            index = _shard_index(path, (stat.st_ino, stat.st_size, stat.st_mtime_ns), *layout) \
                if self._cache_index else _read_shard_index(path, *layout)
            offset, nbytes = index[(ty % fy) * fx + tx % fx]
            if offset == _EMPTY:
                return None
            if self._raw and self._cache_index:
                # Raw tiles of a finished cache are read in place through a memory map: the
                # window's copy touches only the tile rows it needs, where a pread would copy
                # the whole tile first (a 640x640 window: 0.16 ms instead of 0.37).
                shard = _mapping(path, (stat.st_ino, stat.st_size, stat.st_mtime_ns))
                if nbytes != prod(self.tile_shape[1:]):
                    raise CorruptFile(path, f"tile ({ty}, {tx}) of row {row} holds {int(nbytes)} bytes, "
                                      f"expected {prod(self.tile_shape[1:])}")
                return np.frombuffer(shard, dtype=np.uint8, count=int(nbytes),
                                     offset=int(offset)).reshape(self.tile_shape[1:])
            fd = os.open(path, os.O_RDONLY)
            try:
                raw = os.pread(fd, int(nbytes), int(offset))
            finally:
                os.close(fd)
        try:
            return np.frombuffer(self._decode(raw), dtype=np.uint8).reshape(self.tile_shape[1:])
        except Exception as exc:  # a codec's complaint, or a tile of the wrong size
            raise CorruptFile(path, f"tile ({ty}, {tx}) of row {row} does not decode "
                              f"({type(exc).__name__}: {exc})") from None

    def read(self, row: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window [y, y+h) x [x, x+w) of one row; only the tiles it covers are decoded."""
        _, height, width = self.shape[:3]
        if not (0 <= row < self.shape[0] and 0 <= y and 0 <= x and h > 0 and w > 0
                and y + h <= height and x + w <= width):
            raise IndexError(f"window {(row, y, x, h, w)} outside {self.shape}")
        th, tw = self.tile_shape[1:3]
        out = np.empty((h, w) + self.shape[3:], dtype=np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                y0, y1 = max(y, ty * th), min(y + h, (ty + 1) * th)
                x0, x1 = max(x, tx * tw), min(x + w, (tx + 1) * tw)
                tile = self._tile(row, ty, tx)
                dst = out[y0 - y:y1 - y, x0 - x:x1 - x]
                if tile is None:
                    dst[...] = self.fill_value
                else:
                    dst[...] = tile[y0 - ty * th:y1 - ty * th, x0 - tx * tw:x1 - tx * tw]
        return out


@lru_cache(maxsize=64)
def _mapping(path: str, version: tuple[int, int, int]) -> mmap.mmap:
    """A read-only map of one shard file version (inode, size, mtime). Our writer replaces files
    by rename, never in place, so a map stays valid for the file it was made of; a map
    dropped from this cache is unmapped once no window view refers to it."""
    del version  # part of the cache key only
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


@lru_cache(maxsize=4096)
def _shard_index(path: str, version: tuple[int, int, int], nbytes: int, at_end: bool,
                 tiles: int) -> np.ndarray:
    """_read_shard_index, cached per file version (inode, size, mtime)."""
    del version  # part of the cache key only
    return _read_shard_index(path, nbytes, at_end, tiles)


def _read_shard_index(path: str, nbytes: int, at_end: bool, tiles: int) -> np.ndarray:
    """(offset, nbytes) of every tile of a shard file, in C order; CorruptFile where the file is
    shorter than its index, the index's crc32c (when it has one) does not match, or a tile
    lies outside the file (a truncated or overwritten shard). Checked once per file version:
    the index is cached (_shard_index)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        start = size - nbytes if at_end else 0
        raw = os.pread(fd, nbytes, max(start, 0))
    finally:
        os.close(fd)
    if start < 0 or len(raw) != nbytes:
        raise CorruptFile(path, f"{size} bytes, shorter than its shard index ({nbytes} bytes): truncated")
    if nbytes > tiles * 16:  # the index's crc32c follows it
        import google_crc32c

        if int.from_bytes(raw[tiles * 16:], "little") != google_crc32c.value(raw[:tiles * 16]):
            raise CorruptFile(path, "its shard index fails its crc32c (truncated or overwritten)")
    index = np.frombuffer(raw[:tiles * 16], dtype="<u8").reshape(-1, 2)
    data_start, data_end = (0, size - nbytes) if at_end else (nbytes, size)
    used = index[:, 0] != _EMPTY
    if used.any() and (int(index[used, 0].min()) < data_start
                       or int((index[used, 0] + index[used, 1]).max()) > data_end):
        raise CorruptFile(path, "its shard index points outside the file (truncated?)")
    return index


class TileWriter(_Layout):
    """Writes whole rows of one array in the layouts our writer makes, as zarr would store them
    (the Zarr v3 sharding spec: tiles, then an index of (offset, nbytes) per tile in C order
    plus its crc32c), without zarr's per-chunk async machinery: a 2048x1024 frame's shard
    costs one encode per tile and one file write. Every file goes to a temporary name first and
    is renamed, as zarr's LocalStore does, so a kill leaves the old file or the new one."""

    def __init__(self, path: str):
        super().__init__(path)
        self._encode = _encoder(self._codecs)
        if self.sharded and not self._index_at_end:
            raise Unsupported("shard index at the start")
        if self.sharded and self.file_shape[1:3] != tuple(-(-s // t) * t for s, t in
                                                           zip(self.shape[1:3], self.tile_shape[1:3])):
            raise Unsupported("more than one shard per row")

    def write_row(self, row: int, values: np.ndarray) -> dict[str, tuple[int, int]]:
        """Write one row (shape[1:]); returns {file path: (size, crc32c) of what was written},
        what a read-back check compares the files with (`file_digest`)."""
        values = np.asarray(values)
        if values.shape != self.shape[1:] or values.dtype != np.uint8:
            raise ValueError(f"row of {values.dtype} {values.shape}, expected uint8 {self.shape[1:]}")
        th, tw = self.tile_shape[1:3]
        grid = (-(-self.shape[1] // th), -(-self.shape[2] // tw))
        extra = (0,) * (len(self.shape) - 3)
        tiles = [((ty, tx), self._encode(self._tile_bytes(values, ty, tx)))
                 for ty in range(grid[0]) for tx in range(grid[1])]
        if not self.sharded:
            files = {self._file((row, ty, tx) + extra): [data] for (ty, tx), data in tiles}
        else:
            files = {self._file((row, 0, 0) + extra): self._shard(tiles)}
        return {path: _write_atomically(path, parts) for path, parts in files.items()}

    def _tile_bytes(self, values: np.ndarray, ty: int, tx: int) -> np.ndarray:
        """The tile's pixels in C order; an edge tile is padded with the fill value, as zarr does."""
        th, tw = self.tile_shape[1:3]
        part = values[ty * th:(ty + 1) * th, tx * tw:(tx + 1) * tw]
        if part.shape[:2] == (th, tw):
            return np.ascontiguousarray(part)
        tile = np.full(self.tile_shape[1:], self.fill_value, dtype=np.uint8)
        tile[:part.shape[0], :part.shape[1]] = part
        return tile

    def _shard(self, tiles: list) -> list:
        """The shard file's parts: tiles back to back, then the index ((offset, nbytes) per tile
        in C order) and its crc32c."""
        import google_crc32c

        index = np.empty((len(tiles), 2), dtype="<u8")
        offset = 0
        for i, (_, data) in enumerate(tiles):
            index[i] = offset, len(data)
            offset += len(data)
        index_bytes = index.tobytes()
        if self._index_crc:
            index_bytes += int(google_crc32c.value(index_bytes)).to_bytes(4, "little")
        return [data for _, data in tiles] + [index_bytes]


def _write_atomically(path: str, parts: list) -> tuple[int, int]:
    """Write the parts (one writev: no joined copy) to a temporary file, rename it to `path`;
    returns the file's (size, crc32c)."""
    import google_crc32c

    tmp = f"{path}.{os.getpid()}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:  # the row's first file: its folders do not exist yet
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            size = sum(len(memoryview(part).cast("B")) for part in parts)
            done = os.writev(fd, parts)
            while done < size:  # a short write (rare: signals, huge files): write the rest
                done += os.write(fd, b"".join(bytes(memoryview(p).cast("B")) for p in parts)[done:])
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half-written temporary stays taking space
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    crc = 0
    for part in parts:
        crc = google_crc32c.extend(crc, part)
    return size, crc


def file_digest(path: str) -> tuple[int, int]:
    """(size, crc32c) of a file as it is on disk now."""
    import google_crc32c

    with open(path, "rb") as f:
        data = f.read()
    return len(data), google_crc32c.value(data)
