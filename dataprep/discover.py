"""Find the frames of a raw Cityscapes tree.

Official layout (as unpacked from leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip):

    ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_polygons.json
    ROOT/gtCoarse/train_extra/<city>/<city>_<seq>_<frame>_gtCoarse_polygons.json

Rules:
- every folder under leftImg8bit/ is a split; hidden entries (".DS_Store") are ignored;
- a split is *labelled* when its ground-truth folder exists (gtFine/<split>, or for
  train_extra gtCoarse/train_extra); there every image must have its polygon file;
- a split without that folder (e.g. test without gtFine/test) is *unlabelled*: its frames
  have polygons=None, and `unlabelled_splits()` names such splits so callers can say so;
- so is a split whose polygon files are all placeholders: the release's gtFine/test holds,
  per frame, only what camera calibration knows (ego vehicle, rectification border, out of
  roi; no class that is evaluated), since the test labels are kept for the benchmark server.
  A real labelled split shows a class in its first file, so the check costs one read there;
- train_extra has only coarse labels, so it is used only with coarse=True: with
  splits=None and coarse=False it is left out; asking for it by name without coarse=True
  is an error (the fine-only user would otherwise silently get 20k unlabelled frames);
- the tree may come from anywhere (cache.safe_input): every image and polygon file must be
  a regular file (a FIFO, device or socket is refused by name, never opened); symbolic links
  are followed wherever they lead (a symlinked leftImg8bit/ or city folder is a common
  layout), and one that loops or leads nowhere is refused by name. The walk has a fixed depth
  (split, city, file), so no link can make it loop;
- a folder that we wrote (a cache, a run or output folder) inside leftImg8bit/ is passed over,
  so a cache or run placed in the raw tree never breaks a later build of it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cache.errors import UserError
from cache.safe_input import MAX_JSON_BYTES, BadInput, check_regular, read_regular

IMAGES_DIR = "leftImg8bit"
FINE_DIR = "gtFine"
COARSE_DIR = "gtCoarse"
COARSE_SPLIT = "train_extra"
_IMAGE_SUFFIX = "_leftImg8bit.png"
_SPLIT_ORDER = ("train", "val", "test", COARSE_SPLIT)


@dataclass(frozen=True)
class Frame:
    name: str  # "city/city_seq_frame", the key used in the cache
    image: Path
    polygons: Path | None  # None in an unlabelled split


def discover(root: str | Path, splits: list[str] | tuple[str, ...] | None = None,
             coarse: bool = False) -> dict[str, list[Frame]]:
    """split -> frames sorted by name; UserError (one line) for anything that is not a usable tree."""
    root = Path(root)
    images_root = _check_root(root)
    present = _present_splits(images_root)
    wanted = _select_splits(images_root, present, splits, coarse)
    found = {}
    for split in wanted:
        found[split] = _discover_split(root, split)
    if not any(found.values()):
        raise UserError(f"{images_root}: no *{_IMAGE_SUFFIX} images found in splits {', '.join(wanted)}")
    for split, frames in found.items():
        if not frames:
            raise UserError(f"{images_root / split}: split {split!r} has no *{_IMAGE_SUFFIX} images")
    return found


def unlabelled_splits(found: dict[str, list[Frame]]) -> list[str]:
    """The splits of a `discover()` result that have no polygon files (images only)."""
    return [split for split, frames in found.items() if frames and frames[0].polygons is None]


def polygon_dir(root: str | Path, split: str) -> Path:
    """The ground-truth folder of a split: gtCoarse for train_extra, gtFine otherwise."""
    return Path(root) / (COARSE_DIR if split == COARSE_SPLIT else FINE_DIR) / split


def _check_root(root: Path) -> Path:
    if not root.exists():
        raise UserError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise UserError(f"dataset root {root} is not a folder")
    images_root = root / IMAGES_DIR
    if not images_root.is_dir():
        raise UserError(f"{root} has no {IMAGES_DIR}/ folder; point at the folder that holds "
                        f"{IMAGES_DIR}/ and {FINE_DIR}/")
    return images_root


def _present_splits(images_root: Path) -> list[str]:
    names = [e.name for e in os.scandir(images_root)
             if _is_dir(e) and not e.name.startswith(".") and not _made_by_us(e.path)]
    known = [s for s in _SPLIT_ORDER if s in names]
    return known + sorted(set(names) - set(known))


def _select_splits(images_root: Path, present: list[str], splits, coarse: bool) -> list[str]:
    if splits is None:
        return [s for s in present if coarse or s != COARSE_SPLIT]
    if isinstance(splits, str):
        splits = [splits]
    wanted = list(dict.fromkeys(splits))  # keep the caller's order, drop repeats
    for split in wanted:
        if split not in present:
            raise UserError(f"split {split!r} not found under {images_root} "
                            f"(found: {', '.join(present) or 'none'})")
        if split == COARSE_SPLIT and not coarse:
            raise UserError(f"split {COARSE_SPLIT!r} has only coarse labels; enable coarse "
                            "labels (coarse=True, --coarse) to use it")
    return wanted


def _discover_split(root: Path, split: str) -> list[Frame]:
    gt_dir = polygon_dir(root, split)
    labelled = gt_dir.is_dir()
    gt_suffix = f"_{gt_dir.parent.name}_polygons.json"
    frames = []
    for city_dir in _city_dirs(root / IMAGES_DIR / split):
        gt_files = _file_names(gt_dir / city_dir.name) if labelled else set()
        for entry in _sorted_files(city_dir):
            stem = _frame_stem(city_dir.name, entry)
            polygons = None
            if labelled:
                if stem + gt_suffix not in gt_files:
                    raise UserError(f"{entry}: no polygon file {gt_dir / city_dir.name / (stem + gt_suffix)} "
                                    f"(split {split!r} is labelled because {gt_dir} exists)")
                polygons = gt_dir / city_dir.name / (stem + gt_suffix)
                check_regular(polygons)
            frames.append(Frame(f"{city_dir.name}/{stem}", entry, polygons))
    frames.sort(key=lambda f: f.name)
    if labelled and frames and all(_is_placeholder(f.polygons) for f in frames):
        return [Frame(f.name, f.image, None) for f in frames]
    return frames


def _is_placeholder(polygons: Path) -> bool:
    """True when the file names only labels that are never evaluated (ego vehicle, out of roi...).
    A file we cannot read counts as real labels: the build then reports it, naming the file."""
    from cityscapesscripts.helpers.labels import name2label

    try:
        objects = json.loads(read_regular(polygons, MAX_JSON_BYTES))["objects"]
        names = [str(o["label"]) for o in objects if not o.get("deleted")]
    except (BadInput, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return False
    for name in names:
        label = name2label.get(name) or name2label.get(name[:-len("group")] if name.endswith("group") else name)
        if label is None or not label.ignoreInEval:
            return False
    return True


# A cache (its root zarr.json) or an output folder of train/evaluate/predict (its marker,
# training/outputs/folder.MARKER) placed inside the raw tree is no split or city: a later
# build of the tree passes over it instead of refusing its files.
_OUR_FOLDER_FILES = ("zarr.json", ".cityscapes-output")


def _made_by_us(folder: str | Path) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in _OUR_FOLDER_FILES)


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether the entry is a folder, links followed; False for a link that loops."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _city_dirs(split_dir: Path) -> list[Path]:
    cities = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if _is_dir(entry) and _made_by_us(entry.path):
            continue
        if not _is_dir(entry):
            if entry.is_symlink():
                check_regular(entry.path)      # names a link that loops or leads nowhere
            raise UserError(f"{entry.path}: expected only city folders in {split_dir}, found a file")
        cities.append(Path(entry.path))
    return cities


def _sorted_files(city_dir: Path) -> list[Path]:
    """The entries of a city folder, each checked to be a regular file (links followed)."""
    files = [Path(e.path) for e in sorted(os.scandir(city_dir), key=lambda e: e.name)
             if not e.name.startswith(".")]
    for path in files:
        check_regular(path)
    return files


def _file_names(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


def _frame_stem(city: str, image: Path) -> str:
    """'aachen_000000_000019' from .../aachen/aachen_000000_000019_leftImg8bit.png, or UserError."""
    match = re.fullmatch(rf"({re.escape(city)}_\d+_\d+){re.escape(_IMAGE_SUFFIX)}", image.name)
    if match is None:
        raise UserError(f"{image}: malformed file name, expected {city}_<seq>_<frame>{_IMAGE_SUFFIX}")
    return match.group(1)
