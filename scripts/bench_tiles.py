"""Pick the cache's tile size, codecs and sharding by measurement.

For every storage option (tile, shard, image codec, mask codec) this writes the same frames
through the build's own writer (cache.writer.RowWriter: cache.tiles.TileWriter's shard or tile
files, then the byte-for-byte read-back check), then measures:
  - the build's storage cost per frame (write, check), next to the PNG decode of the same
    frame, the floor a build cannot beat;
  - random training windows, drawn by loaders.sampling.draw_train_sample with the default
    AugmentConfig (640 crop, scale 0.5-2.0, so 320..1280 px source windows), read through
    cache.reader.CacheReader.read_window (image and mask, as a loader reads them; the direct
    tile reader of cache/tiles.py), with the bytes of the stored tiles each window touches
    (what a loader reads from disk when the cache is not in the page cache);
  - whole frames (validation), through CacheReader.read_frame;
  - bytes on disk per frame, against the source PNG, and files per frame.

Frames: a synthetic tree from dataprep.synth (2048x1024 by default, PNGs saved at level 1);
`--photo` replaces the images by a mosaic of a real photograph (matplotlib's sample
grace_hopper.jpg, mirrored, plus Gaussian noise of --photo-noise grey levels) saved as PNGs at
PIL's default level; noise 0.2 makes them ~2.2 MB per 2048x1024 frame, about what real
Cityscapes leftImg8bit PNGs weigh (~2.1 MB), so sizes relative to the PNGs are realistic.
All timings run in this one process with zarr and blosc on one thread and glibc reusing frame
buffers, as in a build worker, and are CPU times (process_time; medians per call), which other
jobs on a shared machine disturb far less than wall time; configs are interleaved in every
round. Files are read from the page cache, so read times are decode and copy times, not disk
times; "win MB" says what a window would read from a disk.

    python scripts/bench_tiles.py --frames 6 --json bench/tiles.json [--photo]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.reader import CacheReader  # noqa: E402
from cache.writer import CacheWriter, RowWriter, SplitPlan, Storage, configure_worker_threads  # noqa: E402
from loaders.contract import AugmentConfig  # noqa: E402
from loaders.sampling import draw_train_sample  # noqa: E402


# -- frames --------------------------------------------------------------------
def test_frames(tmp: Path, count: int, height: int, width: int, photo: bool, noise: float):
    """(images, masks, PNG paths of the images) from a synthetic tree written under tmp."""
    from dataprep.build import decode_image
    from dataprep.discover import discover
    from dataprep.rasterize import render_trainids
    from dataprep.synth import write_synthetic_tree

    write_synthetic_tree(tmp / "raw", max(count, 4), height=height, width=width, seed=1)
    frames = [f for split in discover(tmp / "raw").values() for f in split][:count]
    masks = [render_trainids(f.polygons) for f in frames]
    if not photo:
        return [decode_image(f.image) for f in frames], masks, [f.image for f in frames]
    images, pngs = [], []
    for i in range(count):
        images.append(photo_mosaic(height, width, seed=i, noise=noise))
        pngs.append(tmp / f"photo{i}.png")
        Image.fromarray(images[-1]).save(pngs[-1])  # PIL's default PNG level, like most tools
    return images, masks, pngs


def photo_mosaic(height: int, width: int, seed: int, noise: float) -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = np.asarray(Image.open(f).convert("RGB"))
    tile = np.concatenate([photo, photo[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    mosaic = np.tile(tile, reps)[:height, :width].astype(np.int16)
    grain = np.random.default_rng(seed).normal(0, noise, mosaic.shape).round().astype(np.int16)
    return np.clip(mosaic + grain, 0, 255).astype(np.uint8)


# -- timing --------------------------------------------------------------------
class Timer:
    """CPU time (all threads of this process) of each `with` block; medians and means, ms."""

    def __init__(self):
        self.cpu = []

    def __enter__(self):
        self._start = time.process_time()

    def __exit__(self, *exc):
        self.cpu.append(time.process_time() - self._start)

    def summary(self, name: str) -> dict:
        return {f"{name}_cpu_ms": 1e3 * float(np.median(self.cpu)),
                f"{name}_cpu_mean_ms": 1e3 * float(np.mean(self.cpu))}


def time_decode(pngs, timer: Timer) -> None:
    from dataprep.build import decode_image

    for path in pngs:
        with timer:
            decode_image(path)


def write_cache(path: Path, storage: Storage, images, masks, timers: dict) -> None:
    height, width = masks[0].shape
    frames = tuple(f"city/city_{i:06d}_000019" for i in range(len(images)))
    writer = CacheWriter(path)
    writer.prepare_split(SplitPlan("train", frames, height, width, True), storage)
    rows = RowWriter(path, "train")
    for row, (image, mask) in enumerate(zip(images, masks)):
        with timers["write"]:
            written = rows.write(row, image, mask)
        with timers["check"]:
            rows.check(row, written)
        writer.record_row("train", row, (0, 0))
    writer.finish_split("train")


def time_reads(path: Path, windows: list, frames: int, timers: dict) -> None:
    reader = CacheReader(path)
    for p in windows:
        with timers["window"]:
            reader.read_window("train", p.row, p.y, p.x, p.h, p.w)
    for row in range(frames):
        with timers["frame"]:
            reader.read_frame("train", row)


# -- bytes on disk ----------------------------------------------------------------
def stored_tile_bytes(array_dir: Path) -> dict[tuple[int, int, int], int]:
    """(row, tile y, tile x) -> stored bytes of that tile (its file, or its part of the shard)."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    file_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    codec = meta["codecs"][0]
    sizes = {}
    for path in (p for p in (array_dir / "c").rglob("*") if p.is_file()):
        key = tuple(int(part) for part in path.relative_to(array_dir / "c").parts)[:3]
        if codec["name"] != "sharding_indexed":
            sizes[key] = path.stat().st_size
            continue
        tile_shape = codec["configuration"]["chunk_shape"]
        per_file = [f // t for f, t in zip(file_shape, tile_shape)]
        entries = int(np.prod(per_file))
        with open(path, "rb") as f:  # index at the end: (offset, nbytes) per tile, then a crc32c
            f.seek(-(entries * 16 + 4), os.SEEK_END)
            index = np.frombuffer(f.read(entries * 16), dtype="<u8").reshape(per_file + [2])
        for ty in range(per_file[1]):
            for tx in range(per_file[2]):
                sizes[(key[0], key[1] * per_file[1] + ty, key[2] * per_file[2] + tx)] = \
                    int(index[(0, ty, tx) + (0,) * (len(per_file) - 3)][1])
    return sizes


def window_bytes(windows: list, tile: int, sizes: dict) -> float:
    """Mean stored bytes of the tiles the windows touch."""
    total = 0
    for p in windows:
        total += sum(sizes.get((p.row, ty, tx), 0) for ty in range(p.y // tile, (p.y + p.h - 1) // tile + 1)
                     for tx in range(p.x // tile, (p.x + p.w - 1) // tile + 1))
    return total / len(windows)


def disk_use(path: Path, windows: list, tile: int) -> dict:
    def size(sub):
        return sum(p.stat().st_size for p in (path / "train" / sub).rglob("*") if p.is_file())
    touched = sum(window_bytes(windows, tile, stored_tile_bytes(path / "train" / sub))
                  for sub in ("images", "masks"))
    return {"images": size("images"), "masks": size("masks"), "window_bytes": touched,
            "files": sum(1 for s in ("images", "masks") for p in (path / "train" / s / "c").rglob("*")
                         if p.is_file())}


# -- the study --------------------------------------------------------------------
def config_name(cfg: Storage) -> str:
    return f"{cfg.tile}_{cfg.codec}_{cfg.mask_codec}_{'shard' if cfg.shard else 'noshard'}"


def bench(args) -> dict:
    from dataprep.build import reuse_frame_buffers

    configure_worker_threads()
    reuse_frame_buffers()  # set up as a build worker is (loader processes are not; reads barely notice)
    tmp = Path(tempfile.mkdtemp(prefix="bench_tiles_"))
    try:
        images, masks, pngs = test_frames(tmp, args.frames, args.height, args.width, args.photo,
                                          args.photo_noise)
        height, width = masks[0].shape
        configs = [Storage(t, c, s, m) for t, s, c, m in product(args.tiles, args.shard, args.codecs,
                                                                  args.mask_codecs)]
        timers = {cfg: {k: Timer() for k in ("write", "check", "window", "frame")} for cfg in configs}
        decode_timer, sizes = Timer(), {}
        aug = AugmentConfig()
        for round_ in range(args.rounds):
            windows = [draw_train_sample(round_, i, i % args.frames, (height, width), aug)
                       for i in range(args.samples)]
            time_decode(pngs, decode_timer)
            for cfg in configs:
                path = tmp / f"cache_{config_name(cfg)}"
                write_cache(path, cfg, images, masks, timers[cfg])
                time_reads(path, windows, args.frames, timers[cfg])
                sizes[cfg] = disk_use(path, windows, cfg.tile)
                shutil.rmtree(path)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        png_per_frame = float(np.mean([p.stat().st_size for p in pngs]))
        decode = decode_timer.summary("png_decode")
        results = []
        for cfg in configs:
            row = {"tile": cfg.tile, "codec": cfg.codec, "mask_codec": cfg.mask_codec, "shard": cfg.shard}
            for name, timer in timers[cfg].items():
                row.update(timer.summary(name))
            row["write_and_check_over_png_decode"] = \
                (row["write_cpu_ms"] + row["check_cpu_ms"]) / decode["png_decode_cpu_ms"]
            row["image_bytes_per_frame"] = sizes[cfg]["images"] / args.frames
            row["mask_bytes_per_frame"] = sizes[cfg]["masks"] / args.frames
            row["files_per_frame"] = sizes[cfg]["files"] / args.frames
            row["window_stored_bytes"] = sizes[cfg]["window_bytes"]
            row["image_bytes_vs_png"] = row["image_bytes_per_frame"] / png_per_frame
            results.append(row)
        return {"frames": args.frames, "height": height, "width": width, "photo": args.photo,
                "photo_noise": args.photo_noise if args.photo else None, "rounds": args.rounds,
                "samples_per_round": args.samples, "png_bytes_per_frame": png_per_frame, **decode,
                "uncompressed_bytes_per_frame": images[0].nbytes + masks[0].nbytes, "results": results}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


HEADER = (f"{'tile':>4} {'shard':>5} {'image':>6} {'mask':>6} | {'write':>6} {'check':>6} {'w+c/dec':>7} | "
          f"{'window':>6} {'win MB':>6} {'frame':>6} | {'img MB':>6} {'vs PNG':>6} {'mask KB':>7} {'files':>5}")


def format_row(r: dict) -> str:
    return (f"{r['tile']:>4} {'yes' if r['shard'] else 'no':>5} {r['codec']:>6} {r['mask_codec']:>6} | "
            f"{r['write_cpu_ms']:6.1f} {r['check_cpu_ms']:6.1f} {r['write_and_check_over_png_decode']:7.2f} | "
            f"{r['window_cpu_ms']:6.2f} {r['window_stored_bytes'] / 1e6:6.2f} {r['frame_cpu_ms']:6.1f} | "
            f"{r['image_bytes_per_frame'] / 1e6:6.2f} {r['image_bytes_vs_png']:6.2f} "
            f"{r['mask_bytes_per_frame'] / 1e3:7.1f} {r['files_per_frame']:5.0f}")


def print_report(report: dict) -> None:
    kind = f"photo mosaic (noise {report['photo_noise']})" if report["photo"] else "synthetic"
    print(f"{report['frames']} {kind} frames {report['width']}x{report['height']}, {report['rounds']} rounds; "
          f"PNG {report['png_bytes_per_frame'] / 1e6:.2f} MB/frame, decode {report['png_decode_cpu_ms']:.1f} ms CPU")
    print("CPU ms per call (medians): write, check = the build's per-frame storage work; w+c/dec = "
          "(write + check) / PNG decode;\nwindow = image + mask training window, win MB = stored bytes of "
          "the tiles it touches; frame = whole image + mask")
    print(HEADER)
    for row in report["results"]:
        print(format_row(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--tiles", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--codecs", nargs="+", default=["none", "lz4", "zstd-1"], help="image codecs")
    parser.add_argument("--mask-codecs", nargs="+", default=["zstd-1"])
    parser.add_argument("--shard", nargs="+", type=lambda v: v == "yes", default=[False, True],
                        help="yes/no: one shard file per row and array, or one file per tile")
    parser.add_argument("--samples", type=int, default=60, help="random training windows per config and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photo", action="store_true", help="photo mosaic images instead of synthetic paint")
    parser.add_argument("--photo-noise", type=float, default=0.2, help="grain of the photo mosaic (grey levels)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    report = bench(args)
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
