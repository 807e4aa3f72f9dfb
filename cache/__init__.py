"""The Zarr v3 cache: its contract (format), the writer, the reader and verification."""
from cache.format import (
    CLASS_NAMES,
    FORMAT_NAME,
    FORMAT_VERSION,
    IGNORE_INDEX,
    NUM_CLASSES,
    CacheError,
)
from cache.errors import UserError
from cache.reader import CacheReader

__all__ = [
    "CLASS_NAMES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "CacheError",
    "CacheReader",
    "UserError",
]
