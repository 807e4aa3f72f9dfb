"""Figures at Cityscapes' real size: synth, build and one training epoch per loader kind.

    python scripts/bench_scale.py --work bench/scale --json bench/scale.json            # 2975 + 500
    python scripts/bench_scale.py --work bench/scale --frames 300 --json bench/scale300.json

On a tree of Cityscapes' size (by default 2975 train + 500 val frames at 2048x1024 with
photo-like images, `dataprep synth --photo`; `--frames N` for N frames in all, a quarter of
them val; `--root` takes an existing tree), in one run:
  synth   `dataprep synth` in a fresh process: wall, CPU, frames/s;
  build   `dataprep build` for every --storage option (default: the defaults; e.g. lz4, zstd-1,
          scale0.5), each in a fresh process: wall, CPU, frames/s, the peak RSS of the parent and
          the peak PSS of the whole process tree (sampled from /proc every 0.25 s), cache bytes against the PNGs;
  epoch   one epoch of the train split per loader kind (640x640 crops, batch 8, the default
          augmentation), each in a fresh process, in three conditions:
            (a) page cache: the cache's files were just read (warm);
            (b) cold: the cache's files evicted first (posix_fadvise DONTNEED on every file);
            (c) cold, under a memory limit smaller than the cache (a cgroup: v2 or v1's memory
                controller; skipped with the reason where this OS or user cannot make one);
          images/s (whole epoch, loader start included, and from the first batch on), CPU
          seconds per image, peak PSS (shared pages once), MB read from the disk per image (the process's own
          /proc/self/io read_bytes once its workers were reaped), and the disk throughput that
          pace needs; what a SATA SSD (--ssd-mbps, 500 MB/s) would sustain for the cold cases.
Conditions (a)-(c) run for the first --storage option; the others get (a) only (their CPU per
sample and disk footprint). Times are wall clock and CPU of process trees; a shared machine
disturbs the former more.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- process trees -----------------------------------------------------------------------
from bench_loader import process_tree  # noqa: E402  (root pid and its descendants, from /proc)


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of a process's RSS (VmHWM): no peak between samples is lost."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: pages shared between forked workers counted once in a sum."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class PeakRss:
    """Samples the RSS of a process, the PSS of its whole tree and the CPU time of every process
    in it (workers of a forkserver are not the command's children: rusage misses them) until
    stopped; keeps the peaks and the last CPU time seen per process."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every = pid, every
        self.parent = self.tree = 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.parent = max(self.parent, peak_rss_bytes(self.pid))
            tree = process_tree(self.pid)
            self.tree = max(self.tree, sum(pss_bytes(p) for p in tree))
            self.cpu.update({p: max(self.cpu.get(p, 0.0), cpu_seconds(p)) for p in tree})
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_parent_mb": self.parent / 2**20, "peak_pss_tree_mb": self.tree / 2**20,
                "sampled_cpu_s": sum(self.cpu.values())}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(command: list[str], *, preexec=None) -> dict:
    """Wall, CPU (of the process and the children it waited for), peak RSS and stdout."""
    cpu, wall = children_cpu(), time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec)
    peaks = PeakRss(proc.pid)
    stdout, stderr = proc.communicate()
    result = {"wall_s": time.perf_counter() - wall, "cpu_s": children_cpu() - cpu, **peaks.stop(),
              "returncode": proc.returncode}
    result["cpu_s"] = max(result["cpu_s"], result.pop("sampled_cpu_s"))  # see PeakRss
    if proc.returncode != 0:
        result["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
    result["stdout"] = stdout
    return result


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


# -- page cache and memory limits -----------------------------------------------------------
def evict(path: Path) -> int:
    """Drop the page-cache pages of every file under `path` (written back first); returns bytes."""
    total = 0
    for file in Path(path).rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def warm(path: Path) -> None:
    for file in Path(path).rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


class MemoryLimit:
    """A child cgroup with a memory limit that a command joins before it runs (cgroup v2, else
    v1's memory controller). `MemoryLimit.make` returns (limit, None) or (None, why not)."""

    def __init__(self, directory: Path, limit_file: str):
        self.directory, self.limit_file = directory, limit_file

    @classmethod
    def make(cls, limit_bytes: int) -> tuple["MemoryLimit | None", str | None]:
        try:
            with open("/proc/self/cgroup") as f:
                lines = [line.strip().split(":", 2) for line in f if line.strip()]
        except OSError as exc:
            return None, f"no /proc/self/cgroup ({exc})"
        own = {controllers: path for _, controllers, path in lines}
        candidates = []
        if "" in own and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            candidates.append((Path("/sys/fs/cgroup") / own[""].lstrip("/"), "memory.max"))
        for controllers, path in own.items():
            if "memory" in controllers.split(","):
                candidates.append((Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"))
        problems = []
        for parent, limit_file in candidates:
            child = parent / f"bench-scale-{os.getpid()}"
            try:
                child.mkdir()
                (child / limit_file).write_text(str(limit_bytes))
                return cls(child, limit_file), None
            except OSError as exc:
                problems.append(f"{child}: {exc.strerror or exc}")
                try:
                    child.rmdir()
                except OSError:
                    pass
        return None, "; ".join(problems) or "no cgroup v2 and no v1 memory controller mounted"

    def join(self) -> None:  # runs in the child, before exec
        (self.directory / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mb(self) -> float | None:
        """The group's peak memory use (page cache included), to show the limit bound."""
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                return int((self.directory / name).read_text()) / 2**20
            except (OSError, ValueError):
                continue
        return None

    def remove(self) -> None:
        try:
            self.directory.rmdir()
        except OSError:
            pass


# -- one epoch (runs in its own process) ------------------------------------------------------
def epoch_main(cache: str, kind: str, res: int, batch_size: int, workers: str) -> None:
    import gc

    from loaders import AugmentConfig

    from loaders.factory import build_loader

    start = time.perf_counter()
    loader = build_loader(cache, "train", kind, train=True, batch_size=batch_size, device="cpu",
                          aug=AugmentConfig(crop=(res, res)), num_workers=None if workers == "auto" else int(workers))
    loader.set_epoch(0)
    images, first = 0, None
    for batch in loader:
        images += int(batch.image.shape[0])
        if first is None:
            first, first_images = time.perf_counter(), images
    end = time.perf_counter()
    if hasattr(loader, "close"):
        loader.close()
    del loader, batch
    gc.collect()  # reaps the workers, whose reads then count in this process's /proc/self/io
    with open("/proc/self/io") as f:
        io = dict(line.split(": ") for line in f.read().splitlines())
    print(json.dumps({"images": images, "epoch_s": end - start,
                      "steady_images_per_s": (images - first_images) / max(end - first, 1e-9),
                      "read_bytes": int(io["read_bytes"])}))


def epoch(cache: Path, kind: str, args, limit: MemoryLimit | None = None) -> dict:
    command = [sys.executable, __file__, "--epoch", str(cache), kind, str(args.res), str(args.batch_size),
               str(args.loader_workers)]
    run = run_timed(command, preexec=limit.join if limit else None)
    if "error" in run:
        return {"error": run["error"], **{k: run[k] for k in ("wall_s", "returncode")}}
    out = json.loads(run["stdout"].strip().splitlines()[-1])
    mb_per_image = out["read_bytes"] / 2**20 / out["images"]
    steady = out["steady_images_per_s"]
    result = {"images": out["images"], "images_per_s": out["images"] / out["epoch_s"],
              "steady_images_per_s": steady, "process_wall_s": run["wall_s"],
              "cpu_ms_per_image": 1e3 * run["cpu_s"] / out["images"], "peak_pss_tree_mb": run["peak_pss_tree_mb"],
              "mb_read_per_image": mb_per_image, "disk_mb_per_s_needed": mb_per_image * steady,
              "ssd_images_per_s": (args.ssd_mbps / mb_per_image) if mb_per_image > 0.01 else None}
    if limit is not None:
        result["cgroup_peak_mb"] = limit.peak_mb()
    return result


# -- the benchmark ------------------------------------------------------------------------
STORAGES = {  # name -> dataprep build options
    "raw": [], "lz4": ["--codec", "lz4"], "zstd-1": ["--codec", "zstd-1"], "scale0.5": ["--scale", "0.5"],
}


def synth(args, raw: Path) -> dict:
    if (raw / "leftImg8bit").is_dir():
        return {"reused": str(raw)}
    command = [sys.executable, "-m", "dataprep.cli", "synth", "--out", str(raw), "--frames", str(args.frames),
               "--height", str(args.height), "--width", str(args.width), "--photo"]
    run = run_timed(command + (["--workers", str(args.workers)] if args.workers else []))
    if "error" in run:
        raise SystemExit(f"synth failed: {run['error']}")
    run.pop("stdout")
    return {**run, "frames_per_s": args.frames / run["wall_s"]}


def build(args, raw: Path, out: Path, options: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "dataprep.cli", "build", "--root", str(raw), "--out", str(out),
               "--splits", "train,val", *options] + (["--workers", str(args.workers)] if args.workers else [])
    run = run_timed(command)
    if "error" in run:
        raise SystemExit(f"build {options} failed: {run['error']}")
    run.pop("stdout")
    frames = sum(len(json.loads((out / s / "zarr.json").read_text())["attributes"]["frames"])
                 for s in ("train", "val"))
    pngs = dir_bytes(raw / "leftImg8bit", "*.png")
    return {**run, "frames": frames, "frames_per_s": frames / run["wall_s"],
            "cpu_ms_per_frame": 1e3 * run["cpu_s"] / frames, "cache_bytes": dir_bytes(out),
            "image_png_bytes": pngs, "cache_over_image_pngs": dir_bytes(out) / pngs}


def conditions(args, cache: Path, kinds: list[str]) -> dict:
    cache_bytes = dir_bytes(cache / "train")
    out = {}
    for kind in kinds:
        warm(cache / "train")
        page = epoch(cache, kind, args)
        evict(cache)
        cold = epoch(cache, kind, args)
        row = {"page_cache": page, "cold": cold}
        anon = page.get("peak_pss_tree_mb", 0) * 2**20
        limit_bytes = int(anon * 1.1 + args.cache_fraction * cache_bytes)
        limit, why = MemoryLimit.make(limit_bytes)
        if limit is None:
            row["memory_limited"] = {"skipped": why}
        else:
            try:
                evict(cache)
                row["memory_limited"] = {"limit_mb": limit_bytes / 2**20, "train_cache_mb": cache_bytes / 2**20,
                                         **epoch(cache, kind, args, limit)}
            finally:
                limit.remove()
        out[kind] = row
        print(f"  {kind}: " + "  ".join(f"{c} {r['steady_images_per_s']:.1f} img/s {r['mb_read_per_image']:.2f} "
                                        "MB/img" for c, r in row.items() if "images_per_s" in r), flush=True)
    return out


def bench(args) -> dict:
    work = Path(args.work)
    raw = args.root or work / "raw"
    result = {"frames_requested": args.frames, "size": [args.height, args.width], "res": args.res,
              "batch_size": args.batch_size, "cpus": len(os.sched_getaffinity(0)),
              "memory_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30}
    result["synth"] = synth(args, Path(raw))
    print(f"synth: {result['synth']}", flush=True)
    result["builds"], result["epochs"] = {}, {}
    for i, name in enumerate(args.storage):
        cache = work / f"cache-{name}"
        result["builds"][name] = build(args, Path(raw), cache, STORAGES[name])
        b = result["builds"][name]
        print(f"build {name}: {b['wall_s']:.1f} s, {b['frames_per_s']:.1f} frames/s, peak RSS parent "
              f"{b['peak_rss_parent_mb']:.0f} MB, PSS tree {b['peak_pss_tree_mb']:.0f} MB, cache/PNG "
              f"{b['cache_over_image_pngs']:.2f}", flush=True)
        if i == 0:
            result["epochs"][name] = conditions(args, cache, args.kinds)
        else:
            warm(cache / "train")
            result["epochs"][name] = {kind: {"page_cache": epoch(cache, kind, args)} for kind in args.kinds}
            print(f"  page cache: " + "  ".join(f"{k} {r['page_cache'].get('steady_images_per_s', 0):.1f} img/s "
                                               f"{r['page_cache'].get('cpu_ms_per_image', 0):.0f} ms CPU/img"
                                               for k, r in result["epochs"][name].items()), flush=True)
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    if not args.keep and args.root is None:
        shutil.rmtree(raw, ignore_errors=True)
    return result


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "scale", help="where tree and caches go")
    parser.add_argument("--root", type=Path, default=None, help="an existing raw tree (not deleted)")
    parser.add_argument("--frames", type=int, default=3475, help="train + val frames (default: Cityscapes' 3475)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=None, help="synth and build processes (default: all cores)")
    parser.add_argument("--storage", default="raw", help=f"comma-separated, from {', '.join(STORAGES)}; "
                        "the first gets conditions (a)-(c)")
    parser.add_argument("--kinds", default="torch,dali", help="loader kinds")
    parser.add_argument("--res", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader-workers", default="auto", help="loader workers (default: the loader's own)")
    parser.add_argument("--cache-fraction", type=float, default=0.25,
                        help="(c): the memory limit is 1.1x the loader's PSS in (a) plus this share of the cache")
    parser.add_argument("--ssd-mbps", type=float, default=500.0, help="the SATA SSD of the estimate")
    parser.add_argument("--keep", action="store_true", help="keep the tree and caches under --work")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    args.storage = [s.strip() for s in args.storage.split(",") if s.strip()]
    unknown = [s for s in args.storage if s not in STORAGES]
    if unknown:
        parser.error(f"--storage: unknown {', '.join(unknown)}; choose from {', '.join(STORAGES)}")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    return args


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--epoch":
        epoch_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        return
    args = parse()
    result = bench(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
