"""Loaders over the cache: DALI (GPU or CPU-only) and PyTorch, one augmentation contract."""
from loaders.contract import AugmentConfig, Batch, build_loader

__all__ = ["AugmentConfig", "Batch", "build_loader"]
