"""The `dataprep` command group: help texts, synth, the installed entry point, error style."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from cache.format import CLASS_NAMES
from cache.location import CACHE_VAR, DATASET_VAR
from dataprep.cli import _stats_table, main, print_uncut
from dataprep.discover import discover
from dataprep.stats import class_weights, compact_number

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


def run_dataprep(*args, cwd=ROOT_DIR, env=None):
    """The installed console script in a real process (no CliRunner), output through pipes."""
    script = Path(sys.executable).parent / "dataprep"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dataprep.cli"]
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_installed_entry_point_runs_build_stats_verify(tmp_path):
    """The console script, end to end in real processes (no CliRunner)."""
    run = run_dataprep

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


def clean_env(**variables) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (DATASET_VAR, CACHE_VAR, "COLUMNS")}
    return {**env, **variables}


@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw") / "cityscapes"
    result = invoke("synth", "--out", raw, "--frames", "4", "--height", "128", "--width", "256", "--with-test")
    assert result.exit_code == 0, result.output
    return raw


def test_the_documented_commands_run_as_written_in_one_working_directory(raw_tree, tmp_path):
    """`dataprep build --root DIR`, then `dataprep stats` and `dataprep verify` with no flags at all."""
    env = clean_env()
    built = run_dataprep("build", "--root", raw_tree, cwd=tmp_path, env=env)
    assert built.returncode == 0, built.stderr
    cache = tmp_path / "cityscapes.zarr"
    assert f"cache: {cache} (default ./cityscapes.zarr; --cache or ${CACHE_VAR} to change)" in built.stderr
    assert "test: 2 frames, images only (unlabelled: no masks array)" in built.stderr  # placeholders
    stats = run_dataprep("stats", cwd=tmp_path, env=env)
    assert stats.returncode == 0, stats.stderr
    assert f"cache: {cache} (default" in stats.stderr and f"written: {cache / 'stats.json'}" in stats.stderr
    assert json.loads((cache / "stats.json").read_text())["frames"] == 2
    verified = run_dataprep("verify", cwd=tmp_path, env=env)
    assert verified.returncode == 0 and "ok: 6 rows in 3 splits checked" in verified.stderr


def test_environment_variables_give_the_root_and_the_cache(raw_tree, tmp_path):
    cache = tmp_path / "elsewhere.zarr"
    env = clean_env(**{DATASET_VAR: str(raw_tree), CACHE_VAR: str(cache)})
    built = run_dataprep("build", "--splits", "val", cwd=tmp_path, env=env)
    assert built.returncode == 0, built.stderr
    assert f"dataset: {raw_tree} (from ${DATASET_VAR})" in built.stderr
    assert f"cache: {cache} (from ${CACHE_VAR})" in built.stderr
    assert not (tmp_path / "cityscapes.zarr").exists()
    stats = run_dataprep("stats", "--split", "val", cwd=tmp_path, env=env)
    assert stats.returncode == 0 and (cache / "stats.json").is_file(), stats.stderr
    # a flag wins over the variable, and then nothing is announced
    flagged = run_dataprep("build", "--root", raw_tree, "--cache", tmp_path / "flag.zarr", "--splits", "val",
                           cwd=tmp_path, env=env)
    assert flagged.returncode == 0 and (tmp_path / "flag.zarr").is_dir(), flagged.stderr
    assert "from $" not in flagged.stderr and "(default" not in flagged.stderr


@pytest.mark.parametrize("args, words", [
    (("build",), f"error: no dataset root: pass --root DIR or set ${DATASET_VAR}"),
    (("stats",), "cityscapes.zarr: no cache there (the default"),
    (("verify",), "cityscapes.zarr: no cache there (the default"),
])
def test_without_flags_or_variables_a_one_line_error_says_what_to_do(tmp_path, monkeypatch, args, words):
    for variable in (DATASET_VAR, CACHE_VAR):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: ") and words in result.stderr
    assert "Traceback" not in result.output


def real_sized_stats() -> dict:
    """Counts of the size of the real train split: 2975 frames of 2048x1024, 10-digit counts."""
    rng = np.random.default_rng(0)
    counts = (rng.random(19) ** 3 * 2.2e9).astype(np.int64)
    counts[0], counts[11] = 2_036_416_525, 45
    frames = [2975] * 19
    return {"split": "train", "class_names": list(CLASS_NAMES), "pixel_counts": counts.tolist(),
            "frequencies": (counts / counts.sum()).tolist(), "frame_counts": frames, "frames": 2975,
            "ignored_fraction": 0.1, "weights": class_weights(counts, np.array(frames) * 2048 * 1024)}


def assert_whole_numbers(text: str, stats: dict) -> None:
    """Every row carries its numbers whole: compact counts, 3-decimal weights, nothing cut."""
    assert "…" not in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()[:2].strip().isdigit()}
    for i, name in enumerate(stats["class_names"]):
        line = rows[str(i)]
        assert f" {name} " in line and f" {compact_number(stats['pixel_counts'][i])} " in line, line
        for method in ("enet", "median_frequency", "inverse_sqrt"):
            assert f" {compact_number(float(stats['weights'][method][i]))}" in line, (method, line)


@pytest.mark.parametrize("width", [80, 60])
def test_stats_table_never_cuts_numbers(width):
    stats = real_sized_stats()
    out = Console(width=width, file=io.StringIO(), force_terminal=False)
    print_uncut(out, _stats_table(stats))
    text = out.file.getvalue()
    assert_whole_numbers(text, stats)
    widest = max(len(line) for line in text.splitlines())
    assert widest <= 80 and (width == 60 or widest <= width)  # 80 columns hold it


def test_stats_through_a_pipe_at_80_columns(monkeypatch, tmp_path):
    """The command's own output, not a terminal (as in a log), with real-sized counts."""
    from tests.cachefab import blocky_cache

    stats = real_sized_stats()
    monkeypatch.setattr("dataprep.stats.compute_stats", lambda cache, split, progress=None: stats)
    cache = blocky_cache(tmp_path / "c", n_train=2, n_val=2, height=64, width=128, tile=64)
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["stats", "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert_whole_numbers(result.stdout, stats)
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "2.04 G" in result.stdout and " 45 " in result.stdout


@pytest.mark.parametrize("value, text", [
    (0, "0"), (999, "999"), (1000, "1.00 k"), (9_932, "9.93 k"), (151_332, "151 k"), (999_500, "1.00 M"),
    (2_036_416_525, "2.04 G"), (0.5, "0.500"), (50.4979, "50.498"), (49450.4, "49.5 k"), (1.09e6, "1.09 M")])
def test_compact_numbers(value, text):
    assert compact_number(value) == text and len(text) <= 7
