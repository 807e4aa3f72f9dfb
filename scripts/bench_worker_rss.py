"""Memory of one spawned DALI source worker, with and without torch in its imports.

    python scripts/bench_worker_rss.py [--cache CACHE] [--workers 2] [--batches 8] \\
        --json bench/worker_rss.json

A GPU loader starts DALI's source workers with spawn (loaders/dali_loader.py): each is a
fresh interpreter that imports what the pickled `WindowSource` needs. Before issue 18 that
chain reached torch (loaders/contract.py imported it); now it stops at numpy, the cache
reader and zarr. Two measurements, each with and without torch:

- "imports": a spawned process that imports the worker's modules (and `import torch`, as the
  old chain did), then reports its own memory. A bare spawned interpreter is the floor.
- "dali_workers": real DALI workers (CPU-only pipeline, spawn, a small cache written here
  unless --cache is given) after --batches batches. The "with torch" run makes each worker
  import torch first, exactly as the old contract did: a spawned worker re-runs this
  script's top level as `__mp_main__`, which imports torch when BENCH_WORKER_IMPORT_TORCH=1.

Per process: RSS (VmRSS), PSS (shared pages divided among their users) and private memory
(Private_Clean + Private_Dirty, what the process alone costs) from /proc, in MiB. torch's
code pages are file-backed and shared among workers, so RSS overstates what N workers cost
together; the private figure (import-time heap: the op registry, Python objects) is paid by
every worker.

This file's top level must stay free of torch: spawned workers run it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if __name__ == "__mp_main__" and os.environ.get("BENCH_WORKER_IMPORT_TORCH") == "1":
    import torch  # noqa: F401  (the old import chain, in a spawned worker)

# What a spawned source worker imports to unpickle and run WindowSource.
WORKER_MODULES = ("loaders.dali_pipeline", "cache.reader", "numpy", "zarr")


def memory_mib(pid: int | str = "self") -> dict[str, float]:
    """rss, pss and private memory of a process, MiB, from /proc (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) / 1024
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    out["pss"] = fields.get("Pss", 0) / 1024
    out["private"] = (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024
    return {k: round(v, 1) for k, v in out.items()}


def _import_and_report(modules: tuple[str, ...], queue) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)
    queue.put({"torch_imported": "torch" in sys.modules, **memory_mib()})


def measure_imports(modules: tuple[str, ...]) -> dict:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_import_and_report, args=(modules, queue))
    proc.start()
    result = queue.get(timeout=300)
    proc.join()
    return result


def _spawned_children() -> list[int]:
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            continue
    return sorted(p for p in pids
                  if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes())


def _torch_mapped(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps or "/torch/_C" in maps


def measure_dali_workers(cache: Path, *, workers: int, batches: int, with_torch: bool) -> list:
    import torch

    from loaders.contract import AugmentConfig
    from loaders.dali_loader import DaliLoader

    os.environ["BENCH_WORKER_IMPORT_TORCH"] = "1" if with_torch else "0"
    before = set(_spawned_children())
    loader = DaliLoader(cache, "train", train=True, batch_size=4,
                        aug=AugmentConfig(crop=(512, 512)), device=torch.device("cpu"),
                        num_workers=workers, num_threads=1, py_start_method="spawn")
    try:
        for index, _ in enumerate(loader):
            if index + 1 >= batches:
                break
        return [{"pid": pid, "torch_imported": _torch_mapped(pid), **memory_mib(pid)}
                for pid in _spawned_children() if pid not in before]
    finally:
        loader.close()
        os.environ.pop("BENCH_WORKER_IMPORT_TORCH", None)


def main(argv=None) -> int:
    import argparse
    import json
    import platform
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="a cache with a train split "
                        "(default: a small synthetic one written to a temporary folder)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--skip-dali", action="store_true", help="only the import measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    report = {"machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
              "unit": "MiB", "imports": {}}
    for label, modules in (("bare interpreter", ()), ("worker modules", WORKER_MODULES),
                           ("worker modules + torch", WORKER_MODULES + ("torch",))):
        report["imports"][label] = measure_imports(modules)
        print(f"{label:>26}: {report['imports'][label]}", flush=True)
    imports = report["imports"]
    report["imports_torch_costs"] = {
        key: round(imports["worker modules + torch"][key] - imports["worker modules"][key], 1)
        for key in ("rss", "pss", "private")}

    if not args.skip_dali:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            print("DALI not installed: no real worker measurement")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                cache = args.cache
                if cache is None:
                    from tests.cachefab import blocky_cache
                    cache = blocky_cache(Path(tmp) / "cache.zarr", n_train=8, n_val=1,
                                         height=1024, width=2048, tile=256)
                dali = {}
                for label, with_torch in (("now", False), ("with torch (old chain)", True)):
                    dali[label] = measure_dali_workers(cache, workers=args.workers,
                                                       batches=args.batches, with_torch=with_torch)
                    print(f"{'dali workers, ' + label:>26}: {dali[label]}", flush=True)
            report["dali_workers"] = dali

            def mean(rows, key):
                return sum(r[key] for r in rows) / max(1, len(rows))
            report["dali_torch_costs_per_worker"] = {
                key: round(mean(dali["with torch (old chain)"], key) - mean(dali["now"], key), 1)
                for key in ("rss", "pss", "private")}
            report["dali_config"] = {"workers": args.workers, "batches": args.batches,
                                     "batch_size": 4, "crop": 512, "start_method": "spawn"}
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
