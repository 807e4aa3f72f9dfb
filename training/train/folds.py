"""K-fold cross-validation folds of one split, grouped by city.

Cityscapes frames of one city share streets, weather and camera: a model validated on frames of
a city it trained on scores too well. So a fold's validation part is a set of whole cities
(scikit-learn's GroupKFold idea): cities are dealt, largest first, to the fold that holds the
fewest frames so far (ties: the lower fold index; equal cities: name order). The folds are a pure
function of the split's frame names and K, so every run of `train --folds K --fold I` on the same
cache agrees on them, on any machine, without a seed.

A frame name is "city/city_seq_frame" (the split's `frames` attribute; its index is the row).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from cache.errors import UserError

FOLD_FILE = "fold.json"   # in the run dir: which fold it trained, and its validation frames


@dataclass(frozen=True)
class Fold:
    """Fold `index` of `k` of split `split`: cache rows to train on and to validate on."""

    split: str
    k: int
    index: int
    train_rows: tuple[int, ...]
    val_rows: tuple[int, ...]
    val_cities: tuple[str, ...]
    train_cities: tuple[str, ...]


def city_of(frame_name: str) -> str:
    """"aachen/aachen_000000_000019" -> "aachen" (the folder part of the cache's frame name)."""
    city, sep, _ = str(frame_name).partition("/")
    if not sep or not city:
        raise UserError(f"frame name {frame_name!r} has no city folder ('city/city_seq_frame'); "
                        "folds are grouped by city")
    return city


def rows_by_city(frames: Sequence[str]) -> dict[str, list[int]]:
    """City -> its cache rows, cities in name order."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(frames):
        groups.setdefault(city_of(name), []).append(row)
    return dict(sorted(groups.items()))


def city_folds(frames: Sequence[str], k: int) -> list[tuple[str, ...]]:
    """The cities of each of the `k` folds (each in name order), balanced by frame count."""
    groups = rows_by_city(frames)
    if k < 2:
        raise UserError(f"--folds {k}: cross-validation needs at least 2 folds")
    if k > len(groups):
        raise UserError(f"--folds {k}: the split has only {len(groups)} cities "
                        f"({', '.join(groups)}), and folds are grouped by city; use --folds "
                        f"{len(groups)} or fewer")
    sizes = [0] * k
    members: list[list[str]] = [[] for _ in range(k)]
    for city in sorted(groups, key=lambda c: (-len(groups[c]), c)):
        target = min(range(k), key=lambda i: (sizes[i], i))
        members[target].append(city)
        sizes[target] += len(groups[city])
    return [tuple(sorted(cities)) for cities in members]


def make_fold(frames: Sequence[str], k: int, index: int, split: str = "train") -> Fold:
    """Fold `index` (0-based) of `k`: its cities are validation, the others training."""
    if not 0 <= index < k:
        raise UserError(f"--fold {index}: must be between 0 and {k - 1} for --folds {k}")
    groups = rows_by_city(frames)
    val_cities = city_folds(frames, k)[index]
    train_cities = tuple(c for c in groups if c not in val_cities)
    val_rows = sorted(row for city in val_cities for row in groups[city])
    train_rows = sorted(row for city in train_cities for row in groups[city])
    return Fold(split, k, index, tuple(train_rows), tuple(val_rows), val_cities, train_cities)


def write_fold_file(fold: Fold, frames: Sequence[str], run_dir: str | os.PathLike) -> Path:
    """RUN/fold.json: the fold, its cities and its validation frames by name (atomically)."""
    record = {**asdict(fold), "val_frames": [frames[row] for row in fold.val_rows],
              "train_frames": len(fold.train_rows)}
    record.pop("train_rows")            # the frames left for training follow from the rest
    path = Path(run_dir) / FOLD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_fold_file(run_dir: str | os.PathLike) -> dict | None:
    """The run's fold.json as a dict, or None for a run that was not a fold."""
    path = Path(run_dir) / FOLD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not a JSON file (written by `train --folds`?)") from None


def fold_for_config(config, reader) -> Fold | None:
    """The fold a TrainConfig asks for (--folds K --fold I over its train split), or None."""
    if config.folds is None:
        return None
    return make_fold(reader.split(config.train_split).frames, config.folds, config.fold,
                     split=config.train_split)
