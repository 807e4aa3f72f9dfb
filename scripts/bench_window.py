"""Window reads from a cache: raw image tiles read through a memory map against pread.

cache/tiles.py reads raw (uncompressed) shard tiles in place through a memory map, so a
training window copies only the tile rows it covers; before, every covered tile was first
copied whole by pread. This measures both ways side by side on the same windows of an
existing cache (training windows of the default augmentation: 640 crop, scale 0.5-2.0, image
and mask, as a loader reads them), interleaved round by round, in CPU ms per window (files in
the page cache: decode and copy costs, not disk).

    python scripts/bench_window.py --cache bench/host/cache --json bench/window.json
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


def reader_for(cache: str, split: str, mapped: bool) -> CacheReader:
    reader = CacheReader(cache)
    for kind in ("images", "masks"):
        tiles = getattr(reader._window_reader(split, kind), "__self__", None)
        if tiles is not None and not mapped:
            tiles._raw = False          # the pread path, as before the memory map
    return reader


def ms_per_window(reader: CacheReader, split: str, windows) -> float:
    started = time.process_time()
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
    args = parser.parse_args(argv)
    info = CacheReader(args.cache).split(args.split)
    aug = AugmentConfig.square(args.res)
    windows = [draw_train_sample(0, epoch, row, (info.height, info.width), aug)
               for epoch in range(args.epochs) for row in range(len(info))]
    samples = {"pread": [], "mmap": []}
    for _ in range(args.rounds):
        for mode in samples:
            reader = reader_for(args.cache, args.split, mapped=mode == "mmap")
            ms_per_window(reader, args.split, windows[:4])      # open files, warm the index
            samples[mode].append(ms_per_window(reader, args.split, windows))
    result = {"cache": args.cache, "split": args.split, "res": args.res, "windows": len(windows),
              "frame": [info.height, info.width], "cpu_ms_per_window": samples,
              "median": {mode: statistics.median(v) for mode, v in samples.items()}}
    result["speedup"] = result["median"]["pread"] / result["median"]["mmap"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(windows)} windows of {args.res}^2 (scale 0.5-2.0), CPU ms per window (median of "
          f"{args.rounds}): pread {result['median']['pread']:.3f}, mmap "
          f"{result['median']['mmap']:.3f} ({result['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
