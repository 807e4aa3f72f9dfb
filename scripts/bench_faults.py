"""Replay each class of fault of issue 19 ("nothing lost, nothing torn, no traceback") with real
processes, and say for each whether the product held.

Every case runs the console commands as a user does (`python -m dataprep.cli ...`,
`python -m training.cli train|evaluate|predict ...`, each bounded by a timeout) on small data
made in a temporary folder: a raw tree of 4 frames at 512x256 (`dataprep synth`), its cache,
a finished tiny training run (UNet / resnet18, 64x64 crops, 2 steps, CPU), and for the cases
that must catch a build mid-way a tree of 40 frames at 1024x512. A build is caught mid-way
by pausing its process group (SIGSTOP) once it holds the lock (or, for a kill, once its first
done flags are committed), so the second command (or the kill) always lands while it runs;
SIGCONT lets it go on.

Full disks are real: a small tmpfs (`mount -t tmpfs -o size=...`, needs root and a machine that
allows it; else those rows say `skipped: no tmpfs`), grown afterwards ("free some space") for
the rerun that must finish the job.

Per row: the exit status, the message (the first `error:` line of stderr or stdout, or
predict's first `predict: skipped` line; else the first line of stderr that is not a progress
bar, else of stdout), and what was lost or torn: files that had to survive compared by sha256
before and after; every file under its final name read back whole (.pt with
torch.load(weights_only=True), PNG/JPEG decoded, JSON and each JSONL line parsed strictly,
YAML parsed); no `*.tmp` / `*.partial` left (except right after a killed or failed build: the
README lets those wait for the rerun, which must remove them; the row notes them); a cache
that must be whole passes `dataprep verify`. A row
HOLDS when its exit status is the expected one (non-zero for a refusal, 0 where the command
must succeed), the output holds no `Traceback` and at most one `error:` line, the message names
the cause (a few words per case), and nothing was lost or torn. Any BROKEN row: exit status 1.

    python scripts/bench_faults.py [--json bench/faults.json] [--only NAME[,NAME]] [--list]
        [--keep]   # keep the temporary folder (its path is printed)

~3 minutes on this project's 2-core VM (each train/evaluate/predict process spends ~8 s
importing torch and smp before it can refuse anything).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKER = ".cityscapes-output"
TEMP_MARKS = (".tmp", ".partial")
TRAIN_TIMEOUT = 180          # seconds: a tiny run takes ~10 s here, a refusal ~8 s
BUILD_TIMEOUT = 120
TRAIN_FLAGS = ["--loader", "torch", "--arch", "unet", "--encoder", "resnet18",
               "--encoder-weights", "none", "--model-arg", "encoder_depth=3",
               "--model-arg", "decoder_channels=[8,8,8]", "--res", "64", "--batch-size", "2",
               "--workers", "0", "--log-every", "1", "--no-plots", "--device", "cpu"]


# -- rows --------------------------------------------------------------------------------------

@dataclass
class Row:
    case: str                      # the --only name
    name: str                      # what this row replays
    command: str                   # the command line, paths relative to the work folder
    expect: str                    # "0", "1", "3", "non-zero", "signal", "0 or 1"
    status: int | str | None = None
    line: str = ""
    lost_torn: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # other reasons it does not hold
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    verdict: str = ""              # HOLDS, BROKEN or SKIPPED
    holds: bool | None = None

    def judge(self) -> "Row":
        if self.verdict == "SKIPPED":
            self.holds = None
            return self
        if not _status_ok(self.status, self.expect):
            self.problems.insert(0, f"exit status {self.status}, expected {self.expect}")
        self.holds = not self.problems and not self.lost_torn
        self.verdict = "HOLDS" if self.holds else "BROKEN"
        return self


def _status_ok(status, expect: str) -> bool:
    if not isinstance(status, int):
        return False
    if expect == "signal":
        return status < 0
    if expect == "non-zero":
        return status != 0
    return status in {int(x) for x in expect.split(" or ")}


def message_line(stdout: str, stderr: str) -> str:
    """The `error:` line (or predict's first `predict: skipped` line), else the first line of
    stderr that is not a progress bar, else stdout's."""
    for prefix in ("error:", "predict: skipped"):
        for text in (stderr, stdout):
            for line in text.splitlines():
                if line.startswith(prefix):
                    return line
    for text in (stderr, stdout):
        for line in text.splitlines():
            if line.strip() and "\u2501" not in line:     # not a progress bar
                return line.strip()
    return ""


# -- processes ---------------------------------------------------------------------------------

def child_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CITYSCAPES_CACHE", None)
    env.pop("CITYSCAPES_DATASET", None)
    env.pop("CITYSCAPES_CACHE_LOCKING", None)
    return env


def argv_for(tool: str, args: list[str]) -> list[str]:
    """tool: dataprep | train | evaluate | predict (pyproject's console scripts)."""
    if tool == "dataprep":
        return [sys.executable, "-m", "dataprep.cli", *args]
    return [sys.executable, "-m", "training.cli", tool, *args]


class Proc:
    """A command started in its own session (so that the bench can pause, signal or, on a
    timeout, end its whole process group, and nothing else)."""

    def __init__(self, work: Path, tool: str, args: list[str]):
        self.command = " ".join([tool, *args])
        self.started = time.monotonic()
        self.popen = subprocess.Popen(argv_for(tool, args), cwd=work, env=child_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float) -> tuple[int | str, str, str, float]:
        try:
            out, err = self.popen.communicate(timeout=timeout)
            status: int | str = self.popen.returncode
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            out, err = self.popen.communicate()
            status = f"timeout ({timeout:.0f} s)"
        return status, out, err, time.monotonic() - self.started


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- files -------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (the cache's .lock note changes by design)."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def lost(before: dict[str, str], folder: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    after = snapshot(folder)
    gone = [k for k in before if k not in after and not k.startswith(allowed)]
    changed = [k for k in before if k in after and after[k] != before[k] and not k.startswith(allowed)]
    return ([f"lost {folder.name}/{k}" for k in gone[:3]] + (["..."] if len(gone) > 3 else [])
            + [f"changed {folder.name}/{k}" for k in changed[:3]] + (["..."] if len(changed) > 3 else []))


def _strict(name):
    raise ValueError(f"{name} is not JSON")


def torn(folder: Path, temps_allowed: bool = False, skip: tuple[str, ...] = ()) -> list[str]:
    """Files under their final name that do not read back whole, and leftover temporaries."""
    problems = []
    if not folder.exists():
        return problems
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(skip):
            continue
        if any(mark in path.name for mark in TEMP_MARKS):
            if not temps_allowed:
                problems.append(f"leftover {folder.name}/{rel}")
            continue
        try:
            read_whole(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read back is a torn file
            why = " ".join(str(exc).split())[:80]
            problems.append(f"torn {folder.name}/{rel} ({type(exc).__name__}: {why})")
    return problems


def read_whole(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".pt":
        import torch

        torch.load(path, map_location="cpu", weights_only=True)
    elif suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    elif suffix == ".json" or path.name == MARKER:
        json.loads(path.read_text(), parse_constant=_strict)
    elif suffix == ".jsonl":
        for line in path.read_text().splitlines():
            json.loads(line, parse_constant=_strict)
    elif suffix in (".yaml", ".yml"):
        import yaml

        yaml.safe_load(path.read_text())


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A few hundred bytes whose header declares width x height RGB (30 GB decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 49)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    return path


def noise_image(path: Path, h: int = 32, w: int = 64, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def shard_file(cache: Path, kind: str, row: int, split: str = "train") -> Path:
    path = cache / split / kind / "c" / str(row) / "0" / "0"
    return path / "0" if kind == "images" else path


def wait_for(test: Callable[[], bool], proc: Proc, timeout: float = 60.0, step: float = 0.002) -> bool:
    """Poll until test() (True) or the process ended or the timeout passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if test():
            return True
        if proc.popen.poll() is not None:
            return test()
        time.sleep(step)
    return False


# -- the bench ---------------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path):
        self.work = work
        self._made: dict[str, Path] = {}
        self.mounts: list[Path] = []
        self.tmpfs_reason: str | None = None

    # shared inputs, made the first time a case needs them
    def _once(self, key: str, make: Callable[[], Path]) -> Path:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def setup(self, tool: str, args: list[str], timeout: float) -> None:
        status, out, err, _ = Proc(self.work, tool, args).finish(timeout)
        if status != 0:
            raise RuntimeError(f"setup failed: {tool} {' '.join(args)}: {status}\n{err[-2000:]}")

    def raw(self) -> Path:
        return self._once("raw", lambda: self._synth("raw", 4, 256, 512))

    def big_raw(self) -> Path:
        return self._once("big_raw", lambda: self._synth("raw_big", 40, 512, 1024))

    def _synth(self, name: str, frames: int, height: int, width: int) -> Path:
        self.setup("dataprep", ["synth", "--out", name, "--frames", str(frames), "--height",
                                str(height), "--width", str(width), "--workers", "2"], BUILD_TIMEOUT)
        return self.work / name

    def cache(self) -> Path:
        def make():
            self.setup("dataprep", ["build", "--root", self.rel(self.raw()), "--out", "base.zarr",
                                    "--workers", "1"], BUILD_TIMEOUT)
            return self.work / "base.zarr"
        return self._once("cache", make)

    def big_cache(self) -> Path:
        def make():
            self.setup("dataprep", ["build", "--root", self.rel(self.big_raw()), "--out",
                                    "big.zarr", "--workers", "1"], BUILD_TIMEOUT)
            return self.work / "big.zarr"
        return self._once("big_cache", make)

    def run_dir(self) -> Path:
        def make():
            self.setup("train", ["--cache", self.rel(self.cache()), "--out", "runs/base",
                                 *TRAIN_FLAGS, "--iters", "2", "--limit", "1"], TRAIN_TIMEOUT)
            return self.work / "runs" / "base"
        return self._once("run", make)

    def copy(self, source: Path, name: str) -> Path:
        target = self.work / name
        shutil.copytree(source, target, symlinks=True)
        return target

    def rel(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.work))
        except ValueError:
            return str(path)

    # running a row
    def row(self, case: str, name: str, tool: str, args: list[str], expect: str,
            want: tuple[str, ...] = (), timeout: float = TRAIN_TIMEOUT,
            proc: Proc | None = None) -> Row:
        proc = proc or Proc(self.work, tool, args)
        status, out, err, seconds = proc.finish(timeout)
        return self.check(Row(case, name, proc.command, expect), status, out, err, seconds, want)

    def check(self, row: Row, status, out: str, err: str, seconds: float,
              want: tuple[str, ...] = ()) -> Row:
        row.status, row.seconds = status, round(seconds, 1)
        row.line = message_line(out, err)
        both = out + err
        row.output = both                       # not a field: kept out of the JSON
        if "Traceback" in both:
            row.problems.append("a Traceback in the output")
        errors = [line for line in both.splitlines() if line.startswith("error:")]
        if len(errors) > 1:
            row.problems.append(f"{len(errors)} error lines")
        missing = [w for w in want if w not in " ".join(both.split())]
        if missing:
            row.problems.append("the output does not say " + ", ".join(repr(w) for w in missing))
        return row

    def verify_row(self, case: str, name: str, cache: Path) -> Row:
        return self.row(case, name, "dataprep", ["verify", "--cache", self.rel(cache)], "0",
                        timeout=BUILD_TIMEOUT)

    # a small disk
    def tmpfs(self, name: str, size: int) -> Path | None:
        point = self.work / name
        point.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            self.tmpfs_reason = "mounting a tmpfs needs root and mount(8)"
            return None
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            self.tmpfs_reason = done.stderr.strip() or f"mount exited {done.returncode}"
            return None
        self.mounts.append(point)
        return point

    def grow(self, point: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True,
                       capture_output=True, timeout=30)

    def unmount_all(self) -> None:
        for point in reversed(self.mounts):
            subprocess.run(["umount", str(point)], capture_output=True, timeout=30)
        self.mounts.clear()


def skipped(case: str, name: str, why: str) -> Row:
    return Row(case, name, "", "", status="-", line=f"skipped: {why}", verdict="SKIPPED")


# -- the cases ---------------------------------------------------------------------------------

def case_build_full_disk(b: Bench) -> list[Row]:
    case, raw = "build-full-disk", b.raw()
    size = sum(f.stat().st_size for f in b.cache().rglob("*") if f.is_file())
    disk = b.tmpfs("disk_build", size // 2)
    if disk is None:
        return [skipped(case, "full disk during a build", f"no tmpfs ({b.tmpfs_reason})")]
    raw_before = snapshot(raw)
    out = disk / "c.zarr"
    args = ["build", "--root", b.rel(raw), "--out", b.rel(out), "--workers", "1"]
    first = b.row(case, f"build onto a {size // 2 // 1024} KiB tmpfs", "dataprep", args, "1",
                  want=("No space left on device",), timeout=BUILD_TIMEOUT)
    first.lost_torn += lost(raw_before, raw)
    # temporaries a failed build leaves are the rerun's to remove (README, What a rerun repairs)
    leftovers = [p.name for p in out.rglob("*") if any(m in p.name for m in TEMP_MARKS)]
    if leftovers:
        first.notes.append(f"left {len(leftovers)} temporaries for the rerun: {leftovers[:3]}")
    first.lost_torn += torn(out, temps_allowed=True, skip=("train/images", "train/masks",
                                                           "val/images", "val/masks"))
    b.grow(disk, size * 4)
    again = b.row(case, "the same build after space was freed", "dataprep", args, "0",
                  want=("rows written",), timeout=BUILD_TIMEOUT)
    again.lost_torn += torn(out)
    return [first, again, b.verify_row(case, "verify the cache after the rerun", out)]


def case_checkpoint_full_disk(b: Bench) -> list[Row]:
    case, cache = "checkpoint-full-disk", b.cache()
    size = (b.run_dir() / "last.pt").stat().st_size       # the size of one last.pt of this model
    disk = b.tmpfs("disk_ckpt", int(1.5 * size) + 256 * 1024)  # one last.pt fits, not a second
    if disk is None:
        return [skipped(case, "full disk during a checkpoint", f"no tmpfs ({b.tmpfs_reason})")]
    cache_before = snapshot(cache)
    out = disk / "run"
    flags = ["--cache", b.rel(cache), "--out", b.rel(out), *TRAIN_FLAGS, "--iters", "3",
             "--checkpoint-every", "1", "--eval-every", "100"]
    first = b.row(case, f"train, last.pt every step, on a {disk_mib(int(1.5 * size) + 256 * 1024)} tmpfs",
                  "train", flags, "1", want=("No space left on device", "last good checkpoint",
                                             "--resume"))
    first.lost_torn += torn(out) + lost(cache_before, cache)
    b.grow(disk, 4 * size + 1024 * 1024)
    resumed = b.row(case, "train --resume after space was freed", "train",
                    ["--out", b.rel(out), "--resume"], "0")
    resumed.lost_torn += torn(out)
    try:
        import torch

        step = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["progress"]["step"]
        if step != 3:
            resumed.problems.append(f"last.pt is at step {step}, not 3")
    except Exception as exc:  # noqa: BLE001
        resumed.lost_torn.append(f"last.pt does not load ({exc})")
    return [first, resumed]


def disk_mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def pause_when(b: Bench, proc: Proc, test: Callable[[], bool], what: str) -> str | None:
    """Pause proc's process group once test() holds; None, or why the moment was missed."""
    if not wait_for(test, proc):
        proc.signal_group(signal.SIGCONT)
        return f"{what} never happened"
    proc.signal_group(signal.SIGSTOP)
    time.sleep(0.05)
    if proc.popen.poll() is not None:
        return "the build ended before it could be paused"
    return None


def lock_held(cache: Path) -> Callable[[], bool]:
    def test() -> bool:
        try:
            return "PID" in (cache / ".lock").read_text()
        except OSError:
            return False
    return test


def case_two_builds(b: Bench) -> list[Row]:
    case, raw = "two-builds", b.big_raw()
    out = b.work / "race.zarr"
    base = ["build", "--root", b.rel(raw), "--out", b.rel(out), "--workers", "1"]
    rows = []
    for first_extra, second_extra in (([], ["--force"]), (["--force"], [])):
        label = lambda extra: "build --force" if extra else "build"   # noqa: E731
        first = Proc(b.work, "dataprep", base + first_extra)
        missed = pause_when(b, first, lock_held(out), "the first build taking the lock")
        if missed:
            first.finish(BUILD_TIMEOUT)
            rows.append(skipped(case, f"{label(second_extra)} while a {label(first_extra)} runs", missed))
            continue
        second = b.row(case, f"{label(second_extra)} while a {label(first_extra)} runs (paused)",
                       "dataprep", base + second_extra, "1",
                       want=("cannot write the cache", f"writer PID {first.pid}"), timeout=BUILD_TIMEOUT)
        first.signal_group(signal.SIGCONT)
        rows.append(second)
        rows.append(b.row(case, f"the first {label(first_extra)}, let go on", "dataprep", [],
                          "0", want=("rows written",), timeout=BUILD_TIMEOUT, proc=first))
    rows.append(b.verify_row(case, "verify the cache after both", out))
    rows[-1].lost_torn += torn(out)
    return rows


def case_train_during_build(b: Bench) -> list[Row]:
    case = "train-during-force-build"
    cache = b.copy(b.big_cache(), "forced.zarr")
    builder = Proc(b.work, "dataprep", ["build", "--root", b.rel(b.big_raw()), "--out",
                                        b.rel(cache), "--workers", "1", "--force"])
    missed = pause_when(b, builder, lock_held(cache), "the build taking the lock")
    if missed:
        builder.finish(BUILD_TIMEOUT)
        return [skipped(case, "train while a --force build holds the lock", missed)]
    trained = b.row(case, "train while `build --force` holds the lock (paused)", "train",
                    ["--cache", b.rel(cache), "--out", "runs/during", *TRAIN_FLAGS, "--iters", "1",
                     "--limit", "1"], "1",
                    want=("cannot read the cache", f"writer PID {builder.pid}"))
    builder.signal_group(signal.SIGCONT)
    if (b.work / "runs" / "during" / "last.pt").exists():
        trained.problems.append("train wrote a checkpoint from a cache being rebuilt")
    done = b.row(case, "the --force build, let go on", "dataprep", [], "0",
                 want=("rows written",), timeout=BUILD_TIMEOUT, proc=builder)
    check = b.verify_row(case, "verify the rebuilt cache", cache)
    check.lost_torn += torn(cache)
    return [trained, done, check]


def case_missing_shard(b: Bench, kind: str) -> list[Row]:
    case = f"missing-{kind[:-1]}-shard"
    cache = b.copy(b.cache(), f"missing_{kind}.zarr")
    shard_file(cache, kind, 1).unlink()
    before = snapshot(cache)
    frame = json.loads((cache / "train" / "zarr.json").read_text())["attributes"]["frames"][1]
    rows = [b.row(case, f"train on a complete split whose {kind[:-1]} shard of row 1 is gone",
                  "train", ["--cache", b.rel(cache), "--out", f"runs/missing_{kind}", *TRAIN_FLAGS,
                            "--iters", "1", "--limit", "1"], "1", want=(frame, "missing")),
            b.row(case, f"dataprep stats on it", "dataprep", ["stats", "--cache", b.rel(cache)],
                  "1", want=(frame,), timeout=BUILD_TIMEOUT)]
    for row in rows:
        row.lost_torn += lost(before, cache)
    if (cache / "stats.json").exists():
        rows[1].problems.append("stats.json was written from a cache with a missing shard")
    if (b.work / "runs" / f"missing_{kind}" / "last.pt").exists():
        rows[0].problems.append("train wrote a checkpoint from a cache with a missing shard")
    rerun = b.row(case, "the same build again rewrites the row", "dataprep",
                  ["build", "--root", b.rel(b.raw()), "--out", b.rel(cache), "--workers", "1"], "0",
                  want=("writing them again",), timeout=BUILD_TIMEOUT)
    return rows + [rerun, b.verify_row(case, "verify after the rerun", cache)]


def case_garbled_root(b: Bench) -> list[Row]:
    case = "garbled-root-attrs"
    cache = b.copy(b.cache(), "garbled.zarr")
    meta = cache / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["num_classes"] = "19"
    doc["attributes"]["class_names"] = ["road"]
    meta.write_text(json.dumps(doc))
    before = snapshot(cache)
    rows = [b.row(case, "dataprep stats, root num_classes \"19\" and one class name", "dataprep",
                  ["stats", "--cache", b.rel(cache)], "1", want=("zarr.json",), timeout=BUILD_TIMEOUT),
            b.row(case, "train on it", "train", ["--cache", b.rel(cache), "--out", "runs/garbled",
                                                 *TRAIN_FLAGS, "--iters", "1", "--limit", "1"], "1",
                  want=("zarr.json",))]
    for row in rows:
        row.lost_torn += lost(before, cache)
    return rows


def case_truncated_shard(b: Bench) -> list[Row]:
    case = "truncated-shard"
    cache = b.copy(b.cache(), "truncated.zarr")
    path = shard_file(cache, "masks", 0)
    path.write_bytes(path.read_bytes()[:-10])
    before = snapshot(cache)
    rel = b.rel(path)
    rows = [b.row(case, "dataprep stats, mask shard of row 0 10 bytes short", "dataprep",
                  ["stats", "--cache", b.rel(cache)], "1", want=("damaged",), timeout=BUILD_TIMEOUT),
            b.row(case, "train on it", "train", ["--cache", b.rel(cache), "--out", "runs/truncated",
                                                 *TRAIN_FLAGS, "--iters", "2", "--limit", "2"], "1",
                  want=("damaged",)),
            b.row(case, "dataprep verify on it", "dataprep", ["verify", "--cache", b.rel(cache)], "1",
                  want=("damaged",), timeout=BUILD_TIMEOUT)]
    for row in rows:
        row.lost_torn += lost(before, cache)
    if rel not in " ".join(r.line for r in rows[:2]):
        rows[0].notes.append(f"the message does not name {rel}")
    return rows


def case_lost_consolidated(b: Bench) -> list[Row]:
    case = "lost-consolidated"
    cache = b.copy(b.cache(), "consolidated.zarr")
    for group in (cache, cache / "val"):
        doc = json.loads((group / "zarr.json").read_text())
        del doc["consolidated_metadata"]
        (group / "zarr.json").write_text(json.dumps(doc))
    (cache / "zarr.json.1234.partial").write_text('{"attri')
    row = b.row(case, "the build again after consolidated metadata was lost", "dataprep",
                ["build", "--root", b.rel(b.raw()), "--out", b.rel(cache), "--workers", "1"], "0",
                want=("repaired the consolidated metadata of the root",), timeout=BUILD_TIMEOUT)
    row.lost_torn += torn(cache)
    try:
        import zarr

        zarr.open_consolidated(str(cache))
    except Exception as exc:  # noqa: BLE001
        row.problems.append(f"zarr.open_consolidated fails after the rerun ({exc})")
    return [row]


def case_bad_tile(b: Bench) -> list[Row]:
    case = "impossible-tile"
    out = b.work / "tile8.zarr"
    row = b.row(case, "build --tile 16 on 1024x512 frames (2048 tiles a shard)", "dataprep",
                ["build", "--root", b.rel(b.big_raw()), "--out", b.rel(out), "--workers", "1",
                 "--tile", "16"], "1", want=("--tile 32 or larger",), timeout=BUILD_TIMEOUT)
    written = [p for p in out.rglob("c/*") if p.is_file()] if out.exists() else []
    if written:
        row.problems.append(f"{len(written)} chunk files written before the refusal")
    return [row]


def case_user_folder(b: Bench) -> list[Row]:
    case, cache = "train-into-user-folder", b.cache()
    mine = b.work / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    noise_image(mine / "loss.png")
    before = snapshot(mine)
    flags = ["--cache", b.rel(cache), "--out", "mine", *TRAIN_FLAGS, "--iters", "1", "--limit", "1"]
    rows = [b.row(case, "train --out a folder of the user's files", "train", flags, "1",
                  want=("did not write",)),
            b.row(case, "the same with --resume", "train", flags + ["--resume"], "1",
                  want=("did not write",))]
    for row in rows:
        row.lost_torn += lost(before, mine)
        if (mine / MARKER).exists():
            row.problems.append("the user's folder got a marker")
    return rows


def case_resume_nothing(b: Bench) -> list[Row]:
    case, cache = "resume-nothing", b.cache()
    (b.work / "empty").mkdir()
    bare = b.row(case, "train --out EMPTY --resume, no other option (no ./cityscapes.zarr)", "train",
                 ["--out", "empty", "--resume"], "1")
    bare.lost_torn += torn(b.work / "empty")
    fresh = b.row(case, "train --out NEW --resume with a run's options (as SLURM requeues)", "train",
                  ["--cache", b.rel(cache), "--out", "runs/fresh", *TRAIN_FLAGS, "--iters", "1",
                   "--limit", "1", "--resume"], "0", want=("no run in",))
    fresh.lost_torn += torn(b.work / "runs" / "fresh")
    return [bare, fresh]


def case_deleted_last(b: Bench) -> list[Row]:
    case, cache = "deleted-last-pt", b.cache()
    run = b.copy(b.run_dir(), "runs/nolast")
    (run / "last.pt").unlink()
    before = snapshot(run)
    rows = [b.row(case, "train again into a run dir whose last.pt was deleted", "train",
                  ["--cache", b.rel(cache), "--out", b.rel(run), *TRAIN_FLAGS, "--iters", "2",
                   "--limit", "1"], "1", want=("last.pt is gone", "--init-from")),
            b.row(case, "train --out RUN --resume there", "train", ["--out", b.rel(run), "--resume"],
                  "1", want=("nothing to resume from",))]
    for row in rows:
        row.lost_torn += lost(before, run)
    return rows


def case_visualize_foreign(b: Bench) -> list[Row]:
    case = "visualize-foreign-folder"
    ckpt, cache = b.run_dir() / "best.pt", b.cache()
    foreign = b.work / "dataset"
    (foreign / "leftImg8bit" / "val").mkdir(parents=True)
    (foreign / "README").write_text("the dataset\n")
    noise_image(foreign / "leftImg8bit" / "val" / "x.png")
    before = snapshot(foreign)
    row = b.row(case, "evaluate --visualize into a non-empty folder not ours", "evaluate",
                ["--checkpoint", b.rel(ckpt), "--cache", b.rel(cache), "--visualize", "dataset",
                 "--device", "cpu", "--loader", "torch", "--workers", "0", "--limit", "1"], "1",
                want=("--visualize",))
    row.lost_torn += lost(before, foreign)
    if (foreign / MARKER).exists() or snapshot(foreign).keys() != before.keys():
        row.problems.append("files were added to the foreign folder")
    return [row]


def case_predict_clash(b: Bench) -> list[Row]:
    case = "predict-name-clash"
    ckpt = b.run_dir() / "best.pt"
    src = b.work / "clash"
    noise_image(src / "a.png")
    noise_image(src / "a.jpg", seed=1)
    before = snapshot(src)
    row = b.row(case, "predict a folder holding a.png and a.jpg", "predict",
                ["--checkpoint", b.rel(ckpt), "--input", "clash", "--out", "pred_clash",
                 "--device", "cpu"], "1", want=("would both be written",))
    row.lost_torn += lost(before, src)
    if (b.work / "pred_clash").exists():
        row.problems.append("--out was created before the refusal")
    return [row]


def case_predict_corrupt(b: Bench) -> list[Row]:
    case = "predict-bad-among-good"
    ckpt = b.run_dir() / "best.pt"
    src = b.work / "mixed"
    noise_image(src / "a.png")
    noise_image(src / "c.jpg", seed=1)
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bomb_png(src / "d.png")
    before = snapshot(src)
    out = b.work / "pred_mixed"
    row = b.row(case, "predict a.png, c.jpg with a corrupt b.png and a bomb d.png", "predict",
                ["--checkpoint", b.rel(ckpt), "--input", "mixed", "--out", "pred_mixed",
                 "--device", "cpu"], "3", want=("predict: skipped",))
    row.lost_torn += lost(before, src) + torn(out)
    try:
        manifest = json.loads((out / "predict.json").read_text())
        if manifest.get("complete") is not False or manifest.get("frames") != 2:
            row.problems.append(f"predict.json: complete={manifest.get('complete')}, "
                                f"frames={manifest.get('frames')} (want false, 2)")
        if len(manifest.get("failed", [])) != 2:
            row.problems.append(f"predict.json lists {len(manifest.get('failed', []))} failed inputs, not 2")
    except Exception as exc:  # noqa: BLE001
        row.problems.append(f"no readable predict.json ({exc})")
    return [row]


def case_fifo(b: Bench) -> list[Row]:
    case = "fifo-in-raw-tree"
    raw = b.copy(b.raw(), "raw_fifo")
    image = sorted((raw / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))[0]
    image.unlink()
    os.mkfifo(image)
    before = snapshot(raw)
    row = b.row(case, "build with a FIFO named as a train image", "dataprep",
                ["build", "--root", b.rel(raw), "--out", "fifo.zarr", "--workers", "1"], "1",
                want=("FIFO", image.name), timeout=60)
    row.lost_torn += lost(before, raw) + torn(b.work / "fifo.zarr", skip=("train/", "val/"))
    return [row]


def case_png_bomb(b: Bench) -> list[Row]:
    case = "png-bomb"
    raw = b.copy(b.raw(), "raw_bomb")
    image = sorted((raw / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))[0]
    bomb_png(image)
    before = snapshot(raw)
    row = b.row(case, "build with a train image whose header declares 100000x100000", "dataprep",
                ["build", "--root", b.rel(raw), "--out", "bomb.zarr", "--workers", "1"], "1",
                want=("100000x100000",), timeout=60)
    row.lost_torn += lost(before, raw) + torn(b.work / "bomb.zarr", skip=("train/", "val/"))
    return [row]


def case_kill_build(b: Bench, sig: int) -> list[Row]:
    name = signal.Signals(sig).name
    case = f"{name.lower()}-build"
    raw = b.big_raw()
    raw_before = snapshot(raw)
    out = b.work / f"killed_{name.lower()}.zarr"
    args = ["build", "--root", b.rel(raw), "--out", b.rel(out), "--workers", "1"]
    proc = Proc(b.work, "dataprep", args)
    # a row counts once its done flag is committed (in batches, every 0.5 s): kill after that
    missed = pause_when(b, proc, lambda: (out / "train" / "done" / "c" / "0").exists(),
                        "the first done flags of train being committed")
    if missed:
        proc.finish(BUILD_TIMEOUT)
        return [skipped(case, f"{name} a build mid-way", missed)]
    workers = children_of(proc.pid)
    total = len(json.loads((out / "train" / "zarr.json").read_text())["attributes"]["frames"])
    done_before = done_rows(out, "train")
    os.kill(proc.pid, sig)                       # the build's own process, as `kill` would
    proc.signal_group(signal.SIGCONT)
    killed = b.row(case, f"{name} to a build after {done_before} of {total} train rows", "dataprep",
                   [], "signal" if sig == signal.SIGKILL else "non-zero", timeout=BUILD_TIMEOUT,
                   proc=proc)
    killed.command = f"kill -{name[3:]} <build>; " + killed.command
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in workers):
        time.sleep(0.1)
    orphans = [p for p in workers if alive(p)]
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    if orphans:
        killed.problems.append(f"{len(orphans)} worker process(es) outlived the build by 15 s")
    killed.lost_torn += lost(raw_before, raw)
    # a kill may leave *.partial temporaries; the rerun removes them (README)
    killed.lost_torn += torn(out, temps_allowed=True, skip=("train/images", "train/masks",
                                                            "val/images", "val/masks"))
    rerun = b.row(case, "the same build again", "dataprep", args, "0", want=("rows written",),
                  timeout=BUILD_TIMEOUT)
    rerun.lost_torn += torn(out)
    for line in rerun.output.splitlines():          # "train: 18 frames, images + masks, 16 rows written"
        if line.startswith("train:") and "rows written" in line:
            again = int(line.split(",")[-1].split()[0])
            rerun.notes.append(f"wrote {again} of {total} train rows ({done_before} were done)")
            if again > total - done_before:
                rerun.problems.append(f"the rerun wrote {again} train rows again; {done_before} "
                                      f"of {total} were done (no resume)")
    return [killed, rerun, b.verify_row(case, "verify after the rerun", out)]


def done_rows(cache: Path, split: str) -> int:
    import zarr

    return int(zarr.open_array(str(cache / split / "done"), mode="r")[:].sum())


def case_divergence(b: Bench) -> list[Row]:
    case, cache = "divergence", b.cache()
    out = b.work / "runs" / "diverged"
    row = b.row(case, "train --lr 1e6", "train",
                ["--cache", b.rel(cache), "--out", b.rel(out), *TRAIN_FLAGS, "--iters", "30",
                 "--checkpoint-every", "1", "--lr", "1e6"], "1",
                want=("training diverged", "lower --lr"))
    row.lost_torn += torn(out)
    if (out / "last.pt").exists():
        import torch

        state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]
        if not all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()):
            row.lost_torn.append("last.pt holds non-finite weights")
    return [row]


CASES: dict[str, Callable[[Bench], list[Row]]] = {
    "build-full-disk": case_build_full_disk,
    "checkpoint-full-disk": case_checkpoint_full_disk,
    "two-builds": case_two_builds,
    "train-during-force-build": case_train_during_build,
    "missing-image-shard": lambda b: case_missing_shard(b, "images"),
    "missing-mask-shard": lambda b: case_missing_shard(b, "masks"),
    "garbled-root-attrs": case_garbled_root,
    "truncated-shard": case_truncated_shard,
    "lost-consolidated": case_lost_consolidated,
    "impossible-tile": case_bad_tile,
    "train-into-user-folder": case_user_folder,
    "resume-nothing": case_resume_nothing,
    "deleted-last-pt": case_deleted_last,
    "visualize-foreign-folder": case_visualize_foreign,
    "predict-name-clash": case_predict_clash,
    "predict-bad-among-good": case_predict_corrupt,
    "fifo-in-raw-tree": case_fifo,
    "png-bomb": case_png_bomb,
    "sigkill-build": lambda b: case_kill_build(b, signal.SIGKILL),
    "sigterm-build": lambda b: case_kill_build(b, signal.SIGTERM),
    "divergence": case_divergence,
}


# -- report ------------------------------------------------------------------------------------

def machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version()}


def shorten(text: str, work: Path, width: int) -> str:
    text = text.replace(str(work) + "/", "").replace(str(work), ".")
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: list[Row], work: Path, width: int = 150) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| case | replays | exit | expected | message (first line) | lost / torn | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        damage = "; ".join(r.lost_torn) or ("-" if r.verdict == "SKIPPED" else "none")
        verdict = r.verdict if r.holds is not False else "BROKEN: " + "; ".join(r.problems or r.lost_torn)
        lines.append(f"| {r.case} | {cell(r.name)} | {r.status} | {r.expect or '-'} | "
                     f"{cell(shorten(r.line, work, width) or '(no output)')} | {cell(shorten(damage, work, 100))} | "
                     f"{cell(shorten(verdict, work, 160))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated case names (see --list)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    names = list(CASES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown:
            parser.error(f"unknown case(s) {', '.join(unknown)}; --list lists them")
    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    bench = Bench(work)
    rows: list[Row] = []
    started = time.monotonic()
    try:
        for name in names:
            t0 = time.monotonic()
            try:
                got = CASES[name](bench)
            except Exception as exc:  # noqa: BLE001 - a bench failure is a row, not a crash
                got = [Row(name, "(the bench itself failed)", "", "-", status="-",
                           line=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           problems=["bench error"])]
            for row in got:
                row.judge()
            rows += got
            print(f"{name}: {', '.join(r.verdict for r in got)} ({time.monotonic() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    finally:
        bench.unmount_all()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - started
    info = machine()
    print(f"machine: {info['machine']}, {info['cores']} cores, {info['platform']}, "
          f"Python {info['python']}; {len(rows)} rows in {seconds:.0f} s")
    print(table(rows, work))
    broken = [r for r in rows if r.holds is False]
    print(f"{sum(r.holds is True for r in rows)} hold, {len(broken)} broken, "
          f"{sum(r.verdict == 'SKIPPED' for r in rows)} skipped")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": info, "seconds": round(seconds, 1), "cases": names,
                  "rows": [{**asdict(r), "line": shorten(r.line, work, 10_000)} for r in rows]}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
