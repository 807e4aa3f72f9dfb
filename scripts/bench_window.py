"""Window reads from a cache: raw image tiles read through a memory map against pread.

cache/tiles.py reads raw (uncompressed) shard tiles in place through a memory map, so a
training window copies only the tile rows it covers; before, every covered tile was first
copied whole by pread. This measures both ways side by side on the same windows of an
existing cache (training windows of the default augmentation: 640 crop, scale 0.5-2.0, image
and mask, as a loader reads them), interleaved round by round, in CPU ms per window (files in
the page cache: decode and copy costs, not disk).

    python scripts/bench_window.py --cache bench/host/cache --json bench/window.json

--crc adds two modes that price a crc32c check on every read (the issue of checksums on
read): `tile-crc` computes the crc32c of every stored tile a window covers (what a per-tile
checksum, e.g. zarr's crc32c codec inside each shard, would cost), `row-crc` reads and
checksums the window's whole row (the per-row crc32c the writer records, checked on read).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.reader import CacheReader  # noqa: E402
from loaders.contract import AugmentConfig  # noqa: E402
from loaders.sampling import draw_train_sample  # noqa: E402


def _tiles_of(reader: CacheReader, split: str, kind: str):
    read = reader._window_reader(split, kind)
    return getattr(read, "windows", None) or getattr(read, "__self__", None)


def reader_for(cache: str, split: str, mode: str) -> CacheReader:
    reader = CacheReader(cache)
    for kind in ("images", "masks"):
        tiles = _tiles_of(reader, split, kind)
        if tiles is not None and mode == "pread":
            tiles._raw = False          # the pread path, as before the memory map
        if tiles is not None and mode == "tile-crc":
            _check_tile_crc(tiles)
    return reader


def _check_tile_crc(tiles) -> None:
    """Make every tile read also compute the crc32c of the tile's stored bytes."""
    import google_crc32c

    tile = tiles._tile

    def checked(row, ty, tx):
        values = tile(row, ty, tx)
        if values is not None:
            google_crc32c.value(values)
        return values
    tiles._tile = checked


def ms_per_window(reader: CacheReader, split: str, windows, mode: str = "mmap") -> float:
    started = time.process_time()
    if mode == "row-crc":
        from cache.writer import row_checksums

        info = reader.split(split)
        for p in windows:
            image, mask = reader.read_frame(split, p.row)
            row_checksums(image, mask)
            _ = image[p.y:p.y + p.h, p.x:p.x + p.w].copy(), None if mask is None else \
                mask[p.y:p.y + p.h, p.x:p.x + p.w].copy()
        del info
    else:
        for p in windows:
            reader.read_window(split, p.row, p.y, p.x, p.h, p.w)
    return (time.process_time() - started) / len(windows) * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--res", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=4, help="windows per frame")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--crc", action="store_true", help="also time crc32c checks on read")
    args = parser.parse_args(argv)
    info = CacheReader(args.cache).split(args.split)
    aug = AugmentConfig.square(args.res)
    windows = [draw_train_sample(0, epoch, row, (info.height, info.width), aug)
               for epoch in range(args.epochs) for row in range(len(info))]
    samples = {"pread": [], "mmap": []}
    if args.crc:
        samples.update({"tile-crc": [], "row-crc": []})
    for _ in range(args.rounds):
        for mode in samples:
            reader = reader_for(args.cache, args.split, mode)
            ms_per_window(reader, args.split, windows[:4], mode)      # open files, warm the index
            samples[mode].append(ms_per_window(reader, args.split, windows, mode))
            reader.close()
    result = {"cache": args.cache, "split": args.split, "res": args.res, "windows": len(windows),
              "frame": [info.height, info.width], "cpu_ms_per_window": samples,
              "median": {mode: statistics.median(v) for mode, v in samples.items()}}
    result["speedup"] = result["median"]["pread"] / result["median"]["mmap"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(windows)} windows of {args.res}^2 (scale 0.5-2.0), CPU ms per window (median of "
          f"{args.rounds}): pread {result['median']['pread']:.3f}, mmap "
          f"{result['median']['mmap']:.3f} ({result['speedup']:.2f}x)")
    if args.crc:
        base = result["median"]["mmap"]
        print("with a crc32c check on read: " + ", ".join(
            f"{mode} {result['median'][mode]:.3f} ({result['median'][mode] / base:.2f}x mmap)"
            for mode in ("tile-crc", "row-crc")))


if __name__ == "__main__":
    main()
