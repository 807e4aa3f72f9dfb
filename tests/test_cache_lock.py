"""One writer per cache, readers that see a consistent cache (cache/lock.py), with real
processes: a build is refused (naming the holder) or waits with --wait while another process
reads or writes; readers are refused while a writer holds the cache; the lock dies with its
holder (kill -9)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from cache.lock import LOCK_FILE, CacheBusy, lock_cache
from cache.reader import CacheReader
from cache.writer import CacheWriter
from tests.cachefab import built, cache, small_tree  # noqa: F401  (fixtures)

ROOT_DIR = Path(__file__).resolve().parents[1]

HOLD = """
import sys
from cache.lock import lock_cache
from cache.reader import CacheReader
from cache.writer import CacheWriter
path, mode = sys.argv[1], sys.argv[2]
if mode == "read":
    held = CacheReader(path)
elif mode == "write":
    held = CacheWriter(path)
print("held", flush=True)
sys.stdin.read()
"""




class Holder:
    """Another process holding the cache's lock ("read": a CacheReader, "write": a CacheWriter)
    until stop()."""

    def __init__(self, path: Path, mode: str):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode], cwd=ROOT_DIR,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def holders():
    made = []

    def hold(path, mode):
        made.append(Holder(path, mode))
        return made[-1]
    yield hold
    for holder in made:
        holder.stop()


def dataprep(*args, timeout=120, **kwargs):
    return subprocess.run([sys.executable, "-m", "dataprep.cli", *map(str, args)], cwd=ROOT_DIR,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def one_error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- writers are alone ---------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(cache, small_tree, holders):
    holder = holders(cache, "write")
    result = dataprep("build", "--root", small_tree, "--out", cache, "--force", "--workers", "1")
    assert result.returncode == 1
    line = one_error_line(result)
    assert f"PID {holder.pid}" in line and "writer" in line and "python" in line, line
    assert "--wait" in line
    holder.stop()
    assert CacheReader(cache).split("train").frames  # the holder's cache is untouched


def test_a_build_during_reads_is_refused_then_waits_with_wait(cache, small_tree, holders):
    reader = holders(cache, "read")
    refused = dataprep("build", "--root", small_tree, "--out", cache, "--force", "--workers", "1")
    assert refused.returncode == 1
    assert f"reader PID {reader.pid}" in one_error_line(refused)
    waiting = subprocess.Popen([sys.executable, "-m", "dataprep.cli", "build", "--root", str(small_tree),
                                "--out", str(cache), "--force", "--workers", "1", "--wait"],
                               cwd=ROOT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert waiting.poll() is None  # still waiting for the reader
    reader.stop()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    said = " ".join(err.split())
    assert "waiting for reader PID" in said and "rows written" in said


def test_readers_are_refused_while_a_writer_holds_the_cache(cache, holders):
    writer = holders(cache, "write")
    with pytest.raises(CacheBusy, match=f"being written by writer PID {writer.pid}"):
        CacheReader(cache)  # what train and evaluate open
    for command in (("stats", "--cache", cache), ("verify", "--cache", cache)):
        result = dataprep(*command)
        assert result.returncode == 1 and f"PID {writer.pid}" in one_error_line(result)
    writer.stop()
    assert CacheReader(cache).split_names() == ["train", "val"]


def test_readers_share_and_stats_writing_stats_json_is_a_writer(cache, holders, tmp_path):
    holders(cache, "read")
    CacheReader(cache).split("train")  # two readers at once
    elsewhere = tmp_path / "stats.json"
    assert dataprep("stats", "--cache", cache, "--json", elsewhere).returncode == 0
    refused = dataprep("stats", "--cache", cache)  # CACHE/stats.json: a writer
    assert refused.returncode == 1 and "cannot write stats.json" in one_error_line(refused)
    assert not (cache / "stats.json").exists()


def test_the_lock_dies_with_its_holder(cache, small_tree, holders):
    holder = holders(cache, "write")
    holder.kill()  # kill -9: no stale lock to clean up
    result = dataprep("build", "--root", small_tree, "--out", cache, "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "complete already" in result.stderr


def test_two_builds_at_once_never_leave_a_broken_cache(small_tree, tmp_path):
    """The issue's race: two builds on one --out, one with --force. Either may win; the loser
    is refused with one line (or runs after the winner), and the cache verifies."""
    out = tmp_path / "race"
    args = [sys.executable, "-m", "dataprep.cli", "build", "--root", str(small_tree), "--out", str(out),
            "--workers", "1"]
    first = subprocess.Popen(args, cwd=ROOT_DIR, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args + ["--force"], cwd=ROOT_DIR, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=180), p.stderr.read()) for p in (first, second)]
    assert any(code == 0 for code, _ in results)
    for code, err in results:
        assert "Traceback" not in err and "KeyError" not in err, err
        assert code == 0 or "cannot write the cache" in err, err
    check = dataprep("verify", "--cache", out)
    assert check.returncode == 0, check.stderr


# -- within one process ------------------------------------------------------------
def test_one_process_may_read_then_write_and_read_under_its_own_write(cache):
    reader = CacheReader(cache)
    with CacheWriter(cache):  # converts this process's shared hold to exclusive
        CacheReader(cache).split("train")  # shares the process's exclusive hold
        assert "PID" in (cache / LOCK_FILE).read_text()
    assert (cache / LOCK_FILE).read_text() == ""  # the writer's note goes with it
    reader.split("val")
    reader.close()


def test_a_reader_held_elsewhere_blocks_this_process_from_writing(cache, holders):
    holders(cache, "read")
    reader = CacheReader(cache)
    with pytest.raises(CacheBusy, match="a writer needs it alone"):
        CacheWriter(cache)
    reader.split("train")  # the refused conversion kept this process's read lock
    with pytest.raises(CacheBusy):
        lock_cache(cache, exclusive=True)


def test_no_lock_file_in_a_folder_that_is_not_a_cache(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(Exception):
        CacheReader(other)
    result = dataprep("build", "--root", tmp_path / "none", "--out", other)
    assert result.returncode == 1
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_locking_can_be_turned_off_for_file_systems_without_locks(cache, holders, monkeypatch):
    holders(cache, "write")
    monkeypatch.setenv("CITYSCAPES_CACHE_LOCKING", "off")
    assert CacheReader(cache).split("train").frames


def test_outside_readers_ignore_the_lock_file(cache):
    assert (cache / LOCK_FILE).exists()
    group = zarr.open_consolidated(str(cache))
    assert sorted(group.group_keys()) == ["train", "val"]
    meta = json.loads((cache / "zarr.json").read_text())
    assert LOCK_FILE not in json.dumps(meta["consolidated_metadata"])


def try_write(path: Path) -> str:
    """'got' or 'busy': whether another process can take the cache's exclusive lock now."""
    code = ("import sys\nfrom cache.lock import CacheBusy, lock_cache\ntry:\n"
            "    lock_cache(sys.argv[1], exclusive=True)\n    print('got')\n"
            "except CacheBusy:\n    print('busy')\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT_DIR, capture_output=True,
                          text=True, timeout=60).stdout.strip()


def test_a_forked_child_keeps_its_parents_read_lock_without_releasing_it(cache):
    reader = CacheReader(cache)
    pid = os.fork()
    if pid == 0:  # the child: its own reader shares; closing either must not unlock the parent
        try:
            CacheReader(cache).close()
            reader.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert try_write(cache) == "busy"
    reader.close()
    assert try_write(cache) == "got"
