"""How fast is `dataprep build`, against the two things it replaces or cannot beat?

On one raw tree (synthetic, made here in a temp dir unless --root is given), in one run:
  (a) cityscapesscripts' own conversion: json2labelImg(json, png, "trainIds") for every
      polygon file, in a process pool of --workers (what createTrainIdLabelImgs does, but on
      all cores); also its drawing alone (createLabelImage, no PNG encode) for fairness;
  (a') our rasteriser, dataprep.rasterize.render_trainids, the same way;
  (b) the floor: decoding every image PNG with PIL in a process pool of --workers;
  (c) `dataprep build` itself (dataprep.build.build_cache), end to end.
Each pool is started fresh, as a user's run would (so (b) and (c) both pay a pool start);
(b) and (c) alternate for --rounds rounds and their medians are reported.
Per-frame CPU of (a), (a') and (b) is measured inside the workers (process_time); for (b)
and (c) also the total CPU of parent and children (getrusage), which other jobs on a shared
machine disturb far less than wall time. Targets: (a)/(a') >= 2 per core; (c)/(b) <= 1.3.

    python scripts/bench_build.py --frames 24 --json bench/build.json [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.writer import Storage  # noqa: E402
from dataprep.build import BuildOptions, build_cache, default_workers  # noqa: E402
from dataprep.discover import discover  # noqa: E402


# -- tasks (run in the pool workers; each returns its own CPU seconds) ---------------
def reference_json2labelimg(task) -> float:
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    json_path, png_path = task
    start = time.process_time()
    json2labelImg(json_path, png_path, "trainIds")
    return time.process_time() - start


def reference_draw_only(json_path) -> float:
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    start = time.process_time()
    annotation = Annotation()
    annotation.fromJsonFile(json_path)
    createLabelImage(annotation, "trainIds")
    return time.process_time() - start


def our_render(json_path) -> float:
    from dataprep.rasterize import render_trainids

    start = time.process_time()
    render_trainids(json_path)
    return time.process_time() - start


def decode_png(image_path) -> float:
    import numpy as np
    from PIL import Image

    start = time.process_time()
    with Image.open(image_path) as image:  # as dataprep.build.decode_image does
        image.load()
        np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    return time.process_time() - start


# -- measuring -----------------------------------------------------------------
def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_pool(func, items, workers: int) -> dict:
    """Wall time (pool start included), total CPU, and the in-task CPU per item."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        task_cpu = list(pool.map(func, items, chunksize=1))
    return {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu,
            "task_cpu_ms_per_frame": 1e3 * sum(task_cpu) / len(items)}


def timed_build(root: Path, out: Path, workers: int, storage: Storage) -> dict:
    wall, cpu = time.perf_counter(), cpu_seconds()
    report = build_cache(BuildOptions(root=root, out=out, workers=workers, storage=storage))
    assert report.exit_code == 0
    wall = time.perf_counter() - wall
    # The build's workers are children of multiprocessing's forkserver: their CPU reaches our
    # RUSAGE_CHILDREN only once the forkserver is stopped and reaped (a private helper; the
    # next build starts a fresh forkserver, so every round pays the same start-up).
    from multiprocessing import forkserver
    forkserver._forkserver._stop()
    return {"wall_s": wall, "cpu_s": cpu_seconds() - cpu}


def median_of(rounds: list[dict]) -> dict:
    out = {key: float(statistics.median(r[key] for r in rounds)) for key in rounds[0]}
    out["rounds"] = rounds
    return out


def tree_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(args, tmp: Path) -> dict:
    root = args.root
    if root is None:
        root = tmp / "raw"
        from dataprep.synth import write_synthetic_tree
        write_synthetic_tree(root, args.frames, height=args.height, width=args.width, seed=args.seed)
    frames = [f for split in discover(root).values() for f in split]
    labelled = [f for f in frames if f.polygons is not None]
    workers = args.workers or default_workers()
    (tmp / "ref").mkdir()
    results = {"frames": len(frames), "labelled_frames": len(labelled), "workers": workers,
               "tile": args.tile, "codec": args.codec, "shard": args.shard, "rounds": args.rounds}
    # (b) and (c) alternate for --rounds rounds (medians reported), so that a busy spell of a
    # shared machine hits both; both read the PNGs from the page cache.
    decode_rounds, build_rounds = [], []
    for round_ in range(args.rounds):
        decode_rounds.append(timed_pool(decode_png, [str(f.image) for f in frames], workers))
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        build_rounds.append(timed_build(root, tmp / "cache", workers, Storage(args.tile, args.codec, args.shard)))
    results["decode"] = median_of(decode_rounds)
    results["build"] = median_of(build_rounds)
    results["reference_json2labelimg"] = timed_pool(
        reference_json2labelimg, [(str(f.polygons), str(tmp / "ref" / f"{i}.png")) for i, f in enumerate(labelled)],
        workers)
    results["reference_draw_only"] = timed_pool(reference_draw_only, [str(f.polygons) for f in labelled], workers)
    results["our_render"] = timed_pool(our_render, [str(f.polygons) for f in labelled], workers)
    images = tree_bytes(f.image for f in frames)
    cache = tmp / "cache"
    results["bytes"] = {
        "raw_image_pngs": images,
        "raw_polygon_jsons": tree_bytes(f.polygons for f in labelled),
        "cache_total": dir_bytes(cache),
        "cache_images": sum(dir_bytes(cache / s / "images") for s in discover(root)),
        "cache_masks": sum(dir_bytes(cache / s / "masks") for s in discover(root) if (cache / s / "masks").exists()),
    }
    results["ratios"] = ratios(results)
    return results


def ratios(r: dict) -> dict:
    ours = r["our_render"]["task_cpu_ms_per_frame"]
    return {
        "mask_speedup_per_core_vs_json2labelimg": r["reference_json2labelimg"]["task_cpu_ms_per_frame"] / ours,
        "mask_speedup_per_core_vs_reference_drawing_only": r["reference_draw_only"]["task_cpu_ms_per_frame"] / ours,
        "build_wall_over_decode_wall": r["build"]["wall_s"] / r["decode"]["wall_s"],
        "build_cpu_over_decode_cpu": r["build"]["cpu_s"] / r["decode"]["cpu_s"],
        "cache_over_image_pngs": r["bytes"]["cache_total"] / r["bytes"]["raw_image_pngs"],
    }


def print_summary(r: dict) -> None:
    n = r["frames"]
    print(f"{n} frames ({r['labelled_frames']} labelled), {r['workers']} workers, tile {r['tile']}, "
          f"{r['codec']}{', sharded' if r['shard'] else ''}; (b) and (c): medians of {r['rounds']} rounds")
    for key in ("reference_json2labelimg", "reference_draw_only", "our_render", "decode"):
        v = r[key]
        print(f"  {key:<24} wall {v['wall_s']:6.2f} s  cpu {v['cpu_s']:6.2f} s  "
              f"in-task {v['task_cpu_ms_per_frame']:6.1f} ms/frame")
    b = r["build"]
    print(f"  {'dataprep build':<24} wall {b['wall_s']:6.2f} s  cpu {b['cpu_s']:6.2f} s  "
          f"({1e3 * b['cpu_s'] / n:.1f} ms cpu/frame)")
    for key, value in r["ratios"].items():
        print(f"  {key:<48} {value:6.2f}")
    mb = {k: v / 1e6 for k, v in r["bytes"].items()}
    print("  MB: " + ", ".join(f"{k} {v:.1f}" for k, v in mb.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=24, help="synthetic frames (train + val)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--root", type=Path, default=None, help="an existing raw tree instead of a synthetic one")
    parser.add_argument("--tile", type=int, default=Storage().tile)
    parser.add_argument("--codec", default=Storage().codec)
    parser.add_argument("--shard", action="store_true", default=Storage().shard)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (b) and (c); medians are reported")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        result = bench(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_summary(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
