"""`evaluate --export/--visualize`: the benchmark PNGs (training/outputs/export.py) and the
pictures (training/outputs/overlays.py) of prediction batches, written in background threads.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from cache.reader import CacheReader
from training.outputs.export import export_predictions
from training.outputs.labels import as_uint8_labels
from training.outputs.overlays import visualize

MAX_PENDING_WRITES = 8   # batches of PNGs in flight; bounds host memory if the GPU is faster


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
