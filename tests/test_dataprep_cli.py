"""The `dataprep` command group: help texts, synth, the installed entry point, error style."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from dataprep.cli import main
from dataprep.discover import discover

ROOT_DIR = Path(__file__).resolve().parents[1]


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_group_lists_its_commands_and_build_help_documents_on_error():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("build", "stats", "verify", "synth"):
        assert command in result.output
    build_help = " ".join(invoke("build", "--help").output.split())
    for words in ("--on-error [stop|skip]", "stop: the first bad frame stops the build",
                  "skip: bad frames are left out of the split", "exit status is 3",
                  "--limit", "--workers", "--force", "--coarse", "--splits", "--tile", "--codec",
                  "--mask-codec", "--shard / --no-shard", "kill -9"):
        assert words in build_help, words


def test_build_help_shows_the_measured_storage_defaults():
    from cache.writer import DEFAULT_CODEC, DEFAULT_MASK_CODEC, DEFAULT_TILE

    build_help = " ".join(invoke("build", "--help").output.split())
    assert f"Tile size in pixels. [default: {DEFAULT_TILE}]" in build_help
    assert f"for a small disk. [default: {DEFAULT_CODEC}]" in build_help
    assert f"Compression of the mask tiles. [default: {DEFAULT_MASK_CODEC}]" in build_help
    assert "[default: shard]" in build_help


def test_synth_writes_the_official_layout_deterministically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    result = invoke("synth", "--out", a, "--frames", "5", "--height", "96", "--width", "192",
                    "--seed", "4", "--with-test")
    assert result.exit_code == 0, result.output
    assert "train: 3 frames" in result.output and "val: 2 frames" in result.output
    found = discover(a)
    assert {split: len(frames) for split, frames in found.items()} == {"train": 3, "val": 2, "test": 2}
    assert found["test"][0].polygons is None and found["train"][0].polygons.is_file()
    invoke("synth", "--out", b, "--frames", "5", "--height", "96", "--width", "192", "--seed", "4",
           "--with-test")
    assert tree_digest(a) == tree_digest(b)
    from PIL import Image
    assert Image.open(found["val"][0].image).size == (192, 96)


def test_synth_defaults_to_2048x1024():
    help_text = invoke("synth", "--help").output
    assert "[default: 1024]" in help_text and "[default: 2048]" in help_text


def test_synth_bad_arguments_are_one_line_errors(tmp_path):
    result = invoke("synth", "--out", tmp_path / "x", "--frames", "1")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


def test_installed_entry_point_runs_build_stats_verify(tmp_path):
    """The console script, end to end in real processes (no CliRunner)."""
    script = Path(sys.executable).parent / "dataprep"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dataprep.cli"]

    def run(*args):
        return subprocess.run(command + [str(a) for a in args], cwd=ROOT_DIR, capture_output=True,
                              text=True, timeout=300)

    raw, cache = tmp_path / "raw", tmp_path / "cache"
    assert run("synth", "--out", raw, "--frames", "4", "--height", "128", "--width", "256").returncode == 0
    built = run("build", "--root", raw, "--out", cache, "--workers", "2")
    assert built.returncode == 0, built.stderr
    assert "train: 2 frames, images + masks, 2 rows written" in built.stderr
    stats = run("stats", "--cache", cache)
    assert stats.returncode == 0 and (cache / "stats.json").is_file(), stats.stderr
    verified = run("verify", "--cache", cache)
    assert verified.returncode == 0 and "ok: 4 rows in 2 splits checked" in verified.stderr
    failed = run("build", "--root", tmp_path / "nowhere", "--out", cache)
    assert failed.returncode == 1 and failed.stderr.startswith("error: ") and "Traceback" not in failed.stderr
