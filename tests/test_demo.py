"""scripts/demo.sh never deletes what it did not create.

Real runs of the script in a subprocess, with a stand-in `dataprep` first on PATH that logs its
arguments and fails: the demo stops at its first heavy step (set -e), after its folder checks.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"
MARKER = ".cityscapes-demo"


@pytest.fixture
def run_demo(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stand_in = bin_dir / "dataprep"
    stand_in.write_text(f'#!/bin/sh\necho "dataprep $*" >> "{log}"\nexit 7\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def run(*args: str | Path):
        result = subprocess.run(["bash", str(DEMO), *map(str, args)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        return result, calls

    return run


def test_refuses_a_folder_holding_a_user_file(tmp_path, run_demo):
    data = tmp_path / "data"
    data.mkdir()
    (data / "thesis.tex").write_text("years of work")
    (data / "raw").mkdir()  # even a folder named like the demo's own outputs
    result, calls = run_demo(data)
    assert result.returncode == 1 and calls == []  # stopped before any step
    assert result.stderr.startswith(f"error: {data} exists and is not a demo folder")
    assert (data / "thesis.tex").read_text() == "years of work" and (data / "raw").is_dir()
    assert sorted(p.name for p in data.iterdir()) == ["raw", "thesis.tex"]  # no marker written


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_refuses_a_file_or_a_link(tmp_path, run_demo, kind):
    target = tmp_path / "target"
    target.mkdir()
    path = tmp_path / "work"
    if kind == "file":
        path.write_text("mine")
    else:
        path.symlink_to(target)
    result, calls = run_demo(path)
    assert result.returncode == 1 and calls == [] and "is not a demo folder" in result.stderr
    assert list(target.iterdir()) == []


def test_new_folder_default_folder_and_empty_folder_are_taken(tmp_path, run_demo):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, folder in (((tmp_path / "new" / "deeper",), tmp_path / "new" / "deeper"),
                         ((), tmp_path / "demo"), ((empty,), empty)):
        result, calls = run_demo(*args)
        assert result.returncode == 7, result.stderr  # it went on to the first step
        assert (folder / MARKER).is_file()
        assert calls[-1].startswith(f"dataprep synth --out {args[0] if args else 'demo'}/raw ")


def test_rerun_deletes_only_the_demos_own_outputs(tmp_path, run_demo):
    work = tmp_path / "work"
    run_demo(work)
    for name in ("raw", "cache", "run"):
        (work / name).mkdir()
        (work / name / "old.bin").write_text("old")
    (work / "notes.txt").write_text("the user's")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (work / "predictions").symlink_to(outside)  # a link among the outputs: removed, not followed
    result, _ = run_demo(work)
    assert result.returncode == 7
    assert sorted(p.name for p in work.iterdir()) == [MARKER, "notes.txt"]
    assert (outside / "keep.txt").read_text() == "keep"
