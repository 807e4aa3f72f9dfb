"""The host side of each loader kind alone: what the CPU must do when a GPU does the rest.

With a GPU, the CPU's only work is to deliver uint8 windows: the torch kind's DataLoader
workers read, resize and flip them into batches (the GPU then does colour and
normalisation), and the DALI kind's parallel external-source workers (`WindowSource`) read
the windows that DALI's GPU operators then resize, jitter and normalise. These streams
build exactly that host side, from the same classes the loaders use, and stop where the
batch would be handed to the device: `scripts/bench_loader.py` measures them (device
"host") to say whether a weak CPU can feed a GPU, on a machine without one.

Both yield endlessly, epoch after epoch, like `loaders.contract.endless`; `images_in`
counts the samples of one delivered batch, whatever its form.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from cache.reader import CacheReader
from loaders.contract import AugmentConfig, check_request
from loaders.dali_loader import default_workers, require_dali, source_start_method
from loaders.dali_pipeline import source_nodes, WindowSource
from loaders.torch_loader import default_num_workers, EpochBatches, WindowDataset


def torch_host_batches(cache: str | os.PathLike, split: str = "train", *, batch_size: int,
                       aug: AugmentConfig, seed: int = 0, num_workers: int | None = None,
                       pin_memory: bool | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The torch kind's training batches as its workers send them for a GPU: uint8 image
    (B, h, w, 3) and mask (B, h, w), rows, valid sizes and colour parameters, not finished
    (no float conversion, jitter or normalisation). Pinned when CUDA is available, as the
    loader pins them for the copy, unless pin_memory says otherwise."""
    reader, info, rows = _open(cache, split, batch_size, aug)
    workers = default_host_workers("torch") if num_workers is None else num_workers
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    dataset = WindowDataset(reader, info, aug, train=True, seed=seed, finish_jitter=None)
    sampler = EpochBatches(rows, batch_size=batch_size, seed=seed, rank=0, world_size=1,
                           train=True)
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                        pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None)
    yield from loader  # the sampler never ends


def dali_host_batches(cache: str | os.PathLike, split: str = "train", *, batch_size: int,
                      aug: AugmentConfig, seed: int = 0, num_workers: int | None = None,
                      num_threads: int = 1, start_method: str | None = None) -> Iterator[tuple]:
    """The DALI kind's source side: a CPU-only pipeline whose outputs are the parallel
    external source's own (image window, mask window, params, row TensorLists), read by
    `WindowSource` in DALI's Python workers exactly as for the GPU graph, with no pixel
    operator after them. Workers default to the loader's choice for a GPU."""
    from nvidia.dali.pipeline import Pipeline

    require_dali()
    start_method = start_method or source_start_method(None)  # fork unless CUDA is initialised
    reader, _, _ = _open(cache, split, batch_size, aug)
    if num_workers is None:
        num_workers = default_host_workers("dali")
    source = WindowSource(reader, split, train=True, aug=aug, batch_size=batch_size, seed=seed,
                          first_epoch=0, rank=0, world_size=1)
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=None, seed=seed,
                    py_num_workers=num_workers, py_start_method=start_method,
                    exec_dynamic=True)
    with pipe:
        pipe.set_outputs(*source_nodes(source, num_workers).values())
    pipe.build()
    try:
        while True:
            yield pipe.run()
    finally:
        del pipe  # stops and joins the source workers


def default_host_workers(kind: str) -> int:
    """The workers each kind starts by default when it feeds a GPU."""
    if kind == "torch":
        return default_num_workers()
    return default_workers(torch.device("cuda", 0))[0]


def images_in(batch) -> int:
    """Samples in one delivered host batch (a torch dict or DALI's tuple of TensorLists)."""
    if isinstance(batch, dict):
        return int(batch["image"].shape[0])
    return len(batch[0])


def _open(cache, split: str, batch_size: int, aug: AugmentConfig):
    """(reader, split info, rows to read) after the loaders' own checks of the request."""
    reader = CacheReader(cache)
    info = reader.split(split)
    rows = check_request(reader.path, info, train=True, batch_size=batch_size, aug=aug, rank=0,
                         world_size=1)
    return reader, info, rows
