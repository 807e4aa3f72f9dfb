"""Pick the cache's tile size and codec by measurement.

For every (tile, codec) pair this writes the same frames through the build's own writer
(cache.writer), then measures: write time per frame (encode + write, and the build's
read-back check), bytes on disk per frame against the source PNG, the read time of random
training windows (drawn by loaders.sampling.draw_train_sample with the default
AugmentConfig: 640 crop, scale 0.5-2.0, so 320..1280 px source windows) and of whole frames
(validation), both through cache.reader.CacheReader.

Frames: a synthetic tree from dataprep.synth (2048x1024 by default); `--photo` replaces the
images by a mosaic of a real photograph (matplotlib's sample grace_hopper.jpg, mirrored,
with mild sensor-like noise), whose compressibility is closer to real street photos than
the synthetic paint. All timings run in this one process with zarr and blosc limited to one
thread, as in a build or loader worker; files are read from the page cache, so read times
are decode times, not disk times.

    python scripts/bench_tiles.py --frames 6 --json bench/tiles.json [--photo]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.reader import CacheReader  # noqa: E402
from cache.writer import CacheWriter, RowWriter, SplitPlan, Storage, configure_worker_threads  # noqa: E402
from loaders.contract import AugmentConfig  # noqa: E402
from loaders.sampling import draw_train_sample  # noqa: E402


def synthetic_frames(tmp: Path, count: int, height: int, width: int, photo: bool):
    """(images, masks, png bytes per image) from a synthetic tree written under tmp."""
    from dataprep.discover import discover
    from dataprep.rasterize import render_trainids
    from dataprep.synth import write_synthetic_tree

    write_synthetic_tree(tmp / "raw", max(count, 4), height=height, width=width, seed=1)
    frames = [f for split in discover(tmp / "raw").values() for f in split][:count]
    masks = [render_trainids(f.polygons) for f in frames]
    if photo:
        images = [photo_mosaic(height, width, seed=i) for i in range(count)]
        png_bytes = []
        for i, image in enumerate(images):
            path = tmp / f"photo{i}.png"
            Image.fromarray(image).save(path)  # PIL's default PNG level, like most tools
            png_bytes.append(path.stat().st_size)
    else:
        images = [np.asarray(Image.open(f.image).convert("RGB")) for f in frames]
        png_bytes = [f.image.stat().st_size for f in frames]
    return images, masks, png_bytes


def photo_mosaic(height: int, width: int, seed: int) -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = np.asarray(Image.open(f).convert("RGB"))
    tile = np.concatenate([photo, photo[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    mosaic = np.tile(tile, reps)[:height, :width].astype(np.int16)
    noise = np.random.default_rng(seed).normal(0, 2.0, mosaic.shape).round().astype(np.int16)
    return np.clip(mosaic + noise, 0, 255).astype(np.uint8)


def write_cache(path: Path, storage: Storage, images, masks, timers: dict) -> None:
    height, width = masks[0].shape
    frames = tuple(f"city/city_{i:06d}_000019" for i in range(len(images)))
    writer = CacheWriter(path)
    writer.prepare_split(SplitPlan("train", frames, height, width, True), storage)
    rows = RowWriter(path, "train")
    images_arr, masks_arr = rows._open()
    for row, (image, mask) in enumerate(zip(images, masks)):
        with timers["write"]:
            images_arr[row] = image
            masks_arr[row] = mask
        with timers["write_and_check"]:
            rows.write_row(row, image, mask)  # the build's write + read back + crc compare
        writer.record_row("train", row, (0, 0))
    writer.finish_split("train")


def disk_bytes(path: Path) -> dict:
    def size(sub):
        return sum(p.stat().st_size for p in (path / "train" / sub).rglob("*") if p.is_file())
    return {"images": size("images"), "masks": size("masks"),
            "files": sum(1 for s in ("images", "masks") for p in (path / "train" / s).rglob("*") if p.is_file())}


class Timer:
    """Wall and CPU time (all threads of this process) of each `with` block.

    The machine is shared: CPU time is what a call costs this process, and is far less
    disturbed by other jobs than wall time; both are reported (medians and means, ms)."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def __enter__(self):
        self._start = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc):
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])

    def summary(self, name: str) -> dict:
        return {f"{name}_ms": 1e3 * float(np.median(self.wall)),
                f"{name}_cpu_ms": 1e3 * float(np.median(self.cpu)),
                f"{name}_cpu_mean_ms": 1e3 * float(np.mean(self.cpu))}


def time_reads(path: Path, samples: int, frames: int, timers: dict, pixels: list) -> None:
    reader = CacheReader(path)
    info = reader.split("train")
    aug = AugmentConfig()
    for i in range(samples):
        p = draw_train_sample(0, len(pixels), i % frames, (info.height, info.width), aug)
        with timers["window"]:
            reader.read_window("train", p.row, p.y, p.x, p.h, p.w)
        pixels.append(p.h * p.w)
    for row in range(frames):
        with timers["frame"]:
            reader.read_frame("train", row)


def bench(args) -> dict:
    configure_worker_threads()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tiles_"))
    try:
        images, masks, png_bytes = synthetic_frames(tmp, args.frames, args.height, args.width, args.photo)
        configs = [Storage(t, c, s) for t in args.tiles for c in args.codecs for s in args.shard]
        timers = {cfg: {k: Timer() for k in ("write", "write_and_check", "window", "frame")} for cfg in configs}
        pixels, sizes = {cfg: [] for cfg in configs}, {}
        # rounds interleave the configs, so that a busy spell of the machine hits them all
        for round_ in range(args.rounds):
            for cfg in configs:
                path = tmp / f"cache_{cfg.tile}_{cfg.codec}_{cfg.shard}"
                write_cache(path, cfg, images, masks, timers[cfg])
                time_reads(path, args.samples, args.frames, timers[cfg], pixels[cfg])
                sizes[cfg] = disk_bytes(path)
                shutil.rmtree(path)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        png_per_frame = float(np.mean(png_bytes))
        results = []
        for cfg in configs:
            row = {"tile": cfg.tile, "codec": cfg.codec, "shard": cfg.shard}
            for name, timer in timers[cfg].items():
                row.update(timer.summary(name))
            row["window_mean_px"] = float(np.mean(pixels[cfg]))
            row["image_bytes_per_frame"] = sizes[cfg]["images"] / args.frames
            row["mask_bytes_per_frame"] = sizes[cfg]["masks"] / args.frames
            row["files_per_frame"] = sizes[cfg]["files"] / args.frames
            row["image_bytes_vs_png"] = row["image_bytes_per_frame"] / png_per_frame
            results.append(row)
        return {"frames": args.frames, "height": args.height, "width": args.width, "photo": args.photo,
                "rounds": args.rounds, "png_bytes_per_frame": png_per_frame,
                "uncompressed_bytes_per_frame": images[0].nbytes + masks[0].nbytes,
                "samples_per_round": args.samples, "results": results}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


HEADER = ("CPU ms per call (wall ms in brackets)\n"
          f"{'tile':>5} {'codec':>7} {'shard':>5} {'write':>13} {'write+check':>13} {'window':>13} "
          f"{'frame':>13} {'img MB':>7} {'vs PNG':>7} {'mask KB':>8} {'files':>6}")


def _ms(r: dict, name: str) -> str:
    return f"{r[name + '_cpu_ms']:.1f} ({r[name + '_ms']:.1f})".rjust(13)


def format_row(r: dict) -> str:
    return (f"{r['tile']:>5} {r['codec']:>7} {'yes' if r['shard'] else 'no':>5} {_ms(r, 'write')} {_ms(r, 'write_and_check')} "
            f"{_ms(r, 'window')} {_ms(r, 'frame')} {r['image_bytes_per_frame'] / 1e6:>7.2f} "
            f"{r['image_bytes_vs_png']:>7.2f} {r['mask_bytes_per_frame'] / 1e3:>8.1f} "
            f"{r['files_per_frame']:>6.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--tiles", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--codecs", nargs="+", default=["none", "lz4", "zstd-1", "zstd-3"])
    parser.add_argument("--shard", nargs="+", type=lambda v: v == "yes", default=[False, True],
                        help="yes/no: one shard file per row and array, or one file per tile")
    parser.add_argument("--samples", type=int, default=40, help="random training windows per config and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photo", action="store_true", help="photo mosaic images instead of synthetic paint")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    report = bench(args)
    print(HEADER)
    for row in report["results"]:
        print(format_row(row))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
