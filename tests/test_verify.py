"""`dataprep verify`: a sound cache passes; every kind of damage is found and named."""
from __future__ import annotations

import shutil
import google_crc32c
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cache.format import CHECKSUMS, DONE, IMAGES, MASKS
from cache.verify import verify_cache
from cache.writer import CacheWriter, RowWriter, SplitPlan, Storage
from dataprep.build import BuildOptions, build_cache
from dataprep.cli import main
from dataprep.synth import write_synthetic_tree
from tests.cachefab import blocky_cache, blocky_frame


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache made by the build: train 4, val 2, test 2 (images only), 256x512, 128 px tiles."""
    base = tmp_path_factory.mktemp("verify")
    write_synthetic_tree(base / "raw", 6, height=256, width=512, seed=9, with_test=True)
    out = base / "cache"
    build_cache(BuildOptions(root=base / "raw", out=out, workers=1, storage=Storage(tile=128)))
    return out


@pytest.fixture
def cache(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "cache"))


def run_verify(path: Path, *extra):
    result = CliRunner().invoke(main, ["verify", "--cache", str(path), *extra])
    assert "Traceback" not in result.output, result.output
    return result


def frame_name(path: Path, split: str, row: int) -> str:
    return zarr.open_group(str(path), mode="r")[split].attrs["frames"][row]


def test_sound_cache_passes(built):
    result = run_verify(built)
    assert result.exit_code == 0, result.output
    assert "ok: 8 rows in 3 splits checked" in result.output


def test_flipped_bytes_in_a_stored_tile_name_the_frame(cache):
    chunk = cache / "train" / IMAGES / "c" / "2" / "0" / "0" / "0"  # row 2's shard (1 per row)
    data = bytearray(chunk.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0x5A
    chunk.write_bytes(bytes(data))
    result = run_verify(cache)
    assert result.exit_code == 1
    name = frame_name(cache, "train", 2)
    faults = [line for line in result.stderr.splitlines() if line.startswith("fault: ")]
    assert len(faults) == 1 and f"train row 2 ({name})" in faults[0], result.output
    assert "1 bad frames" in result.stderr


def test_flipped_byte_in_an_uncompressed_mask_tile_is_caught_by_the_checksum(tmp_path):
    # without a codec a flipped byte still decodes: only the checksum can catch it
    path = tmp_path / "raw_cache"
    image, mask = blocky_frame(64, 128, seed=1)
    writer = CacheWriter(path)
    writer.prepare_split(SplitPlan("val", ("a/a_000000_000019",), 64, 128, True),
                         Storage(64, "none", shard=False, mask_codec="none"))
    writer.record_row("val", 0, RowWriter(path, "val").write_row(0, image, mask))
    assert writer.finish_split("val") and verify_cache(path).ok
    chunk = path / "val" / MASKS / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    report = verify_cache(path)
    assert report.bad_frames() == ["val/a/a_000000_000019"]
    assert "mask checksum" in report.faults[0].problem


def test_mask_values_outside_the_trainids_are_faults(cache):
    group = zarr.open_group(str(cache), mode="r+")["val"]
    mask = np.asarray(group[MASKS][1])
    mask[:3, :3] = 40
    group[MASKS][1] = mask
    sums = np.asarray(group[CHECKSUMS][1])
    sums[1] = google_crc32c.value(mask.tobytes())  # a consistent checksum: only the range is wrong
    group[CHECKSUMS][1] = sums
    report = verify_cache(cache)
    assert [str(f) for f in report.faults] == [
        f"val row 1 ({frame_name(cache, 'val', 1)}): mask has 9 pixels outside 0..18 and 255 (values 40)"]


def test_done_flags_complete_flag_and_attrs_are_checked(cache):
    root = zarr.open_group(str(cache), mode="r+")
    root["train"][DONE][3] = 0
    root["val"].attrs["complete"] = False
    root.attrs["class_names"] = ["road"] * 19
    report = verify_cache(cache)
    problems = [str(f) for f in report.faults]
    assert any(p.startswith("cache: root attribute 'class_names'") for p in problems)
    assert f"train row 3 ({frame_name(cache, 'train', 3)}): not done (never written, or the build " \
           "was interrupted)" in problems
    assert any(p.startswith("split 'val': split is not complete") for p in problems)
    assert len(problems) == 3


def test_corrupt_done_chunk_and_missing_array(cache):
    (cache / "train" / DONE / "c" / "0").write_bytes(b"\x00")
    shutil.rmtree(cache / "val" / CHECKSUMS)
    report = verify_cache(cache)
    problems = [str(f) for f in report.faults]
    assert f"train row 0 ({frame_name(cache, 'train', 0)}): its done flag cannot be read (corrupt chunk)" \
        in problems
    assert "split 'val': array(s) checksums missing" in problems


def test_row_count_mismatch_is_a_fault(cache):
    group = zarr.open_group(str(cache), mode="r+")["train"]
    group.attrs["frames"] = group.attrs["frames"][:3]
    problems = [str(f) for f in verify_cache(cache).faults]
    assert any("expected uint8 (3, 256, 512, 3) for 3 frames" in p for p in problems)


def test_many_rows_are_checked_in_worker_processes(tmp_path):
    path = blocky_cache(tmp_path / "big", n_train=18, n_val=2, height=64, width=128, tile=64)
    chunk = path / "train" / IMAGES / "c" / "17" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-5])
    report = verify_cache(path, workers=2)
    assert report.rows_checked == {"train": 18, "val": 2}
    assert len(report.bad_frames()) == 1 and report.faults[0].row == 17


def test_not_a_cache_is_a_one_line_error(tmp_path):
    result = run_verify(tmp_path / "nothing")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: ") and "no cache there" in result.stderr


def test_layouts_the_direct_reader_does_not_know_are_verified_through_zarr(cache, monkeypatch):
    from cache import tiles

    def unsupported(self, path, **kwargs):
        raise tiles.Unsupported("pretend")

    monkeypatch.setattr(tiles.TileArray, "__init__", unsupported)
    assert verify_cache(cache).ok
    mask = np.asarray(zarr.open_group(str(cache), mode="r")["val"][MASKS][0])
    mask[0, 0] = (int(mask[0, 0]) + 1) % 19
    zarr.open_group(str(cache), mode="r+")["val"][MASKS][0] = mask
    faults = verify_cache(cache).faults
    assert len(faults) == 1 and faults[0].split == "val" and "mask checksum" in faults[0].problem


def test_a_cache_without_splits_is_not_ok(tmp_path):
    """A build that stopped at its first frame check leaves a root with no split; verify must
    not call that 'ok'."""
    CacheWriter(tmp_path / "empty")
    result = run_verify(tmp_path / "empty")
    assert result.exit_code == 1
    assert "no splits" in result.stderr
