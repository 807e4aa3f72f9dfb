"""One-shot check of the GPU path on a CUDA machine: one JSON and a short table, offline.

    python scripts/gpu_check.py [--json bench/gpu_check.json] [--budget 300] [--dry-run]

Parts, each in its own subprocess with its own time limit (a failure or a timeout is
recorded and the next part runs; the whole stays within --budget seconds):

  versions      device, driver, CUDA, torch, DALI and library versions (what is missing);
                the card's compute capability and the precision --amp auto picks on it
  data          a small synthetic tree and its cache (`dataprep synth`, `dataprep build`)
  tests         the `gpu`-marked and the `dali` (CPU-mode DALI) tests, with CUDA initialised
                first in the pytest process (CITYSCAPES_TEST_INIT_CUDA=1, tests/conftest.py)
  syncs         host-device synchronisations per training step, each loader kind
                (torch.cuda.set_sync_debug_mode("warn") over 20 steps of a small model)
  compare       DALI on the GPU against DALI on the CPU, same samples: images within 2 grey
                levels, masks >= 99.9% equal
  held          a batch held by the caller stays intact while the loader advances 4 batches
  reuse         a consumer that reads every batch late (each batch's reads queued behind a
                20 ms kernel on its stream) reads what the loader produced: each kind's
                batches against a reference run of the same seed read at once, zero
                mismatching batches; a control run of DALI's zero-copy hand-over (the old
                hazard) says whether the check can see a reuse at all
  bench_loader  scripts/bench_loader.py host and cuda rows, torch and dali, 640^2, batch 8
                (images/s, CPU %, GPU memory the loader added)
  bench_train   scripts/bench_train.py, DeepLabV3+ resnet50 (no weights), 640^2, batch 8,
                --amp auto (bf16 from compute capability 8.0, fp16 on 7.x): each loader's
                cost against replaying one batch (target < 5%)

The report (--json) is rewritten as each part finishes, and each part's outcome is also
written on its own next to it (gpu_check.<part>.json), so a run cut short keeps what it
measured; "complete" turns true at the end.

Without a CUDA device it runs `versions` only, says "no CUDA device" and exits with
status 2. Nothing is downloaded: the model has no pretrained weights, the data is synthetic.
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

NO_CUDA_STATUS = 2
RESULT = "RESULT "
# (part, seconds it may take at most); the sum (5 minutes) is the default --budget.
# A part may also use what the parts before it left unused, never what the later ones need.
PARTS = (("versions", 20), ("data", 30), ("tests", 75), ("syncs", 30), ("compare", 15),
         ("held", 15), ("reuse", 50), ("bench_loader", 30), ("bench_train", 35))
LIBRARIES = ("torch", "torchvision", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "zarr",
             "numcodecs", "numpy", "segmentation-models-pytorch", "timm", "cityscapesscripts",
             "click", "rich", "pyyaml", "pytest")
RES, BATCH = 640, 8
SYNC_STEPS = 20
REUSE_BATCHES, REUSE_DELAY_MS = 120, 20.0  # per run on a GPU: 2.4 s of delays per run


# -- the parts (each runs in a child: `gpu_check.py --part NAME`) ------------------------------
def part_versions(args) -> dict:
    from importlib import metadata

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    out = {"python": sys.version.split()[0], "libraries": found,
           "missing": [n for n, v in found.items() if v is None
                       and not n.startswith("nvidia-dali")]}
    if not (found["nvidia-dali-cuda130"] or found["nvidia-dali-cuda120"]):
        out["missing"].append("nvidia-dali-cuda130 (or -cuda120)")
    out.update(nvidia_smi())
    try:
        import torch
    except ImportError:
        return {**out, "cuda_available": False}
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), cuda_available=torch.cuda.is_available())
    if out["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        out.update(device_count=torch.cuda.device_count(), device=props.name,
                   capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported(), precision=precision_info("cuda:0"))
    return out


def precision_info(device: str) -> dict:
    """What --amp auto computes in on `device` and why (training.core.device.describe_precision:
    name, capability, native_bf16, amp, loss_scaling, reason); never raises."""
    import torch

    try:
        from training.core.device import describe_precision
    except ImportError:  # an older training.core.device: the plain answer
        describe_precision = None
    try:
        if describe_precision is not None:
            return describe_precision(device, "auto")
        from training.core.device import resolve_amp

        device = torch.device(device)
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": str(device), "name": torch.cuda.get_device_name(device),
                "capability": f"sm_{major}{minor}", "amp": resolve_amp("auto", device)}
    except Exception as exc:  # the probe still reports the rest
        return {"device": device, "error": f"{type(exc).__name__}: {exc}"}


def nvidia_smi() -> dict:
    """Driver version and CUDA version the driver supports, from nvidia-smi (if present)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20)
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia_smi": f"not run: {exc}"}
    first = (done.stdout.strip().splitlines() or [""])[0]
    name, _, driver = first.rpartition(", ")
    cuda = None
    for word_line in header.stdout.splitlines():
        if "CUDA Version" in word_line:
            cuda = word_line.split("CUDA Version:")[1].split()[0]
    return {"gpu_name": name or None, "driver": driver or None, "driver_cuda": cuda}


def part_data(args) -> dict:
    work = Path(args.work)
    raw, cache = work / "raw", work / "cache"
    if not (raw / "leftImg8bit").is_dir():
        dataprep("synth", "--out", str(raw), "--frames", "24")
    if not (cache / "zarr.json").is_file():
        dataprep("build", "--root", str(raw), "--out", str(cache), "--splits", "train")
    return {"raw": str(raw), "cache": str(cache)}


def dataprep(*argv: str) -> None:
    command = [sys.executable, "-c", "from dataprep.cli import main; main()", *argv]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"dataprep {argv[0]} failed: {tail}")


def part_tests(args, seconds: float) -> dict:
    report = Path(args.work) / "tests.xml"
    env = dict(os.environ, CITYSCAPES_TEST_INIT_CUDA="1")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu or dali", "-p", "no:cacheprovider",
               f"--junitxml={report}", "tests"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=max(10, seconds - 5))
    counts = junit_counts(report)
    return {**counts, "exit_status": done.returncode,
            "summary": (done.stdout.strip().splitlines() or [""])[-1]}


def junit_counts(report: Path) -> dict:
    """passed/failed/skipped counts and the failing test ids from a JUnit XML report."""
    import xml.etree.ElementTree as ET

    failed, skipped, total = [], 0, 0
    for case in ET.parse(report).iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            skipped += 1
    return {"passed": total - len(failed) - skipped, "failed": len(failed), "skipped": skipped,
            "failures": failed[:20]}


def small_training(cache: str, kind: str, *, device: str, res: int, arch="unet",
                   encoder="resnet18"):
    """(TimedTraining, loader) of the product's own training step on `kind` batches."""
    from cache.reader import CacheReader
    from training.throughput import TimedTraining
    from training.train.builders import build_split_loader
    from training.train.config import resolve_config
    from training.core.device import single_process

    config = resolve_config({"cache": cache, "res": str(res), "batch_size": BATCH,
                             "arch": arch, "encoder": encoder, "encoder_weights": "none",
                             "device": device, "amp": "auto", "out": "unused"})
    env = single_process(config.device)
    loader = build_split_loader(config, env, train=True, kind=kind)
    return TimedTraining(config, loader, CacheReader(cache), env), loader


def part_syncs(args) -> dict:
    """Synchronisations per training step (loader + forward + backward + step), per kind.
    On the CPU (--device cpu, a rehearsal of the plumbing) the steps run uncounted."""
    import warnings

    import torch

    from training.core.engine import train_step

    cuda = args.device == "cuda"
    out = {}
    for kind in ("torch", "dali"):
        try:
            timed, _ = small_training(args.cache, kind, device=args.device, res=args.small_res)
            timed.images_per_s(3)  # warm-up: lazy inits may sync once
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(SYNC_STEPS):
                        train_step(timed.parts, timed.batches, 1)
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
            where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
            out[kind] = {"syncs_per_step": len(syncs) / SYNC_STEPS if cuda else None,
                         "where": where[:10], "steps": SYNC_STEPS}
        except Exception as exc:  # the other kind still runs
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def part_compare(args) -> dict:
    """The DALI graph on the GPU and on the CPU, same seed and samples."""
    import torch

    from loaders import AugmentConfig

    from loaders.factory import build_loader
    from loaders.contract import STD

    aug = AugmentConfig.square(RES)
    batches = {}
    for device in (args.device, "cpu"):
        loader = build_loader(args.cache, "train", "dali", train=True, batch_size=BATCH,
                              aug=aug, device=device, seed=11, num_workers=2)
        batches[device] = [(b.image.float().cpu(), b.mask.cpu(), b.rows.cpu())
                           for _, b in zip(range(2), loader)]
        del loader
    std = torch.tensor(STD).view(1, 3, 1, 1)
    worst, equal, total = 0.0, 0, 0
    for (gi, gm, gr), (ci, cm, cr) in zip(batches[args.device], batches["cpu"]):
        if not torch.equal(gr, cr):
            raise RuntimeError("the GPU and CPU pipelines drew different rows")
        worst = max(worst, float(((gi - ci).abs() * std).max()))
        equal += int((gm == cm).sum())
        total += gm.numel()
    share = equal / total
    return {"image_max_grey_levels": worst, "mask_equal_share": share,
            "ok": worst <= 2.0 and share >= 0.999}


def part_held(args) -> dict:
    """A batch the training loop still holds must not change while the loader runs on."""
    import torch

    from loaders import AugmentConfig

    from loaders.factory import build_loader
    from loaders.contract import endless

    out = {}
    for kind in ("torch", "dali"):
        try:
            loader = build_loader(args.cache, "train", kind, train=True, batch_size=BATCH,
                                  aug=AugmentConfig.square(RES), device=args.device, seed=3,
                                  num_workers=2)
            stream = endless(loader)
            held = next(stream)
            copy = (held.image.clone(), held.mask.clone())
            for _ in range(4):
                next(stream)
            if args.device == "cuda":
                torch.cuda.synchronize()
            intact = torch.equal(held.image, copy[0]) and torch.equal(held.mask, copy[1])
            out[kind] = {"intact": intact}
        except Exception as exc:
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def part_reuse(args) -> dict:
    """Batches the caller has let go of, on the host, while its GPU work on them is still
    queued: the loader must not give their memory to a later batch before that work has run.

    The consumer queues a long kernel (torch.cuda._sleep) on its stream before it asks for
    each batch, so that everything it and the loader queue for that batch (the loader's own
    copies included) runs only after the delay, and drops the batch at once. A loader that
    lets the memory be reused in the meantime shows as a batch whose fingerprint differs
    from the same batch in a reference run (same seed, each batch read to the end before it
    is dropped). On the CPU (--device cpu) the runs rehearse the plumbing without delays."""
    cuda = args.device == "cuda"
    batches = args.reuse_batches or (REUSE_BATCHES if cuda else 3)
    delay = sleep_cycles(REUSE_DELAY_MS) if cuda else 0
    out = {"batches": batches, "delay_ms": REUSE_DELAY_MS if cuda else 0.0}
    runs = [("torch", "torch", False), ("dali", "dali", False)]
    if cuda:  # DALI's buffers handed over as they are: the hazard the check must be able to see
        runs.append(("dali_zero_copy_control", "dali", True))
    ok = True
    for name, kind, zero_copy in runs:
        try:
            reference, ref_rows = late_fingerprints(args, kind, batches, delay=0)
            late, late_rows = late_fingerprints(args, kind, batches, delay=delay,
                                                zero_copy=zero_copy)
            if ref_rows != late_rows:
                raise RuntimeError("the two runs drew different rows: the seed does not fix "
                                   "the order")
            image_diff = (late[:, :, :3] - reference[:, :, :3]).abs().amax(dim=(1, 2, 3, 4))
            mask_diff = (late[:, :, 3] - reference[:, :, 3]).abs().amax(dim=(1, 2, 3))
            # a reused buffer holds another crop: block means move by far more than a grey level
            bad = (image_diff > 0.05) | (mask_diff > 2.0)
            out[name] = {"mismatched_batches": int(bad.sum()),
                         "image_max_diff": round(float(image_diff.max()), 4),
                         "mask_max_diff": round(float(mask_diff.max()), 4)}
            if not zero_copy:
                ok = ok and not bool(bad.any())
        except Exception as exc:  # the other kinds still run
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            ok = ok and zero_copy
    if cuda:
        out["copy_us_8x3x640x640"] = copy_microseconds()  # what the DALI kind's copy costs
    control = out.get("dali_zero_copy_control", {})
    if "mismatched_batches" in control:
        out["control_detected"] = control["mismatched_batches"] > 0
    out["ok"] = ok
    return out


def late_fingerprints(args, kind: str, batches: int, *, delay: int, zero_copy: bool = False):
    """(fingerprints (batches, B, 4, 8, 8) on the host, rows per batch) of `batches` batches
    of a train loader of `kind`, each read behind a `delay`-cycle kernel (0: read at once and
    waited for before the batch goes)."""
    import torch

    from loaders import AugmentConfig

    from loaders.factory import build_loader
    from loaders.contract import endless

    cuda = args.device == "cuda"
    loader = build_loader(args.cache, "train", kind, train=True, batch_size=BATCH,
                          aug=AugmentConfig.square(args.small_res), device=args.device, seed=5,
                          num_workers=2)
    if zero_copy:
        loader._unsafe_zero_copy = True
    stream = endless(loader)
    prints, rows = [], []
    try:
        for _ in range(batches):
            if delay:
                torch.cuda._sleep(delay)  # what is queued from here on runs after it
            batch = next(stream)
            prints.append(fingerprint(batch))
            rows.append(batch.rows.tolist())
            del batch  # gone on the host; its reads may still be queued
            if cuda and not delay:
                torch.cuda.synchronize()
        return torch.stack(prints).cpu(), rows
    finally:
        stream.close()
        del stream, loader


def fingerprint(batch):
    """(B, 4, 8, 8) float: 8x8 block means of the three image channels and of the mask."""
    import torch
    import torch.nn.functional as F

    image = F.adaptive_avg_pool2d(batch.image.float(), 8)
    mask = F.adaptive_avg_pool2d(batch.mask[:, None].float(), 8)
    return torch.cat([image, mask], dim=1)


def copy_microseconds() -> float:
    """Device time of one clone of a float (8, 3, 640, 640) batch: the copy the DALI kind
    makes of each image on a GPU."""
    import torch

    image = torch.randn(BATCH, 3, RES, RES, device="cuda")
    for _ in range(3):
        image.clone()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        image.clone()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / 20 * 1000, 1)


def sleep_cycles(milliseconds: float) -> int:
    """torch.cuda._sleep cycles that keep this GPU's stream busy for about `milliseconds`."""
    import torch

    probe = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * milliseconds / max(start.elapsed_time(end), 1e-3))


def part_bench_loader(args, seconds: float) -> dict:
    out = Path(args.work) / "bench_loader.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_loader.py"), "--root", args.raw,
               "--cache", args.cache, "--kinds", "torch,dali", "--devices", "host,cuda",
               "--res", str(RES), "--batch-size", str(BATCH), "--seconds", "4",
               "--warmup", "1", "--json", str(out)]
    run_script(command, seconds)
    return {"rows": json.loads(out.read_text())}


def part_bench_train(args, seconds: float) -> dict:
    out = Path(args.work) / "bench_train.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--cache", args.cache,
               "--res", str(RES), "--batch-size", str(BATCH), "--arch", "deeplabv3plus",
               "--encoder", "resnet50", "--amp", "auto", "--loaders", "replay,torch,dali",
               "--iters", "20", "--warmup", "4", "--json", str(out)]
    run_script(command, seconds)
    report = json.loads(out.read_text())
    costs = {k: r["loader_cost"] for k, r in report["results"].items()}
    precision = report.get("precision") or {}
    return {"loader_cost": costs, "amp": report.get("amp", precision.get("amp")),
            "capability": precision.get("capability"), "precision": precision,
            "report": report,
            "ok": all(c is not None and c < 0.05 for k, c in costs.items() if k != "replay")}


def run_script(command: list[str], seconds: float) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=max(10, seconds - 5))
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{Path(command[1]).name} exited {done.returncode}: {tail}")


PART_FUNCTIONS = {"versions": part_versions, "data": part_data, "tests": part_tests,
                  "syncs": part_syncs, "compare": part_compare, "held": part_held,
                  "reuse": part_reuse, "bench_loader": part_bench_loader,
                  "bench_train": part_bench_train}
TAKES_SECONDS = {"tests", "bench_loader", "bench_train"}
NEEDS_DATA = {"syncs", "compare", "held", "reuse", "bench_loader", "bench_train"}


def run_part_here(args) -> None:
    """Child side: run one part, print its result as one RESULT line."""
    function = PART_FUNCTIONS[args.part]
    result = function(args, args.seconds) if args.part in TAKES_SECONDS else function(args)
    print(RESULT + json.dumps(result), flush=True)


# -- the parent: schedule, record, report ---------------------------------------------------
def run_part(args, name: str, seconds: float) -> dict:
    """Run one part in a child with a time limit; never raises."""
    command = [sys.executable, __file__, "--part", name, "--work", str(args.work),
               "--seconds", str(int(seconds))]
    if name in NEEDS_DATA:
        if not args.data:
            return {"ok": False, "seconds": 0, "error": "no data: the data part failed"}
        command += ["--raw", args.data["raw"], "--cache", args.data["cache"]]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": seconds, "error": f"timed out after {seconds:.0f} s"}
    elapsed = round(time.perf_counter() - started, 1)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "seconds": elapsed, "error": tail}
    result = json.loads(lines[-1][len(RESULT):])
    return {"ok": bool(result.get("ok", True)), "seconds": elapsed, "result": result}


def schedule(budget: float) -> list[tuple[str, float]]:
    """(part, seconds) within the budget: parts keep their share, scaled down if needed."""
    wanted = sum(seconds for _, seconds in PARTS)
    scale = min(1.0, budget / wanted)
    return [(name, seconds * scale) for name, seconds in PARTS]


def check(args) -> int:
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "budget_s": args.budget, "complete": False, "parts": {}}
    deadline = time.perf_counter() + args.budget
    args.data = None
    plan = schedule(args.budget)
    for index, (name, _) in enumerate(plan):
        # its share, plus whatever the earlier parts left unused; the later parts keep theirs
        seconds = deadline - time.perf_counter() - sum(s for _, s in plan[index + 1:])
        if seconds < 5:
            report["parts"][name] = {"ok": False, "seconds": 0, "error": "no time left"}
            continue
        print(f"{name} (up to {seconds:.0f} s) ...", file=sys.stderr, flush=True)
        report["parts"][name] = outcome = run_part(args, name, seconds)
        if name == "versions":
            probe = outcome.get("result", {})
            report.update(capability=probe.get("capability"), precision=probe.get("precision"))
        # on disk as soon as the part is done: a run cut short keeps what it measured
        write_part(args, name, outcome)
        write(args, report)
        if name == "versions" and not outcome.get("result", {}).get("cuda_available"):
            report["no_cuda"] = True
            break
        if name == "data":
            args.data = outcome.get("result")
    report["complete"] = True
    write(args, report)
    show(report)
    if report.get("no_cuda"):
        print("error: no CUDA device: only the version probe ran "
              f"(see {args.json}); run this on a machine with a GPU", file=sys.stderr)
        return NO_CUDA_STATUS
    return 0


def write(args, report: dict) -> None:
    write_json(Path(args.json), report)


def write_part(args, name: str, outcome: dict) -> None:
    """One part's outcome on its own, next to the report: <report stem>.<part>.json."""
    path = Path(args.json)
    write_json(path.with_name(f"{path.stem}.{name}.json"), {"part": name, **outcome})


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all (a reader, or a kill, never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def headline(name: str, outcome: dict) -> str:
    """A few words per part for the table."""
    if "error" in outcome:
        return outcome["error"][:100]
    r = outcome["result"]
    if name == "versions":
        precision = r.get("precision") or {}
        return (f"{r.get('device', 'no GPU')}, driver {r.get('driver')} (CUDA "
                f"{r.get('driver_cuda')}), torch {r.get('torch')} (CUDA {r.get('torch_cuda')}), "
                f"DALI {r['libraries'].get('nvidia-dali-cuda130') or r['libraries'].get('nvidia-dali-cuda120')}"
                + (f"; {precision.get('capability')}: amp auto = "
                   f"{precision.get('amp') or 'float32'}" if precision.get("capability") else "")
                + (f"; missing: {', '.join(r['missing'])}" if r["missing"] else ""))
    if name == "tests":
        return f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
    if name in ("syncs", "held"):
        key = "syncs_per_step" if name == "syncs" else "intact"
        return ", ".join(f"{k}: {v.get(key, v.get('error'))}" for k, v in r.items())
    if name == "reuse":
        words = [f"{k}: {v.get('mismatched_batches', v.get('error'))}" for k, v in r.items()
                 if isinstance(v, dict)]
        return (f"mismatched batches of {r['batches']} - " + ", ".join(words)
                + ("" if "control_detected" not in r else
                   f"; control {'sees' if r['control_detected'] else 'does NOT see'} reuse"))
    if name == "compare":
        return (f"images max {r['image_max_grey_levels']:.2f} grey levels, masks "
                f"{100 * r['mask_equal_share']:.3f}% equal")
    if name == "bench_loader":
        return "; ".join(f"{row['kind']}/{row['device']} {row['images_per_second'] or 0:.0f} img/s"
                         f" {row.get('cpu_percent') or 0:.0f}% CPU"
                         + (f" {row['gpu_memory_mb']:.0f} MB GPU" if row.get("gpu_memory_mb")
                            is not None else "") for row in r["rows"])
    if name == "bench_train":
        return (", ".join(f"{k} {100 * v:.1f}%" for k, v in r["loader_cost"].items()
                          if v is not None and k != "replay")
                + (f" ({r['amp'] or 'float32'}, {r['capability']})" if r.get("capability")
                   else ""))
    return "done"


def show(report: dict) -> None:
    rows = [(name, "yes" if o["ok"] else "NO", f"{o['seconds']:.0f}", headline(name, o))
            for name, o in report["parts"].items()]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the check must report even where rich is missing
        for row in rows:
            print("  ".join(row))
        return
    table = Table(title="GPU check")
    for column in ("part", "ok", "s", "result"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 120)).print(table)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/gpu_check.json", help="write the report here")
    parser.add_argument("--work", default="bench/gpu_check", help="data and part outputs")
    parser.add_argument("--budget", type=float, default=sum(s for _, s in PARTS),
                        help="seconds for the whole check")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--part", choices=sorted(PART_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    # a part on the CPU rehearses its plumbing (tests); the check itself runs on CUDA
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--small-res", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--reuse-batches", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.part:
        run_part_here(args)
        return
    if args.budget < 30:
        print(f"error: --budget {args.budget:g}: give the check at least 30 seconds",
              file=sys.stderr)
        sys.exit(1)
    if args.dry_run:
        for name, seconds in schedule(args.budget):
            print(f"{name:13s} up to {seconds:4.0f} s")
        print(f"report: {args.json} (work files under {args.work})")
        return
    sys.exit(check(args))


if __name__ == "__main__":
    main()
