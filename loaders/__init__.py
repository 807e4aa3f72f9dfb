"""Loaders over the cache: DALI (GPU or CPU-only) and PyTorch, one augmentation contract.

Importing this package (which any `import loaders.x` does, DALI's source workers included)
must not import torch: the factory `build_loader` (torch and both loader kinds) is imported
from loaders/factory.py.
"""
from loaders.contract import AugmentConfig, Batch

__all__ = ["AugmentConfig", "Batch"]
