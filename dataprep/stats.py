"""`dataprep stats`: class pixel counts, frequencies and class weights of a cache split.

Streams the masks row by row (one bincount per frame), so memory stays at one frame.
Weights (19 floats each, trainId order), with p_c = pixels of class c / labelled pixels:
  enet:              1 / ln(1.02 + p_c)                    (Paszke et al., ENet)
  median_frequency:  median(f) / f_c, f_c = pixels of c / pixels of the frames where c
                     appears                               (Eigen & Fergus)
  inverse_sqrt:      1 / sqrt(p_c), scaled so that sum_c p_c w_c = 1 (the loss keeps its scale)
A class with no pixel at all gets the largest weight of the others under the last two (its
weight never multiplies a pixel of this split; a finite value keeps the JSON valid).
The JSON (CACHE/stats.json by default) is what `train --class-weights FILE[:method]` reads.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from cache.format import STATS_FILE, CacheError
from cache.errors import UserError
from cache.lock import lock_cache
from cache.reader import CacheReader

WEIGHT_METHODS = ("enet", "median_frequency", "inverse_sqrt")
ENET_C = 1.02


def open_labelled_split(cache: str | os.PathLike, split: str):
    """(reader, split info); CacheError for a missing, unfinished or unlabelled split."""
    reader = CacheReader(cache)
    info = reader.split(split)
    if not info.has_masks:
        raise CacheError(f"{reader.path}: split {split!r} has no masks (an unlabelled split); "
                         "stats need a labelled split such as train")
    return reader, info


def class_histograms(reader: CacheReader, split: str, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(pixel counts per value 0..255 summed over the split, frames in which each value appears)."""
    info = reader.split(split)
    pixels = np.zeros(256, dtype=np.int64)
    present = np.zeros(256, dtype=np.int64)
    for row in range(len(info)):
        # through the reader's direct tile path: ~2.5x cheaper per frame than zarr's
        mask = reader.read_mask_window(split, row, 0, 0, info.height, info.width)
        counts = np.bincount(mask.ravel(), minlength=256)
        pixels += counts
        present += counts > 0
        if progress is not None:
            progress()
    return pixels, present


def class_weights(pixel_counts: np.ndarray, frame_pixels: np.ndarray) -> dict[str, list[float]]:
    """Weights per method from per-class pixel counts and the pixels of the frames holding each class."""
    counts = pixel_counts.astype(np.float64)
    total = counts.sum()
    p = counts / total if total > 0 else np.zeros_like(counts)
    seen = counts > 0
    enet = 1.0 / np.log(ENET_C + p)
    median = np.zeros_like(p)
    inv_sqrt = np.zeros_like(p)
    if seen.any():
        freq = np.where(seen, counts / np.maximum(frame_pixels, 1), 0.0)
        median[seen] = np.median(freq[seen]) / freq[seen]
        inv_sqrt[seen] = 1.0 / np.sqrt(p[seen])
        inv_sqrt[seen] /= float((p[seen] * inv_sqrt[seen]).sum())
        median[~seen] = median[seen].max()
        inv_sqrt[~seen] = inv_sqrt[seen].max()
    return {"enet": enet.tolist(), "median_frequency": median.tolist(), "inverse_sqrt": inv_sqrt.tolist()}


def compute_stats(cache: str | os.PathLike, split: str = "train", progress=None) -> dict:
    """The stats document of one split (see the module docstring for the weights)."""
    reader, info = open_labelled_split(cache, split)
    n = reader.num_classes
    pixels, present = class_histograms(reader, split, progress)
    frame_size = info.height * info.width
    class_pixels = pixels[:n]
    labelled = int(class_pixels.sum())
    total = int(pixels.sum())
    ignored = int(pixels[reader.ignore_index])
    other = total - labelled - ignored
    if other:
        raise CacheError(f"{reader.path}/{split}: {other} mask pixels are neither a trainId "
                         f"0..{n - 1} nor {reader.ignore_index}; run `dataprep verify`")
    return {
        "split": split,
        "frames": len(info),
        "height": info.height,
        "width": info.width,
        "num_classes": n,
        "ignore_index": reader.ignore_index,
        "class_names": reader.class_names,
        "pixel_counts": [int(c) for c in class_pixels],
        "frequencies": [c / labelled if labelled else 0.0 for c in class_pixels.tolist()],
        "frame_counts": [int(c) for c in present[:n]],
        "labelled_pixels": labelled,
        "ignored_pixels": ignored,
        "ignored_fraction": ignored / total if total else 0.0,
        "weights": class_weights(class_pixels, present[:n] * frame_size),
    }


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def lock_for_stats(cache: str | os.PathLike, json_path: str | os.PathLike | None = None, *,
                   wait: bool = False, on_wait=None):
    """The lock a stats run holds: exclusive when it writes into the cache (CACHE/stats.json,
    the default), shared when the JSON goes elsewhere."""
    target = Path(json_path) if json_path is not None else Path(cache) / STATS_FILE
    writes_cache = _inside(target, Path(cache))
    return lock_cache(cache, exclusive=writes_cache, wait=wait, on_wait=on_wait,
                      what="write stats.json" if writes_cache else "read the cache")


def write_stats(stats: dict, cache: str | os.PathLike, json_path: str | os.PathLike | None = None) -> Path:
    """Write the stats JSON (default CACHE/stats.json) atomically; returns its path. Inside the
    cache it is written under the cache's exclusive lock (a build may be deleting it)."""
    path = Path(json_path) if json_path is not None else Path(cache) / STATS_FILE
    inside = _inside(path, Path(cache))
    with lock_cache(cache, exclusive=True, what="write stats.json") if inside else nullcontext():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(stats, indent=2) + "\n")
            tmp.replace(path)
        except OSError as exc:
            raise UserError(f"--json {path}: cannot write ({exc.strerror or exc})") from None
    return path



_UNITS = ("", " k", " M", " G", " T", " P")


def compact_number(value: float) -> str:
    """At most 7 characters, for tables that must fit 80 columns and logs: below 1000 as is
    (floats with 3 decimals), above with 3 significant digits and an SI unit ('2.04 G' for a
    10-digit Cityscapes pixel count, '49.5 k'), never cut and never in exponent form."""
    if abs(value) < 1000:
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    scaled, unit = float(value), 0
    while abs(scaled) >= 999.5 and unit < len(_UNITS) - 1:
        scaled, unit = scaled / 1000, unit + 1
    digits = 2 if abs(scaled) < 10 else 1 if abs(scaled) < 100 else 0
    return f"{scaled:.{digits}f}{_UNITS[unit]}"
