"""`dataprep build`: raw Cityscapes tree -> the tiled Zarr cache, in parallel, resumable.

Per split: find the frames (dataprep.discover), check them cheaply (PNG header and end,
polygon JSON and its image size, one frame size per split), create or resume the split, and
let worker processes do all the per-pixel work of a frame: decode the PNG once (libspng
through pyspng, ~1.6x faster than PIL on photo-like frames, same pixels; PIL where pyspng is
missing or the PNG is not 8-bit RGB), render the trainIds from the polygons, downscale both
with `scale` (images antialiased bilinear, masks nearest: only source labels), write the tiles,
read the files back and compare them. The parent only records each row's checksums and done
flag (committed in batches) and shows progress. A split is marked complete once every row is
done; a complete split is left alone unless `force`. Memory stays flat in the number of
frames: the parent holds per row a frame name, two checksums and a flag.

Scale: `scale` < 1 stores the splits in `scale_splits` (default train and train_extra)
downscaled, e.g. 0.5 stores 2048x1024 frames as 1024x512 (a quarter of the disk and of the
read cost); the other splits (val, test) stay at full resolution, so that evaluation sees the
official-grade frames. Each split records its scale and source size in its attributes.

Bad input (`on_error`):
  "stop" (default): the first bad frame stops the build with a one-line error naming the
      file; the split stays incomplete (rows already written are kept, and the next run
      resumes once the file is fixed).
  "skip": bad frames are left out of the split's frame list, which is then completed
      without them; they are recorded in the split's `skipped` attribute (name -> problem)
      and listed at the end, and the exit status is EXIT_SKIPPED (3), not 0, so that a
      script notices a cache with frames missing. Later runs leave them out again;
      `--force` retries them.
Problems that are not about one frame (no tree, unwritable --out, a cache made with other
options, a storage fault) always stop the build.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from cache.errors import UserError
from cache.safe_input import check_pixels, open_regular, png_header
from cache.writer import SKIPPED_ATTR, CacheWriter, RowWriter, SplitPlan, Storage
from dataprep.discover import COARSE_SPLIT
from dataprep.discover import Frame, discover, polygon_dir, unlabelled_splits
from dataprep.rasterize import BadFrame, load_polygons, render_trainids

ON_ERROR_CHOICES = ("stop", "skip")
EXIT_SKIPPED = 3
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PROBE_IN_PARENT_BELOW = 32  # frames; fewer are checked without starting the worker pool
_IN_FLIGHT_PER_WORKER = 4    # frame tasks queued per worker: enough to keep it busy
DEFAULT_SCALE_SPLITS = ("train", COARSE_SPLIT)
MIN_STORED_SIDE = 16  # pixels: the smallest frame side --scale may make


@dataclass(frozen=True)
class BuildOptions:
    root: Path
    out: Path
    splits: tuple[str, ...] | None = None   # None: every split present
    workers: int | None = None               # None: every core this process may use
    wait: bool = False                       # another process holds the cache: wait, not refuse
    limit: int | None = None                 # first N frames per split (smoke runs)
    force: bool = False
    coarse: bool = False
    on_error: str = "stop"
    storage: Storage = field(default_factory=Storage)
    scale: float = 1.0                       # stored size / raw size for the scale_splits
    scale_splits: tuple[str, ...] = DEFAULT_SCALE_SPLITS

    def __post_init__(self):
        if not 0 < self.scale <= 1:
            raise UserError(f"--scale must be in (0, 1] (a downscale factor, e.g. 0.5), got {self.scale}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.on_error not in ON_ERROR_CHOICES:
            raise UserError(f"--on-error must be one of {', '.join(ON_ERROR_CHOICES)}, got {self.on_error!r}")

    def scale_of(self, split: str) -> float:
        return self.scale if split in self.scale_splits else 1.0


@dataclass
class SplitResult:
    name: str
    frames: int
    has_masks: bool
    rows_written: int = 0
    already_complete: bool = False
    skipped: dict = field(default_factory=dict)  # frame name -> problem
    scale: float = 1.0
    stored_size: tuple[int, int] | None = None  # (height, width) of the stored frames


@dataclass
class BuildReport:
    out: Path
    splits: list[SplitResult] = field(default_factory=list)

    @property
    def skipped(self) -> dict[str, str]:
        return {f"{s.name}/{name}": problem for s in self.splits for name, problem in s.skipped.items()}

    @property
    def exit_code(self) -> int:
        return EXIT_SKIPPED if self.skipped else 0


class BuildEvents:
    """What a build reports while it runs; the CLI shows it, tests may record it."""

    def message(self, text: str) -> None: ...
    def split_started(self, split: str, total: int, done: int) -> None: ...
    def row_done(self, split: str) -> None: ...
    def split_finished(self, split: str) -> None: ...


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_cache(options: BuildOptions, events: BuildEvents | None = None) -> BuildReport:
    """Build (or resume, or confirm) the cache at options.out from the tree at options.root."""
    try:
        return _build(options, events or BuildEvents())
    except OSError as exc:  # disk full, permissions changed under us...: one line, not a traceback
        where = exc.filename or options.out
        raise UserError(f"{where}: {exc.strerror or exc} (while building {options.out})") from None


def _build(options: BuildOptions, events: BuildEvents) -> BuildReport:
    found = discover(options.root, options.splits, coarse=options.coarse)
    for split in unlabelled_splits(found):
        labels = polygon_dir(options.root, split)
        why = (f"{labels} holds placeholder polygons only (no evaluated class), as the real "
               "test split does" if labels.is_dir() else f"no {labels}")
        events.message(f"split {split!r}: images only, no masks array ({why})")
    with _WorkerPool(options.workers or default_workers()) as pool:
        pool.start()  # before this process opens the cache (and takes its lock): see worker_context
        with CacheWriter(options.out, force=options.force, wait=options.wait,
                         on_wait=events.message) as writer:
            report = BuildReport(Path(options.out))
            for split, frames in found.items():
                frames = frames[: options.limit] if options.limit else frames
                report.splits.append(_build_split(writer, pool, split, frames, options, events))
            for group in writer.ensure_consolidated():  # what a crash or full disk left
                events.message(f"repaired the consolidated metadata of "
                               f"{'split ' + repr(group) if group else 'the root'}")
    return report


def _build_split(writer: CacheWriter, pool: "_WorkerPool", split: str, frames: list[Frame],
                 options: BuildOptions, events: BuildEvents) -> SplitResult:
    plan, by_name = _plan_split(writer, pool, split, frames, options, events)
    options.storage.check_frame(plan.height, plan.width)  # before any row: --tile too small
    result = SplitResult(split, len(plan.frames), plan.has_masks, skipped=dict(plan.skipped),
                         scale=plan.scale, stored_size=(plan.height, plan.width))
    marked = not options.force and (writer.split_attrs(split) or {}).get("complete") is True
    if marked and writer.is_complete(plan, options.storage):
        result.already_complete = True
        events.message(f"split {split!r}: complete already ({len(plan.frames)} frames); "
                       "--force rebuilds it")
        return result
    if marked:  # complete, but files were deleted since: their rows are written again
        events.message(f"split {split!r}: marked complete but the files of "
                       f"{int(writer.missing_rows(split).sum())} frames are missing; writing them again")
    done = writer.prepare_split(plan, options.storage, force=options.force)
    events.split_started(split, len(plan.frames), int(done.sum()))
    while True:
        todo = [row for row in range(len(plan.frames)) if not done[row]]
        written, failed = _write_rows(writer, pool, plan, todo, by_name, options, events)
        result.rows_written += written
        if not failed:
            break
        # --on-error skip: leave the bad frames out, then write the rows whose frame moved
        frames_left = writer.drop_frames(split, failed)
        if not frames_left:
            raise BadFrame(f"split {split!r}: every frame is bad; first: {next(iter(failed.values()))}")
        plan = SplitPlan(split, frames_left, plan.height, plan.width, plan.has_masks,
                         {**plan.skipped, **failed}, plan.scale, plan.source_size)
        result.frames, result.skipped = len(frames_left), dict(plan.skipped)
        done = writer.done_flags(split)
    if not writer.finish_split(split):
        raise UserError(f"{options.out}/{split}: rows are missing after the build (storage fault?); "
                        "run the build again")
    events.split_finished(split)
    return result


def _plan_split(writer, pool, split, frames, options, events) -> tuple[SplitPlan, dict[str, Frame]]:
    """The split's frame list and frame size, after the cheap checks of every frame."""
    labelled = bool(frames) and frames[0].polygons is not None
    previous = writer.split_attrs(split) if not options.force else None
    skipped = dict((previous or {}).get(SKIPPED_ATTR, {}))
    frames = [f for f in frames if f.name not in skipped]
    if skipped:
        events.message(f"split {split!r}: {len(skipped)} frames left out by an earlier "
                       "--on-error skip run (--force retries them)")
    probes = pool.map(probe_frame, frames, in_parent=len(frames) < _PROBE_IN_PARENT_BELOW)
    sizes = Counter(size for size, problem in probes if problem is None)
    common = sizes.most_common(1)[0][0] if sizes else None
    bad, good = {}, []
    for frame, (size, problem) in zip(frames, probes):
        if problem is None and size != common:
            problem = (f"{frame.image}: image is {size[1]}x{size[0]} but the other frames of split "
                       f"{split!r} are {common[1]}x{common[0]}")
        if problem is None:
            good.append(frame)
            continue
        if options.on_error == "stop":
            raise BadFrame(problem)
        bad[frame.name] = problem
    if not good:
        raise BadFrame(f"split {split!r}: every frame is bad; first: {next(iter(bad.values()))}")
    scale = options.scale_of(split)
    height, width = scaled_size(common, scale)
    plan = SplitPlan(split, tuple(f.name for f in good), height, width, labelled,
                     {**skipped, **bad}, scale=scale, source_size=common)
    return plan, {f.name: f for f in good}


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) stored for raw frames of `size` at `scale` (rounded, at least 16 px)."""
    if scale == 1.0:
        return size
    scaled = tuple(round(side * scale) for side in size)
    if min(scaled) < MIN_STORED_SIDE:
        raise UserError(f"--scale {scale:g} makes {size[1]}x{size[0]} frames {scaled[1]}x{scaled[0]}; "
                        f"the stored frames need at least {MIN_STORED_SIDE} px a side")
    return scaled


def _write_rows(writer, pool, plan, todo, by_name, options, events) -> tuple[int, dict[str, str]]:
    """Write the rows in `todo` in the workers; returns (rows written, bad frames: name -> problem)."""
    row_writer = RowWriter(options.out, plan.name)
    source = plan.source_size or (plan.height, plan.width)
    tasks = ((row_writer, row, by_name[plan.frames[row]], source, (plan.height, plan.width))
             for row in todo)
    written, failed = 0, {}
    try:
        for row, checksums, problem in pool.imap_unordered(build_row, tasks, stop=lambda: bool(failed)
                                                           and options.on_error == "stop"):
            if problem is not None:
                failed[plan.frames[row]] = problem
                continue
            writer.record_row(plan.name, row, checksums)
            written += 1
            events.row_done(plan.name)
    finally:  # whatever stops the build (a bad frame, Ctrl-C), the rows finished are kept
        writer.flush(plan.name)
    if failed and options.on_error == "stop":
        raise BadFrame(next(iter(failed.values())))
    return written, failed


# -- the per-frame work (runs in worker processes) ----------------------------
def probe_frame(frame: Frame) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width), None) if the frame passes the cheap checks, else (None, problem)."""
    try:
        size = png_size(frame.image)
        if frame.polygons is not None:
            polygons = load_polygons(frame.polygons)
            if (polygons.height, polygons.width) != size:
                return None, (f"{frame.image}: image is {size[1]}x{size[0]} but {frame.polygons.name} "
                              f"says {polygons.width}x{polygons.height}")
    except BadFrame as exc:
        return None, str(exc)
    return size, None


def png_size(path: Path) -> tuple[int, int]:
    """(height, width) from the PNG header; BadFrame if it is not a complete 8-bit PNG."""
    try:
        with open_regular(path) as f:     # a FIFO is refused, never waited on
            head = f.read(33)
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            tail = f.read()
    except OSError as exc:
        raise BadFrame(f"{path}: cannot read image ({exc.strerror or exc})") from None
    height, width, depth, _ = png_header(path, head)
    check_pixels(path, width, height)      # before any row's tiles are planned for it
    if depth != 8:
        raise BadFrame(f"{path}: {depth}-bit PNG; expected 8 bits per channel")
    if _PNG_END not in tail:
        raise BadFrame(f"{path}: truncated PNG (no IEND chunk at its end)")
    return height, width


def decode_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB; BadFrame if the file cannot be decoded whole.

    8-bit RGB PNGs (every Cityscapes image) go through libspng (pyspng): the same pixels as
    PIL's (tested), ~1.6x faster on photo-like 2048x1024 frames (scripts/bench_build.py).
    Anything else, or a file libspng refuses, goes through PIL, which names the problem.
    Only a regular file is read, and only if its header declares at most PIL's pixel limit
    (libspng has none): cache.safe_input."""
    from cache.safe_input import read_png

    data = read_png(path)
    image = _decode_rgb8_png(data)
    return image if image is not None else _decode_with_pil(path, data)


def _decode_rgb8_png(data: bytes) -> np.ndarray | None:
    """libspng's decode of an 8-bit truecolour PNG; None for other PNGs, errors, or no pyspng."""
    # IHDR: width, height at 16..24, bit depth at 24, colour type at 25 (2: RGB), interlace at 28
    if len(data) < 33 or data[24] != 8 or data[25] != 2:
        return None
    try:
        import pyspng

        image = pyspng.load(data, format="RGB")
    except Exception:  # ImportError, or libspng's complaint: PIL decides and explains
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return image if image.shape == (height, width, 3) and image.dtype == np.uint8 else None


def _decode_with_pil(path: Path, data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadFrame(f"{path}: cannot decode PNG ({exc})") from None


def build_row(task) -> tuple[int, tuple[int, int] | None, str | None]:
    """Decode, render, scale, write and check one frame: (row, checksums, None) or
    (row, None, problem)."""
    row_writer, row, frame, (height, width), stored_size = task
    try:
        image = decode_image(frame.image)
        if image.shape[:2] != (height, width):
            raise BadFrame(f"{frame.image}: image is {image.shape[1]}x{image.shape[0]} but the "
                           f"split's frames are {width}x{height}")
        mask = None
        if frame.polygons is not None:
            mask = render_trainids(frame.polygons)
            if mask.shape != (height, width):
                raise BadFrame(f"{frame.polygons}: says {mask.shape[1]}x{mask.shape[0]} but the image "
                               f"is {width}x{height}")
    except BadFrame as exc:
        return row, None, str(exc)
    if stored_size != (height, width):
        image, mask = downscale(image, mask, stored_size)
    try:
        return row, row_writer.write_row(row, image, mask), None
    except OSError as exc:
        raise UserError(f"{row_writer.path}: cannot write row {row} of split "
                        f"{row_writer.split!r} ({exc.strerror or exc})") from None


def downscale(image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]):
    """(image, mask) at size (height, width): the image with PIL's bilinear filter, which
    widens its support by the reduction factor (antialiased: every source pixel counts), the
    mask by nearest neighbour (only labels of the source appear, as DESIGN.md requires)."""
    from PIL import Image

    height, width = size
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
    return image, mask


# -- the process pool ----------------------------------------------------------
def _init_worker() -> None:
    from cache.writer import configure_worker_threads

    _die_with_parent()
    configure_worker_threads()
    reuse_frame_buffers()
    # Ctrl-C goes to the whole process group; the parent alone decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM ends a worker as it always did (the parent's handler, inherited, would raise)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def reuse_frame_buffers() -> None:
    """glibc: serve buffers up to 32 MB from the heap and keep up to 128 MB of freed heap.

    By default glibc maps a large buffer afresh (mmap) and unmaps it once freed, and the mix
    of buffers PIL, numpy and zarr allocate per frame keeps its adaptive threshold from
    settling; then every frame-sized buffer page-faults in again: ~1600 page faults per
    2048x1024 frame decoded, written and checked (measured), ~4 ms of kernel CPU on our VM, 10%
    of the PNG decode. A worker handles one frame after another and can reuse the same memory.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD (its maximum on 64-bit)
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when its parent dies (e.g. the build was kill -9'ed), so
    no orphan keeps writing while the next run resumes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_context():
    """How worker processes start.

    fork, where this process runs no other thread yet: the workers inherit the imported zarr,
    numpy and PIL instead of importing them again (~0.5 s of CPU per worker for zarr alone,
    which a build of a few dozen frames notices). The pool is started before this process
    opens the cache, because zarr then starts its IO thread, and a thread's locks must not be
    forked. Otherwise (a caller with threads, e.g. a test session) forkserver: a clean server
    process imports this module, zarr and the main module once and forks every worker from
    that; not spawn, which would import them all in every worker.
    """
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        import zarr  # noqa: F401  (imported here, so that the workers inherit it)

        return multiprocessing.get_context("fork")
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", "dataprep.build", "zarr"])
        return context
    return multiprocessing.get_context("spawn")


class _WorkerPool:
    """A process pool started on first use, shared by every split of a build; with one
    worker the work runs in this process (no pool to start, easier to debug)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=worker_context(),
                                                 initializer=_init_worker)
        return self._executor

    def start(self) -> None:
        """Start the worker processes now (with one worker there are none)."""
        if self.workers > 1:
            self._pool().submit(int).result()  # the first task starts the workers

    def map(self, func, items, *, in_parent: bool = False) -> list:
        if in_parent or not items or self.workers == 1:
            return [func(item) for item in items]
        chunk = max(1, len(items) // (8 * self.workers))
        return list(self._pool().map(func, items, chunksize=chunk))

    def imap_unordered(self, func, items, *, stop):
        """Results as they complete; once stop() is true, queued items are cancelled and the
        running ones are waited for (their rows are still recorded)."""
        if self.workers == 1:
            for item in items:
                yield func(item)
                if stop():
                    return
            return
        pool = self._pool()
        todo = iter(items)
        # a bounded window of tasks in flight: the parent's memory stays flat in the frames
        pending = {pool.submit(func, item) for item in islice(todo, _IN_FLIGHT_PER_WORKER * self.workers)}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    if not future.cancelled():
                        yield future.result()
                if stop():
                    for future in pending:
                        future.cancel()
                    continue
                pending |= {pool.submit(func, item) for item in islice(todo, len(finished))}
        finally:
            for future in pending:
                future.cancel()
