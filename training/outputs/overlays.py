"""Pictures of predictions for people: `evaluate --visualize DIR`.

Per frame, `DIR/<city>/<stem>_color.png` is the prediction in the official Cityscapes palette
at full size (like cityscapesscripts' `_gtFine_color.png`), and `DIR/<city>/<stem>_overlay.png`
a sheet of panels under a legend of the class colours:

    image              | prediction over the image
    ground truth       | errors: wrong pixels red on a grey image      (when there are masks)

Pixels the ground truth ignores (trainId 255, not scored) are hatched in both lower panels.
Panels are composed at full resolution and then shrunk by a whole factor to at most
`MAX_PANEL_WIDTH` (box filter), so that a one-pixel error still tints the shrunk picture.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import trainId2label
from PIL import Image, ImageDraw, ImageFont

from training.outputs.atomic import PNG_COMPRESS_LEVEL, make_parent, write_png
from training.outputs.export import frame_file_stem
from training.outputs.labels import as_numpy, colorize

MAX_PANEL_WIDTH = 1024        # a 2048x1024 frame gives a 2048-wide sheet of 1024-wide panels
PREDICTION_ALPHA = 0.6        # class colour over the image: strong enough to compare with GT
WRONG_RGB = (255, 0, 0)       # the errors panel has no class colours, so red means only "wrong"
HATCH_RGB = (210, 210, 210)
GAP, PAD = 4, 6               # pixels between panels; padding inside labels and the legend


def _trainid_names() -> list[str]:
    return [trainId2label[train_id].name for train_id in range(19)]


CLASS_NAMES = _trainid_names()


@lru_cache(maxsize=8)
def _font(size: int):
    return ImageFont.load_default(size=size)   # Pillow's bundled FreeType font: no system fonts


def hatch(shape: tuple[int, int], period: int) -> np.ndarray:
    """Boolean diagonal stripes, one third of each `period` drawn."""
    y, x = np.ogrid[:shape[0], :shape[1]]
    return (x + y) % period < max(1, period // 3)


def blend(image: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    mixed = image * np.float32(1.0 - alpha) + colour * np.float32(alpha)
    return (mixed + 0.5).astype(np.uint8)         # rounds: both terms are >= 0


def paint_ignored(panel: np.ndarray, image: np.ndarray, ignored: np.ndarray,
                  period: int) -> np.ndarray:
    """Ignored pixels: the image darkened, under light stripes."""
    panel = panel.copy()
    panel[ignored] = (image[ignored] * 0.35).astype(np.uint8)
    panel[ignored & hatch(ignored.shape, period)] = HATCH_RGB
    return panel


def error_panel(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, ignore_index: int,
                period: int) -> tuple[np.ndarray, float]:
    """(panel, fraction of scored pixels that are wrong): red where the prediction is wrong,
    a dimmed grey image where it is right, hatched where the ground truth ignores the pixel."""
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    panel = np.repeat((40 + 0.55 * grey).astype(np.uint8)[..., None], 3, axis=2)
    ignored = gt == ignore_index
    wrong = (pred != gt) & ~ignored
    panel[wrong] = WRONG_RGB
    scored = int((~ignored).sum())
    return paint_ignored(panel, image, ignored, period), (wrong.sum() / scored if scored else 0.0)


def shrink_factor(width: int) -> int:
    return max(1, -(-width // MAX_PANEL_WIDTH))


def _shrink(panel: np.ndarray, factor: int) -> np.ndarray:
    return np.asarray(Image.fromarray(panel).reduce(factor)) if factor > 1 else panel


def _label(canvas, xy: tuple[int, int], text: str, font) -> None:
    """White text on a dark box in a panel's top-left corner."""
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((xy[0] + PAD, xy[1] + PAD), text, font=font)
    draw.rectangle((xy[0], xy[1], right + PAD, bottom + PAD), fill=(20, 20, 20))
    draw.text((xy[0] + PAD, xy[1] + PAD), text, font=font, fill=(255, 255, 255))


def _swatch(size: int, kind) -> np.ndarray:
    if isinstance(kind, str) and kind == "ignored":
        box = np.full((size, size, 3), 40, np.uint8)
        box[hatch((size, size), max(3, size // 3))] = HATCH_RGB
        return box
    return np.broadcast_to(np.array(kind, np.uint8), (size, size, 3)).copy()


def legend(width: int, present: set[int], with_errors: bool, font):
    """The class colours in trainId order (classes in neither map greyed), then on a row of
    their own the keys of the lower panels."""
    classes = [(tuple(int(c) for c in colorize(np.array([i]))[0]), name, i in present)
               for i, name in enumerate(CLASS_NAMES)]
    keys = [("ignored", "ignored: not scored", True),
            (WRONG_RGB, "wrong (errors panel)", True)] if with_errors else []
    size = font.size
    column = max(int(font.getlength(name)) for _, name, _ in classes + keys) + size + 4 * PAD
    columns = max(1, (width - PAD) // column)
    class_rows = -(-len(classes) // columns)
    cells = [(i // columns, i % columns, entry) for i, entry in enumerate(classes)]
    cells += [(class_rows + i // columns, i % columns, entry) for i, entry in enumerate(keys)]
    rows = cells[-1][0] + 1
    canvas = Image.new("RGB", (width, rows * (size + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, col, (kind, name, shown) in cells:
        x, y = PAD + col * column, PAD + row * (size + PAD)
        canvas.paste(Image.fromarray(_swatch(size, kind)), (x, y))
        draw.rectangle((x, y, x + size - 1, y + size - 1), outline=(90, 90, 90))
        draw.text((x + size + PAD, y + size // 2), name, font=font, anchor="lm",
                  fill=(20, 20, 20) if shown else (160, 160, 160))
    return canvas


def overlay_sheet(image, pred, gt=None, *, title: str = "", ignore_index: int = 255) -> np.ndarray:
    """(H, W, 3) uint8 sheet of panels and legend (see the module docstring); `image` is resized
    to the prediction's size. Without `gt`: the image and prediction panels only."""
    pred = _as_labels(pred)
    image = as_numpy(image).astype(np.uint8)
    if image.shape[:2] != pred.shape:
        image = np.asarray(Image.fromarray(image).resize(pred.shape[::-1], Image.BILINEAR))
    factor = shrink_factor(pred.shape[1])
    period = 12 * factor                       # stripes 12 px apart after shrinking
    panels = [(image, title or "image"),
              (blend(image, colorize(pred), PREDICTION_ALPHA), "prediction")]
    present = _present(pred)
    if gt is not None:
        gt = _as_labels(gt)
        ignored = gt == ignore_index
        truth = paint_ignored(blend(image, colorize(gt), PREDICTION_ALPHA), image, ignored, period)
        errors, wrong = error_panel(image, pred, gt, ignore_index, period)
        panels += [(truth, "ground truth"), (errors, f"errors: {100 * wrong:.1f}% of scored pixels")]
        present |= _present(gt) - {ignore_index}
    return _compose([(_shrink(p, factor), text) for p, text in panels], present, gt is not None)


def _as_labels(array) -> np.ndarray:
    """uint8 label map (cheap to colour and count); anything outside 0..255 becomes 255."""
    array = as_numpy(array)
    if array.dtype == np.uint8:
        return array
    return np.where((array >= 0) & (array < 256), array, 255).astype(np.uint8)


def _present(labels: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.bincount(labels.ravel(), minlength=256)).tolist())


def _compose(panels: list[tuple[np.ndarray, str]], present: set[int], with_errors: bool) -> np.ndarray:
    """Two panels a row, each labelled, above the legend."""
    h, w = panels[0][0].shape[:2]
    width = 2 * w + GAP
    font = _font(max(12, width // 100))
    rows = -(-len(panels) // 2)
    key = legend(width, present, with_errors, font)
    canvas = Image.new("RGB", (width, rows * (h + GAP) + key.height), (255, 255, 255))
    for index, (panel, text) in enumerate(panels):
        xy = (index % 2 * (w + GAP), index // 2 * (h + GAP))
        canvas.paste(Image.fromarray(panel), xy)
        _label(canvas, xy, text, font)
    canvas.paste(key, (0, rows * (h + GAP)))
    return np.asarray(canvas)


def visualize(image_uint8, pred, out_dir: str | os.PathLike, frame_name: str, *, gt=None,
              ignore_index: int = 255) -> list[Path]:
    """Write `<city>/<stem>_color.png` and `<city>/<stem>_overlay.png` (module docstring), each
    whole or not at all (training.outputs.atomic)."""
    city, stem = frame_file_stem(frame_name)
    folder = make_parent(Path(out_dir) / city / stem).parent
    paths = [folder / f"{stem}_color.png", folder / f"{stem}_overlay.png"]
    sheet = overlay_sheet(image_uint8, pred, gt, title=stem, ignore_index=ignore_index)
    write_png(paths[0], colorize(pred), compress_level=PNG_COMPRESS_LEVEL)
    write_png(paths[1], sheet, compress_level=PNG_COMPRESS_LEVEL)
    return paths
