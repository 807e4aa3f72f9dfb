"""`dataprep build`: content, resume (kill -9 included), refusals, bad input, --on-error."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from cache.format import CHECKSUMS, DONE, IMAGES, MASKS, ROOT_ATTRS, STATS_FILE
from cache.reader import CacheReader
from cache.writer import SKIPPED_ATTR, Storage
from dataprep.build import EXIT_SKIPPED, BuildOptions, build_cache
from dataprep.cli import main
from dataprep.discover import discover
from dataprep.rasterize import render_trainids
from dataprep.synth import write_synthetic_tree

ROOT_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    """train 4, val 2 (labelled), test 2 (images only); 256x512."""
    root = tmp_path_factory.mktemp("raw") / "cityscapes"
    write_synthetic_tree(root, 6, height=256, width=512, seed=3, with_test=True)
    return root


@pytest.fixture(scope="module")
def clean_cache(small_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "cache"
    report = build_cache(BuildOptions(root=small_tree, out=out, workers=2))
    assert report.exit_code == 0
    return out


@pytest.fixture
def tree(small_tree, tmp_path) -> Path:
    """A private copy of the small tree, for tests that damage it."""
    return Path(shutil.copytree(small_tree, tmp_path / "raw"))


def run_build(*args):
    result = CliRunner().invoke(main, ["build", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def cache_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_cache(a: Path, b: Path) -> None:
    """Byte for byte: the same files (chunks, metadata, attributes) with the same contents."""
    files_a, files_b = cache_files(a), cache_files(b)
    assert sorted(files_a) == sorted(files_b)
    different = [name for name in files_a if files_a[name] != files_b[name]]
    assert not different, different[:5]


# -- what a build writes --------------------------------------------------------
def test_clean_build_holds_decoded_images_and_exact_masks(small_tree, clean_cache):
    root = zarr.open_group(str(clean_cache), mode="r")
    assert dict(root.attrs) == ROOT_ATTRS
    found = discover(small_tree)
    reader = CacheReader(clean_cache)
    assert reader.split_names() == ["test", "train", "val"]
    for split, frames in found.items():
        group = root[split]
        assert group.attrs["frames"] == [f.name for f in frames]
        assert group.attrs["complete"] is True
        assert group[IMAGES].chunks == (1, Storage().tile, Storage().tile, 3)
        # the defaults: one shard per row (a whole number of tiles), raw image tiles, zstd masks
        assert group[IMAGES].shards == (1, 512, 512, 3)
        assert group[IMAGES].compressors == ()
        assert len([p for p in (clean_cache / split / IMAGES / "c").rglob("*") if p.is_file()]) == len(frames)
        assert np.asarray(group[DONE][:]).tolist() == [1] * len(frames)
        for row, frame in enumerate(frames):
            image = np.asarray(Image.open(frame.image).convert("RGB"))
            np.testing.assert_array_equal(group[IMAGES][row], image)
            sums = np.asarray(group[CHECKSUMS][row])
            assert int(sums[0]) == google_crc32c.value(image.tobytes())
            if frame.polygons is None:
                continue
            mask = render_trainids(frame.polygons)
            np.testing.assert_array_equal(group[MASKS][row], mask)
            assert int(sums[1]) == google_crc32c.value(mask.tobytes())
    assert MASKS not in [name for name, _ in root["test"].arrays()]
    assert root["train"][MASKS].chunks == (1, Storage().tile, Storage().tile)
    assert [type(c).__name__ for c in root["train"][MASKS].compressors] == ["ZstdCodec"]


def test_image_and_mask_codecs_are_chosen_separately(small_tree, tmp_path, clean_cache):
    out = tmp_path / "cache"
    result = run_build("--root", small_tree, "--out", out, "--workers", "1", "--splits", "val",
                       "--tile", "128", "--no-shard", "--codec", "lz4", "--mask-codec", "none")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out), mode="r")["val"]
    assert [c.to_dict()["configuration"]["cname"] for c in group[IMAGES].compressors] == ["lz4"]
    assert group[MASKS].compressors == () and group[MASKS].shards is None
    mask_tile = out / "val" / MASKS / "c" / "0" / "0" / "0"
    assert mask_tile.stat().st_size == 128 * 128  # stored raw
    mine, clean = CacheReader(out), CacheReader(clean_cache)
    for row in range(2):
        for got, want in zip(mine.read_frame("val", row), clean.read_frame("val", row)):
            np.testing.assert_array_equal(got, want)


def test_storage_options_are_checked_and_named():
    from cache.errors import UserError

    with pytest.raises(UserError, match="--codec: unknown codec 'gzip'"):
        Storage(codec="gzip")
    with pytest.raises(UserError, match="--mask-codec: unknown codec 'png'"):
        Storage(mask_codec="png")
    with pytest.raises(UserError, match="--tile must be between 16 and 4096"):
        Storage(tile=8)
    assert Storage(64, "lz4").pixel_array_spec((2, 64, 64, 3), 0)["compressors"][0].cname.value == "lz4"
    assert Storage(64, "lz4").pixel_array_spec((2, 64, 64), 255)["compressors"][0].level == 1  # masks


def test_cli_build_says_which_split_has_no_masks_and_rerun_rebuilds_nothing(small_tree, tmp_path, clean_cache):
    out = tmp_path / "cache"
    first = run_build("--root", small_tree, "--out", out, "--workers", "1", "--tile", "128")
    assert first.exit_code == 0, first.output
    assert "split 'test': images only, no masks array" in first.output
    assert "test: 2 frames, images only" in first.output
    # (the lock file excepted: each run notes its holder in it)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    again = run_build("--root", small_tree, "--out", out, "--workers", "1", "--tile", "128")
    assert again.exit_code == 0, again.output
    assert again.output.count("already complete") == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_limit_and_splits_options(small_tree, tmp_path):
    out = tmp_path / "cache"
    result = run_build("--root", small_tree, "--out", out, "--workers", "1", "--limit", "1",
                       "--splits", "val,train")
    assert result.exit_code == 0, result.output
    reader = CacheReader(out)
    assert reader.split_names() == ["train", "val"]
    assert len(reader.split("train")) == 1 and len(reader.split("val")) == 1
    assert reader.split("train").frames[0] == discover(small_tree)["train"][0].name


def test_two_workers_and_one_give_the_same_bytes(small_tree, tmp_path, clean_cache):
    out = tmp_path / "cache"
    assert run_build("--root", small_tree, "--out", out, "--workers", "1").exit_code == 0
    assert_same_cache(clean_cache, out)


@pytest.mark.parametrize("shard, files_per_row", [("--shard", 1), ("--no-shard", 8)])
def test_shards_and_tiles_hold_the_same_pixels(small_tree, tmp_path, clean_cache, shard, files_per_row):
    out = tmp_path / "cache"
    result = run_build("--root", small_tree, "--out", out, "--workers", "1", "--tile", "128", shard)
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out), mode="r")["train"]
    assert group[IMAGES].chunks == (1, 128, 128, 3)
    assert group[IMAGES].shards == ((1, 256, 512, 3) if shard == "--shard" else None)
    assert len([p for p in (out / "train" / IMAGES / "c").rglob("*") if p.is_file()]) == 4 * files_per_row
    other, clean = CacheReader(out), CacheReader(clean_cache)
    for split in ("train", "val", "test"):
        for row in range(len(clean.split(split))):
            for got, want in zip(other.read_frame(split, row), clean.read_frame(split, row)):
                np.testing.assert_array_equal(got, want)
    assert other.read_window("train", 1, 100, 200, 60, 90)[0].shape == (60, 90, 3)


# -- resume ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def kill_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("killraw") / "cityscapes"
    write_synthetic_tree(root, 16, height=512, width=1024, seed=5)  # train 12, val 4
    return root


def done_rows(out: Path, split: str) -> int:
    """Rows whose done flag is committed (0 before the array exists or while it is replaced)."""
    try:
        return int(np.asarray(zarr.open_array(str(out / split / DONE), mode="r")[:]).sum())
    except Exception:
        return 0


def rows_on_disk(out: Path, split: str) -> int:
    """Rows whose image shard exists (written; their done flags follow in batches)."""
    chunks = out / split / IMAGES / "c"
    return sum(1 for p in chunks.iterdir() if p.name.isdigit()) if chunks.is_dir() else 0


def start_and_kill(root: Path, out: Path, kill_after: int) -> None:
    """Start a build in a subprocess and kill -9 it once `kill_after` train rows are written."""
    command = [sys.executable, "-m", "dataprep.cli", "build", "--root", str(root), "--out", str(out),
               "--workers", "2", "--tile", "128"]
    proc = subprocess.Popen(command, cwd=ROOT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while rows_on_disk(out, "train") < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def test_kill_9_mid_build_then_rerun_gives_exactly_the_clean_build(kill_tree, tmp_path):
    clean = tmp_path / "clean"
    build_cache(BuildOptions(root=kill_tree, out=clean, workers=2, storage=Storage(tile=128)))
    out = tmp_path / "killed"
    start_and_kill(kill_tree, out, kill_after=2)
    start_and_kill(kill_tree, out, kill_after=7)  # resumes, and is killed again
    train = zarr.open_group(str(out), mode="r")["train"]
    assert train.attrs["complete"] is False
    assert done_rows(out, "train") <= rows_on_disk(out, "train")  # a flag never precedes its row
    # the workers die with the build (PR_SET_PDEATHSIG): nothing writes to the cache any more
    time.sleep(0.3)
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    time.sleep(0.5)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot
    result = run_build("--root", kill_tree, "--out", out, "--workers", "2", "--tile", "128")
    assert result.exit_code == 0, result.output
    written = {line.split(":")[0]: line for line in result.stderr.splitlines() if "rows written" in line}
    assert "12 frames" in written["train"] and "rows written" in written["train"]
    assert not list(out.rglob("*.partial"))
    assert_same_cache(clean, out)


@pytest.mark.parametrize("torn", [DONE + "/c/0", CHECKSUMS + "/c/0/0"])
def test_torn_done_or_checksum_chunk_reads_as_not_done(small_tree, tmp_path, clean_cache, torn):
    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    train = zarr.open_group(str(out), mode="r+", use_consolidated=False)["train"]
    train.attrs["complete"] = False  # as if the build had been interrupted
    (out / "train" / torn).write_bytes(b"\x01\x02")  # torn: short (one chunk holds every row here)
    (out / "train" / IMAGES / "c" / "3.0123.partial").write_bytes(b"leftover")
    result = run_build("--root", small_tree, "--out", out, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "train: 4 frames, images + masks, 4 rows written" in result.output
    assert_same_cache(clean_cache, out)


def test_interrupted_split_setup_is_started_again(small_tree, tmp_path, clean_cache):
    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    shutil.rmtree(out / "val" / DONE)  # killed before the done array was created
    zarr.open_group(str(out), mode="r+")["val"].attrs["complete"] = False
    result = run_build("--root", small_tree, "--out", out, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "val: 2 frames, images + masks, 2 rows written" in result.output
    assert_same_cache(clean_cache, out)


# -- refusals -------------------------------------------------------------------
@pytest.mark.parametrize("first, second, words", [
    (["--tile", "128"], ["--tile", "256"], "128 px tiles"),
    (["--codec", "lz4"], ["--codec", "zstd-1"], "images were written with another codec than --codec zstd-1"),
    (["--mask-codec", "lz4"], [], "masks were written with another codec than --mask-codec zstd-1"),
    (["--limit", "1"], [], "holds 1 frames but this build would make 2"),
    (["--no-shard"], [], "written without shards, this build with"),
])
def test_resume_with_other_options_is_refused_until_force(small_tree, tmp_path, first, second, words):
    out = tmp_path / "cache"
    common = ["--root", small_tree, "--out", out, "--workers", "1", "--splits", "val"]
    assert run_build(*common, *first).exit_code == 0
    refused = run_build(*common, *second)
    assert refused.exit_code == 1
    line = error_line(refused)
    assert words in line and "--force" in line
    forced = run_build(*common, *second, "--force")
    assert forced.exit_code == 0, forced.output
    assert zarr.open_group(str(out), mode="r")["val"].attrs["complete"] is True


def test_force_rebuilds_and_drops_stale_stats(small_tree, tmp_path, clean_cache):
    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    (out / STATS_FILE).write_text(json.dumps({"split": "train"}))
    result = run_build("--root", small_tree, "--out", out, "--workers", "1", "--splits", "train", "--force")
    assert result.exit_code == 0, result.output
    assert "train: 4 frames, images + masks, 4 rows written" in result.output
    assert not (out / STATS_FILE).exists()
    assert_same_cache(clean_cache, out)


def test_other_format_version_is_refused_until_force(small_tree, tmp_path, clean_cache):
    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    zarr.open_group(str(out), mode="r+").attrs["version"] = 99
    refused = run_build("--root", small_tree, "--out", out, "--workers", "1")
    assert refused.exit_code == 1 and "version 99" in error_line(refused) and "--force" in error_line(refused)
    assert run_build("--root", small_tree, "--out", out, "--workers", "1", "--force").exit_code == 0
    assert_same_cache(clean_cache, out)


def test_out_that_is_not_a_cache_is_never_touched(small_tree, tmp_path):
    out = tmp_path / "papers"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    for extra in ([], ["--force"]):
        result = run_build("--root", small_tree, "--out", out, *extra)
        assert result.exit_code == 1
        assert str(out) in error_line(result) and "not a Cityscapes cache" in error_line(result)
    assert [p.name for p in out.iterdir()] == ["thesis.txt"]


# -- bad input ------------------------------------------------------------------
def first_frame(root: Path, split: str = "train"):
    return discover(root, [split])[split][0]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def resize_image(path: Path, width: int, height: int) -> None:
    Image.open(path).convert("RGB").resize((width, height)).save(path)


def set_json_size(path: Path, width: int, height: int) -> None:
    doc = json.loads(path.read_text())
    doc["imgWidth"], doc["imgHeight"] = width, height
    path.write_text(json.dumps(doc))


def add_unknown_label(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["objects"].append({"label": "flying saucer", "polygon": [[0, 0], [20, 0], [20, 20]], "deleted": 0})
    path.write_text(json.dumps(doc))


BAD_FRAMES = {
    "truncated json": (lambda f: truncate(f.polygons), "polygons", "not valid JSON"),
    "not json": (lambda f: f.polygons.write_text("<html>404</html>"), "polygons", "not valid JSON"),
    "garbage png": (lambda f: f.image.write_bytes(b"GIF89a" + bytes(100)), "image", "not a PNG"),
    "truncated png": (lambda f: truncate(f.image), "image", "truncated PNG"),
    "corrupt png data": (lambda f: flip_middle(f.image), "image", "cannot decode PNG"),
    "size differs from json": (lambda f: resize_image(f.image, 256, 128), "image", "says 512x256"),
    "unknown label": (lambda f: add_unknown_label(f.polygons), "polygons", "unknown label"),
    "other frame size": (lambda f: (resize_image(f.image, 256, 128), set_json_size(f.polygons, 256, 128)),
                         "image", "other frames of split 'train' are 512x256"),
}


@pytest.mark.parametrize("kind", list(BAD_FRAMES))
def test_bad_frame_stops_the_build_naming_the_file(tree, tmp_path, kind):
    damage, which, words = BAD_FRAMES[kind]
    frame = discover(tree, ["train"])["train"][2]
    damage(frame)
    out = tmp_path / "cache"
    result = run_build("--root", tree, "--out", out, "--workers", "1")
    assert result.exit_code == 1
    line = error_line(result)
    assert str(getattr(frame, which)) in line and words in line
    root = zarr.open_group(str(out), mode="r")
    if "train" in [name for name, _ in root.groups()]:  # found while decoding: split unfinished
        assert root["train"].attrs["complete"] is False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_decode_time_failure_keeps_written_rows_and_resumes_once_fixed(tree, tmp_path, clean_cache, workers):
    frame = discover(tree, ["train"])["train"][2]
    original = frame.polygons.read_bytes()
    add_unknown_label(frame.polygons)
    out = tmp_path / "cache"
    stopped = run_build("--root", tree, "--out", out, "--workers", workers, "--splits", "train")
    assert stopped.exit_code == 1 and "unknown label" in error_line(stopped)
    done = CacheReader(out).done_rows("train").tolist()
    assert done[:3] == [True, True, False]  # with 2 workers row 3 may have been written too
    frame.polygons.write_bytes(original)
    result = run_build("--root", tree, "--out", out, "--workers", workers)
    assert result.exit_code == 0, result.output
    assert f"train: 4 frames, images + masks, {4 - sum(done)} rows written" in result.output
    assert_same_cache(clean_cache, out)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_on_error_skip_leaves_bad_frames_out_and_exits_3(tree, tmp_path, clean_cache, workers):
    frames = discover(tree, ["train"])["train"]
    truncate(frames[0].polygons)            # found by the cheap checks
    add_unknown_label(frames[2].polygons)   # found only while rendering
    out = tmp_path / "cache"
    result = run_build("--root", tree, "--out", out, "--workers", workers, "--on-error", "skip")
    assert result.exit_code == EXIT_SKIPPED, result.output
    assert "2 bad frames were left out" in result.output
    assert f"skipped train/{frames[0].name}" in result.stderr and "not valid JSON" in result.stderr
    assert f"skipped train/{frames[2].name}" in result.stderr and "unknown label" in result.stderr
    good = [frames[1].name, frames[3].name]
    group = zarr.open_group(str(out), mode="r")["train"]
    assert group.attrs["frames"] == good and group.attrs["complete"] is True
    assert sorted(group.attrs[SKIPPED_ATTR]) == sorted([frames[0].name, frames[2].name])
    assert group[IMAGES].shape[0] == 2 and group[DONE].shape == (2,)
    clean = zarr.open_group(str(clean_cache), mode="r")["train"]
    for row, name in enumerate(good):
        clean_row = clean.attrs["frames"].index(name)
        for array in (IMAGES, MASKS, CHECKSUMS):
            np.testing.assert_array_equal(group[array][row], clean[array][clean_row])
    again = run_build("--root", tree, "--out", out, "--workers", workers, "--on-error", "skip")
    assert again.exit_code == EXIT_SKIPPED and "train: 2 frames, images + masks, already complete" in again.output


def test_tree_and_out_problems_are_one_line_errors(tmp_path, small_tree):
    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "train").mkdir(parents=True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    missing_gt = Path(shutil.copytree(small_tree, tmp_path / "nogt"))
    first_frame(missing_gt).polygons.unlink()
    cases = [
        (["--root", tmp_path / "nowhere", "--out", tmp_path / "c1"], "does not exist"),
        (["--root", empty, "--out", tmp_path / "c2"], "no *_leftImg8bit.png images"),
        (["--root", small_tree, "--out", blocker / "cache"], "cannot write"),
        (["--root", missing_gt, "--out", tmp_path / "c3"], "no polygon file"),
        (["--root", small_tree, "--out", tmp_path / "c4", "--workers", "0"], "--workers"),
        (["--root", small_tree, "--out", tmp_path / "c5", "--splits", "nosuch"], "'nosuch' not found"),
    ]
    for args, words in cases:
        result = run_build(*args)
        assert result.exit_code == 1, (args, result.output)
        assert words in error_line(result), (args, result.output)
    missing = CliRunner().invoke(main, ["build", "--out", str(tmp_path / "c6")],
                                 env={"CITYSCAPES_DATASET": None})
    assert missing.exit_code == 1 and "--root" in error_line(missing)


def test_coarse_builds_train_extra_from_gtcoarse(tree, tmp_path):
    """train_extra (gtCoarse polygons) is built only with --coarse."""
    for frame in discover(tree, ["train"])["train"][:2]:
        city = frame.image.parent.name
        stem = frame.name.split("/")[1]
        image_dir = tree / "leftImg8bit" / "train_extra" / city
        gt_dir = tree / "gtCoarse" / "train_extra" / city
        image_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(frame.image, image_dir / frame.image.name)
        shutil.copy(frame.polygons, gt_dir / f"{stem}_gtCoarse_polygons.json")
    out = tmp_path / "cache"
    plain = run_build("--root", tree, "--out", out, "--workers", "1", "--limit", "1")
    assert plain.exit_code == 0 and "train_extra" not in CacheReader(out).split_names()
    coarse = run_build("--root", tree, "--out", out, "--workers", "1", "--coarse", "--splits", "train_extra")
    assert coarse.exit_code == 0, coarse.output
    extra = discover(tree, ["train_extra"], coarse=True)["train_extra"]
    reader = CacheReader(out)
    assert reader.split("train_extra").frames == tuple(f.name for f in extra)
    for row, frame in enumerate(extra):
        np.testing.assert_array_equal(reader.read_frame("train_extra", row)[1], render_trainids(frame.polygons))


def test_drop_interrupted_before_the_arrays_shrank_is_finished_on_resume(tmp_path):
    """--on-error skip drops frames in three steps; a kill between the last two is repaired."""
    from cache.writer import CacheWriter, RowWriter, SplitPlan
    from tests.cachefab import blocky_frame

    names = tuple(f"a/a_{i:06d}_000019" for i in range(4))
    writer = CacheWriter(tmp_path / "cache")
    storage = Storage(tile=64)
    writer.prepare_split(SplitPlan("train", names, 64, 128, True), storage)
    rows = RowWriter(tmp_path / "cache", "train")
    for row in range(4):
        writer.record_row("train", row, rows.write_row(row, *blocky_frame(64, 128, seed=row)))
    writer.flush("train")
    # drop_frames steps 1 and 2 (done flags from the first dropped row on, then the frame list)...
    group = writer.root["train"]
    group[DONE][1:] = 0
    group.attrs.update({"frames": [names[0], names[2], names[3]], SKIPPED_ATTR: {names[1]: "bad"}})
    # ...then killed before the arrays were resized; the next run plans the 3 frames:
    plan = SplitPlan("train", (names[0], names[2], names[3]), 64, 128, True, {names[1]: "bad"})
    done = CacheWriter(tmp_path / "cache").prepare_split(plan, storage)
    assert done.tolist() == [True, False, False]
    assert group[IMAGES].shape[0] == 3 and group[DONE].shape == (3,) and group[CHECKSUMS].shape == (3, 2)
    np.testing.assert_array_equal(CacheReader(tmp_path / "cache").read_frame("train", 0)[1],
                                  blocky_frame(64, 128, seed=0)[1])


# -- the read-back check and the worker processes ---------------------------------
def one_row_cache(path: Path, storage: Storage):
    from cache.writer import CacheWriter, RowWriter, SplitPlan
    from tests.cachefab import blocky_frame

    writer = CacheWriter(path)
    writer.prepare_split(SplitPlan("val", ("a/a_000000_000019",), 64, 128, True), storage)
    return RowWriter(path, "val"), blocky_frame(64, 128, seed=1)


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec, shard", [("none", True), ("none", False), ("zstd-1", True), ("lz4", False)])
def test_the_check_catches_tiles_that_do_not_decode_to_the_frame(tmp_path, codec, shard):
    from cache.format import CacheError

    rows, (image, mask) = one_row_cache(tmp_path / "c", Storage(64, codec, shard, mask_codec=codec))
    written = rows.write(0, image, mask)
    rows.check(0, written)
    stored = sorted(p for p in (tmp_path / "c" / "val" / MASKS / "c").rglob("*") if p.is_file())[0]
    flip_byte(stored, 40)  # a pixel of a raw tile, or a byte of a compressed stream
    with pytest.raises(CacheError, match="masks of row 0 read back differently"):
        rows.check(0, written)
    written = rows.write(0, image, mask)
    stored.unlink()  # a file that vanished (another process, a full disk) fails the check too
    with pytest.raises(CacheError, match="masks of row 0 read back differently"):
        rows.check(0, written)


def test_the_check_reads_a_rewritten_shard_through_its_new_index(tmp_path):
    """A shard rewritten within the file system's timestamp granularity (forced here) must not
    be read through the index cache.tiles kept of its previous version."""
    rows, (image, mask) = one_row_cache(tmp_path / "c", Storage(32, "zstd-1", True))
    rows.write_row(0, image, mask)
    shard = tmp_path / "c" / "val" / MASKS / "c" / "0" / "0" / "0"
    stamp = shard.stat()
    other_mask = np.random.default_rng(0).integers(0, 19, mask.shape, dtype=np.uint8)  # other offsets
    written = rows.write(0, image, other_mask)
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    rows.check(0, written)
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").read_frame("val", 0)[1], other_mask)


def test_a_new_row_writer_opens_the_arrays_again(tmp_path):
    """Workers keep opened arrays per RowWriter token; a cache made again at the same path
    (other shape) is written through its new arrays."""
    from tests.cachefab import blocky_frame

    path = tmp_path / "c"
    first, (image, mask) = one_row_cache(path, Storage(64))
    first.write_row(0, image, mask)
    shutil.rmtree(path)
    from cache.writer import CacheWriter, RowWriter, SplitPlan

    CacheWriter(path).prepare_split(SplitPlan("val", ("a/a_000000_000019",), 96, 64, True), Storage(64))
    image, mask = blocky_frame(96, 64, seed=2)
    RowWriter(path, "val").write_row(0, image, mask)
    np.testing.assert_array_equal(CacheReader(path).read_frame("val", 0)[0], image)


def test_workers_are_forked_from_a_single_threaded_build_else_from_a_forkserver():
    import threading

    from dataprep.build import worker_context

    code = "from dataprep.build import worker_context; print(worker_context().get_start_method())"
    fresh = subprocess.run([sys.executable, "-c", code], cwd=ROOT_DIR, capture_output=True, text=True)
    assert fresh.stdout.strip() == "fork", fresh.stderr
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert worker_context().get_start_method() == "forkserver"
    finally:
        stop.set()
        thread.join()


# -- the direct tile writer, the decoder -------------------------------------------
@pytest.mark.parametrize("storage", [Storage(64, "none", True, "zstd-1"), Storage(64, "zstd-1", True, "lz4"),
                                     Storage(48, "lz4", False, "none"), Storage(64, "zstd-3", False)])
def test_our_tile_files_read_in_zarr_as_zarrs_own(tmp_path, storage):
    """RowWriter writes the shard/tile files itself; zarr must read them as the frame, edge
    tiles (padded with the fill value) included, exactly as it reads the files it writes."""
    from cache.writer import CacheWriter, RowWriter, SplitPlan

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 100, 150, 3), dtype=np.uint8)
    masks = rng.integers(0, 19, (2, 100, 150), dtype=np.uint8)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for path in (ours, theirs):
        CacheWriter(path).prepare_split(SplitPlan("train", ("a/a_0", "a/a_1"), 100, 150, True), storage)
    rows = RowWriter(ours, "train")
    group = zarr.open_group(str(theirs), mode="r+", use_consolidated=False)["train"]
    for row in range(2):
        rows.write_row(row, images[row], masks[row])
        group[IMAGES][row], group[MASKS][row] = images[row], masks[row]
    read = zarr.open_group(str(ours), mode="r", use_consolidated=False)["train"]
    np.testing.assert_array_equal(read[IMAGES][:], images)
    np.testing.assert_array_equal(read[MASKS][:], masks)
    assert sorted(cache_files(ours / "train" / IMAGES)) == sorted(cache_files(theirs / "train" / IMAGES))


def test_decoder_gives_pils_pixels_and_falls_back_to_pil(tmp_path):
    from dataprep.build import _decode_rgb8_png, decode_image
    from dataprep.rasterize import BadFrame
    from dataprep.synth import photo_like, synthetic_frame

    rgb = photo_like(synthetic_frame(np.random.default_rng(1), 256, 512)[2], np.random.default_rng(2))
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    assert _decode_rgb8_png((tmp_path / "photo.png").read_bytes()) is not None  # libspng took it
    np.testing.assert_array_equal(decode_image(tmp_path / "photo.png"), rgb)
    # other PNG kinds go to PIL and come out as PIL's RGB
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    for name in ("palette.png", "rgba.png"):
        assert _decode_rgb8_png((tmp_path / name).read_bytes()) is None
        with Image.open(tmp_path / name) as image:
            np.testing.assert_array_equal(decode_image(tmp_path / name), np.asarray(image.convert("RGB")))
    data = (tmp_path / "photo.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFrame, match="cut.png: cannot decode PNG"):
        decode_image(tmp_path / "cut.png")


# -- --scale ----------------------------------------------------------------------
def test_scale_stores_training_splits_downscaled_and_stats_and_loader_run_on_it(small_tree, tmp_path):
    from dataprep.build import downscale
    from dataprep.stats import compute_stats
    from loaders import AugmentConfig
    from loaders.factory import build_loader

    out = tmp_path / "half"
    result = run_build("--root", small_tree, "--out", out, "--workers", "2", "--scale", "0.5", "--tile", "128")
    assert result.exit_code == 0, result.output
    assert "train: 4 frames, images + masks, 4 rows written, stored at 256x128 (--scale 0.5)" in result.output
    reader = CacheReader(out)
    train, val = reader.split("train"), reader.split("val")
    assert (train.height, train.width, train.scale) == (128, 256, 0.5)
    assert (val.height, val.width, val.scale) == (256, 512, 1.0)  # evaluation stays full-size
    group = zarr.open_group(str(out), mode="r")["train"]
    assert group.attrs["scale"] == 0.5 and group.attrs["source_size"] == [256, 512]
    for row, frame in enumerate(discover(small_tree, ["train"])["train"]):
        full_mask = render_trainids(frame.polygons)
        image, mask = reader.read_frame("train", row)
        with Image.open(frame.image) as png:
            want = np.asarray(png.convert("RGB").resize((256, 128), Image.BILINEAR))
        np.testing.assert_array_equal(image, want)
        np.testing.assert_array_equal(mask, downscale(np.zeros((256, 512, 3), np.uint8), full_mask, (128, 256))[1])
        assert set(np.unique(mask)) <= set(np.unique(full_mask))  # nearest: only source labels
    stats = compute_stats(out, "train")
    assert (stats["height"], stats["width"]) == (128, 256)
    assert sum(stats["pixel_counts"]) + stats["ignored_pixels"] == len(train) * 128 * 256
    loader = build_loader(out, "train", "torch", train=True, batch_size=2, num_workers=0,
                          aug=AugmentConfig(crop=(96, 96)))
    batch = next(iter(loader))
    assert tuple(batch.image.shape) == (2, 3, 96, 96) and tuple(batch.mask.shape) == (2, 96, 96)
    refused = run_build("--root", small_tree, "--out", out, "--workers", "1", "--splits", "train", "--force",
                        "--scale", "0")
    assert refused.exit_code == 1 and "--scale must be in (0, 1]" in error_line(refused)
    again = run_build("--root", small_tree, "--out", out, "--workers", "1", "--splits", "val",
                      "--scale", "0.5", "--scale-splits", "val")
    assert again.exit_code == 1 and "at scale 1, this build at 0.5" in error_line(again)


def test_verify_and_build_show_progress_with_a_total(small_tree, tmp_path):
    out = tmp_path / "cache"
    assert run_build("--root", small_tree, "--out", out, "--workers", "1").exit_code == 0
    result = CliRunner().invoke(main, ["verify", "--cache", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "verify" in result.output and "8/8" in result.output


def test_sigterm_stops_a_build_with_the_resume_hint_and_the_same_command_resumes(small_tree,
                                                                                  tmp_path):
    """A scheduler's SIGTERM is handled as Ctrl-C is: one line, the hint, exit status 143;
    the same command then finishes the cache (it verifies)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cache"
    command = [sys.executable, "-m", "dataprep.cli", "build", "--root", str(small_tree),
               "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(command, cwd=ROOT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    lock = out / ".lock"
    # once the build holds the cache's lock (its note names it), stop it there, so that the
    # signal lands mid-build on any machine, then let it run into the signal
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.is_file() and f"PID {proc.pid} " in lock.read_text(errors="replace"):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; run the same command again to resume", stderr
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr
    again = subprocess.run(command, cwd=ROOT_DIR, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    verify = subprocess.run([sys.executable, "-m", "dataprep.cli", "verify", "--cache", str(out)],
                            cwd=ROOT_DIR, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
