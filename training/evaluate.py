"""The `evaluate` job: a checkpoint over a cache split -> official-grade scores, latency, exports.

Predictions are made at the mask's stored resolution (the image may be resized by eval_scale
first, and TTA may add scales and a mirrored view), so the scores are those the official
script gives for the same predictions at full size. A split without masks (test) is only
predicted and exported. PNG writing runs in a small thread pool so that it overlaps inference.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch

from cache.format import UserError
from cache.reader import CacheReader, SplitInfo
from training.export import export_predictions, frame_file_stem, prepare_export_dir, visualize
from training.metrics import ConfusionMatrix
from training.tta import input_divisor, predict_logits

MAX_PENDING_WRITES = 8       # batches of PNGs in flight; bounds host memory if the GPU is faster
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r}: not a torch device (try cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def check_options(checkpoint, split: SplitInfo, *, batch_size: int, tta_scales: Sequence[float],
                  limit: int | None, export_dir, visualize_dir, json_path) -> None:
    """Refuse what cannot work before the model is loaded or a file is written."""
    if not Path(checkpoint).is_file():
        raise UserError(f"{checkpoint}: no such checkpoint file")
    if batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, got {batch_size}")
    if not tta_scales or min(tta_scales) <= 0:
        raise UserError(f"--tta: need one or more positive scales, got {tuple(tta_scales)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit: must be at least 1, got {limit}")
    if not split.has_masks and export_dir is None and visualize_dir is None:
        raise UserError(f"split {split.name!r} has no masks, so there is nothing to score; "
                        "give --export DIR (and/or --visualize DIR) to write its predictions")
    if json_path is not None and Path(json_path).is_dir():
        raise UserError(f"--json {json_path}: is a directory; give a file name")
    if export_dir is not None or visualize_dir is not None:
        for name in split.frames:      # the benchmark's file names are made from these
            frame_file_stem(name)


def check_model_matches_cache(meta: dict, reader: CacheReader, checkpoint) -> None:
    """A model is only scored on the label set it was trained for."""
    if int(meta["num_classes"]) != reader.num_classes:
        raise UserError(f"{checkpoint}: model has {meta['num_classes']} classes but cache "
                        f"{reader.path} has {reader.num_classes}")
    if list(meta["class_names"]) != reader.class_names:
        raise UserError(f"{checkpoint}: the model's class names (in trainId order) differ from "
                        f"those of cache {reader.path}")
    if int(meta.get("ignore_index", reader.ignore_index)) != reader.ignore_index:
        raise UserError(f"{checkpoint}: model ignore index {meta['ignore_index']} differs from "
                        f"the cache's {reader.ignore_index}")


def autocast(device: torch.device, amp: str | None):
    if amp is None:
        return nullcontext()
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp: {amp!r} is not one of: {', '.join(AMP_DTYPES)}, none")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model, input_hw: tuple[int, int], device: torch.device, *, runs: int,
                    warmup: int, amp: str | None = None, out_hw=None, tta_scales=(1.0,),
                    tta_flip: bool = False) -> float:
    """Median ms per frame at batch 1: the model's forward alone (out_hw=None, input padded to
    the size the model needs), or the whole TTA prediction up to out_hw."""
    h, w = input_hw
    divisor = input_divisor(model)
    padded = (-(-h // divisor) * divisor, -(-w // divisor) * divisor)
    image = torch.randn(1, 3, *(padded if out_hw is None else input_hw), device=device)
    times = []
    with autocast(device, amp):
        for i in range(warmup + runs):
            _sync(device)
            start = time.perf_counter()
            if out_hw is None:
                model(image)
            else:
                predict_logits(model, image, out_hw, scales=tta_scales, flip=tta_flip)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


class PngWriter:
    """Writes export/visualisation PNGs in background threads (PIL's zlib releases the GIL)."""

    def __init__(self, reader: CacheReader, split: str, export_dir: Path | None,
                 visualize_dir: Path | None):
        self.reader, self.split = CacheReader(reader.path), split   # its own handles, off the loader's
        self.export_dir, self.visualize_dir = export_dir, visualize_dir
        self.pool = ThreadPoolExecutor(max_workers=2) if (export_dir or visualize_dir) else None
        self.pending: deque[Future] = deque()

    def submit(self, preds: torch.Tensor, rows: list[int], names: list[str]) -> None:
        if self.pool is None:
            return
        preds = preds.to(torch.uint8).cpu().numpy()
        while len(self.pending) >= MAX_PENDING_WRITES:
            self.pending.popleft().result()          # re-raises a writer's error here
        self.pending.append(self.pool.submit(self._write, preds, rows, names))

    def _write(self, preds, rows, names) -> None:
        if self.export_dir is not None:
            export_predictions(preds, names, self.export_dir)
        if self.visualize_dir is not None:
            for pred, row, name in zip(preds, rows, names):
                image, _ = self.reader.read_frame(self.split, row)   # stored pixels, full size
                visualize(image, pred, self.visualize_dir, name)

    def finish(self) -> None:
        """Wait for every write; a writer's error is raised here."""
        while self.pending:
            self.pending.popleft().result()

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def predict_split(model, batches, info: SplitInfo, *, limit: int | None, tta_scales, tta_flip,
                  amp: str | None, device: torch.device, matrix: ConfusionMatrix | None,
                  writer: PngWriter, progress=None) -> int:
    """Predict every frame (or the first `limit`); returns the number of frames seen."""
    seen = 0
    wanted = len(info) if limit is None else min(limit, len(info))
    task = progress.add_task(f"evaluate {info.name}", total=wanted) if progress else None
    for batch in batches:
        take = min(len(batch.rows), wanted - seen)
        image, mask = batch.image[:take], None if batch.mask is None else batch.mask[:take]
        rows = batch.rows[:take].tolist()
        out_hw = tuple(mask.shape[-2:]) if mask is not None else (info.height, info.width)
        with autocast(device, amp):
            logits = predict_logits(model, image, out_hw, scales=tta_scales, flip=tta_flip)
        pred = logits.argmax(1)
        if matrix is not None:
            matrix.update(pred, mask)
        writer.submit(pred, rows, [info.frames[r] for r in rows])
        seen += take
        if progress:
            progress.update(task, advance=take)
        if seen >= wanted:
            break
    return seen


def print_scores(result: dict, console) -> None:
    """Per-class and per-category IoU tables (when there was ground truth), then one summary line."""
    from rich.table import Table

    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}"

    if result["has_masks"]:
        title = f"{result['split']}: {result['frames']} frames of {result['checkpoint']}"
        for caption, key, mean in (("class", "class_iou", "miou"),
                                   ("category", "category_iou", "category_miou")):
            table = Table(title=title if key == "class_iou" else None, show_footer=True)
            table.add_column(caption, footer="mean")
            table.add_column("IoU %", justify="right", footer=pct(result[mean]))
            for name, iou in result[key].items():
                table.add_row(name, pct(iou))
            console.print(table)
        console.print(f"pixel accuracy {pct(result['pixel_accuracy'])} %")
    else:
        console.print(f"{result['split']}: {result['frames']} frames predicted (no ground truth)")
    if result["latency_ms"] is not None:
        h, w = result["input_hw"]
        console.print(f"latency {result['latency_ms']:.2f} ms/frame (batch 1, input {h}x{w}, "
                      f"{result['device']})")
    if result["export_dir"]:
        console.print(f"benchmark PNGs in {result['export_dir']}")


def time_model(model, info: SplitInfo, aug, device: torch.device, *, runs: int | None,
               amp: str | None, tta_scales: tuple[float, ...], tta_flip: bool):
    """(input_hw, forward ms, TTA ms or None, runs) at batch 1 and the eval input size.

    runs None: 50 timed passes on a GPU, 3 on the CPU (a big model takes seconds there)."""
    from loaders.sampling import eval_sample

    sample = eval_sample(0, (info.height, info.width), aug)
    input_hw = (sample.out_h, sample.out_w)
    runs = (50 if device.type == "cuda" else 3) if runs is None else runs
    if runs < 1:
        return input_hw, None, None, 0
    timing = dict(runs=runs, warmup=min(10, max(1, runs // 5)), amp=amp)
    latency = measure_latency(model, input_hw, device, **timing)
    tta_latency = None
    if tta_flip or tta_scales != (1.0,):
        tta_latency = measure_latency(model, input_hw, device, out_hw=(info.height, info.width),
                                      tta_scales=tta_scales, tta_flip=tta_flip, **timing)
    return input_hw, latency, tta_latency, runs


def run_evaluate(checkpoint, cache, split: str = "val", *, loader: str = "torch",
                 batch_size: int = 1, tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False,
                 json_path=None, export_dir=None, visualize_dir=None, device=None,
                 limit: int | None = None, eval_scale: float = 1.0, num_workers: int | None = None,
                 amp: str | None = None, latency_runs: int | None = None, console=None) -> dict:
    """Score `checkpoint` on `split` of `cache`; see the module docstring.

    latency_runs: timed forward passes (None: 50 on a GPU, 3 on the CPU; 0: skip, latency_ms
    None). amp: "bf16"/"fp16" autocast for inference, None for float32.
    Returns the result dict that is also written to json_path (when given).
    """
    from rich.console import Console

    from loaders.contract import AugmentConfig, build_loader
    from training.checkpoint import load_for_eval

    console = console or Console()
    tta_scales = tuple(float(s) for s in tta_scales)
    device = resolve_device(device)
    reader = CacheReader(cache)
    info = reader.split(split)
    check_options(checkpoint, info, batch_size=batch_size, tta_scales=tta_scales, limit=limit,
                  export_dir=export_dir, visualize_dir=visualize_dir, json_path=json_path)
    # crop does not apply to evaluation; the frame size keeps loaders' crop checks content
    aug = AugmentConfig(crop=(info.height, info.width), eval_scale=eval_scale)  # checks eval_scale
    autocast(device, amp)                               # checks amp

    model, meta = load_for_eval(checkpoint, device)
    check_model_matches_cache(meta, reader, checkpoint)
    model.eval()
    export = prepare_export_dir(export_dir) if export_dir is not None else None
    vis = Path(visualize_dir) if visualize_dir is not None else None
    batches = build_loader(cache, split, loader, train=False, batch_size=batch_size, aug=aug,
                           device=device, num_workers=num_workers)
    matrix = ConfusionMatrix(reader.num_classes, reader.ignore_index) if info.has_masks else None
    frames, seconds, timing = predict_and_time(
        model, batches, info, aug, PngWriter(reader, split, export, vis), matrix=matrix,
        limit=limit, tta_scales=tta_scales, tta_flip=tta_flip, amp=amp, device=device,
        latency_runs=latency_runs, console=console)

    result = {
        "checkpoint": os.fspath(checkpoint), "cache": reader.path, "split": split,
        "frames": frames, "has_masks": info.has_masks, "arch": meta.get("arch"),
        "encoder": meta.get("encoder"), "loader": loader, "batch_size": batch_size,
        "device": str(device), "amp": amp, "eval_scale": eval_scale,
        "tta_scales": list(tta_scales), "tta_flip": tta_flip, **timing,
        "output_hw": [info.height, info.width],
        "frames_per_s": frames / seconds if seconds > 0 else None, "seconds": seconds,
        "export_dir": None if export is None else os.fspath(export),
        "visualize_dir": None if vis is None else os.fspath(vis),
    }
    result.update(matrix.compute(reader.class_names) if matrix is not None else
                  {"miou": None, "class_iou": {}, "pixel_accuracy": None, "category_iou": {},
                   "category_miou": None})
    print_scores(result, console)
    if json_path is not None:
        write_json(result, json_path)
    return result


def predict_and_time(model, batches, info: SplitInfo, aug, writer: PngWriter, *, matrix, limit,
                     tta_scales, tta_flip, amp, device, latency_runs, console):
    """(frames, seconds of the prediction pass, latency fields) with the writes all done."""
    from rich.progress import Progress

    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"    # every frame has the same size
    start = time.perf_counter()
    try:
        with Progress(console=console, transient=True) as progress:
            frames = predict_split(model, batches, info, limit=limit, tta_scales=tta_scales,
                                   tta_flip=tta_flip, amp=amp, device=device, matrix=matrix,
                                   writer=writer, progress=progress)
        writer.finish()
        _sync(device)
        seconds = time.perf_counter() - start
        input_hw, latency, tta_latency, runs = time_model(
            model, info, aug, device, runs=latency_runs, amp=amp, tta_scales=tta_scales,
            tta_flip=tta_flip)
    finally:
        writer.shutdown()
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return frames, seconds, {"input_hw": list(input_hw), "latency_ms": latency,
                             "latency_tta_ms": tta_latency, "latency_runs": runs}


def write_json(result: dict, json_path) -> None:
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: the file stays strict JSON (absent classes are null, never NaN)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
