"""Writing a cache: storage options, split setup, resume checks and checked per-row writes.

The writer is split in two, as the build runs: `CacheWriter` (the parent process) creates the
root and the splits, decides what is already done, records per-row checksums and done flags
and marks a split complete; `RowWriter` (a worker process) writes one frame's tiles and reads
them back.

Crash safety. A row is trusted only through its done flag, and the flag is set only after the
row's files were written and read back (size and crc32c of every file compared with what was
written), and after its checksums were stored.
Every file (ours through cache.tiles.TileWriter, zarr's through LocalStore) is written to a
temporary name and renamed, so a SIGKILL leaves either the old or the new file plus, at worst,
a `*.partial` leftover (which `prepare_split` removes). We do not depend on that: the done and
checksum arrays carry a crc32c codec, so a torn done or checksum chunk fails to decode and
reads as "not done", and a row that is not done is simply written again. Done flags are
committed in batches (`FLUSH_SECONDS`): a kill loses at most that much finished work.
(Power loss is another matter: nothing here fsyncs; run `dataprep verify` after one.)

Consolidated metadata (see cache/format.py) is removed from the root and from a split before
either changes, and written again once a split is complete; our own code never reads it.
"""
from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.format import (
    CHECKSUMS,
    DIMENSIONS,
    DONE,
    FORMAT_NAME,
    FORMAT_VERSION,
    IGNORE_INDEX,
    IMAGES,
    MASKS,
    ROOT_ATTRS,
    SCALE_ATTR,
    SOURCE_SIZE_ATTR,
    STATS_FILE,
    CacheError,
    UserError,
    damaged_children,
    open_group,
    split_group_names,
)
from cache.lock import LOCK_FILE, lock_cache
from cache.tiles import TileArray, TileWriter, Unsupported, file_digest, open_windows

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
# Done flags and checksums: rows per chunk (one chunk per row made the parent write two files
# per frame), and how often the parent commits the rows finished since its last commit.
BOOKKEEPING_CHUNK = 1024
FLUSH_SECONDS = 0.5


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

    def tiles_per_shard(self, height: int, width: int) -> int:
        return -(-height // self.tile) * -(-width // self.tile)

    def check_frame(self, height: int, width: int) -> None:
        """UserError if frames of this size cannot be stored with these options: a shard file
        is written with one writev of its tiles and index, at most IOV_MAX (1024) parts."""
        if not self.shard:
            return
        limit = _iov_max() - 1
        tiles = self.tiles_per_shard(height, width)
        if tiles > limit:
            smallest = next(t for t in range(16, 4097, 16) if -(-height // t) * -(-width // t) <= limit)
            raise UserError(f"--tile {self.tile}: a {width}x{height} frame would make {tiles} tiles "
                            f"in its shard file, more than the {limit} a shard can hold here (one "
                            f"writev of tiles and index); use --tile {smallest} or larger, or --no-shard")

    def codec_of(self, shape: tuple[int, ...]) -> str:
        """The codec of an images (N, H, W, 3) or a masks (N, H, W) array."""
        return self.codec if len(shape) == 4 else self.mask_codec

    def pixel_array_spec(self, shape: tuple[int, ...], fill_value: int) -> dict:
        """create_array arguments of an images (N, H, W, 3) or masks (N, H, W) array."""
        t = self.tile
        chunks = (1, t, t) + tuple(shape[3:])
        spec = dict(shape=shape, chunks=chunks, dtype="uint8", fill_value=fill_value,
                    compressors=_codec_table()[self.codec_of(shape)](),
                    dimension_names=DIMENSIONS[IMAGES if len(shape) == 4 else MASKS])
        if self.shard:  # one shard per row, a whole number of tiles
            spec["shards"] = (1, -(-shape[1] // t) * t, -(-shape[2] // t) * t) + tuple(shape[3:])
        return spec


@dataclass(frozen=True)
class SplitPlan:
    """What one split of the cache holds: frames (sorted, index = row) of one stored size.

    height, width: the stored frame size, `scale` times the raw frames' `source_size`
    (rounded; scale 1.0 stores them as they are)."""

    name: str
    frames: tuple[str, ...]
    height: int
    width: int
    has_masks: bool
    skipped: dict = field(default_factory=dict)  # frames left out: name -> problem
    scale: float = 1.0
    source_size: tuple[int, int] | None = None  # None: (height, width)

    def split_attrs(self) -> dict:
        source = self.source_size or (self.height, self.width)
        return {"frames": list(self.frames), "complete": False, SKIPPED_ATTR: dict(self.skipped),
                SCALE_ATTR: float(self.scale), SOURCE_SIZE_ATTR: [int(source[0]), int(source[1])]}


def _iov_max() -> int:
    try:
        return int(os.sysconf("SC_IOV_MAX"))
    except (ValueError, OSError, AttributeError):
        return 1024


def row_checksums(image: np.ndarray, mask: np.ndarray | None) -> tuple[int, int]:
    """crc32c of a row's image bytes and mask bytes (0 for a split without masks).

    crc32c (Castagnoli) runs on the CPU's own instruction (SSE4.2, ARMv8): ~0.25 ms for a
    2048x1024 frame against ~2.1 ms for zlib's crc32 (google-crc32c, which zarr needs anyway)."""
    import google_crc32c

    crc_image = google_crc32c.value(np.ascontiguousarray(image))
    crc_mask = 0 if mask is None else google_crc32c.value(np.ascontiguousarray(mask))
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
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return attrs if isinstance(attrs, dict) else {}


def _clear_but_lock(path: Path) -> None:
    """Empty a folder that _check_out found to be ours (an empty one, or a cache of another
    version that --force replaces), except for the lock file that this process holds."""
    import shutil

    for entry in path.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _holds_only_ours(path: Path) -> bool:
    """An empty folder, or one that holds only what our own runs leave before the root exists
    (the lock file, a write probe)."""
    return all(entry.name == LOCK_FILE or entry.name.startswith(".write-test-")
               for entry in path.iterdir())


def _check_out(path: Path, attrs: dict | None, force: bool) -> dict | None:
    """Refuse an --out that is not ours; returns the root attrs to keep (None: make the root)."""
    if attrs is None and path.is_dir() and not _holds_only_ours(path):
        raise UserError(f"--out {path}: directory is not empty and is not a Cityscapes "
                        "cache; choose a new or empty directory")
    if attrs is not None and attrs.get("format") != FORMAT_NAME:
        raise UserError(f"--out {path}: holds a Zarr store that is not a Cityscapes cache; "
                        "choose a new or empty directory")
    if attrs is not None and attrs.get("version") != FORMAT_VERSION:
        if not force:
            raise CacheError(f"--out {path}: cache format version {attrs.get('version')!r} "
                             f"differs from this code's {FORMAT_VERSION}; rebuild it with "
                             "`dataprep build --force`")
        return None
    return attrs


class CacheWriter:
    """The parent side of a build: root, splits, done flags, checksums, completion.

    Holds the cache's exclusive lock (cache/lock.py) from its creation until close() (or
    `with`, or garbage collection): a second writer, or a reader, is refused (CacheBusy naming
    the holder) or, with wait=True, waits."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False, wait: bool = False,
                 on_wait=None):
        import weakref

        import zarr

        self.path = Path(path)
        if self.path.is_dir():  # refuse a folder that is not ours before putting a lock file in it
            _check_out(self.path, _read_root_attrs(self.path), force)
        _mkdir_out(self.path)
        self._lock = lock_cache(self.path, exclusive=True, wait=wait, what="write the cache",
                                on_wait=on_wait)
        weakref.finalize(self, self._lock.release)
        attrs = _check_out(self.path, _read_root_attrs(self.path), force)  # again, under the lock
        if attrs is None:  # one write makes the root with its attributes: no window without them
            _clear_but_lock(self.path)  # (zarr's mode="w" would delete the lock file we hold)
            self.root = zarr.open_group(store=str(self.path), mode="a", zarr_format=3,
                                        attributes=dict(ROOT_ATTRS))
        else:
            self.root = open_group(str(self.path), mode="a")
            if dict(self.root.attrs) != ROOT_ATTRS:
                _drop_consolidated(self.path)
                self.root.attrs.update(ROOT_ATTRS)
        self._rows: dict[str, _Bookkeeping] = {}  # split -> rows recorded, not yet committed

    def close(self) -> None:
        """Commit what is recorded and give the lock back."""
        try:
            self.flush()
        finally:
            self._lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- splits --------------------------------------------------------------
    def split_names(self) -> list[str]:
        return split_group_names(self.root)

    def _split(self, name: str):
        try:
            return open_group(str(self.path), split=name, mode="r+")
        except Exception as exc:
            meta = self.path / name / "zarr.json"
            raise CacheError(f"{meta}: split {name!r} cannot be opened ({type(exc).__name__}: "
                             f"{str(exc)[:80]}); the cache is damaged: `dataprep build --force "
                             f"--splits {name}` rebuilds that split") from None

    def split_attrs(self, name: str) -> dict | None:
        if name in damaged_children(str(self.path)):
            self._split(name)  # raises, naming the file
        return dict(self._split(name).attrs) if name in self.split_names() else None

    def is_complete(self, plan: SplitPlan, storage: Storage) -> bool:
        """True if the split exists, matches the plan and is complete (raises on a mismatch)."""
        attrs = self.split_attrs(plan.name)
        if attrs is None or not attrs.get("complete", False):
            return False
        self._check_matches(plan, storage)
        if self.missing_rows(plan.name).any():  # files deleted since: prepare_split rewrites them
            return False
        return True

    def missing_rows(self, split: str) -> np.ndarray:
        """bool per row: a file of the row (image or mask shard, or tile) is not there. Rows
        whose done flag is set have all their files; only damage from outside removes one."""
        group = self._split(split)
        n = len(group.attrs.get("frames", []))
        missing = np.zeros(n, dtype=bool)
        for name in (IMAGES, MASKS):
            try:
                layout = TileArray(str(self.path / split / name))
            except (Unsupported, OSError, ValueError, KeyError):
                continue
            for row, _ in layout.missing_files():
                if row < n:
                    missing[row] = True
        return missing

    def prepare_split(self, plan: SplitPlan, storage: Storage, *, force: bool = False) -> np.ndarray:
        """Create the split, or check that the existing one was made with the same options.

        Returns the done flags (bool per row): the rows a resumed build can skip.
        """
        storage.check_frame(plan.height, plan.width)
        self._rows.pop(plan.name, None)
        if force and plan.name in damaged_children(str(self.path)):
            import shutil  # a split whose metadata is garbled: --force starts it again

            _drop_consolidated(self.path)
            shutil.rmtree(self.path / plan.name)
        exists = plan.name in self.split_names()
        _drop_consolidated(self.path)
        if exists:
            _drop_consolidated(self.path / plan.name)
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
        done = self.done_flags(plan.name)
        lost = done & self.missing_rows(plan.name)
        if lost.any():  # rows whose files were deleted: not done any more, written again
            group = self._split(plan.name)
            group.attrs["complete"] = False
            rows = _Bookkeeping.open(group)
            rows.done[lost] = 0
            rows.dirty.update(int(r) // rows.done_array.chunks[0] for r in np.flatnonzero(lost))
            rows.flush()
            done = self.done_flags(plan.name)
        return done

    def _array_names(self, split: str) -> list[str]:
        return [name for name, _ in self._split(split).arrays()]

    def _create_split(self, plan: SplitPlan, storage: Storage) -> None:
        n, h, w = len(plan.frames), plan.height, plan.width
        group = self.root.create_group(plan.name, attributes=plan.split_attrs())
        group.create_array(IMAGES, **storage.pixel_array_spec((n, h, w, 3), 0))
        if plan.has_masks:
            group.create_array(MASKS, **storage.pixel_array_spec((n, h, w), IGNORE_INDEX))
        group.create_array(CHECKSUMS, **_bookkeeping_spec(CHECKSUMS, (n, 2), "uint32"))
        # Created last: a split without its done array never finished its setup.
        group.create_array(DONE, **_bookkeeping_spec(DONE, (n,), "uint8"))

    def _check_matches(self, plan: SplitPlan, storage: Storage) -> None:
        """Refuse to resume a split made with other options (the build would mix them)."""
        group = self._split(plan.name)
        where = f"{self.path}/{plan.name}"
        hint = "use --force to rebuild it with the new options"
        stored = list(group.attrs.get("frames", []))
        if stored != list(plan.frames):
            raise CacheError(f"{where}: the cache holds {len(stored)} frames but this build would "
                             f"make {len(plan.frames)} (or other ones); {hint}")
        if bool(plan.has_masks) != (MASKS in self._array_names(plan.name)):
            raise CacheError(f"{where}: the cache and this build disagree on whether the split has "
                             f"masks; {hint}")
        scale = float(group.attrs.get(SCALE_ATTR, 1.0))
        if scale != float(plan.scale):
            raise CacheError(f"{where}: the cache stores this split at scale {scale:g}, this build "
                             f"at {plan.scale:g}; {hint}")
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
        """Done flags of every row as committed; a chunk that cannot be read counts as not done."""
        self.flush(split)
        group = self._split(split)
        done = read_rows_tolerantly(group[DONE])
        sums = read_rows_tolerantly(group[CHECKSUMS])
        return np.array([d is not None and int(d) == 1 and c is not None
                         for d, c in zip(done, sums)], dtype=bool)

    def record_row(self, split: str, row: int, checksums: tuple[int, int]) -> None:
        """Note a checked row's checksums and done flag; they are committed (`flush`) at most
        FLUSH_SECONDS later, in one write per chunk of rows, checksums first (the flag is the
        commit)."""
        if split not in self._rows:
            self._rows[split] = _Bookkeeping.open(self._split(split))
        rows = self._rows[split]
        rows.record(row, checksums)
        if time.monotonic() - rows.flushed_at >= FLUSH_SECONDS:
            rows.flush()

    def flush(self, split: str | None = None) -> None:
        """Commit the rows recorded since the last commit (of one split, or of all)."""
        for name in [split] if split is not None else list(self._rows):
            if name in self._rows:
                self._rows[name].flush()

    def drop_frames(self, split: str, bad: dict[str, str]) -> tuple[str, ...]:
        """Leave frames out of a split being built (`--on-error skip`); returns the new list.

        Rows keep their meaning only below the first dropped frame: the done flags from there
        on are cleared *before* the frame list changes, so that at every moment a row whose
        flag is set holds frames[row]. The arrays are shrunk last; a resumed build finishes
        an interrupted shrink (`_finish_interrupted_drop`).
        """
        self.flush(split)
        self._rows.pop(split, None)
        _drop_consolidated(self.path)
        _drop_consolidated(self.path / split)
        group = self._split(split)
        frames = list(group.attrs["frames"])
        first = min(frames.index(name) for name in bad)
        group[DONE][first:] = 0
        kept = [name for name in frames if name not in bad]
        skipped = {**dict(group.attrs.get(SKIPPED_ATTR, {})), **bad}
        group.attrs.update({"frames": kept, SKIPPED_ATTR: skipped, "complete": False})
        self._finish_interrupted_drop(split)
        return tuple(kept)

    def _finish_interrupted_drop(self, split: str) -> None:
        self._rows.pop(split, None)  # the arrays change shape
        group = self._split(split)
        n = len(group.attrs.get("frames", []))
        for name, array in group.arrays():
            if array.shape[0] != n:
                array.resize((n,) + tuple(array.shape[1:]))

    def finish_split(self, split: str) -> bool:
        """Mark the split complete if every row is done; returns whether it is. A complete
        split, and then the root, get consolidated metadata for outside readers."""
        if not self.done_flags(split).all():
            return False
        self._split(split).attrs["complete"] = True
        _consolidate(self.path, split)
        _consolidate(self.path, None)
        return True

    def ensure_consolidated(self) -> list[str]:
        """Repair what a crash (or a full disk) can leave of the consolidated metadata: every
        complete split, and the root once every split is, carries it, matching the files.
        Returns the groups it rewrote ("" for the root)."""
        repaired = []
        splits = self.split_names()
        complete = [name for name in splits if self.split_attrs(name).get("complete") is True]
        for name in complete:
            if not _consolidated_current(self.path / name):
                _consolidate(self.path, name)
                repaired.append(name)
        if splits and len(complete) == len(splits) and not _consolidated_current(self.path):
            _consolidate(self.path, None)
            repaired.append("")
        for leftover in self.path.glob("*.partial"):  # the root's half-written metadata
            leftover.unlink(missing_ok=True)
        return repaired

    def _forget_stats_of(self, split: str) -> None:
        """stats.json describes one split; it is stale once that split is written again."""
        stats = self.path / STATS_FILE
        try:
            if json.loads(stats.read_text()).get("split") == split:
                stats.unlink()
        except (OSError, ValueError, AttributeError):
            pass


@dataclass
class _Bookkeeping:
    """A split's checksums and done flags as the parent records them: in memory, committed in
    whole chunks of BOOKKEEPING_CHUNK rows."""

    checksums_array: object
    done_array: object
    checksums: np.ndarray
    done: np.ndarray
    dirty: set = field(default_factory=set)  # chunk indexes holding rows not yet committed
    flushed_at: float = field(default_factory=time.monotonic)

    @classmethod
    def open(cls, group) -> "_Bookkeeping":
        checksums_array, done_array = group[CHECKSUMS], group[DONE]
        sums = read_rows_tolerantly(checksums_array)
        done = read_rows_tolerantly(done_array)
        # an unreadable chunk is rewritten whole: its rows start again as not done
        checksums = np.array([s if s is not None else (0, 0) for s in sums], dtype=np.uint32)
        flags = np.array([int(d is not None and s is not None and int(d) == 1)
                          for d, s in zip(done, sums)], dtype=np.uint8)
        return cls(checksums_array, done_array, checksums.reshape(-1, 2), flags)

    def record(self, row: int, checksums: tuple[int, int]) -> None:
        self.checksums[row] = checksums
        self.done[row] = 1
        self.dirty.add(row // self.done_array.chunks[0])

    def flush(self) -> None:
        chunk = self.done_array.chunks[0]
        spans = [(c * chunk, min((c + 1) * chunk, self.done.shape[0])) for c in sorted(self.dirty)]
        for start, stop in spans:  # every checksum first: a flag may only follow its checksums
            self.checksums_array[start:stop] = self.checksums[start:stop]
        for start, stop in spans:
            self.done_array[start:stop] = self.done[start:stop]
        self.dirty.clear()
        self.flushed_at = time.monotonic()


class RowWriter:
    """The worker side: writes one frame's tiles and reads the files back.

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
        """Write the row, read its files back and compare; returns its (crc32c image, mask)."""
        checksums = row_checksums(image, mask)
        self.check(row, self.write(row, image, mask))
        return checksums

    def write(self, row: int, image: np.ndarray, mask: np.ndarray | None) -> dict:
        """The row's tiles: {array name: {file path: (size, crc32c) written}} for `check`.

        Our own TileWriter encodes and writes the shard (or tile) files of the layouts the
        writer makes, ~3x cheaper than zarr's write path; any other layout goes through zarr
        and is checked by decoding it back ({name: the array's values})."""
        arrays = self._open()
        written = {}
        for name, values in ((IMAGES, image), (MASKS, mask)):
            if name not in arrays.zarr:
                continue
            direct = arrays.direct.get(name)
            if direct is not None:
                written[name] = direct.write_row(row, values)
            else:
                arrays.zarr[name][row] = values
                written[name] = np.asarray(values, dtype=np.uint8)
        return written

    def check(self, row: int, written: dict) -> None:
        """CacheError unless the row's files hold exactly what `write` wrote: each file is read
        back whole and its size and crc32c compared with those of the bytes written (a storage
        fault, or another writer, shows here; no decode needed)."""
        arrays = self._open()
        for name, expected in written.items():
            try:
                if isinstance(expected, dict):
                    same = all(file_digest(path) == digest for path, digest in expected.items())
                else:
                    same = _same_bytes(arrays.read_back(name, row), expected)
            except FileNotFoundError:
                same = False
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
    """A split's pixel arrays, opened for writing: our TileWriter where it knows the layout,
    else zarr (with cache.tiles to read back)."""

    zarr: dict      # IMAGES / MASKS -> zarr array
    direct: dict    # IMAGES / MASKS -> cache.tiles.TileWriter, where the layout allows
    tiles: dict     # IMAGES / MASKS -> cache.tiles.open_windows(...) of the files as written

    @classmethod
    def open(cls, path: str, split: str) -> "_RowArrays":
        group = open_group(path, split=split, mode="r+")
        names = [name for name, _ in group.arrays() if name in (IMAGES, MASKS)]
        # Every row is written whole, so zarr's test for tiles equal to the fill value
        # (done by comparing every pixel) would cost a third of the write and save nothing.
        arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in names}
        direct = {}
        for name in names:
            try:
                direct[name] = TileWriter(os.path.join(path, split, name))
            except Unsupported:
                pass
        # a check must see the files as they are now: no cached shard indexes
        tiles = {name: open_windows(os.path.join(path, split, name), cache_index=False) for name in names}
        return cls(arrays, direct, tiles)

    def read_back(self, name: str, row: int) -> np.ndarray:
        return self.tiles[name].read_row(row)


def _same_bytes(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether two uint8 arrays hold the same bytes; compared as 8-byte words where the size
    allows (8x fewer comparisons than byte by byte)."""
    if got.shape != want.shape:
        return False
    got, want = np.ascontiguousarray(got).reshape(-1), np.ascontiguousarray(want).reshape(-1)
    whole = got.size - got.size % 8
    return bool(np.array_equal(got[:whole].view(np.uint64), want[:whole].view(np.uint64))
                and np.array_equal(got[whole:], want[whole:]))


# -- consolidated metadata -------------------------------------------------------
def _drop_consolidated(group_dir: Path) -> None:
    """Remove the consolidated metadata from a group's zarr.json (before the group or anything
    in it changes: outside readers would trust it); written through a rename, as zarr writes."""
    meta = Path(group_dir) / "zarr.json"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return
    if doc.pop("consolidated_metadata", None) is None:
        return
    tmp = meta.with_name(f"zarr.json.{uuid.uuid4().hex}.partial")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, meta)


def _consolidated_current(group_dir: Path) -> bool:
    """Whether the group's consolidated metadata exists and lists exactly its nodes as their
    own zarr.json files describe them (a crash between a change and the consolidation, or a
    full disk during it, leaves it missing or stale)."""
    group_dir = Path(group_dir)
    try:
        consolidated = json.loads((group_dir / "zarr.json").read_text()).get("consolidated_metadata")
        entries = consolidated["metadata"]
        nodes = _child_nodes(group_dir)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
    if not isinstance(entries, dict) or set(entries) != set(nodes):
        return False

    def plain(doc):
        return {k: v for k, v in doc.items() if k != "consolidated_metadata"} if isinstance(doc, dict) else doc
    return all(plain(entries[key]) == plain(doc) for key, doc in nodes.items())


def _child_nodes(group_dir: Path, prefix: str = "") -> dict:
    """key -> zarr.json document of every node below a group (never into an array's chunks)."""
    nodes = {}
    for entry in os.scandir(group_dir):
        meta = os.path.join(entry.path, "zarr.json")
        if not entry.is_dir() or not os.path.isfile(meta):
            continue
        with open(meta) as f:
            doc = json.load(f)
        key = prefix + entry.name
        nodes[key] = doc
        if doc.get("node_type") == "group":
            nodes.update(_child_nodes(Path(entry.path), key + "/"))
    return nodes


def _consolidate(path: Path, split: str | None) -> None:
    import zarr

    with warnings.catch_warnings():
        # "not part of the Zarr v3 spec": other readers ignore it and list the store instead;
        # stats.json in the root is ours and no node
        warnings.filterwarnings("ignore", message=".*onsolidated metadata")
        warnings.filterwarnings("ignore", message=".*not recognized as a component")
        zarr.consolidate_metadata(str(path), path=split or "")


# -- helpers -----------------------------------------------------------------
def _bookkeeping_spec(name: str, shape: tuple[int, ...], dtype: str) -> dict:
    """Per-row bookkeeping arrays: BOOKKEEPING_CHUNK rows a chunk, uncompressed, crc32c-protected."""
    from zarr.codecs import BytesCodec, Crc32cCodec

    return dict(shape=shape, chunks=(BOOKKEEPING_CHUNK,) + tuple(shape[1:]), dtype=dtype, fill_value=0,
                serializer=BytesCodec(), compressors=[Crc32cCodec()], dimension_names=DIMENSIONS[name])


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
