"""The `predict` job: a checkpoint over images or a video -> colour and overlay pictures, a video.

Inputs: one PNG/JPEG image, a folder (searched recursively) or a glob of them, or one video file
(decoded with PyAV). Any size: each frame is resized by the eval scale (the checkpoint's unless
given), padded to the model's multiple, predicted (with optional multi-scale/flip TTA, the same
code as `evaluate`) and brought back to its own size. Frames of one size are batched.

Outputs, for an input frame whose name (relative to the input folder, or `<video>/<video>_<n>`
for a video's frame n) is KEY: OUT/KEY_color.png (the prediction in the official Cityscapes
colours) and OUT/KEY_overlay.png (it blended over the frame); with `video_path`, the overlays
in input order as an H.264 MP4 (e.g. a city's frames as a time-lapse). OUT/predict.json records
what was run and, at the end, how many frames were written, the files written ("outputs") and
the inputs that could not be predicted ("failed"). Files are written through a
temporary name (training/outputs/atomic.py), so none is ever half-written; OUT follows the one
output-folder rule (training/outputs/folder.py): new, empty, or marked by an earlier `predict`
(or holding an older version's predict.json), so that nothing we did not write is overwritten.

Inputs may come from anywhere (cache.safe_input): only regular files are read (a FIFO or
device among them is reported, never opened for reading), a folder is searched with links
followed but each folder once and at most 64 deep, and an image or video whose header declares
more than PIL's decompression-bomb limit of pixels is refused before it is decoded. Two inputs
that would be written under one name (a.png and a.jpg) are refused before any work. A bad input
(unreadable, corrupt, too large, a video cut short) is reported in one line naming it and in
predict.json's "failed", the others are predicted, and the run ends with complete: false
(the command's exit status is then 3); when no frame at all could be predicted it is an error.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from cache.errors import UserError
from training.core.device import autocast_context, resolve_device, use_device
from training.core.tta import normalisation, predict_logits
from training.infer.inputs import (Inputs, batches_of_one_size, find_inputs, frame_count,
                                   iter_frames, video_rate)
from training.infer.options import check_batch_and_tta, check_limit
from training.outputs.atomic import make_parent, write_json, write_png
from training.outputs.folder import check_output_dir, claim_output_dir
from training.outputs.labels import colorize
from training.train.checkpoint import load_for_eval

MANIFEST = "predict.json"
MAX_PENDING_WRITES = 16  # frames' pictures in flight: bounds host memory
EXIT_FAILED_INPUTS = 3   # some inputs could not be predicted (as `dataprep build --on-error skip`)


# -- where the pictures go ----------------------------------------------------------------------

def prepare_out_dir(out_dir, *, claim: bool = True) -> Path:
    """OUT under the one output-folder rule (training/outputs/folder.py): new, empty, or marked
    by an earlier `predict` (or holding its predict.json: a folder from before the marker).
    claim=False only checks; claim=True creates and marks it."""
    rule = claim_output_dir if claim else check_output_dir
    rule(out_dir, "predict", option="--out", command="predict", legacy=(MANIFEST,))
    return Path(out_dir)


def check_video_path(video_path, out: Path) -> Path | None:
    """--video FILE: an .mp4/.mkv/.mov that is new, or one an earlier run into OUT wrote."""
    if video_path is None:
        return None
    path = Path(video_path)
    if path.suffix.lower() not in (".mp4", ".mkv", ".mov"):
        raise UserError(f"--video {path}: give a file name ending in .mp4, .mkv or .mov")
    if path.is_dir():
        raise UserError(f"--video {path}: is a folder; give a file name")
    if path.exists():
        earlier = read_manifest(out).get("video")
        if earlier is None or Path(earlier).resolve() != path.resolve():
            raise UserError(f"--video {path}: exists and was not written by `predict` into "
                            f"{out}; choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_manifest(out: Path, record: dict) -> None:
    write_json(out / MANIFEST, record)


def save_png(path: Path, array: np.ndarray) -> None:
    """Through a temporary name (training/outputs/atomic.py): a kill leaves the old file or the new one,
    never a torn one. Not fsynced one by one (thousands of pictures); predict.json is."""
    write_png(make_parent(path), array, compress_level=1, fsync=False)


def overlay(frame: np.ndarray, pred: np.ndarray, alpha: float) -> np.ndarray:
    """The prediction's official colours blended over the frame (alpha: the colours' weight)."""
    return (frame * (1.0 - alpha) + colorize(pred) * alpha).round().astype(np.uint8)


class VideoWriter:
    """Frames, in order, into an H.264 (yuv420p) video through PyAV, written under a temporary
    name and moved into place by `close`. Frames are cropped to even sides (yuv420p needs them);
    frames of another size than the first are resized to it."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
        self.container = self.stream = None
        self.frames = 0

    def _open(self, height: int, width: int) -> None:
        import av

        self.container = av.open(os.fspath(self.tmp), mode="w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
        self.stream.width, self.stream.height = width - width % 2, height - height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "20"}

    def add(self, rgb: np.ndarray) -> None:
        import av
        if self.container is None:
            self._open(*rgb.shape[:2])
        h, w = self.stream.height, self.stream.width
        fh, fw = rgb.shape[:2]
        if (fh - fh % 2, fw - fw % 2) != (h, w):
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        if self.container is None:
            return
        self.container.mux(self.stream.encode(None))       # flush the encoder
        self.container.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.container is not None:
            self.container.close()
            self.tmp.unlink(missing_ok=True)


class PictureWriter:
    """Colour and overlay PNGs in two threads (PIL's zlib releases the GIL) and video frames in
    one (in order), so that writing overlaps prediction."""

    def __init__(self, out: Path | None, video: VideoWriter | None, alpha: float):
        self.out, self.video, self.alpha = out, video, alpha
        self.png_pool = ThreadPoolExecutor(max_workers=2)
        self.video_pool = ThreadPoolExecutor(max_workers=1)
        self.pending: list = []

    def submit(self, keys: Sequence[str], frames: Sequence[np.ndarray], preds: np.ndarray) -> None:
        while len(self.pending) >= MAX_PENDING_WRITES:
            self.pending.pop(0).result()        # re-raises a writer's error here
        for key, frame, pred in zip(keys, frames, preds):
            if self.video is not None:     # one thread, fed in input order: frames stay in order
                self.pending.append(self.video_pool.submit(self._add_to_video, frame, pred))
            if self.out is not None:
                self.pending.append(self.png_pool.submit(self._write_pngs, key, frame, pred))

    def _add_to_video(self, frame: np.ndarray, pred: np.ndarray) -> None:
        self.video.add(overlay(frame, pred, self.alpha))

    def _write_pngs(self, key: str, frame: np.ndarray, pred: np.ndarray) -> None:
        save_png(self.out / f"{key}_color.png", colorize(pred))
        save_png(self.out / f"{key}_overlay.png", overlay(frame, pred, self.alpha))

    def finish(self) -> None:
        while self.pending:
            self.pending.pop(0).result()
        if self.video is not None:
            self.video.close()

    def shutdown(self, failed: bool) -> None:
        self.png_pool.shutdown(wait=True, cancel_futures=True)
        self.video_pool.shutdown(wait=True)
        if failed and self.video is not None:
            self.video.abort()


# -- the job ----------------------------------------------------------------------------------

@torch.no_grad()
def predict_frames(model, frames: Sequence[np.ndarray], device: torch.device, *, eval_scale: float,
                   autocast, tta_scales: Sequence[float], tta_flip: bool) -> np.ndarray:
    """(B, H, W) uint8 trainIds of same-size RGB frames, at their own size."""
    pixels = torch.from_numpy(np.stack(frames)).to(device, non_blocking=True)
    mean, std, _ = normalisation(device)
    image = (pixels.permute(0, 3, 1, 2).float() - mean) / std
    h, w = frames[0].shape[:2]
    if eval_scale != 1.0:
        size = (max(1, round(h * eval_scale)), max(1, round(w * eval_scale)))
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                              antialias=eval_scale < 1.0)
    with autocast:
        logits = predict_logits(model, image, (h, w), scales=tta_scales, flip=tta_flip)
    return logits.argmax(1).to(torch.uint8).cpu().numpy()


def check_options(*, batch_size: int, tta_scales, alpha: float, limit, fps, images: bool,
                  video_path, eval_scale) -> None:
    """Refuse what cannot work before anything is read, loaded or written."""
    check_batch_and_tta(batch_size, tta_scales)
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha: must be between 0 and 1, got {alpha}")
    check_limit(limit)
    if fps is not None and not fps > 0:
        raise UserError(f"--fps: must be positive, got {fps}")
    if eval_scale is not None and not eval_scale > 0:
        raise UserError(f"--eval-scale: must be positive, got {eval_scale}")
    if not images and video_path is None:
        raise UserError("--no-images without --video: there would be nothing to write")


def run_predict(checkpoint, input_spec, out_dir, *, video_path=None, fps: float | None = None,
                batch_size: int = 1, tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False,
                eval_scale: float | None = None, amp: str | None = None, device=None,
                images: bool = True, alpha: float = 0.5, limit: int | None = None,
                console=None) -> dict:
    """Predict every frame of `input_spec` with `checkpoint`; see the module docstring.
    Returns the record also written to OUT/predict.json."""
    console = console or Console(stderr=True)
    tta_scales = tuple(float(s) for s in tta_scales)
    check_options(batch_size=batch_size, tta_scales=tta_scales, alpha=alpha, limit=limit, fps=fps,
                  images=images, video_path=video_path, eval_scale=eval_scale)
    if not Path(checkpoint).is_file():
        raise UserError(f"--checkpoint {checkpoint}: no such checkpoint file")
    inputs = find_inputs(input_spec, exclude=Path(out_dir))
    total = frame_count(inputs, limit)          # also opens a video: refused here if it cannot be
    video = check_video_path(video_path, prepare_out_dir(out_dir, claim=False))
    out = prepare_out_dir(out_dir)
    device = resolve_device(device)
    use_device(device)
    autocast = autocast_context(amp, device)
    model, meta = load_for_eval(checkpoint, device)
    record = {
        "checkpoint": os.fspath(checkpoint), "input": os.fspath(input_spec), "out": os.fspath(out),
        "video": None if video is None else os.fspath(video.resolve()),
        "fps": None if video is None else (fps or video_rate(inputs)), "images": images,
        "arch": meta.get("arch"), "encoder": meta.get("encoder"), "device": str(device),
        "amp": amp, "batch_size": batch_size, "tta_scales": list(tta_scales), "tta_flip": tta_flip,
        "eval_scale": float(meta.get("eval_scale", 1.0) if eval_scale is None else eval_scale),
        "alpha": alpha, "complete": False,
    }
    write_manifest(out, record)        # first: a later run may then rewrite what this one wrote
    console.print(f"predict: {total or 'all'} frame(s) of {input_spec} with "
                  f"{checkpoint} ({meta.get('arch')}/{meta.get('encoder')}) on {device} -> {out}"
                  + (f" and {video}" if video else ""), soft_wrap=True)
    failed: list[dict] = []

    def bad(source: str, problem: str) -> None:
        failed.append({"input": source, "problem": problem})
        console.print(f"predict: skipped {problem}", soft_wrap=True, markup=False, highlight=False)

    for source, problem in inputs.problems:
        bad(source, problem)
    writer = PictureWriter(out if images else None,
                           None if video is None else VideoWriter(video, record["fps"]), alpha)
    keys, seconds = _predict_all(model, inputs, writer, record, limit, total, autocast, device,
                                 console, bad)
    frames = len(keys)
    record.update(complete=not failed, frames=frames, seconds=seconds,
                  frames_per_s=frames / seconds if seconds > 0 else None,
                  outputs=[f"{key}_{kind}.png" for key in keys for kind in ("color", "overlay")]
                  if images else [],
                  failed=failed)
    write_manifest(out, record)
    if failed and not frames:
        more = f" (and {len(failed) - 1} more, listed in {out / MANIFEST})" if len(failed) > 1 else ""
        raise UserError(f"no frame predicted: {failed[0]['problem']}{more}")
    console.print(f"predict: {frames} frame(s) in {seconds:.1f} s"
                  + (f"; colour and overlay PNGs in {out}" if images else "")
                  + (f"; video {video}" if video else "")
                  + (f"; {len(failed)} input(s) could not be predicted (listed above and in "
                     f"{out / MANIFEST}), exit status {EXIT_FAILED_INPUTS}" if failed else ""),
                  soft_wrap=True)
    return record


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "not enough memory" in text)


def _predict_all(model, inputs: Inputs, writer: PictureWriter, record: dict, limit, total,
                 autocast, device, console, bad) -> tuple[list[str], float]:
    """(keys of the frames predicted and written, seconds). A batch that runs out of memory is
    reported frame by frame through `bad` and the run goes on."""
    options = dict(eval_scale=record["eval_scale"], autocast=autocast,
                   tta_scales=tuple(record["tta_scales"]), tta_flip=record["tta_flip"])
    start, written, aborted = time.perf_counter(), [], True
    columns = (TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("predict", total=total)
            for batch in batches_of_one_size(iter_frames(inputs, limit, bad), record["batch_size"]):
                keys, sources, pictures = (list(column) for column in zip(*batch))
                try:
                    preds = predict_frames(model, pictures, device, **options)
                except Exception as exc:   # noqa: BLE001 - only memory errors are handled
                    if not _out_of_memory(exc):
                        raise
                    del exc
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    h, w = pictures[0].shape[:2]
                    for source in sources:
                        bad(source, f"{source}: out of memory predicting this {w}x{h} frame on "
                                    f"{device} (try --eval-scale 0.5 or --batch-size 1)")
                else:
                    writer.submit(keys, pictures, preds)
                    written.extend(keys)
                progress.update(task, advance=len(batch))
        writer.finish()
        aborted = False
    finally:
        writer.shutdown(aborted)
    return written, time.perf_counter() - start
