"""What `predict` reads: images (one, a folder searched recursively, or a glob) and videos,
found, checked (cache.safe_input) and decoded into frames in order.
"""
from __future__ import annotations

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cache.errors import UserError
from cache.safe_input import (MAX_IMAGE_PIXELS, PNG_SIGNATURE, BadInput, check_pixels,
                                 check_regular, open_regular, png_header, walk_files)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


DEFAULT_FPS = 5.0        # image sequences: a time-lapse of a few frames a second


@dataclass(frozen=True)
class Inputs:
    """What --input named: image files (with their output keys) or one video, and the entries
    found that cannot be read (path, problem)."""

    spec: str
    images: tuple[Path, ...] = ()
    keys: tuple[str, ...] = ()
    video: Path | None = None
    problems: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.images)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _glob_parts(pattern: str) -> tuple[Path, tuple[str, ...]]:
    """(the folder before the first wildcard, the components from there):
    "data/*/x_*.png" -> ("data", ("*", "x_*.png"))."""
    parts = Path(pattern).parts
    first = next(i for i, p in enumerate(parts) if _is_glob(p))
    return (Path(*parts[:first]) if first else Path(".")), tuple(parts[first:])


def _keys(paths: Sequence[Path], base: Path) -> tuple[str, ...]:
    """Output names: each path relative to `base`, without its suffix."""
    return tuple(p.relative_to(base).with_suffix("").as_posix() for p in paths)


def _outside(paths, exclude: Path | None) -> list[Path]:
    """Paths not under `exclude` (--out inside the input folder: never read our own output)."""
    if exclude is None:
        return list(paths)
    root = exclude.resolve()
    return [p for p in paths if not p.resolve().is_relative_to(root)]


def _found(text: str, paths: list[Path], base: Path, problems, exclude: Path | None) -> Inputs | None:
    """The inputs found, or None when there is none and no problem either."""
    paths = _outside(paths, exclude)
    problems = tuple((os.fspath(p), f"{p}: {why}") for p, why in problems
                     if exclude is None or not Path(p).resolve().is_relative_to(exclude.resolve()))
    if not paths:
        if problems:
            raise UserError(f"--input {text}: no readable PNG or JPEG file; first problem: "
                            f"{problems[0][1]}")
        return None
    keys = _keys(paths, base)
    _refuse_clashes(text, paths, keys)
    return Inputs(text, tuple(paths), keys, problems=problems)


def _refuse_clashes(text: str, paths: Sequence[Path], keys: Sequence[str]) -> None:
    """Two inputs whose pictures would have one name (a.png and a.jpg; case is ignored, as a
    case-insensitive disk would): refused before any work."""
    first: dict[str, Path] = {}
    for path, key in zip(paths, keys):
        other = first.setdefault(key.casefold(), path)
        if other is not path:
            raise UserError(f"--input {text}: {other} and {path} would both be written as "
                            f"{key}_color.png and {key}_overlay.png; rename one, or give a glob "
                            "that picks one (e.g. '*.png')")


def find_inputs(spec: str, exclude: Path | None = None) -> Inputs:
    """Resolve --input: a glob, a folder, an image file or a video file; images under
    `exclude` (the output folder) are left out."""
    text = os.fspath(spec)
    if _is_glob(text) and not Path(text).exists():
        base, match = _glob_parts(text)
        paths, problems = (walk_files(base, IMAGE_SUFFIXES, match=match)
                           if base.is_dir() else ([], []))
        found = _found(text, paths, base, problems, exclude)
        if found is None:
            raise UserError(f"--input {text}: no PNG or JPEG file matches")
        return found
    path = Path(text)
    if path.is_dir():
        files, problems = walk_files(path, IMAGE_SUFFIXES)
        found = _found(text, files, path, problems, exclude)
        if found is None:
            raise UserError(f"--input {path}: no PNG or JPEG file in this folder")
        return found
    if not os.path.lexists(path):
        raise UserError(f"--input {path}: no such file or folder")
    check_regular(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return Inputs(text, (path,), (path.stem,))
    if suffix in VIDEO_SUFFIXES:
        return Inputs(text, video=path)
    raise UserError(f"--input {path}: not a PNG/JPEG image ({', '.join(IMAGE_SUFFIXES)}) "
                    f"or a video ({', '.join(VIDEO_SUFFIXES)})")


def read_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PNG/JPEG (grey, palette and alpha images are converted), read
    only from a regular file and only if its header declares at most `max_pixels` pixels."""
    _quiet_pil_bomb_warning()
    try:
        with open_regular(path) as f:
            head = f.read(len(PNG_SIGNATURE) + 25)
            if head.startswith(PNG_SIGNATURE):         # its IHDR, before PIL sees the file
                height, width, _, _ = png_header(path, head)
                check_pixels(path, width, height, max_pixels)
            f.seek(0)
            with Image.open(f) as image:
                check_pixels(path, *image.size, max_pixels)  # the header only: nothing decoded yet
                return np.asarray(image.convert("RGB"))
    except MemoryError:
        raise BadInput(f"{path}: too large for this machine's memory") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        raise BadInput(f"{path}: cannot read this image ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated?'})") from None


@functools.cache
def _quiet_pil_bomb_warning() -> None:
    """PIL warns (in several lines) of an image between its limit and twice it; we refuse such
    an image ourselves, in one line."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_video(path: Path):
    """(container, stream) of a video file, or a one-line error."""
    import av

    check_regular(path)
    try:
        container = av.open(os.fspath(path))
    except (av.FFmpegError, OSError) as exc:
        raise BadInput(f"{path}: cannot open this video ({type(exc).__name__}: {exc})") from None
    if not container.streams.video:
        container.close()
        raise BadInput(f"{path}: has no video stream")
    stream = container.streams.video[0]
    try:
        check_pixels(path, stream.codec_context.width, stream.codec_context.height)
    except BadInput:
        container.close()
        raise
    return container, stream


def iter_frames(inputs: Inputs, limit: int | None = None,
                bad=None) -> Iterator[tuple[str, str, np.ndarray]]:
    """(key, source, RGB uint8 frame) in input order; images are decoded one ahead in a thread.
    An input that cannot be read is passed to `bad(source, problem)` (default: raise) and
    left out; a video that stops with an error, or before the frames its header declares, is
    reported so once its readable frames have been given."""
    def report(source: str, problem: str) -> None:
        if bad is None:
            raise UserError(problem)
        bad(source, problem)

    if inputs.video is not None:
        yield from _video_frames(inputs.video, limit, report)
        return
    count = len(inputs) if limit is None else min(limit, len(inputs))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read_image, inputs.images[0]) if count else None
        for i in range(count):
            try:
                image, problem = pending.result(), None
            except UserError as exc:
                image, problem = None, str(exc)
            if i + 1 < count:
                pending = pool.submit(read_image, inputs.images[i + 1])
            source = os.fspath(inputs.images[i])
            if image is None:
                report(source, problem)
                continue
            yield inputs.keys[i], source, image


def _video_frames(path: Path, limit: int | None, report) -> Iterator[tuple[str, str, np.ndarray]]:
    import av

    source, stem = os.fspath(path), path.stem
    container, stream = open_video(path)
    declared, index, problem = stream.frames, 0, None
    try:
        decoded = container.decode(stream)
        while limit is None or index < limit:
            try:
                frame = next(decoded, None)
            except (av.FFmpegError, MemoryError) as exc:
                problem = (f"{path}: cut short or corrupt after {index} frame(s) ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'})")
                break
            if frame is None:
                break
            yield f"{stem}/{stem}_{index:06d}", f"{source} frame {index}", frame.to_ndarray(format="rgb24")
            index += 1
    finally:
        container.close()
    if problem is None and index == 0:
        problem = f"{path}: no frame could be decoded (cut short or corrupt?)"
    if problem is None and declared and index < (declared if limit is None else min(limit, declared)):
        problem = f"{path}: ended after {index} of the {declared} frames its header declares (cut short?)"
    if problem is not None:
        report(source, problem)


def batches_of_one_size(frames, batch_size: int):
    """Lists of up to `batch_size` consecutive items, such as (key, frame) or (key, source,
    frame), whose frames (each item's last element) share a size."""
    batch: list = []
    for item in frames:
        if batch and (len(batch) == batch_size or batch[0][-1].shape != item[-1].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def video_rate(inputs: Inputs) -> float:
    """The input video's frame rate, else DEFAULT_FPS."""
    if inputs.video is None:
        return DEFAULT_FPS
    container, stream = open_video(inputs.video)
    try:
        rate = stream.average_rate or stream.guessed_rate
        return float(rate) if rate else DEFAULT_FPS
    finally:
        container.close()


def frame_count(inputs: Inputs, limit: int | None) -> int | None:
    """Frames to predict, for the progress bar (None when a video does not say)."""
    if inputs.video is None:
        total = len(inputs)
    else:
        container, stream = open_video(inputs.video)
        total = stream.frames or None
        container.close()
    return total if total is None or limit is None else min(total, limit)
