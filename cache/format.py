"""The cache contract shared by the writer, the reader and outside tools.

Layout (Zarr v3; see DESIGN.md):

    OUT/                 attrs: format, version, num_classes, ignore_index, class_names
    OUT/<split>/         attrs: frames (sorted "city/city_seq_frame"), complete, scale
                         (1.0, or the factor `dataprep build --scale` stored the frames at),
                         source_size ([H, W] of the raw frames)
    OUT/<split>/images   uint8 (N, H, W, 3) RGB, chunks (1, T, T, 3)
    OUT/<split>/masks    uint8 (N, H, W) trainIds, 255 = ignore, chunks (1, T, T)
    OUT/<split>/checksums  uint32 (N, 2): crc32c of each row's image and mask bytes
    OUT/<split>/done     uint8 (N,): 1 once the row is written and checked
    OUT/stats.json       written by `dataprep stats`

Every array names its dimensions (Zarr v3 `dimension_names`, see DIMENSIONS), so xarray
opens a split as a Dataset. A complete split, and the root once every split it holds is
complete, carry zarr's consolidated metadata: outside readers then open them without listing
the directories (no warning about stats.json, no slow fallback in xarray); the writer removes
it before it changes anything (cache.writer).

Version history: 1 crc32 checksums, one done chunk per row, no dimension names;
2 crc32c checksums, done and checksum chunks of BOOKKEEPING_CHUNK rows, dimension names.
"""
from __future__ import annotations

from cache.errors import UserError

FORMAT_NAME = "cityscapes-cache"
FORMAT_VERSION = 2
NUM_CLASSES = 19
IGNORE_INDEX = 255

# trainId order, as in cityscapesscripts.helpers.labels (tests check they agree).
CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

IMAGES = "images"
MASKS = "masks"
CHECKSUMS = "checksums"
DONE = "done"
STATS_FILE = "stats.json"
SCALE_ATTR = "scale"
SOURCE_SIZE_ATTR = "source_size"

# Zarr v3 dimension_names of each array: what xarray needs to open a split as a Dataset.
DIMENSIONS = {
    IMAGES: ("frame", "y", "x", "channel"),
    MASKS: ("frame", "y", "x"),
    CHECKSUMS: ("frame", "checksum"),  # checksum 0: image bytes, 1: mask bytes
    DONE: ("frame",),
}

ROOT_ATTRS = {
    "format": FORMAT_NAME,
    "version": FORMAT_VERSION,
    "num_classes": NUM_CLASSES,
    "ignore_index": IGNORE_INDEX,
    "class_names": list(CLASS_NAMES),
}


class CacheError(UserError):
    """The cache is missing, of another format or version, or incomplete."""


def open_group(path: str, *, split: str | None = None, mode: str = "r"):
    """A cache root (or one split) as a zarr group, its metadata read from the files themselves
    (never from consolidated metadata, which this code writes for outside readers only)."""
    import zarr

    return zarr.open_group(store=path, path=split or "", mode=mode, use_consolidated=False)


def split_group_names(root) -> list[str]:
    """The splits of an open cache root (zarr group): its child groups, sorted. Read from the
    folder's own zarr.json files where the store is a local folder (zarr's listing would warn
    about stats.json and .lock, and raise its parser's error from a task for a garbled child);
    a child whose zarr.json cannot be read is a CacheError naming that file."""
    import os
    import warnings

    location = getattr(getattr(root, "store", None), "root", None)
    if location is not None and os.path.isdir(os.path.join(str(location), root.path or "")):
        folder = os.path.join(str(location), root.path or "")
        for name, problem in damaged_children(folder).items():
            raise CacheError(f"{problem}; the cache is damaged: rebuild that split with "
                             f"`dataprep build --force --splits {name}`")
        return sorted(name for name, kind in child_nodes(folder).items() if kind == "group")
    with warnings.catch_warnings():
        # stats.json sits in the root by contract; zarr warns that it is not a node
        warnings.filterwarnings("ignore", message=".*not recognized as a component")
        return sorted(name for name, _ in root.groups())


def child_nodes(path: str) -> dict[str, str]:
    """name -> node_type ("group", "array") of the Zarr nodes directly inside a local folder."""
    import json
    import os

    nodes = {}
    for entry in os.scandir(path):
        meta = os.path.join(entry.path, "zarr.json")
        if entry.is_dir() and os.path.isfile(meta):
            try:
                with open(meta) as f:
                    nodes[entry.name] = json.load(f).get("node_type")
            except (OSError, ValueError, AttributeError):
                continue
    return nodes


def damaged_children(path: str) -> dict[str, str]:
    """name -> problem of each folder of the cache root whose zarr.json does not parse as a
    Zarr v3 node."""
    import json
    import os

    damaged = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        meta = os.path.join(entry.path, "zarr.json")
        if not entry.is_dir() or not os.path.isfile(meta):
            continue
        try:
            with open(meta) as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or \
                    doc.get("node_type") not in ("group", "array"):
                raise ValueError("not Zarr v3 metadata")
        except (OSError, ValueError) as exc:
            damaged[entry.name] = f"{meta}: cannot be read ({type(exc).__name__}: {str(exc)[:80]})"
    return damaged


def check_root_attrs(path: str, attrs: dict) -> None:
    """Refuse a store that is not our cache, of a version this code does not know, or whose
    root attributes are damaged (one line naming the file, never a traceback later on)."""
    if attrs.get("format") != FORMAT_NAME:
        raise CacheError(f"{path}: not a Cityscapes cache (no format={FORMAT_NAME!r} attribute); "
                         "make one with `dataprep build`")
    version = attrs.get("version")
    if version != FORMAT_VERSION or not isinstance(version, int):
        raise CacheError(f"{path}: cache format version {version!r} is not supported by this code "
                         f"(it reads version {FORMAT_VERSION}); rebuild it with `dataprep build --force` "
                         "(same --root and --out)")
    where = f"{path}/zarr.json: root attribute"
    fix = "the cache is damaged; rebuild it with `dataprep build --force` (same --root and --out)"
    num_classes = attrs.get("num_classes")
    if not _is_int(num_classes) or not 1 <= num_classes <= 255:
        raise CacheError(f"{where} 'num_classes' is {num_classes!r}, expected an integer 1..255; {fix}")
    ignore = attrs.get("ignore_index")
    if not _is_int(ignore) or not num_classes <= ignore <= 255:
        raise CacheError(f"{where} 'ignore_index' is {ignore!r}, expected an integer "
                         f"{num_classes}..255; {fix}")
    names = attrs.get("class_names")
    if not isinstance(names, list) or len(names) != num_classes or \
            not all(isinstance(n, str) for n in names):
        raise CacheError(f"{where} 'class_names' is not a list of {num_classes} names "
                         f"(got {str(names)[:80]}); {fix}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
