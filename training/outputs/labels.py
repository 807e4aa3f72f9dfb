"""Label maps as tables and colours: trainId -> labelId (the benchmark's ids), the official palette,
and host copies of (maybe GPU) label maps. The bottom of training/outputs/: no files, no console.
The tables themselves are cache/labels.py's, shared with the PNG baseline loader.
"""
from __future__ import annotations

import numpy as np
import torch

from cache.labels import LABELID_TO_TRAINID, TRAINID_TO_COLOUR, TRAINID_TO_LABELID

__all__ = ["LABELID_TO_TRAINID", "TRAINID_TO_COLOUR", "TRAINID_TO_LABELID", "as_numpy",
           "as_uint8_labels", "colorize", "trainid_to_labelid"]


def trainid_to_labelid(pred) -> np.ndarray:
    """uint8 labelIds of a trainId array; anything that is not a class becomes 0 ("unlabeled")."""
    pred = as_numpy(pred)
    return TRAINID_TO_LABELID[np.where((pred >= 0) & (pred < 256), pred, 255).astype(np.uint8)]


def colorize(pred) -> np.ndarray:
    """(H, W, 3) uint8 picture of a trainId map in the official Cityscapes colours."""
    pred = as_numpy(pred)
    if pred.dtype != np.uint8:                   # uint8 indexes the table as it is
        pred = np.where((pred >= 0) & (pred < 256), pred, 255).astype(np.uint8)
    return TRAINID_TO_COLOUR[pred]


def as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):     # torch tensor, maybe on a GPU
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def as_uint8_labels(preds) -> np.ndarray:
    """uint8 host copy of label maps (trainIds < 256). A tensor is cast on its device before the
    copy: an int64 argmax of a 2048x1024 frame is 16 MB, its uint8 2 MB. The cast wraps values
    as numpy's astype does, so the bytes are those of `as_numpy(preds).astype(np.uint8)`."""
    if hasattr(preds, "detach"):
        return preds.detach().to(torch.uint8).cpu().numpy()
    return np.asarray(preds).astype(np.uint8, copy=False)
