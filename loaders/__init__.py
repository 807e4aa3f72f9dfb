"""Loaders over the cache: DALI (GPU or CPU-only) and PyTorch, one augmentation contract.

Importing this package (which any `import loaders.x` does, DALI's source workers included)
must not import torch: `build_loader` (loaders/factory.py, torch and both loader kinds) is
loaded on first use.
"""
from loaders.contract import AugmentConfig, Batch

__all__ = ["AugmentConfig", "Batch", "build_loader"]


def __getattr__(name: str):
    if name == "build_loader":
        from loaders.factory import build_loader
        return build_loader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
