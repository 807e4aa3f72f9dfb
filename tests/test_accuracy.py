"""Class accuracy, mean accuracy and pixel accuracy against a confusion matrix made by hand."""
from __future__ import annotations

import pytest
import torch

from training.core.metrics import ConfusionMatrix

NAMES = ["road", "sidewalk", "building", "wall"]


def test_accuracies_from_a_hand_made_confusion_matrix():
    #        gt:   0  0  0  0    1  1  2  255   (255: ignored)
    #      pred:   0  0  3  255  1  0  2  2     (255: a void prediction, 3: wall, absent in gt)
    target = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 0, 3, 255, 1, 0, 2, 2]])
    matrix = ConfusionMatrix(num_classes=4, ignore_index=255)
    matrix.update(pred, target)
    scores = matrix.compute(NAMES)
    # ground-truth pixels: road 4 (2 right), sidewalk 2 (1 right), building 1 (1 right), wall 0
    assert scores["class_accuracy"] == {"road": 0.5, "sidewalk": 0.5, "building": 1.0, "wall": None}
    assert scores["mean_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 7)
    # the IoU of the same matrix: road TP 2 / (TP 2 + FN 2 + FP 1, a sidewalk pixel)
    assert scores["class_iou"]["road"] == pytest.approx(2 / 5)


def test_no_ground_truth_means_no_accuracy():
    scores = ConfusionMatrix(num_classes=4).compute(NAMES)
    assert scores["class_accuracy"] == dict.fromkeys(NAMES) and scores["mean_accuracy"] is None
