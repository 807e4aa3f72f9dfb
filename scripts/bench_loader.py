"""Loader throughput: the PNG baseline against the torch and DALI kinds, in one run.

    python scripts/bench_loader.py --root RAW --cache CACHE --res 640 --batch-size 8 \\
        --kinds png,torch,dali [--seconds 20] [--workers W] --json bench/loader.json

Every kind reads the same frames (the PNG baseline the raw tree, the others the cache built
from it) with the same AugmentConfig (square crop of --res, scale 0.5-2.0, flip, colour
jitter). Each (kind, device) runs in its own subprocess, so CPU and memory figures belong to
that kind alone: after a warm-up it counts images/s over --seconds, the CPU time of the
process and all its descendants (loader workers) from /proc, as a percentage of one core,
and the peak of the summed RSS (and PSS, which counts pages shared between forked workers
once) of that process tree. The DALI kind runs in DALI's CPU-only mode, and on the GPU too
when CUDA is available; so does the torch kind. Device "host" measures the host side of
each cache kind alone, as it would feed a GPU (loaders/host_side.py): the torch kind's
workers delivering uint8 batches, DALI's source workers delivering windows. Each row also
counts the process tree's minor page faults per image and, on a GPU, the GPU memory the
loader added (cudaMemGetInfo before building it and after the measurement).

Without --root/--cache it writes a synthetic tree (`dataprep synth`) and builds its train
split (`dataprep build`) under --work, once.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.errors import UserError  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RSS_SAMPLE_SECONDS = 1.0  # reading smaps_rollup costs CPU too: at 0.25 s ~4% of a host row


# -- process-tree accounting from /proc -----------------------------------------------------
def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants (threads are counted within their process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_and_faults(pids: list[int]) -> tuple[float, int]:
    """(utime + stime in seconds, minor page faults) of these processes, all threads."""
    ticks = faults = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            faults += int(fields[7])  # minflt
        except (OSError, IndexError, ValueError):
            continue
    return ticks / CLOCK_TICKS, faults


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    return cpu_and_faults(pids)[0]


def memory_mb(pids: list[int]) -> tuple[float, float]:
    """(summed RSS, summed PSS) of these processes, in MiB."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


# -- one measurement (runs in a child process) ----------------------------------------------
def make_batches(args, kind: str, device: str):
    """(endless batch iterator, workers) of one kind on one device ("host": the host side
    alone, loaders/host_side.py)."""
    from loaders import AugmentConfig
    from loaders.factory import build_loader
    from loaders.contract import endless

    aug = AugmentConfig.square(args.res)
    if device == "host":
        from loaders import host_side

        make = {"torch": host_side.torch_host_batches, "dali": host_side.dali_host_batches}
        workers = host_side.default_host_workers(kind) if args.workers is None else args.workers
        return make[kind](args.cache, args.split, batch_size=args.batch_size, aug=aug, seed=0,
                          num_workers=workers), workers
    if kind == "png":
        from loaders.png_baseline import build_png_loader

        # repeat: one pass spans many epochs of the few bench frames, as in a real epoch
        loader = build_png_loader(args.root, args.split, batch_size=args.batch_size, aug=aug,
                                  seed=0, num_workers=args.workers, repeat=50)
    else:
        loader = build_loader(args.cache, args.split, kind, train=True,
                              batch_size=args.batch_size, aug=aug, device=device, seed=0,
                              num_workers=args.workers)
    return endless(loader), getattr(loader, "num_workers", args.workers)


def gpu_used_bytes() -> int | None:
    """Device-wide GPU memory in use (cudaMemGetInfo), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


def measure(args, kind: str, device: str) -> dict:
    import torch

    from loaders.host_side import images_in

    cuda = device == "cuda"
    gpu_before = gpu_used_bytes() if cuda else None
    started = time.perf_counter()
    batches, workers = make_batches(args, kind, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warm_until = time.perf_counter() + args.warmup
    warm_batches = 0
    while warm_batches < 3 or time.perf_counter() < warm_until:
        next(batches)
        warm_batches += 1
    sync()
    startup = time.perf_counter() - started
    me = os.getpid()
    pids = process_tree(me)
    (cpu0, faults0), t0 = cpu_and_faults(pids), time.perf_counter()
    main0 = cpu_seconds([me])
    peak_rss, peak_pss = memory_mb(pids)
    images, last_sample = 0, t0
    while time.perf_counter() - t0 < args.seconds:
        images += images_in(next(batches))
        if time.perf_counter() - last_sample > RSS_SAMPLE_SECONDS:
            rss, pss = memory_mb(process_tree(me))
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            last_sample = time.perf_counter()
    sync()
    elapsed = time.perf_counter() - t0
    pids = process_tree(me)
    cpu1, faults1 = cpu_and_faults(pids)  # exited processes' faults are lost: few here
    main1 = cpu_seconds([me])
    rss, pss = memory_mb(pids)
    gpu_after = gpu_used_bytes() if cuda else None
    return {
        "kind": kind, "device": device,
        "images_per_second": images / elapsed,
        "cpu_percent": 100.0 * (cpu1 - cpu0) / elapsed,
        # of which the consuming process itself (the rest: the loader's worker processes)
        "main_cpu_percent": 100.0 * (main1 - main0) / elapsed,
        # robust to other load on the machine: what one core-second of CPU buys
        "images_per_cpu_second": images / max(cpu1 - cpu0, 1e-9),
        "minor_faults_per_image": (faults1 - faults0) / max(images, 1),
        "peak_rss_mb": max(peak_rss, rss), "peak_pss_mb": max(peak_pss, pss),
        # what the loader added on the GPU, pools and batches in flight included
        "gpu_memory_mb": None if gpu_before is None else (gpu_after - gpu_before) / 2**20,
        "images": images, "seconds": elapsed, "startup_seconds": startup,
        "processes": len(pids), "workers": workers,
        "batch_size": args.batch_size,
        "res": args.res, "cores": len(os.sched_getaffinity(0)),
    }


# -- the parent: data, subprocesses, table ---------------------------------------------------
def run_dataprep(*argv: str) -> None:
    command = [sys.executable, "-c", "from dataprep.cli import main; main()", *argv]
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode != 0:
        raise UserError(f"`dataprep {' '.join(argv)}` failed (exit status {done.returncode})")


def ensure_data(args) -> None:
    """Fill in --root/--cache: given ones are used as they are, missing ones are built once."""
    work = Path(args.work)
    if args.root is None:
        args.root = work / "raw"
        if not (args.root / "leftImg8bit").is_dir():
            run_dataprep("synth", "--out", str(args.root), "--frames", str(args.frames))
    if args.cache is None:
        args.cache = work / "cache"
        if not (args.cache / "zarr.json").is_file():
            run_dataprep("build", "--root", str(args.root), "--out", str(args.cache),
                         "--splits", args.split)


KINDS = ("png", "torch", "dali")


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"--kinds: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    if not kinds:
        raise UserError("--kinds: name at least one of " + ", ".join(KINDS))
    return kinds


DEVICES = ("cpu", "host", "cuda")


def parse_devices(text: str, cuda: bool) -> list[str]:
    """--devices: cpu (the whole loader on the CPU), host (the host side alone, as it feeds a
    GPU), cuda (the whole loader with a GPU; dropped where there is none)."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for device in devices:
        if device not in DEVICES:
            raise UserError(f"--devices: unknown device {device!r}; choose from "
                            + ", ".join(DEVICES))
    if not devices:
        raise UserError("--devices: name at least one of " + ", ".join(DEVICES))
    return [d for d in devices if cuda or d != "cuda"]


def plan(kinds: list[str], devices: list[str]) -> list[tuple[str, str]]:
    """(kind, device) runs, kind by kind: the PNG baseline runs on the CPU only."""
    return [(kind, device) for kind in kinds for device in devices
            if kind != "png" or device == "cpu"]


def run_child(args, kind: str, device: str) -> dict:
    command = [sys.executable, __file__, "--measure", kind, "--device", device,
               "--root", str(args.root), "--cache", str(args.cache), "--split", args.split,
               "--res", str(args.res), "--batch-size", str(args.batch_size),
               "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not rows:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"kind": kind, "device": device, "images_per_second": None, "cpu_percent": None,
                "peak_rss_mb": None, "error": tail}
    return json.loads(rows[-1])


def show(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    base = next((r["images_per_second"] for r in rows
                 if r["kind"] == "png" and r["images_per_second"]), None)
    table = Table(title="loader throughput (train batches, after warm-up)")
    base_cpu = next((r["images_per_cpu_second"] for r in rows
                     if r["kind"] == "png" and r["images_per_second"]), None)
    columns = ("kind", "device", "img/s", "xPNG", "CPU%", "img/CPU-s", "xPNG(CPU)",
               "faults/img", "RSS MB", "PSS MB", "GPU MB", "workers")
    for name in columns:
        table.add_column(name, justify="left" if name in ("kind", "device") else "right")
    for r in rows:
        if r["images_per_second"] is None:
            table.add_row(r["kind"], r["device"], "failed", *[""] * (len(columns) - 4),
                          r.get("error", ""))
            continue
        speedup = f"{r['images_per_second'] / base:.1f}" if base else "-"
        cpu_speedup = f"{r['images_per_cpu_second'] / base_cpu:.1f}" if base_cpu else "-"
        gpu = r.get("gpu_memory_mb")
        table.add_row(r["kind"], r["device"], f"{r['images_per_second']:.1f}", speedup,
                      f"{r['cpu_percent']:.0f}", f"{r['images_per_cpu_second']:.1f}",
                      cpu_speedup, f"{r['minor_faults_per_image']:.0f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['peak_pss_mb']:.0f}",
                      "-" if gpu is None else f"{gpu:.0f}", str(r["workers"]))
    Console(width=max(Console().width, 110)).print(table)
    print("img/CPU-s: images per second of CPU time of the loader's process tree; on a shared "
          "machine it is the steadier comparison. host: the host side alone, batches as they "
          "are handed to the GPU (loaders/host_side.py).")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="raw tree (default: synthesised under --work)")
    parser.add_argument("--cache", type=Path, help="cache (default: built under --work)")
    parser.add_argument("--work", default="bench/loader", help="where missing data is made")
    parser.add_argument("--frames", type=int, default=16, help="synthetic frames, when made")
    parser.add_argument("--split", default="train")
    parser.add_argument("--res", type=int, default=640, help="square crop size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kinds", default="png,torch,dali")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per kind")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds (>= 3 batches)")
    parser.add_argument("--devices", default="cpu,host,cuda",
                        help="cpu, host (host side alone), cuda (where available)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers (default: each kind's own default)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    try:
        if args.measure:
            print("ROW " + json.dumps(measure(args, args.measure, args.device)), flush=True)
            return
        kinds = parse_kinds(args.kinds)
        import torch

        runs = plan(kinds, parse_devices(args.devices, torch.cuda.is_available()))
        ensure_data(args)
        rows = []
        for kind, device in runs:
            print(f"measuring {kind} on {device} ...", file=sys.stderr, flush=True)
            rows.append(run_child(args, kind, device))
        show(rows)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
