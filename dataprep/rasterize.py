"""Cityscapes polygon JSON -> label image, identical pixel for pixel to cityscapesscripts.

`cityscapesscripts.preparation.json2labelImg` is the reference: the official trainId masks
were made with it. We follow its rules exactly and draw with PIL's `ImageDraw.polygon`, the
same scanline filler it uses, so every boundary pixel agrees:

- the canvas starts as 'unlabeled' (id 0, trainId 255);
- objects are drawn in file order, later ones over earlier ones;
- an object whose `deleted` is truthy is skipped (before its label is even looked up);
- an unknown label ending in "group" (cargroup, persongroup...) is drawn as its base label,
  but a known one (polegroup) keeps its own values;
- a label with id < 0 (license plate) is not drawn, so the car beneath shows through;
- PIL clips polygons that leave the image.

Where the reference exits (unknown label) or crashes (bad polygon), we raise `BadFrame`.

Files from anywhere are bounded (cache.safe_input): only a regular file of at most
MAX_JSON_BYTES is read, and drawn only if it holds at most MAX_POINTS points (which bounds the
time PIL takes); a number that is not finite (NaN, Infinity, 1e400), a fraction beyond
MAX_NUMBER or an integer PIL cannot draw is refused, and so is an image size above
MAX_IMAGE_PIXELS (PIL's decompression-bomb limit; a Cityscapes frame is 2048x1024) before
any canvas is made.

We are faster because we skip what the reference does besides drawing: building a Python
object per point and encoding a PNG.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS
from PIL import Image, ImageDraw

from cache.safe_input import MAX_IMAGE_PIXELS, MAX_JSON_BYTES, BadInput, check_pixels, read_regular

ENCODINGS = ("trainIds", "ids")

# label name -> value drawn, per encoding; ids < 0 are kept here and skipped when drawing.
_VALUES = {
    "ids": {label.name: label.id for label in _CS_LABELS},
    "trainIds": {label.name: label.trainId for label in _CS_LABELS},
}
_NEGATIVE_ID = {label.name for label in _CS_LABELS if label.id < 0}
_BACKGROUND = "unlabeled"


# A polygon file we cannot turn into a label image (unreadable, malformed, an unknown label),
# or any other input file of a frame that cannot be used: one exception for all of them.
BadFrame = BadInput
# Drawing costs PIL about (rows x edges) per polygon: the points are bounded so that a hostile
# file takes seconds, not minutes (a Cityscapes frame has a few thousand).
MAX_POINTS = 100_000
MAX_NUMBER = 1e9  # no fractional coordinate is bigger (integers are not hooked: that costs
                  # ~1 us a point; PIL's refusal of one beyond 2**63 is caught when drawing)


class PolygonObject(NamedTuple):
    label: str
    polygon: list  # [[x, y], ...] as read from the JSON (tuples of (x, y) work too)
    deleted: bool


@dataclass
class Polygons:
    height: int
    width: int
    objects: list[PolygonObject] = field(default_factory=list)
    source: str = "<polygons>"  # the file, for error messages


def load_polygons(path: str | Path) -> Polygons:
    """Read a `*_polygons.json`; BadFrame if it is not a readable Cityscapes polygon file."""
    if not Path(path).exists() and not Path(path).is_symlink():
        raise BadFrame(f"{path}: polygon file not found")
    data = read_regular(path, MAX_JSON_BYTES)
    try:
        doc = json.loads(data, parse_float=_bounded_float, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise BadFrame(f"{path}: cannot read polygon file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BadFrame(f"{path}: not valid JSON, truncated or corrupt ({exc})") from None
    except _OutOfRange as exc:
        raise BadFrame(f"{path}: {exc}") from None
    except (ValueError, RecursionError) as exc:   # a 5000-digit number, nesting 1000s deep
        raise BadFrame(f"{path}: not a polygon file ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:80] if str(exc) else 'nested too deeply'})") from None
    return _polygons_from_doc(doc, str(path))


class _OutOfRange(ValueError):
    pass


def _bounded_float(text: str) -> float:
    value = float(text)
    if not abs(value) <= MAX_NUMBER:    # NaN fails this too
        raise _OutOfRange(f"number {text[:40]} is out of range (beyond {MAX_NUMBER:g})")
    return value


def _no_constant(text: str):
    raise _OutOfRange(f"{text} is not a number a polygon file may hold")


def _polygons_from_doc(doc, source: str) -> Polygons:
    if not isinstance(doc, dict):
        raise BadFrame(f"{source}: expected a JSON object with imgHeight, imgWidth and objects")
    missing = [key for key in ("imgHeight", "imgWidth", "objects") if key not in doc]
    if missing:
        raise BadFrame(f"{source}: missing {', '.join(missing)}")
    try:  # the reference takes int() of both, so "1024" and 1024.0 are accepted
        height, width = int(doc["imgHeight"]), int(doc["imgWidth"])
    except (TypeError, ValueError, OverflowError):
        raise BadFrame(f"{source}: imgHeight/imgWidth are not integers") from None
    if height <= 0 or width <= 0:
        raise BadFrame(f"{source}: image size {width}x{height} is not positive")
    if height * width > MAX_IMAGE_PIXELS:
        check_pixels(f"{source}: imgWidth x imgHeight", width, height)
    if doc.get("ignore"):  # the reference reads these as boxes and crashes drawing them
        raise BadFrame(f"{source}: 'ignore' regions are not supported in polygon files")
    if not isinstance(doc["objects"], list):
        raise BadFrame(f"{source}: 'objects' is not a list")
    objects, points = [], 0
    for index, obj in enumerate(doc["objects"]):
        if not isinstance(obj, dict) or "label" not in obj or "polygon" not in obj:
            raise BadFrame(f"{source}: object {index} has no label or polygon")
        # str() and truthiness as in cityscapesscripts' CsPoly.fromJsonText / createLabelImage
        objects.append(PolygonObject(str(obj["label"]), obj["polygon"], bool(obj.get("deleted", 0))))
        points += len(obj["polygon"]) if isinstance(obj["polygon"], (list, tuple)) else 0
    if points > MAX_POINTS:
        raise BadFrame(f"{source}: {points:,} polygon points, more than the {MAX_POINTS:,} drawn "
                       "for one frame")
    return Polygons(height, width, objects, source)


def render_label_image(polygons: Polygons, encoding: str = "trainIds") -> np.ndarray:
    """uint8 (H, W) label image in `encoding` ("trainIds" or "ids"), as json2labelImg draws it."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, not {encoding!r}")
    values = _VALUES[encoding]
    image = Image.new("L", (polygons.width, polygons.height), values[_BACKGROUND])
    draw = ImageDraw.Draw(image)
    for index, obj in enumerate(polygons.objects):
        if obj.deleted:
            continue
        label = _resolve_label(obj.label, polygons.source)
        if label in _NEGATIVE_ID:
            continue
        _draw_polygon(draw, obj.polygon, values[label], f"{polygons.source}: object {index} ({label})")
    return np.array(image)


def render_trainids(path: str | Path) -> np.ndarray:
    """uint8 (H, W) trainIds (255 = ignore) for one polygon file."""
    return render_label_image(load_polygons(path), "trainIds")


def _resolve_label(label: str, source: str) -> str:
    if label not in _VALUES["ids"] and label.endswith("group"):
        label = label[: -len("group")]
    if label not in _VALUES["ids"]:
        raise BadFrame(f"{source}: unknown label {label!r}")
    return label


def _draw_polygon(draw: ImageDraw.ImageDraw, polygon, value: int, where: str) -> None:
    if not isinstance(polygon, (list, tuple)) or (polygon and not isinstance(polygon[0], (list, tuple))):
        # PIL would also take a flat [x0, y0, x1, ...] list; the reference crashes on it
        raise BadFrame(f"{where}: polygon is not a list of [x, y] points")
    try:
        draw.polygon(polygon, fill=value)
        return
    except (TypeError, ValueError, OverflowError, SystemError):
        pass  # not plain [x, y] pairs, too few points or a number PIL refuses; it drew nothing
    try:
        # the reference keeps only p[0], p[1] of each point (extra coordinates are dropped)
        draw.polygon([(p[0], p[1]) for p in polygon], fill=value)
    except (TypeError, ValueError, IndexError, KeyError, OverflowError, SystemError) as exc:
        # SystemError: PIL's answer to an integer beyond 64 bits
        raise BadFrame(f"{where}: cannot draw polygon ({str(exc)[:120]})") from None
