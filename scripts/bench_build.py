"""How fast is `dataprep build`, against the two things it replaces or cannot beat?

On one raw tree (synthetic with photo-like images, `dataprep synth --photo`: ~2.3 MB PNGs at
2048x1024 like the real ones; made here in a temp dir unless --root is given), in one run:
  (a) cityscapesscripts' own conversion: json2labelImg(json, png, "trainIds") for every
      polygon file, in a process pool of --workers (what createTrainIdLabelImgs does, but on
      all cores); also its drawing alone (createLabelImage, no PNG encode) for fairness;
  (a') our rasteriser, dataprep.rasterize.render_trainids, the same way;
  (b) the floor: a fresh Python process that decodes every image PNG with PIL in a fork
      process pool of --workers (the cheapest way to merely decode them all with PIL);
  (b') the same with the fastest decoder of (e), libspng through pyspng (the build's own);
  (c) `dataprep build` itself, as a user runs it: a fresh `python -m dataprep.cli build`
      process, once per --storage option.
(b) and (c) run in fresh processes, interleaved for --rounds rounds (medians reported), each
also once more on one frame per split (`--limit 1`): the difference is the cost per frame
without the fixed costs (interpreter, imports, pool start), which a real build of thousands
of frames amortises. Time is wall time and the CPU time of the process and its children
(getrusage), which other jobs on a shared machine disturb far less than wall time.
(d) the per-frame CPU breakdown of the build's steps, run one after the other in a fresh process
    (once per round; medians reported).
(e) PNG decoders on the tree's images, in this process, CPU ms per frame (medians) and whether
    the pixels equal PIL's: PIL, pyspng (libspng), OpenCV, imagecodecs (each where installed).
Targets: (a)/(a') >= 2 per core; (c)/(b) <= 1.0 (issue 8), also reported against (b').

    python scripts/bench_build.py --frames 24 --json bench/build.json [--workers 2] \\
        [--storage 512,none,zstd-1,shard --storage 512,zstd-1,zstd-1,noshard]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def decode_pil(image_path):
    import numpy as np
    from PIL import Image

    with Image.open(image_path) as image:
        image.load()
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def decode_pyspng(image_path):
    import pyspng

    with open(image_path, "rb") as f:
        return pyspng.load(f.read(), format="RGB")


def decode_opencv(image_path):
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    with open(image_path, "rb") as f:
        bgr = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_imagecodecs(image_path):
    import imagecodecs

    with open(image_path, "rb") as f:
        return imagecodecs.png_decode(f.read())


DECODERS = {"pil": decode_pil, "pyspng": decode_pyspng, "opencv": decode_opencv,
            "imagecodecs": decode_imagecodecs}
FLOORS = ("pil", "pyspng")  # (b) and (b')


def decode_task(task) -> float:
    decoder, image_path = task
    start = time.process_time()
    DECODERS[decoder](image_path)
    return time.process_time() - start


def decode_floor_main(decoder: str, paths: list[str], workers: int) -> None:
    """(b)/(b'), run as its own process: decode every PNG in a fork pool, print in-task CPU ms/frame."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        task_cpu = list(pool.map(decode_task, [(decoder, p) for p in paths], chunksize=1))
    print(json.dumps({"task_cpu_ms_per_frame": 1e3 * sum(task_cpu) / len(paths)}))


def compare_decoders(paths: list, rounds: int) -> dict:
    """(e): CPU ms per frame of each installed decoder (median over frames and rounds) and
    whether every frame's pixels equal PIL's."""
    import numpy as np

    reference = {p: decode_pil(p) for p in paths}
    out = {}
    for name, decode in DECODERS.items():
        try:
            decode(paths[0])
        except ImportError:
            out[name] = {"installed": False}
            continue
        times, same = [], True
        for _ in range(rounds):
            for path in paths:
                start = time.process_time()
                pixels = decode(path)
                times.append(1e3 * (time.process_time() - start))
                same = same and pixels.shape == reference[path].shape and np.array_equal(pixels, reference[path])
        out[name] = {"installed": True, "cpu_ms_per_frame": float(np.median(times)), "same_pixels_as_pil": same}
    return out


# -- measuring -----------------------------------------------------------------
def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def children_cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def timed_process(command: list[str]) -> tuple[dict, str]:
    """Wall and CPU (the process and every child it waited for) of one fresh process."""
    wall, cpu = time.perf_counter(), children_cpu_seconds()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    result = {"wall_s": time.perf_counter() - wall, "cpu_s": children_cpu_seconds() - cpu}
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return result, done.stdout


def timed_decode_floor(decoder: str, paths: list[str], workers: int) -> dict:
    command = [sys.executable, __file__, "--decode-floor", decoder, str(workers), *paths]
    result, stdout = timed_process(command)
    result.update(json.loads(stdout.strip().splitlines()[-1]))
    return result


def timed_build(root: Path, out: Path, workers: int, storage, limit: int | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "dataprep.cli", "build", "--root", str(root), "--out", str(out),
               "--workers", str(workers), *storage_options(storage)]
    if limit is not None:
        command += ["--limit", str(limit)]
    return timed_process(command)[0]


def timed_pool(func, items, workers: int) -> dict:
    """Wall time (pool start included), total CPU, and the in-task CPU per item."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    wall, cpu = time.perf_counter(), cpu_seconds()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        task_cpu = list(pool.map(func, items, chunksize=1))
    return {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu,
            "task_cpu_ms_per_frame": 1e3 * sum(task_cpu) / len(items)}


# -- storage options -------------------------------------------------------------
def parse_storage(text: str):
    """"TILE,CODEC,MASK_CODEC,shard|noshard" -> Storage."""
    from cache.writer import Storage

    tile, codec, mask_codec, shard = text.split(",")
    if shard not in ("shard", "noshard"):
        raise argparse.ArgumentTypeError(f"{text}: the last field is shard or noshard")
    return Storage(int(tile), codec, shard == "shard", mask_codec)


def storage_name(storage) -> str:
    return f"{storage.tile},{storage.codec},{storage.mask_codec},{'shard' if storage.shard else 'noshard'}"


def storage_options(storage) -> list[str]:
    return ["--tile", str(storage.tile), "--codec", storage.codec, "--mask-codec", storage.mask_codec,
            "--shard" if storage.shard else "--no-shard"]


# -- (d) the build's steps one by one ----------------------------------------------
def breakdown(frames, storage, tmp: Path) -> dict:
    """CPU ms per frame of each step of the build, in this process (set up as a build worker:
    zarr and blosc on one thread, glibc reusing frame buffers): the parent's probe and
    bookkeeping (batched: its share per row), the worker's decode, render, crc32c, tile
    writes and read-back check."""
    from cache.writer import CacheWriter, RowWriter, SplitPlan, configure_worker_threads, row_checksums
    from dataprep.build import decode_image, probe_frame, reuse_frame_buffers
    from dataprep.rasterize import render_trainids

    configure_worker_threads()
    reuse_frame_buffers()  # as dataprep.build's workers do
    steps = {name: [] for name in ("probe", "decode", "render", "crc32c", "write", "check", "record")}

    def timed(name, func, *args):
        start = time.process_time()
        value = func(*args)
        steps[name].append(1e3 * (time.process_time() - start))
        return value

    out = tmp / "breakdown"
    shutil.rmtree(out, ignore_errors=True)
    height, width = timed("probe", probe_frame, frames[0])[0]
    for frame in frames[1:]:
        timed("probe", probe_frame, frame)
    writer = CacheWriter(out)
    writer.prepare_split(SplitPlan("train", tuple(f"c/c_{i:06d}_000019" for i in range(len(frames))),
                                   height, width, True), storage)
    rows = RowWriter(out, "train")
    for row, frame in enumerate(frames):
        image = timed("decode", decode_image, frame.image)
        mask = timed("render", render_trainids, frame.polygons)
        checksums = timed("crc32c", row_checksums, image, mask)
        written = timed("write", rows.write, row, image, mask)
        timed("check", rows.check, row, written)
        timed("record", writer.record_row, "train", row, checksums)
    timed("record", writer.flush, "train")
    result = {name: statistics.median(values) for name, values in steps.items()}
    result["record"] = sum(steps["record"]) / len(frames)  # batched: the flushes' share per row
    result["total"] = sum(result.values())
    result["total_over_decode"] = result["total"] / result["decode"]
    shutil.rmtree(out, ignore_errors=True)
    return result


def breakdown_in_fresh_process(root: Path, frames: int, storage, tmp: Path) -> dict:
    """(d) in a new process, which starts as fresh as a build worker does."""
    command = [sys.executable, __file__, "--breakdown", str(root), str(frames), storage_name(storage), str(tmp)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def breakdown_main(root: str, frames: str, storage: str, tmp: str) -> None:
    from dataprep.discover import discover

    labelled = [f for split in discover(Path(root)).values() for f in split if f.polygons is not None]
    print(json.dumps(breakdown(labelled[: int(frames)], parse_storage(storage), Path(tmp))))


# -- the benchmark -----------------------------------------------------------------
def median_of(rounds: list[dict]) -> dict:
    out = {key: float(statistics.median(r[key] for r in rounds)) for key in rounds[0]}
    out["rounds"] = rounds
    return out


def tree_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def per_frame(full: dict, one: dict, frames: int, one_frames: int) -> dict:
    """Cost per frame beyond the fixed costs: (full run - run on a frame per split) / frames."""
    return {key: (full[key] - one[key]) / (frames - one_frames) for key in ("wall_s", "cpu_s")}


def bench(args, tmp: Path) -> dict:
    from cache.writer import Storage
    from dataprep.build import default_workers
    from dataprep.discover import discover

    root = args.root
    if root is None:
        root = tmp / "raw"
        from dataprep.synth import write_synthetic_tree
        write_synthetic_tree(root, args.frames, height=args.height, width=args.width, seed=args.seed,
                             photo=not args.painted, workers=args.workers or default_workers())
    found = discover(root)
    frames = [f for split in found.values() for f in split]
    first_frames = [split[0] for split in found.values()]  # what `--limit 1` builds
    labelled = [f for f in frames if f.polygons is not None]
    workers = args.workers or default_workers()
    storages = args.storage or [Storage()]
    names = [storage_name(s) for s in storages]
    results = {"frames": len(frames), "labelled_frames": len(labelled), "workers": workers,
               "rounds": args.rounds, "storages": names}
    # (b) and (c) alternate, so that a busy spell of a shared machine hits them all; all read
    # the PNGs from the page cache.
    runs = {**{f"decode {d}": [] for d in FLOORS}, **{f"decode {d} one": [] for d in FLOORS},
            **{n: [] for n in names}, **{n + " one": [] for n in names}, **{n + " steps": [] for n in names}}
    for round_ in range(args.rounds):
        for decoder in FLOORS:
            runs[f"decode {decoder}"].append(timed_decode_floor(decoder, [str(f.image) for f in frames], workers))
        for storage, name in zip(storages, names):
            runs[name].append(timed_build(root, tmp / "cache", workers, storage))
        for decoder in FLOORS:
            runs[f"decode {decoder} one"].append(
                timed_decode_floor(decoder, [str(f.image) for f in first_frames], workers))
        for storage, name in zip(storages, names):
            runs[name + " one"].append(timed_build(root, tmp / "cache_one", workers, storage, limit=1))
            runs[name + " steps"].append(breakdown_in_fresh_process(root, args.breakdown_frames, storage, tmp))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    floors = {}
    for decoder in FLOORS:
        whole, one = median_of(runs[f"decode {decoder}"]), median_of(runs[f"decode {decoder} one"])
        floors[decoder] = {"decode": whole, "decode_one": one,
                           "per_frame": per_frame(whole, one, len(frames), len(first_frames))}
    results["floors"] = floors
    results["decode"], results["decode_per_frame"] = floors["pil"]["decode"], floors["pil"]["per_frame"]
    decode_frame = results["decode_per_frame"]
    fast = floors["pyspng"]
    images = tree_bytes(f.image for f in frames)
    results["builds"] = {}
    for storage, name in zip(storages, names):
        build, one = median_of(runs[name]), median_of(runs[name + " one"])
        build_frame = per_frame(build, one, len(frames), len(first_frames))
        timed_build(root, tmp / "cache", workers, storage)  # the cache whose bytes are counted
        cache = tmp / "cache"
        results["builds"][name] = {
            "build": build, "build_one": one, "build_per_frame": build_frame,
            "breakdown_ms_per_frame": median_of(runs[name + " steps"]),
            "bytes": {"cache_total": dir_bytes(cache),
                      "cache_images": sum(dir_bytes(cache / s / "images") for s in found),
                      "cache_masks": sum(dir_bytes(cache / s / "masks") for s in found
                                         if (cache / s / "masks").exists())},
            "ratios": {
                "build_wall_over_decode_wall": build["wall_s"] / results["decode"]["wall_s"],
                "build_cpu_over_decode_cpu": build["cpu_s"] / results["decode"]["cpu_s"],
                "per_frame_wall_over_decode": build_frame["wall_s"] / decode_frame["wall_s"],
                "per_frame_cpu_over_decode": build_frame["cpu_s"] / decode_frame["cpu_s"],
                "build_wall_over_pyspng_decode_wall": build["wall_s"] / fast["decode"]["wall_s"],
                "build_cpu_over_pyspng_decode_cpu": build["cpu_s"] / fast["decode"]["cpu_s"],
                "per_frame_cpu_over_pyspng_decode": build_frame["cpu_s"] / fast["per_frame"]["cpu_s"],
                "cache_over_image_pngs": dir_bytes(cache) / images,
            },
        }
    if not args.no_references:
        (tmp / "ref").mkdir()
        results["reference_json2labelimg"] = timed_pool(
            reference_json2labelimg, [(str(f.polygons), str(tmp / "ref" / f"{i}.png"))
                                      for i, f in enumerate(labelled)], workers)
        results["reference_draw_only"] = timed_pool(reference_draw_only, [str(f.polygons) for f in labelled],
                                                    workers)
        results["our_render"] = timed_pool(our_render, [str(f.polygons) for f in labelled], workers)
        ours = results["our_render"]["task_cpu_ms_per_frame"]
        results["mask_ratios"] = {
            "mask_speedup_per_core_vs_json2labelimg":
                results["reference_json2labelimg"]["task_cpu_ms_per_frame"] / ours,
            "mask_speedup_per_core_vs_reference_drawing_only":
                results["reference_draw_only"]["task_cpu_ms_per_frame"] / ours,
        }
    results["decoders"] = compare_decoders([str(f.image) for f in frames[: args.breakdown_frames]],
                                           args.rounds)
    results["bytes"] = {"raw_image_pngs": images, "mean_image_png": images / len(frames),
                        "raw_polygon_jsons": tree_bytes(f.polygons for f in labelled)}
    return results


def print_summary(r: dict) -> None:
    n = r["frames"]
    print(f"{n} frames ({r['labelled_frames']} labelled), {r['workers']} workers; fresh processes, "
          f"medians of {r['rounds']} rounds; 'per frame' = (N frames - 1 per split) / frames")
    print(f"  image PNGs: {r['bytes']['mean_image_png'] / 1e6:.2f} MB per frame")
    for decoder, floor in r["floors"].items():
        d, df = floor["decode"], floor["per_frame"]
        print(f"  {'decode floor ' + decoder:<32} wall {d['wall_s']:5.2f} s  cpu {d['cpu_s']:5.2f} s  "
              f"per frame: wall {1e3 * df['wall_s']:5.1f} ms  cpu {1e3 * df['cpu_s']:5.1f} ms  "
              f"(in-task {d['task_cpu_ms_per_frame']:.1f} ms)")
    for name, b in r["builds"].items():
        bb, bf, ratio = b["build"], b["build_per_frame"], b["ratios"]
        print(f"  build {name:<26} wall {bb['wall_s']:5.2f} s  cpu {bb['cpu_s']:5.2f} s  "
              f"per frame: wall {1e3 * bf['wall_s']:5.1f} ms  cpu {1e3 * bf['cpu_s']:5.1f} ms")
        print(f"  {'':<32} vs floor: wall {ratio['build_wall_over_decode_wall']:.2f}x  cpu "
              f"{ratio['build_cpu_over_decode_cpu']:.2f}x  per frame: wall {ratio['per_frame_wall_over_decode']:.2f}x"
              f"  cpu {ratio['per_frame_cpu_over_decode']:.2f}x   cache/PNGs {ratio['cache_over_image_pngs']:.2f}")
        print(f"  {'':<32} vs pyspng floor: wall {ratio['build_wall_over_pyspng_decode_wall']:.2f}x  cpu "
              f"{ratio['build_cpu_over_pyspng_decode_cpu']:.2f}x  per frame cpu "
              f"{ratio['per_frame_cpu_over_pyspng_decode']:.2f}x")
        steps = b["breakdown_ms_per_frame"]
        print(f"  {'':<32} CPU ms/frame: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()
                                                       if k not in ("total_over_decode", "rounds"))
              + f" ({steps['total_over_decode']:.2f}x decode)")
    for key in ("reference_json2labelimg", "reference_draw_only", "our_render"):
        if key in r:
            v = r[key]
            print(f"  {key:<32} wall {v['wall_s']:5.2f} s  cpu {v['cpu_s']:5.2f} s  "
                  f"in-task {v['task_cpu_ms_per_frame']:5.1f} ms/frame")
    for key, value in r.get("mask_ratios", {}).items():
        print(f"  {key:<48} {value:6.2f}")
    for name, d in r["decoders"].items():
        print(f"  decoder {name:<24} " + (f"{d['cpu_ms_per_frame']:5.1f} ms/frame, same pixels as PIL: "
                                          f"{d['same_pixels_as_pil']}" if d["installed"] else "not installed"))


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--decode-floor":  # (b), (b'), in their own processes
        decode_floor_main(sys.argv[2], sys.argv[4:], int(sys.argv[3]))
        return
    if len(sys.argv) == 6 and sys.argv[1] == "--breakdown":  # (d), in its own process
        breakdown_main(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=24, help="synthetic frames (train + val)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--painted", action="store_true",
                        help="synthetic frames as painted (light PNGs at level 1) instead of photo-like")
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--root", type=Path, default=None, help="an existing raw tree instead of a synthetic one")
    parser.add_argument("--storage", type=parse_storage, action="append", default=None,
                        help="TILE,CODEC,MASK_CODEC,shard|noshard (repeat to compare; default: the defaults)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (b) and (c); medians are reported")
    parser.add_argument("--breakdown-frames", type=int, default=12, help="frames timed step by step in (d)")
    parser.add_argument("--no-references", action="store_true", help="skip (a) and (a')")
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
