"""For tests: exported labelIds read back as trainIds (the inverse of what `evaluate --export`
writes; the product itself never needs it)."""
from __future__ import annotations

import numpy as np

from cache.labels import LABELID_TO_TRAINID
from training.outputs.labels import as_numpy


def labelid_to_trainid(labels) -> np.ndarray:
    """uint8 trainIds of a labelId array (labels ignored in evaluation become 255)."""
    return LABELID_TO_TRAINID[as_numpy(labels).astype(np.uint8)]
