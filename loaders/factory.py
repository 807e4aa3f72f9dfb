"""`build_loader`: the one factory for loaders (both kinds).

It lives apart from loaders/contract.py so that the contract imports neither torch nor a
loader kind: DALI's source workers import the contract (through loaders/dali_pipeline.py)
and stay free of torch's hundreds of MB, and the loader kinds import the contract without
an import circle through the factory.
"""
from __future__ import annotations

import os

import torch

from cache.errors import UserError
from loaders.contract import LOADER_KINDS, AugmentConfig, Loader
from loaders.dali_loader import DaliLoader
from loaders.torch_loader import TorchLoader


def build_loader(cache: str | os.PathLike, split: str, kind: str = "dali", *, train: bool,
                 batch_size: int, aug: AugmentConfig | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int | None = None, rows=None,
                 channels_last: bool = False) -> Loader:
    """The one factory for loaders. kind="dali" runs augmentation in DALI (GPU operators when
    `device` is CUDA, DALI's CPU-only mode otherwise); kind="torch" uses DataLoader workers.
    `rows`: the cache rows of the split to read (e.g. one cross-validation fold); all by default.
    Order, sharding and batching then run over these rows as they would over a whole split.
    `channels_last`: hand images in channels_last memory format (what convolutions on a GPU
    prefer; free for both kinds, whose pixels are channels-last until then)."""
    aug = aug or AugmentConfig()
    if kind == "torch":
        impl = TorchLoader
    elif kind == "dali":
        impl = DaliLoader
    else:
        raise UserError(f"unknown loader kind {kind!r}; choose one of: {', '.join(LOADER_KINDS)}")
    return impl(cache, split, train=train, batch_size=batch_size, aug=aug,
                device=torch.device(device), seed=seed, rank=rank, world_size=world_size,
                num_workers=num_workers, rows=rows, channels_last=channels_last)
