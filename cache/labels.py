"""The Cityscapes label tables, once: labelId <-> trainId and the trainId colours.

Every reader of labelIds (the PNG baseline loader, `evaluate --export`) and every picture of
a trainId map (`evaluate --visualize`, `predict`) indexes these uint8 tables.
"""
from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels


def _label_luts():
    """(trainId -> labelId, labelId -> trainId, trainId -> colour), each indexed by a uint8."""
    to_label = np.zeros(256, dtype=np.uint8)            # unknown trainIds (255) -> 0 "unlabeled"
    to_train = np.full(256, 255, dtype=np.uint8)        # ignored or unknown labelIds -> 255
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
