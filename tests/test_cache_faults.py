"""A damaged cache is named, never read as zeros and never a traceback; a rerun of the build
repairs what a crash can leave (and rewrites deleted shards); verify's workers die with it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cache.errors import UserError
from cache.format import CacheError
from cache.reader import CacheReader
from cache.verify import verify_cache
from cache.writer import Storage
from dataprep.cli import main
from dataprep.synth import write_synthetic_tree
from tests.cachefab import built, cache, small_tree  # noqa: F401  (fixtures)

ROOT_DIR = Path(__file__).resolve().parents[1]




def shard_file(cache: Path, kind: str, row: int, split: str = "train") -> Path:
    path = cache / split / kind / "c" / str(row) / "0" / "0"
    return path / "0" if kind == "images" else path


def cli(*args):
    result = CliRunner().invoke(main, [*map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


# -- a missing shard of a complete split ----------------------------------------------
@pytest.mark.parametrize("kind", ["images", "masks"])
def test_a_deleted_shard_is_an_error_naming_split_and_frame_not_zeros(cache, kind):
    frame = CacheReader(cache).split("train").frames[1]
    shard_file(cache, kind, 1).unlink()
    with pytest.raises(CacheError, match=f"split 'train'.*{frame} \\(row 1\\)"):
        CacheReader(cache).split("train")
    result = cli("stats", "--cache", cache)
    assert result.exit_code == 1 and frame in error_line(result)
    report = verify_cache(cache, workers=1)
    assert any(f.frame == frame and f"{kind[:-1]} file is missing" in f.problem for f in report.faults)


def test_a_shard_deleted_while_reading_is_an_error_too(cache):
    reader = CacheReader(cache)
    info = reader.split("train")
    shard_file(cache, "images", 0).unlink()
    with pytest.raises(CacheError, match=f"{info.frames[0]} \\(row 0\\)"):
        reader.read_window("train", 0, 0, 0, 16, 16)


def test_the_rerun_writes_deleted_shards_again(cache, built, small_tree):
    shard_file(cache, "images", 0).unlink()
    shard_file(cache, "masks", 1).unlink()
    result = cli("build", "--root", small_tree, "--out", cache, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "files of 2 frames are missing; writing them again" in " ".join(result.output.split())
    assert verify_cache(cache, workers=1).ok
    for row in (0, 1):
        for got, want in zip(CacheReader(cache).read_frame("train", row), CacheReader(built).read_frame("train", row)):
            np.testing.assert_array_equal(got, want)


# -- damaged files --------------------------------------------------------------------
def test_a_truncated_shard_is_one_line_naming_the_file(cache):
    path = shard_file(cache, "masks", 0)
    path.write_bytes(path.read_bytes()[:-10])
    result = cli("stats", "--cache", cache)
    assert result.exit_code == 1
    line = error_line(result)
    assert str(path) in line and "damaged" in line
    report = verify_cache(cache, workers=1)
    assert any(f.row == 0 and "mask file is damaged" in f.problem for f in report.faults)


def test_a_corrupt_shard_index_is_named(cache):
    path = shard_file(cache, "images", 1)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the index
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="crc32c"):
        CacheReader(cache).read_frame("train", 1)


@pytest.mark.parametrize("key, value", [("num_classes", "19"), ("class_names", ["road"]),
                                        ("version", "2"), ("ignore_index", 3)])
def test_bad_root_attributes_are_one_line_naming_the_file(cache, key, value):
    meta = cache / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][key] = value
    meta.write_text(json.dumps(doc))
    for command in (("stats", "--cache", cache), ("verify", "--cache", cache)):
        result = cli(*command)
        assert result.exit_code == 1
        line = error_line(result)
        assert key in line or "version" in line, line
    with pytest.raises(CacheError):
        CacheReader(cache)


def test_a_garbled_split_metadata_is_one_line_and_force_rebuilds_it(cache, small_tree):
    meta = cache / "val" / "zarr.json"
    meta.write_text('{"attributes": {')
    for command in (("stats", "--cache", cache), ("verify", "--cache", cache),
                    ("build", "--root", small_tree, "--out", cache, "--workers", "1")):
        result = cli(*command)
        assert result.exit_code == 1 and str(meta) in error_line(result)
    result = cli("build", "--root", small_tree, "--out", cache, "--workers", "1", "--force", "--splits", "val")
    assert result.exit_code == 0, result.output
    assert verify_cache(cache, workers=1).ok


# -- what a crash can leave -----------------------------------------------------------
def test_the_rerun_repairs_lost_consolidated_metadata(cache, small_tree):
    """A full disk while the root's consolidated metadata was written: the writer had removed
    it first, so the root has none (and a half-written temporary may lie next to it)."""
    for group in (cache, cache / "val"):
        doc = json.loads((group / "zarr.json").read_text())
        del doc["consolidated_metadata"]
        (group / "zarr.json").write_text(json.dumps(doc))
    (cache / "zarr.json.1234.partial").write_text('{"attri')
    with pytest.raises(Exception):
        zarr.open_consolidated(str(cache))
    result = cli("build", "--root", small_tree, "--out", cache, "--workers", "1")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "repaired the consolidated metadata of split 'val'" in said
    assert "repaired the consolidated metadata of the root" in said
    assert sorted(zarr.open_consolidated(str(cache)).group_keys()) == ["train", "val"]
    assert not list(cache.glob("*.partial"))
    again = cli("build", "--root", small_tree, "--out", cache, "--workers", "1")
    assert "repaired" not in again.output


# -- options ----------------------------------------------------------------------------
def test_tile_sizes_a_shard_cannot_hold_are_refused_before_any_row(tmp_path):
    with pytest.raises(UserError, match="--tile 16: a 2048x1024 frame would make 8192 tiles"):
        Storage(tile=16).check_frame(1024, 2048)
    Storage(tile=16, shard=False).check_frame(1024, 2048)
    Storage(tile=64).check_frame(1024, 2048)
    root = tmp_path / "raw"
    write_synthetic_tree(root, 4, height=512, width=1024, seed=1)
    result = cli("build", "--root", root, "--out", tmp_path / "c", "--workers", "1", "--tile", "16")
    assert result.exit_code == 1
    assert "use --tile 32 or larger, or --no-shard" in error_line(result)
    assert "rows written" not in result.output


def test_interrupted_stats_and_verify_promise_no_resume(cache, monkeypatch):
    import cache.verify as verify_module
    import dataprep.stats as stats_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(stats_module, "compute_stats", interrupted)
    monkeypatch.setattr(verify_module, "verify_cache", interrupted)
    for command, name in (("stats", "dataprep stats"), ("verify", "dataprep verify")):
        result = CliRunner().invoke(main, [command, "--cache", str(cache)])
        assert result.exit_code == 130
        assert "resume" not in result.stderr and f"run `{name}` again" in result.stderr


# -- verify's workers die with it ------------------------------------------------------
def _load_bench_faults():
    """scripts/bench_faults.py: its /proc helpers (children_of, alive) serve this test too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_faults", ROOT_DIR / "scripts" / "bench_faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)      # its dataclasses look their module up
    spec.loader.exec_module(module)
    return sys.modules[spec.name]


_bench_faults = _load_bench_faults()
_children, _alive = _bench_faults.children_of, _bench_faults.alive


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_verify_workers_die_with_the_parent(tmp_path, how):
    from tests.cachefab import blocky_cache

    path = blocky_cache(tmp_path / "c", n_train=200, n_val=40, height=256, width=512, tile=128)
    proc = subprocess.Popen([sys.executable, "-m", "dataprep.cli", "verify", "--cache", str(path),
                             "--workers", "2"], cwd=ROOT_DIR, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    children = set()
    while time.monotonic() < deadline and len(children) < 3:  # 2 workers + resource tracker
        children |= _children(proc.pid)
        time.sleep(0.05)
    assert len(children) >= 2, "no worker processes appeared"
    time.sleep(0.5)
    children |= _children(proc.pid)
    assert proc.poll() is None, "verify finished before it could be interrupted"
    os.kill(proc.pid, how)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    left = [pid for pid in children if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"orphans still alive 15 s after {how.name}: {left}"
