"""Writing a cache: storage options, split setup, resume checks and checked per-row writes.

The writer is split in two, as the build runs: `CacheWriter` (the parent process) creates the
root and the splits, decides what is already done, records per-row checksums and done flags
and marks a split complete; `RowWriter` (a worker process) writes one frame's tiles and reads
them back.

Crash safety. A row is trusted only through its done flag, and the flag is set only after the
row's tiles were written, read back and compared with the frame, and after its checksums were
stored. zarr 3.1's LocalStore writes every key through a temporary file and a rename, so a
SIGKILL leaves either the old or the new file plus, at worst, a `*.partial` leftover (which
`prepare_split` removes). We do not depend on that: the done and checksum arrays carry a
crc32c codec, so a torn done or checksum chunk fails to decode and reads as "not done", and a
row that is not done is simply written again. (Power loss is another matter: nothing here
fsyncs; run `dataprep verify` after one.)
"""
from __future__ import annotations

import json
import os
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.format import (
    CHECKSUMS,
    DONE,
    FORMAT_NAME,
    FORMAT_VERSION,
    IGNORE_INDEX,
    IMAGES,
    MASKS,
    ROOT_ATTRS,
    STATS_FILE,
    CacheError,
    UserError,
    split_group_names,
)
from cache.tiles import open_windows

# Chosen by scripts/bench_tiles.py and scripts/bench_build.py (evidence in the README's
# benchmark section; 2048x1024 photo frames whose PNGs weigh what Cityscapes' do). Read through
# cache/tiles.py, a training window (image + mask) costs ~0.6 ms of CPU with raw image tiles,
# ~1.2 ms with lz4 and ~3.1 ms with zstd-1 (the loaders' budget is ~1.3 ms per sample), and raw
# tiles also keep the build nearest the PNG-decode floor. The price is disk: raw images take
# ~3.0x the PNGs, zstd-1 ~2.3x (photos barely compress without PNG's filters): `--codec zstd-1`
# for a small disk. Masks compress ~140x with zstd-1 at no measurable cost. One shard per row
# and array makes 2 files per frame instead of 2 * (H/T) * (W/T), which makes writes cheaper and
# windows no dearer. 512 px tiles: windows as cheap as with 256 or 1024 px, whole frames cheaper
# than with 256 px, and a window touches ~3.0 MB of stored tiles against 4.3 MB with 1024 px
# (what a loader reads from disk when the cache does not fit in the page cache).
DEFAULT_TILE = 512
DEFAULT_CODEC = "none"
DEFAULT_MASK_CODEC = "zstd-1"
DEFAULT_SHARD = True
# Split attribute (besides `frames` and `complete`): frames left out by `--on-error skip`,
# name -> problem. A resumed build leaves them out again; `--force` retries them.
SKIPPED_ATTR = "skipped"


def _codec_table() -> dict:
    """Codec name -> zarr compressors (standard Zarr v3 codecs only, so outside tools read them)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    return {
        "none": lambda: [],
        "lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")],
        "zstd-1": lambda: [ZstdCodec(level=1)],
        "zstd-3": lambda: [ZstdCodec(level=3)],
    }


CODEC_NAMES = ("none", "lz4", "zstd-1", "zstd-3")


@dataclass(frozen=True)
class Storage:
    """How the pixels are stored: square tiles of `tile` pixels; image tiles compressed with
    `codec`, mask tiles with `mask_codec` (standard Zarr v3 codecs either way).

    shard=True puts all tiles of a row in one file per array (Zarr v3 sharding: the tiles
    stay separately readable through the shard's index), so a frame costs 2 files instead
    of 2 * (H/T) * (W/T); file creation is what a build pays most for beyond the codec.
    """

    tile: int = DEFAULT_TILE
    codec: str = DEFAULT_CODEC
    shard: bool = DEFAULT_SHARD
    mask_codec: str = DEFAULT_MASK_CODEC

    def __post_init__(self):
        if not 16 <= self.tile <= 4096:
            raise UserError(f"--tile must be between 16 and 4096 pixels, got {self.tile}")
        for option, codec in (("--codec", self.codec), ("--mask-codec", self.mask_codec)):
            if codec not in CODEC_NAMES:
                raise UserError(f"{option}: unknown codec {codec!r}; choose one of: {', '.join(CODEC_NAMES)}")

    def codec_of(self, shape: tuple[int, ...]) -> str:
        """The codec of an images (N, H, W, 3) or a masks (N, H, W) array."""
        return self.codec if len(shape) == 4 else self.mask_codec

    def pixel_array_spec(self, shape: tuple[int, ...], fill_value: int) -> dict:
        """create_array arguments of an images (N, H, W, 3) or masks (N, H, W) array."""
        t = self.tile
        chunks = (1, t, t) + tuple(shape[3:])
        spec = dict(shape=shape, chunks=chunks, dtype="uint8", fill_value=fill_value,
                    compressors=_codec_table()[self.codec_of(shape)]())
        if self.shard:  # one shard per row, a whole number of tiles
            spec["shards"] = (1, -(-shape[1] // t) * t, -(-shape[2] // t) * t) + tuple(shape[3:])
        return spec


@dataclass(frozen=True)
class SplitPlan:
    """What one split of the cache holds: frames (sorted, index = row) of one size."""

    name: str
    frames: tuple[str, ...]
    height: int
    width: int
    has_masks: bool
    skipped: dict = field(default_factory=dict)  # frames left out: name -> problem


def row_checksums(image: np.ndarray, mask: np.ndarray | None) -> tuple[int, int]:
    """crc32 of a row's image bytes and mask bytes (0 for a split without masks)."""
    crc_image = zlib.crc32(np.ascontiguousarray(image))
    crc_mask = 0 if mask is None else zlib.crc32(np.ascontiguousarray(mask))
    return crc_image, crc_mask


def configure_worker_threads() -> None:
    """One process per core: keep zarr's codec threads and blosc's threads at one each."""
    import numcodecs.blosc
    import zarr

    zarr.config.set({"threading.max_workers": 1})
    numcodecs.blosc.set_nthreads(1)
    numcodecs.blosc.use_threads = False


def _mkdir_out(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None


def _read_root_attrs(path: Path) -> dict | None:
    """The root attrs of the Zarr group at `path`, or None where there is no group."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}


class CacheWriter:
    """The parent side of a build: root, splits, done flags, checksums, completion."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False):
        import zarr

        self.path = Path(path)
        _mkdir_out(self.path)
        attrs = _read_root_attrs(self.path)
        if attrs is None and any(self.path.iterdir()):
            raise UserError(f"--out {self.path}: directory is not empty and is not a Cityscapes "
                            "cache; choose a new or empty directory")
        if attrs is not None and attrs.get("format") != FORMAT_NAME:
            raise UserError(f"--out {self.path}: holds a Zarr store that is not a Cityscapes cache; "
                            "choose a new or empty directory")
        if attrs is not None and attrs.get("version") != FORMAT_VERSION:
            if not force:
                raise CacheError(f"--out {self.path}: cache format version {attrs.get('version')} "
                                 f"differs from this code's {FORMAT_VERSION}; use --force to rebuild it")
            attrs = None
        if attrs is None:  # one write makes the root with its attributes: no window without them
            self.root = zarr.open_group(store=str(self.path), mode="w", zarr_format=3,
                                        attributes=dict(ROOT_ATTRS))
        else:
            self.root = zarr.open_group(store=str(self.path), mode="a", zarr_format=3)
            if dict(self.root.attrs) != ROOT_ATTRS:
                self.root.attrs.update(ROOT_ATTRS)
        self._bookkeeping: dict[str, tuple] = {}  # split -> (checksums, done), opened once

    # -- splits --------------------------------------------------------------
    def split_names(self) -> list[str]:
        return split_group_names(self.root)

    def split_attrs(self, name: str) -> dict | None:
        return dict(self.root[name].attrs) if name in self.split_names() else None

    def is_complete(self, plan: SplitPlan, storage: Storage) -> bool:
        """True if the split exists, matches the plan and is complete (raises on a mismatch)."""
        attrs = self.split_attrs(plan.name)
        if attrs is None or not attrs.get("complete", False):
            return False
        self._check_matches(plan, storage)
        return True

    def prepare_split(self, plan: SplitPlan, storage: Storage, *, force: bool = False) -> np.ndarray:
        """Create the split, or check that the existing one was made with the same options.

        Returns the done flags (bool per row): the rows a resumed build can skip.
        """
        self._bookkeeping.pop(plan.name, None)
        exists = plan.name in self.split_names()
        if exists and (force or DONE not in self._array_names(plan.name)):
            # --force, or a split whose setup was interrupted before its done array existed
            # (no row of it can be trusted): start it again.
            del self.root[plan.name]
            exists = False
        self._forget_stats_of(plan.name)
        if not exists:
            self._create_split(plan, storage)
            return np.zeros(len(plan.frames), dtype=bool)
        self._finish_interrupted_drop(plan.name)
        self._check_matches(plan, storage)
        _remove_partial_files(self.path / plan.name)
        return self.done_flags(plan.name)

    def _array_names(self, split: str) -> list[str]:
        return [name for name, _ in self.root[split].arrays()]

    def _create_split(self, plan: SplitPlan, storage: Storage) -> None:
        n, h, w = len(plan.frames), plan.height, plan.width
        group = self.root.create_group(plan.name, attributes={
            "frames": list(plan.frames), "complete": False, SKIPPED_ATTR: dict(plan.skipped)})
        group.create_array(IMAGES, **storage.pixel_array_spec((n, h, w, 3), 0))
        if plan.has_masks:
            group.create_array(MASKS, **storage.pixel_array_spec((n, h, w), IGNORE_INDEX))
        group.create_array(CHECKSUMS, **_bookkeeping_spec((n, 2), (1, 2), "uint32"))
        # Created last: a split without its done array never finished its setup.
        group.create_array(DONE, **_bookkeeping_spec((n,), (1,), "uint8"))

    def _check_matches(self, plan: SplitPlan, storage: Storage) -> None:
        """Refuse to resume a split made with other options (the build would mix them)."""
        group = self.root[plan.name]
        where = f"{self.path}/{plan.name}"
        hint = "use --force to rebuild it with the new options"
        stored = list(group.attrs.get("frames", []))
        if stored != list(plan.frames):
            raise CacheError(f"{where}: the cache holds {len(stored)} frames but this build would "
                             f"make {len(plan.frames)} (or other ones); {hint}")
        if bool(plan.has_masks) != (MASKS in self._array_names(plan.name)):
            raise CacheError(f"{where}: the cache and this build disagree on whether the split has "
                             f"masks; {hint}")
        images = group[IMAGES]
        if tuple(images.shape[1:3]) != (plan.height, plan.width):
            raise CacheError(f"{where}: frames are {images.shape[2]}x{images.shape[1]} in the "
                             f"cache but {plan.width}x{plan.height} now; {hint}")
        tile = images.chunks[1]
        if tile != storage.tile:
            raise CacheError(f"{where}: the cache uses {tile} px tiles, this build {storage.tile}; {hint}")
        if (images.shards is not None) != storage.shard:
            raise CacheError(f"{where}: the cache was written {'with' if images.shards else 'without'} "
                             f"shards, this build {'with' if storage.shard else 'without'}; {hint}")
        arrays = [(IMAGES, images, "--codec")]
        if plan.has_masks:
            arrays.append((MASKS, group[MASKS], "--mask-codec"))
        for name, array, option in arrays:
            if _storage_json(array.metadata) != _storage_json_of(storage, array.shape):
                raise CacheError(f"{where}: the cache's {name} were written with another codec than "
                                 f"{option} {storage.codec_of(array.shape)}; {hint}")

    # -- rows ----------------------------------------------------------------
    def done_flags(self, split: str) -> np.ndarray:
        """Done flags of every row; a chunk that cannot be read counts as not done."""
        group = self.root[split]
        done = read_rows_tolerantly(group[DONE])
        sums = read_rows_tolerantly(group[CHECKSUMS])
        return np.array([d is not None and int(d) == 1 and c is not None
                         for d, c in zip(done, sums)], dtype=bool)

    def record_row(self, split: str, row: int, checksums: tuple[int, int]) -> None:
        """Store a checked row's checksums, then its done flag (the flag is the commit)."""
        if split not in self._bookkeeping:  # opening the arrays costs more than writing a row
            group = self.root[split]
            self._bookkeeping[split] = (group[CHECKSUMS], group[DONE])
        checksum_array, done_array = self._bookkeeping[split]
        checksum_array[row] = np.asarray(checksums, dtype=np.uint32)
        done_array[row] = 1

    def drop_frames(self, split: str, bad: dict[str, str]) -> tuple[str, ...]:
        """Leave frames out of a split being built (`--on-error skip`); returns the new list.

        Rows keep their meaning only below the first dropped frame: the done flags from there
        on are cleared *before* the frame list changes, so that at every moment a row whose
        flag is set holds frames[row]. The arrays are shrunk last; a resumed build finishes
        an interrupted shrink (`_finish_interrupted_drop`).
        """
        self._bookkeeping.pop(split, None)
        group = self.root[split]
        frames = list(group.attrs["frames"])
        first = min(frames.index(name) for name in bad)
        group[DONE][first:] = 0
        kept = [name for name in frames if name not in bad]
        skipped = {**dict(group.attrs.get(SKIPPED_ATTR, {})), **bad}
        group.attrs.update({"frames": kept, SKIPPED_ATTR: skipped, "complete": False})
        self._finish_interrupted_drop(split)
        return tuple(kept)

    def _finish_interrupted_drop(self, split: str) -> None:
        self._bookkeeping.pop(split, None)  # the arrays change shape
        group = self.root[split]
        n = len(group.attrs.get("frames", []))
        for name, array in group.arrays():
            if array.shape[0] != n:
                array.resize((n,) + tuple(array.shape[1:]))

    def finish_split(self, split: str) -> bool:
        """Mark the split complete if every row is done; returns whether it is."""
        if not self.done_flags(split).all():
            return False
        self.root[split].attrs["complete"] = True
        return True

    def _forget_stats_of(self, split: str) -> None:
        """stats.json describes one split; it is stale once that split is written again."""
        stats = self.path / STATS_FILE
        try:
            if json.loads(stats.read_text()).get("split") == split:
                stats.unlink()
        except (OSError, ValueError, AttributeError):
            pass


class RowWriter:
    """The worker side: writes one frame's tiles, reads them back and checks them.

    Picklable. The build sends one with every task, so the opened arrays are kept per process
    (keyed by a token made when the RowWriter is), not per instance: opening costs ms.
    """

    def __init__(self, path: str | os.PathLike, split: str):
        self.path = os.fspath(path)
        self.split = split
        self._token = uuid.uuid4().hex  # a new RowWriter (new split, resized arrays): reopen

    def _open(self) -> "_RowArrays":
        arrays = _OPENED.get(self._token)
        if arrays is None:
            arrays = _RowArrays.open(self.path, self.split)
            _OPENED.clear()  # a worker writes one split at a time
            _OPENED[self._token] = arrays
        return arrays

    def write_row(self, row: int, image: np.ndarray, mask: np.ndarray | None) -> tuple[int, int]:
        """Write the row, read it back and compare; returns its (crc32 image, crc32 mask)."""
        checksums = row_checksums(image, mask)
        self.write(row, image, mask)
        self.check(row, image, mask)
        return checksums

    def write(self, row: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        """The row's tiles, through zarr."""
        arrays = self._open()
        arrays.images[row] = image
        if arrays.masks is not None:
            arrays.masks[row] = mask

    def check(self, row: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        """CacheError unless the stored tiles of the row decode to exactly `image` and `mask`.

        The tiles are read back from the files and decoded by cache.tiles (what the loaders
        read; ~2.5x cheaper than zarr's read path), and compared byte for byte.
        """
        arrays = self._open()
        for name, want in ((IMAGES, image), (MASKS, mask)):
            if name == MASKS and arrays.masks is None:
                continue
            try:
                same = _same_bytes(arrays.read_back(name, row), want)
            except OSError:
                raise
            except Exception as exc:  # a codec's or the shard index's complaint
                raise CacheError(f"{self.path}/{self.split}: the {name} of row {row} cannot be read "
                                 f"back ({type(exc).__name__}: {exc}); storage fault?") from None
            if not same:
                raise CacheError(f"{self.path}/{self.split}: the {name} of row {row} read back "
                                 "differently from what was written (storage fault?)")


_OPENED: dict[str, "_RowArrays"] = {}


@dataclass
class _RowArrays:
    """A split's pixel arrays, opened for writing (zarr) and for reading back (cache.tiles)."""

    images: object
    masks: object | None
    tiles: dict  # IMAGES / MASKS -> cache.tiles.open_windows(...) of the files as written

    @classmethod
    def open(cls, path: str, split: str) -> "_RowArrays":
        import zarr

        group = zarr.open_group(store=path, mode="r+")[split]
        names = [name for name, _ in group.arrays()]
        # Every row is written whole, so zarr's test for tiles equal to the fill value
        # (done by comparing every pixel) would cost a third of the write and save nothing.
        config = {"write_empty_chunks": True}
        images = group[IMAGES].with_config(config)
        masks = group[MASKS].with_config(config) if MASKS in names else None
        # a check must see the files as they are now: no cached shard indexes
        tiles = {name: open_windows(os.path.join(path, split, name), cache_index=False)
                 for name in (IMAGES, MASKS) if name in names}
        return cls(images, masks, tiles)

    def read_back(self, name: str, row: int) -> np.ndarray:
        return self.tiles[name].read_row(row)


def _same_bytes(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether two uint8 arrays hold the same bytes; compared as 8-byte words where the size
    allows (8x fewer comparisons than byte by byte)."""
    if got.shape != want.shape:
        return False
    if want.dtype != np.uint8:  # values given in another dtype (zarr cast them when writing)
        return bool(np.array_equal(got, want))
    got, want = np.ascontiguousarray(got).reshape(-1), np.ascontiguousarray(want).reshape(-1)
    whole = got.size - got.size % 8
    return bool(np.array_equal(got[:whole].view(np.uint64), want[:whole].view(np.uint64))
                and np.array_equal(got[whole:], want[whole:]))


# -- helpers -----------------------------------------------------------------
def _bookkeeping_spec(shape, chunks, dtype) -> dict:
    """Per-row bookkeeping arrays: one chunk per row, uncompressed, crc32c-protected."""
    from zarr.codecs import BytesCodec, Crc32cCodec

    return dict(shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                serializer=BytesCodec(), compressors=[Crc32cCodec()])


def _storage_json(metadata) -> list:
    """The parts of an array's metadata that the storage options decide."""
    doc = metadata.to_dict()
    return json.loads(json.dumps([doc["chunk_grid"], doc["codecs"]], default=str))


def _storage_json_of(storage: Storage, shape: tuple[int, ...]) -> list:
    """What a fresh images array of this shape, made with these options, would record."""
    import zarr

    probe = zarr.create_array(store={}, **storage.pixel_array_spec(tuple(shape), 0))
    return _storage_json(probe.metadata)


def read_rows_tolerantly(array) -> list:
    """array[row] of every row of a per-row array, or None where that row's chunk does not
    decode (torn or corrupt); a missing chunk reads as the fill value, which is fine."""
    try:
        values = np.asarray(array[:])
        return [values[row] for row in range(array.shape[0])]
    except Exception:  # a torn or corrupt chunk: find it row by row
        out = []
        for row in range(array.shape[0]):
            try:
                out.append(np.asarray(array[row]))
            except Exception:
                out.append(None)
        return out


def _remove_partial_files(directory: Path) -> None:
    """Leftovers of LocalStore's write-then-rename after a kill; they are never read."""
    for leftover in directory.rglob("*.partial"):
        try:
            leftover.unlink()
        except OSError:
            pass
