"""Re-read a whole cache and check it against its own records.

Checked: the root attributes (exactly cache.format.ROOT_ATTRS); per split its attributes
(`frames` sorted and unique, `complete` true), the arrays' presence, dtypes and shapes; per
row its done flag, the crc32c of its image and mask bytes against the checksums recorded at
build time (a tile that no longer decodes is a fault too), and the mask values (trainIds
0..num_classes-1 or the ignore index). Every fault is reported with the frame's name.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cache.format import CHECKSUMS, DONE, IMAGES, MASKS, ROOT_ATTRS, open_group
from cache.reader import CacheReader
from cache.tiles import CorruptFile, MissingFile, open_windows
from cache.writer import configure_worker_threads, read_rows_tolerantly, row_checksums

_IN_PROCESS_BELOW = 16  # rows; fewer are checked without starting worker processes


@dataclass(frozen=True)
class Fault:
    split: str | None
    row: int | None
    frame: str | None
    problem: str

    def __str__(self) -> str:
        if self.split is None:
            return f"cache: {self.problem}"
        if self.row is None:
            return f"split {self.split!r}: {self.problem}"
        return f"{self.split} row {self.row} ({self.frame}): {self.problem}"


@dataclass
class VerifyReport:
    path: str
    rows_checked: dict[str, int] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults

    def bad_frames(self) -> list[str]:
        return sorted({f"{f.split}/{f.frame}" for f in self.faults if f.frame is not None})


def rows_to_check(path: str | os.PathLike) -> int:
    """How many rows `verify_cache` will re-read (the total of its progress)."""
    reader = CacheReader(path)
    total = 0
    for split in reader.split_names():
        frames = open_group(reader.path, split=split).attrs.get("frames")
        total += len(frames) if isinstance(frames, list) else 0
    return total


def verify_cache(path: str | os.PathLike, *, workers: int | None = None, progress=None) -> VerifyReport:
    """Check every split and row; raises CacheError only if `path` is not a cache at all."""
    reader = CacheReader(path)  # refuses a non-cache or an unknown version
    report = VerifyReport(reader.path)
    _ROW_READERS.clear()  # the files may have changed since an earlier run in this process
    for key, value in ROOT_ATTRS.items():
        if reader.attrs.get(key) != value:
            report.faults.append(Fault(None, None, None, f"root attribute {key!r} is "
                                       f"{reader.attrs.get(key)!r}, expected {value!r}"))
    if not reader.split_names():  # a build that stopped before its first split: nothing to use
        report.faults.append(Fault(None, None, None, "no splits (a build that stopped early?); "
                                   "run `dataprep build` again"))
    for split in reader.split_names():
        faults, tasks = _check_split(reader, split)
        report.faults.extend(faults)
        report.rows_checked[split] = len(tasks)
        for row, problems in _check_rows(tasks, workers, progress):
            frame = reader.split(split, require_complete=False, check_files=False).frames[row]
            report.faults.extend(Fault(split, row, frame, p) for p in problems)
    report.faults.sort(key=lambda f: (f.split or "", -1 if f.row is None else f.row))
    return report


def _check_split(reader: CacheReader, split: str) -> tuple[list[Fault], list[tuple]]:
    """(faults of the split's structure, one task per row to re-read; none if it is unusable)."""
    group = open_group(reader.path, split=split)
    attrs = dict(group.attrs)
    faults = []

    def fault(problem):
        faults.append(Fault(split, None, None, problem))

    frames = attrs.get("frames")
    if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
        fault("attribute 'frames' is missing or not a list of names")
        return faults, []
    if frames != sorted(set(frames)):
        fault("attribute 'frames' is not sorted and unique")
    if attrs.get("complete") is not True:
        fault("split is not complete (attribute complete is not true): an interrupted build? "
              "run `dataprep build` again")
    arrays = dict(group.arrays())
    missing = [name for name in (IMAGES, CHECKSUMS, DONE) if name not in arrays]
    if missing:
        fault(f"array(s) {', '.join(missing)} missing")
        return faults, []
    n, has_masks = len(frames), MASKS in arrays
    frame_hw = tuple(arrays[IMAGES].shape[1:3])
    expected = {IMAGES: ((n, *frame_hw, 3), "uint8"), CHECKSUMS: ((n, 2), "uint32"),
                DONE: ((n,), "uint8")}
    if has_masks:
        expected[MASKS] = ((n, *frame_hw), "uint8")
    wrong = [f"array {name!r} is {arrays[name].dtype} {tuple(arrays[name].shape)}, expected "
             f"{dtype} {shape} for {n} frames" for name, (shape, dtype) in expected.items()
             if tuple(arrays[name].shape) != shape or str(arrays[name].dtype) != dtype]
    if wrong:
        faults.extend(Fault(split, None, None, problem) for problem in wrong)
        return faults, []
    done = read_rows_tolerantly(arrays[DONE])  # shapes were checked above: n rows each
    sums = read_rows_tolerantly(arrays[CHECKSUMS])
    tasks = [(reader.path, split, row, done[row], sums[row], has_masks, reader.num_classes,
              reader.ignore_index) for row in range(n)]
    return faults, tasks


def _check_rows(tasks: list, workers: int | None, progress):
    if len(tasks) < _IN_PROCESS_BELOW or workers == 1:
        for task in tasks:
            yield task[2], check_row(task)
            if progress is not None:
                progress()
        return
    import multiprocessing

    workers = workers or len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(os.getpid(),))
    try:
        chunk = max(1, len(tasks) // (8 * workers))
        for task, problems in zip(tasks, pool.map(check_row, tasks, chunksize=chunk)):
            yield task[2], problems
            if progress is not None:
                progress()
    finally:  # Ctrl-C or an error: drop the queued rows, wait only for the running ones
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(parent_pid: int) -> None:
    """A verify worker: SIGKILLed when the verify process dies (SIGTERM, SIGKILL: without it
    the workers and multiprocessing's resource tracker lived on), leaves Ctrl-C to the parent,
    one codec thread."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # not the parent's raising handler
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent went before the request took effect
        os._exit(0)
    configure_worker_threads()


_ROW_READERS: dict[tuple[str, str, str], object] = {}  # opened once per process and verify run


def _read_row(path: str, split: str, kind: str, row: int) -> np.ndarray:
    """A whole row of images or masks, decoded by cache.tiles as the loaders read it (~2.5x
    cheaper than zarr's read path), or by zarr where cache.tiles does not know the layout."""
    key = (path, split, kind)
    if key not in _ROW_READERS:
        # a missing file is a fault here, not the fill value zarr would read
        _ROW_READERS[key] = open_windows(os.path.join(path, split, kind), cache_index=False,
                                         missing="error")
    return _ROW_READERS[key].read_row(row)


def _unreadable(kind: str, exc: Exception) -> str:
    if isinstance(exc, MissingFile):
        return f"{kind} file is missing ({exc.path})"
    if isinstance(exc, CorruptFile):
        return f"{kind} file is damaged ({exc.path}: {exc.problem})"
    return f"{kind} tiles cannot be decoded ({type(exc).__name__}: {exc})"


def check_row(task) -> list[str]:
    """The problems of one row (empty if it is sound)."""
    path, split, row, done, recorded, has_masks, num_classes, ignore_index = task
    problems = []
    if done is None:
        problems.append("its done flag cannot be read (corrupt chunk)")
    elif int(done) != 1:
        problems.append("not done (never written, or the build was interrupted)")
    if recorded is None:
        problems.append("its checksums cannot be read (corrupt chunk)")
    try:
        image = _read_row(path, split, IMAGES, row)
    except Exception as exc:
        return problems + [_unreadable("image", exc)]
    mask = None
    if has_masks:
        try:
            mask = _read_row(path, split, MASKS, row)
        except Exception as exc:
            return problems + [_unreadable("mask", exc)]
    crc_image, crc_mask = row_checksums(image, mask)
    if recorded is not None and int(recorded[0]) != crc_image:
        problems.append(f"image checksum {crc_image:#010x} differs from the recorded {int(recorded[0]):#010x}")
    if recorded is not None and has_masks and int(recorded[1]) != crc_mask:
        problems.append(f"mask checksum {crc_mask:#010x} differs from the recorded {int(recorded[1]):#010x}")
    if mask is not None:
        counts = np.bincount(mask.ravel(), minlength=256)
        counts[:num_classes] = 0
        counts[ignore_index] = 0
        if counts.any():
            values = np.flatnonzero(counts)
            problems.append(f"mask has {int(counts.sum())} pixels outside 0..{num_classes - 1} and "
                            f"{ignore_index} (values {', '.join(map(str, values[:5]))})")
    return problems

