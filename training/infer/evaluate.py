"""The `evaluate` job: a checkpoint over a cache split -> official-grade scores, latency, exports.

Predictions come from the same pass as validation during training (training.core.engine.evaluate):
made at the mask's stored resolution (the image may be resized by eval_scale first, and TTA
may add scales and a mirrored view), so the scores are those the official script gives for
the same predictions at full size. A split without masks (test) is only predicted and
exported. PNG writing runs in a small thread pool so that it overlaps inference.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cache.errors import UserError
from cache.reader import CacheReader, SplitInfo
from loaders.contract import AugmentConfig
from loaders.factory import build_loader
from training.core.complexity import model_complexity
from training.core.device import autocast_context, resolve_device, synchronize, use_device
from training.core.engine import evaluate
from training.core.latency import time_model
from training.core.memory import CPU_VAL_BATCH, auto_val_batch
from training.core.metrics import ConfusionMatrix
from training.infer.options import check_batch_and_tta, check_limit
from training.outputs import atomic
from training.outputs.atomic import WriteError
from training.outputs.export import check_export_dir, frame_file_stem, prepare_export_dir
from training.outputs.folder import check_output_dir, claim_output_dir
from training.outputs.writer import PngWriter
from training.train.checkpoint import load_checkpoint, load_for_eval

# --visualize DIR: new, empty, or one an earlier --visualize marked (training.outputs.folder)
VISUALIZE_FOLDER = dict(kind="visualize", option="--visualize", command="evaluate --visualize")
MAX_SCORES_FILE = 50 * 2**20     # a scores JSON is a few kB; a bigger --json file is not ours

NO_SCORES = {"miou": None, "class_iou": {}, "pixel_accuracy": None, "category_iou": {},
             "category_miou": None}


def check_options(checkpoint, split: SplitInfo, *, batch_size: int, tta_scales: Sequence[float],
                  limit: int | None, export_dir, visualize_dir, json_path) -> None:
    """Refuse what cannot work before the model is loaded or a file is written."""
    if not Path(checkpoint).is_file():
        raise UserError(f"{checkpoint}: no such checkpoint file")
    check_batch_and_tta(batch_size, tta_scales)
    check_limit(limit)
    if not split.has_masks and export_dir is None and visualize_dir is None:
        raise UserError(f"split {split.name!r} has no masks, so there is nothing to score; "
                        "give --export DIR (and/or --visualize DIR) to write its predictions")
    if json_path is not None:
        check_json_path(json_path)
    check_output_dirs(export_dir, visualize_dir)
    if export_dir is not None or visualize_dir is not None:
        for name in split.frames:      # the benchmark's file names are made from these
            frame_file_stem(name)


def check_json_path(json_path) -> None:
    """--json FILE: new, or a scores file that `evaluate` wrote (never a user's own file)."""
    path = Path(json_path)
    if path.is_dir():
        raise UserError(f"--json {json_path}: is a directory; give a file name")
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text()) if path.stat().st_size <= MAX_SCORES_FILE else None
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and {"checkpoint", "split", "miou"} <= set(data)):
        raise UserError(f"--json {json_path}: exists and is not a scores file of `evaluate`; "
                        "choose another name (it is never overwritten)")


def check_output_dirs(export_dir, visualize_dir) -> None:
    """The picture folders, checked before any work (training.outputs.folder): nothing is
    written here."""
    if export_dir is not None and visualize_dir is not None \
            and Path(export_dir).resolve() == Path(visualize_dir).resolve():
        raise UserError(f"--export and --visualize: give two folders (the export must hold "
                        f"nothing but its PNGs), not {export_dir} twice")
    if export_dir is not None:
        check_export_dir(export_dir)
    if visualize_dir is not None:
        check_output_dir(visualize_dir, **VISUALIZE_FOLDER)


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


@dataclass
class EvalSetup:
    """Everything checked and loaded, nothing predicted or written yet."""

    reader: CacheReader
    info: SplitInfo
    device: torch.device
    aug: Any                     # loaders.contract.AugmentConfig
    autocast: Any
    model: torch.nn.Module
    meta: dict


def open_evaluation(checkpoint, cache, split: str, *, device, eval_scale: float, amp: str | None,
                    **checked) -> EvalSetup:
    """Check every option, then load the model: a mistake costs no model load, no file."""
    device = resolve_device(device)
    use_device(device)       # side threads (pin memory, DALI) open their context there
    reader = CacheReader(cache)
    info = reader.split(split)
    check_options(checkpoint, info, **checked)
    # crop does not apply to evaluation; the frame size keeps the loaders' crop checks content
    aug = AugmentConfig(crop=(info.height, info.width), eval_scale=eval_scale)  # checks eval_scale
    autocast = autocast_context(amp, device)
    model, meta = load_for_eval(checkpoint, device)
    check_model_matches_cache(meta, reader, checkpoint)
    return EvalSetup(reader, info, device, aug, autocast, model, meta)


def evaluation_loader(meta: dict) -> str:
    """The loader kind the run validated with (so that `evaluate` reproduces the run's own
    scores to the last digit: the kinds resize whole frames with slightly different filters),
    or torch where that is DALI and DALI is not installed here."""
    kind = meta.get("loader", "torch")
    if kind == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "torch"
    return kind


def run_evaluate(checkpoint, cache, split: str = "val", *, loader: str | None = None,
                 batch_size: int = 1, tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False,
                 json_path=None, export_dir=None, visualize_dir=None, device=None,
                 limit: int | None = None, eval_scale: float = 1.0, num_workers: int | None = None,
                 amp: str | None = None, latency_runs: int | None = None, console=None) -> dict:
    """Score `checkpoint` on `split` of `cache`; see the module docstring.

    latency_runs: timed forward passes (None: 50 on a GPU, 3 on the CPU; 0: skip, latency_ms
    None). amp: "bf16"/"fp16" autocast for inference, None for float32.
    Returns the result dict that is also written to json_path (when given).
    """
    console = console or Console()
    tta = {"tta_scales": tuple(float(s) for s in tta_scales), "tta_flip": tta_flip}
    setup = open_evaluation(checkpoint, cache, split, device=device, eval_scale=eval_scale,
                            amp=amp, batch_size=batch_size, limit=limit, export_dir=export_dir,
                            visualize_dir=visualize_dir, json_path=json_path,
                            tta_scales=tta["tta_scales"])
    info = setup.info
    loader = loader or evaluation_loader(setup.meta)
    export = prepare_export_dir(export_dir) if export_dir is not None else None
    vis = claim_visualize_dir(visualize_dir) if visualize_dir is not None else None
    batches = build_loader(cache, split, loader, train=False, batch_size=batch_size, aug=setup.aug,
                           device=setup.device, num_workers=num_workers)
    matrix = ConfusionMatrix(setup.reader.num_classes, setup.reader.ignore_index) \
        if info.has_masks else None
    writer = PngWriter(setup.reader.path, split, info.frames, export, vis)
    with cudnn_autotuned(setup.device), write_errors_in_one_line(export):
        frames, seconds = predict_split(setup, batches, matrix, writer, limit=limit,
                                        console=console, **tta)
        timing = time_model(setup.model, (info.height, info.width), setup.aug, setup.device,
                            runs=latency_runs, amp=amp, **tta)
    result = {
        "checkpoint": os.fspath(checkpoint), "cache": setup.reader.path, "split": split,
        "frames": frames, "has_masks": info.has_masks, "arch": setup.meta.get("arch"),
        "encoder": setup.meta.get("encoder"), "loader": loader, "batch_size": batch_size,
        "device": str(setup.device), "amp": amp, "eval_scale": eval_scale,
        "tta_scales": list(tta["tta_scales"]), "tta_flip": tta_flip, **timing,
        **model_complexity(setup.model, timing["input_hw"]),
        "output_hw": [info.height, info.width],
        "frames_per_s": frames / seconds if seconds > 0 else None, "seconds": seconds,
        "export_dir": None if export is None else os.fspath(export),
        "visualize_dir": None if vis is None else os.fspath(vis),
        **(matrix.compute(setup.reader.class_names) if matrix is not None else NO_SCORES),
    }
    print_scores(result, console)
    if json_path is not None:
        with write_errors_in_one_line(export):
            write_json(result, json_path)
    print_outputs(result, json_path, console)
    return result


def claim_visualize_dir(visualize_dir) -> Path:
    return claim_output_dir(visualize_dir, **VISUALIZE_FOLDER)


def predict_split(setup: EvalSetup, batches, matrix, writer: PngWriter, *, limit: int | None,
                  tta_scales, tta_flip, console) -> tuple[int, float]:
    """(frames, seconds) of the prediction pass over the split, its PNGs all written."""
    info = setup.info
    start = time.perf_counter()
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"evaluate {info.name}",
                                     total=len(info) if limit is None else min(limit, len(info)))

            def write_and_count(prediction) -> None:
                writer.submit(prediction.pred, prediction.rows)
                progress.update(task, advance=len(prediction.rows))

            frames = evaluate(setup.model, batches, matrix, (info.height, info.width),
                              on_prediction=write_and_count, limit=limit,
                              autocast=setup.autocast, tta_scales=tta_scales, tta_flip=tta_flip)
        writer.finish()
        synchronize(setup.device)
        return frames, time.perf_counter() - start
    finally:
        writer.shutdown()


@contextmanager
def write_errors_in_one_line(export_dir):
    """A write that fails (a full disk) ends `evaluate` with one line: which file, why, and
    what is left (whole files only: training.outputs.atomic removed the one being written)."""
    try:
        yield
    except WriteError as exc:
        again = " (--export needs a new or empty folder again)" if export_dir else ""
        raise UserError(f"evaluate stopped: cannot write {exc.filename} "
                        f"({exc.strerror or exc}); the files written before it are whole, no "
                        f"scores JSON was written; fix that and run the command again{again}") \
            from None


@contextmanager
def cudnn_autotuned(device: torch.device):
    """cudnn may pick its fastest kernels once: every frame of a split has the same size."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def print_scores(result: dict, console) -> None:
    """Per-class and per-category IoU tables (when there was ground truth), then one summary
    line. Numbers are never wrapped or cut, whatever the console width (a log is 80 wide):
    only names may fold; lines that hold a path are printed whole (soft wrap)."""
    if result["has_masks"]:
        console.print(f"{result['split']}: {result['frames']} frames of {result['checkpoint']}",
                      soft_wrap=True)
        for caption, key, mean in (("class", "class_iou", "miou"),
                                   ("category", "category_iou", "category_miou")):
            console.print(score_table(caption, result[key], result[mean]))
        console.print(f"pixel accuracy {_pct(result['pixel_accuracy'])} %")
    else:
        console.print(f"{result['split']}: {result['frames']} frames predicted (no ground truth)")
    if result["latency_ms"] is not None:
        h, w = result["input_hw"]
        console.print(f"latency {result['latency_ms']:.2f} ms/frame (batch 1, input {h}x{w}, "
                      f"{result['device']})")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def score_table(caption: str, scores: dict, mean):
    """name | IoU %, with the mean as footer; the number column never wraps."""
    table = Table(show_footer=True)
    table.add_column(caption, footer="mean", overflow="fold")
    table.add_column("IoU %", justify="right", footer=_pct(mean), no_wrap=True, min_width=6)
    for name, iou in scores.items():
        table.add_row(name, _pct(iou))
    return table


def print_outputs(result: dict, json_path, console) -> None:
    """Where the run wrote, one whole line each (paths are never broken, even in a log)."""
    outputs = [("scores", json_path), ("benchmark PNGs", result["export_dir"]),
               ("overlays", result["visualize_dir"])]
    for what, path in outputs:
        if path is not None:
            console.print(f"{what}: {os.fspath(path)}", soft_wrap=True, highlight=False)


def write_json(result: dict, json_path) -> None:
    """Whole or not at all (training.outputs.atomic); allow_nan=False: the file stays strict JSON
    (absent classes are null, never NaN)."""
    path = atomic.make_parent(json_path)
    atomic.write_json(path, result)


def auto_eval_batch(checkpoint, cache, split: str, *, device, amp: str | None,
                    tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False,
                    eval_scale: float = 1.0) -> int:
    """`evaluate --batch-size auto`: 1 on the CPU; on CUDA what fits the card for the
    checkpoint's model, the split's frame size, --amp, --tta/--flip and --eval-scale (the
    `evaluate` pass: no loss, no optimiser state, the model in contiguous format). A mistake in
    the options is left for run_evaluate to report (batch 1 here)."""
    try:
        device = resolve_device(device)
    except Exception:
        return 1
    if device.type != "cuda":
        return CPU_VAL_BATCH
    try:
        meta = load_checkpoint(checkpoint)["meta"]
        info = CacheReader(cache).split(split)
        scales = tuple(float(s) for s in tta_scales)
        if not scales or min(scales) <= 0:
            return 1
    except Exception:
        return 1
    return auto_val_batch(device, meta["arch"], meta["encoder"], (info.height, info.width), amp,
                          model_kwargs=dict(meta.get("model_kwargs", {})),
                          num_classes=int(meta["num_classes"]), eval_scale=eval_scale,
                          tta_scales=scales, tta_flip=tta_flip, channels_last=False)
