"""`evaluate --visualize`: the colour prediction and the sheet of panels (training/outputs/overlays.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.outputs.labels import colorize
from training.outputs.overlays import (GAP, HATCH_RGB, WRONG_RGB, blend, error_panel, overlay_sheet,
                               visualize)

H, W = 256, 512
ROAD, SIDEWALK, CAR = 0, 1, 13


@pytest.fixture
def frame():
    """A random image; prediction road | car; the truth has a sidewalk block the prediction
    calls road, and ignores its bottom rows."""
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    pred = np.full((H, W), ROAD, dtype=np.int64)
    pred[:, W // 2:] = CAR
    gt = pred.copy()
    gt[100:120, 50:90] = SIDEWALK
    gt[200:, :] = 255
    return image, pred, gt


def panel(sheet: np.ndarray, index: int) -> np.ndarray:
    y, x = index // 2 * (H + GAP), index % 2 * (W + GAP)
    return sheet[y:y + H, x:x + W]


def colour(train_id: int) -> np.ndarray:
    return colorize(np.array([train_id]))[0]


def test_visualize_writes_the_palette_picture_and_the_sheet(tmp_path, frame):
    image, pred, gt = frame
    colour_path, sheet_path = visualize(image, torch.from_numpy(pred), tmp_path,
                                        "ulm/ulm_000000_000019", gt=gt)
    assert colour_path == tmp_path / "ulm" / "ulm_000000_000019_color.png"
    assert sheet_path == tmp_path / "ulm" / "ulm_000000_000019_overlay.png"
    assert np.array_equal(np.asarray(Image.open(colour_path)), colorize(pred))
    sheet = np.asarray(Image.open(sheet_path))
    assert np.array_equal(sheet, overlay_sheet(image, pred, gt, title="ulm_000000_000019"))


def test_the_four_panels_show_image_prediction_truth_and_errors(frame):
    image, pred, gt = frame
    sheet = overlay_sheet(image, pred, gt)
    assert sheet.shape[1] == 2 * W + GAP and sheet.shape[0] > 2 * (H + GAP)    # legend below
    below_label = (slice(60, H), slice(W // 2, W))          # labels sit in the top-left corners
    assert np.array_equal(panel(sheet, 0)[below_label], image[below_label])
    predicted = panel(sheet, 1)
    assert np.array_equal(predicted[150, 400], blend(image[150, 400], colour(CAR), 0.6))
    truth, errors = panel(sheet, 2), panel(sheet, 3)
    assert np.array_equal(truth[110, 70], blend(image[110, 70], colour(SIDEWALK), 0.6))
    assert (errors[100:120, 50:90] == WRONG_RGB).all()                  # wrong: red
    right = errors[60:200, 100:500]
    assert (right[..., 0] == right[..., 1]).all() and (right[..., 1] == right[..., 2]).all()
    for shown in (truth, errors):                                       # ignored: hatched
        ignored = shown[200:].reshape(-1, 3)
        stripes = (ignored == HATCH_RGB).all(1)
        assert 0.2 < stripes.mean() < 0.5
        darkened = (image[200:].reshape(-1, 3)[~stripes] * 0.35).astype(np.uint8)
        assert np.array_equal(ignored[~stripes], darkened)
    assert not (errors[200:] == WRONG_RGB).all(-1).any()               # never scored as wrong


def test_error_fraction_counts_scored_pixels_only(frame):
    image, pred, gt = frame
    _, wrong = error_panel(image, pred, gt, 255, period=12)
    assert wrong == pytest.approx(20 * 40 / (200 * W))
    _, none_scored = error_panel(image, pred, np.full_like(gt, 255), 255, period=12)
    assert none_scored == 0.0


def test_legend_shows_every_class_colour_and_the_keys(frame):
    image, pred, gt = frame
    sheet = overlay_sheet(image, pred, gt)
    key = sheet[2 * (H + GAP):].reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(key, axis=0)}
    assert {tuple(colour(i)) for i in range(19)} <= colours
    assert tuple(HATCH_RGB) in colours
    without_truth = overlay_sheet(image, pred)
    assert without_truth.shape[0] < sheet.shape[0] - H           # one row of panels
    assert np.array_equal(panel(without_truth, 1)[150, 400], panel(sheet, 1)[150, 400])


def test_a_one_pixel_error_survives_shrinking_a_wide_frame():
    pred = np.zeros((64, 2048), dtype=np.int64)
    gt = pred.copy()
    gt[41, 1501] = CAR
    image = np.full((64, 2048, 3), 128, dtype=np.uint8)
    sheet = overlay_sheet(image, pred, gt)
    assert sheet.shape[1] == 2 * 1024 + GAP                      # panels shrunk by 2
    errors = sheet[32 + GAP:64 + GAP, 1024 + GAP:]
    red, green = errors[20, 750, 0].astype(int), errors[20, 750, 1].astype(int)
    assert red - green > 30                                      # a quarter red still shows
    assert (errors[:, :700, 0] == errors[:, :700, 1]).all()


def test_image_of_another_size_is_resized_to_the_prediction(frame):
    image, pred, gt = frame
    half = np.asarray(Image.fromarray(image).resize((W // 2, H // 2)))
    sheet = overlay_sheet(half, pred, gt)
    assert sheet.shape[1] == 2 * W + GAP
