"""Predictions in the official benchmark format (pictures of them: training/outputs/overlays.py).

The benchmark server and cityscapesscripts' `evalPixelLevelSemanticLabeling` want, per frame, a
single-channel uint8 PNG of labelIds (not trainIds) whose name starts with
`<city>_<seq>_<frame>`; we write `DIR/<city>/<city>_<seq>_<frame>_labelIds.png` and nothing else,
so that DIR can be zipped and uploaded, or given to the official script, as it is.
"""
from __future__ import annotations

import os
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from cache.errors import UserError

# "city/city_seq_frame": the city may not contain "_" (cityscapesscripts splits names on it).
_FRAME_NAME = re.compile(r"^(?P<city>[^/_]+)/(?P=city)_(?P<seq>\d+)_(?P<frame>\d+)$")
PNG_COMPRESS_LEVEL = 1   # flat label maps compress well at level 1 too, at a fraction of the time
MAX_PENDING_WRITES = 8   # batches of PNGs in flight; bounds host memory if the GPU is faster


def _label_luts():
    """(trainId -> labelId, labelId -> trainId, trainId -> colour), each indexed by a uint8."""
    from cityscapesscripts.helpers.labels import labels

    to_label = np.zeros(256, dtype=np.uint8)            # unknown trainIds (255) -> 0 "unlabeled"
    to_train = np.full(256, 255, dtype=np.uint8)
    colours = np.zeros((256, 3), dtype=np.uint8)        # ignore is black, as "unlabeled"
    for label in labels:
        if label.id < 0:
            continue
        to_train[label.id] = label.trainId if 0 <= label.trainId < 255 else 255
        if 0 <= label.trainId < 255:
            to_label[label.trainId] = label.id
            colours[label.trainId] = label.color
    return to_label, to_train, colours


TRAINID_TO_LABELID, LABELID_TO_TRAINID, TRAINID_TO_COLOUR = _label_luts()


def trainid_to_labelid(pred) -> np.ndarray:
    """uint8 labelIds of a trainId array; anything that is not a class becomes 0 ("unlabeled")."""
    pred = _as_numpy(pred)
    return TRAINID_TO_LABELID[np.where((pred >= 0) & (pred < 256), pred, 255).astype(np.uint8)]


def labelid_to_trainid(labels) -> np.ndarray:
    """uint8 trainIds of a labelId array (labels ignored in evaluation become 255)."""
    return LABELID_TO_TRAINID[_as_numpy(labels).astype(np.uint8)]


def colorize(pred) -> np.ndarray:
    """(H, W, 3) uint8 picture of a trainId map in the official Cityscapes colours."""
    pred = _as_numpy(pred)
    if pred.dtype != np.uint8:                   # uint8 indexes the table as it is
        pred = np.where((pred >= 0) & (pred < 256), pred, 255).astype(np.uint8)
    return TRAINID_TO_COLOUR[pred]


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):     # torch tensor, maybe on a GPU
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def as_uint8_labels(preds) -> np.ndarray:
    """uint8 host copy of label maps (trainIds < 256). A tensor is cast on its device before the
    copy: an int64 argmax of a 2048x1024 frame is 16 MB, its uint8 2 MB. The cast wraps values
    as numpy's astype does, so the bytes are those of `_as_numpy(preds).astype(np.uint8)`."""
    if hasattr(preds, "detach"):
        import torch

        return preds.detach().to(torch.uint8).cpu().numpy()
    return np.asarray(preds).astype(np.uint8, copy=False)


def frame_file_stem(frame_name: str) -> tuple[str, str]:
    """("city", "city_seq_frame") of a cache frame name "city/city_seq_frame"."""
    match = _FRAME_NAME.match(frame_name)
    if not match:
        raise UserError(f"frame name {frame_name!r} is not of the Cityscapes form "
                        "'city/city_000000_000000'; the benchmark needs such names")
    return match["city"], frame_name.split("/", 1)[1]


EXPORT_FOLDER = dict(kind="export", option="--export", command="evaluate --export", mark=False,
                     why=" (the benchmark wants nothing but the prediction PNGs in it)")


def check_export_dir(out_dir: str | os.PathLike) -> None:
    """Refuse a DIR that is not new or empty, writing nothing (training.outputs.folder: the
    export gets no marker, since the benchmark takes the folder as it is)."""
    from training.outputs.folder import check_output_dir

    check_output_dir(out_dir, **EXPORT_FOLDER)


def prepare_export_dir(out_dir: str | os.PathLike) -> Path:
    """Create DIR, or accept it if it is empty: the export must be the only thing in it."""
    from training.outputs.folder import claim_output_dir

    return claim_output_dir(out_dir, **EXPORT_FOLDER)


def export_predictions(preds, frame_names: Sequence[str], out_dir: str | os.PathLike) -> list[Path]:
    """Write each (H, W) trainId prediction of `preds` (B, H, W) as an official labelIds PNG
    (whole or not at all: training.outputs.atomic)."""
    from training.outputs.atomic import make_parent, write_png

    preds = _as_numpy(preds)
    if len(preds) != len(frame_names):
        raise ValueError(f"{len(preds)} predictions for {len(frame_names)} frame names")
    written = []
    for pred, frame_name in zip(preds, frame_names):
        city, stem = frame_file_stem(frame_name)
        path = make_parent(Path(out_dir) / city / f"{stem}_labelIds.png")
        write_png(path, trainid_to_labelid(pred), compress_level=PNG_COMPRESS_LEVEL)
        written.append(path)
    return written


class PngWriter:
    """Writes the export and visualisation PNGs of prediction batches in background threads
    (PIL's zlib releases the GIL), so that writing overlaps inference. Does nothing when
    neither directory is given. Overlays are drawn on the stored frame and its ground truth,
    read from the cache."""

    def __init__(self, cache_path: str, split: str, frame_names: Sequence[str],
                 export_dir: Path | None, visualize_dir: Path | None):
        self.split, self.frame_names = split, frame_names
        self.export_dir, self.visualize_dir = export_dir, visualize_dir
        self.pool = ThreadPoolExecutor(max_workers=2) if (export_dir or visualize_dir) else None
        self.pending: deque[Future] = deque()
        self.reader = None
        if visualize_dir is not None:
            from cache.reader import CacheReader

            self.reader = CacheReader(cache_path)      # its own handles, apart from the loader's

    def submit(self, preds, rows: list[int]) -> None:
        """Queue the (B, H, W) trainId predictions of cache rows `rows`."""
        if self.pool is None:
            return
        preds = as_uint8_labels(preds)       # cast on the device: 1/8 of the bytes to copy
        while len(self.pending) >= MAX_PENDING_WRITES:
            self.pending.popleft().result()          # re-raises a writer's error here
        self.pending.append(self.pool.submit(self._write, preds, rows))

    def _write(self, preds: np.ndarray, rows: list[int]) -> None:
        names = [self.frame_names[row] for row in rows]
        if self.export_dir is not None:
            export_predictions(preds, names, self.export_dir)
        if self.visualize_dir is not None:
            from training.outputs.overlays import visualize

            for pred, row, name in zip(preds, rows, names):
                image, mask = self.reader.read_frame(self.split, row)   # stored, full size
                visualize(image, pred, self.visualize_dir, name, gt=mask,
                          ignore_index=self.reader.ignore_index)

    def finish(self) -> None:
        """Wait for every write; a writer's error is raised here."""
        while self.pending:
            self.pending.popleft().result()

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
