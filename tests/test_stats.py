"""`dataprep stats`: counts and weights against a direct computation; JSON contract; streaming."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cache.format import CLASS_NAMES, STATS_FILE
from cache.reader import CacheReader
from dataprep.cli import main
from dataprep.stats import class_weights, compute_stats
from tests.cachefab import blocky_frame, write_cache

NAMES = [f"c{i}/c{i}_000000_000019" for i in range(4)]


def masks_with_ignore_and_absent_class() -> np.ndarray:
    """4 masks of 64x128: blocky classes, class 7 removed, some ignore pixels."""
    masks = np.stack([blocky_frame(64, 128, seed=s, block=16)[1] for s in range(4)])
    masks[masks == 7] = 6
    masks[0, :8, :] = 255
    masks[2, :, :5] = 255
    return masks


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[Path, np.ndarray]:
    masks = masks_with_ignore_and_absent_class()
    images = np.zeros(masks.shape + (3,), dtype=np.uint8)
    path = tmp_path_factory.mktemp("stats") / "cache"
    write_cache(path, {"train": (images, masks, NAMES), "test": (images[:2], None, NAMES[:2])}, tile=64)
    return path, masks


def test_counts_frequencies_and_frames_match_numpy(cache):
    path, masks = cache
    stats = compute_stats(path, "train")
    counts = np.array([(masks == c).sum() for c in range(19)])
    assert stats["pixel_counts"] == counts.tolist()
    assert stats["frequencies"] == pytest.approx((counts / counts.sum()).tolist())
    assert stats["frame_counts"] == [int(sum((m == c).any() for m in masks)) for c in range(19)]
    assert stats["frame_counts"][7] == 0
    assert stats["ignored_fraction"] == pytest.approx((masks == 255).mean())
    assert stats["frames"] == 4 and stats["split"] == "train"
    assert stats["class_names"] == list(CLASS_NAMES)


def test_weights_follow_their_definitions(cache):
    path, masks = cache
    stats = compute_stats(path, "train")
    counts = np.array(stats["pixel_counts"], dtype=float)
    p = counts / counts.sum()
    enet = stats["weights"]["enet"]
    assert enet == pytest.approx([1 / math.log(1.02 + x) for x in p])
    # median frequency: f_c = pixels of c / pixels of the frames where c appears
    frame_pixels = np.array(stats["frame_counts"]) * masks[0].size
    seen = counts > 0
    f = counts[seen] / frame_pixels[seen]
    median = np.array(stats["weights"]["median_frequency"])
    assert median[seen] == pytest.approx(np.median(f) / f)
    assert median[7] == pytest.approx(median[seen].max())  # absent class: the largest weight
    inv = np.array(stats["weights"]["inverse_sqrt"])
    assert (p * inv).sum() == pytest.approx(1.0)
    assert inv[seen] == pytest.approx((1 / np.sqrt(p[seen])) / (1 / np.sqrt(p[seen]) * p[seen]).sum())
    assert all(len(w) == 19 and all(math.isfinite(x) for x in w) for w in stats["weights"].values())


def test_rarer_classes_weigh_more():
    counts = np.array([1000, 100, 10] + [0] * 16)
    frame_pixels = np.array([2000, 2000, 2000] + [0] * 16)
    for method, weights in class_weights(counts, frame_pixels).items():
        assert weights[0] < weights[1] < weights[2], method


def test_cli_writes_the_json_contract(cache, tmp_path):
    path, _ = cache
    result = CliRunner().invoke(main, ["stats", "--cache", str(path)])
    assert result.exit_code == 0, result.output
    assert "class statistics of split 'train'" in result.stdout and "sidewalk" in result.stdout
    doc = json.loads((path / STATS_FILE).read_text())
    for key in ("split", "class_names", "pixel_counts", "frequencies", "frame_counts", "weights",
                "ignored_fraction", "frames"):
        assert key in doc, key
    assert sorted(doc["weights"]) == ["enet", "inverse_sqrt", "median_frequency"]
    assert doc == json.loads(json.dumps(compute_stats(path, "train")))
    other = tmp_path / "sub" / "w.json"
    result = CliRunner().invoke(main, ["stats", "--cache", str(path), "--json", str(other)])
    assert result.exit_code == 0 and json.loads(other.read_text())["split"] == "train"
    # the cache stays readable as a cache with stats.json next to its splits
    assert CacheReader(path).split_names() == ["test", "train"]


def test_stats_stream_one_whole_row_at_a_time_through_the_tile_reader(cache, monkeypatch):
    path, _ = cache
    windows = []
    real_read = CacheReader.read_mask_window

    def spy(self, split, row, y, x, h, w):
        windows.append((row, y, x, h, w))
        return real_read(self, split, row, y, x, h, w)

    monkeypatch.setattr(CacheReader, "read_mask_window", spy)
    compute_stats(path, "train")
    info = CacheReader(path).split("train")
    assert windows == [(row, 0, 0, info.height, info.width) for row in range(4)]


@pytest.mark.parametrize("split, words", [
    ("test", "has no masks"),
    ("nosuch", "no split 'nosuch'"),
    ("val", "is incomplete"),
])
def test_unusable_splits_are_one_line_errors(cache, tmp_path, split, words):
    path, masks = cache
    if split == "val":
        path = tmp_path / "c"
        write_cache(path, {"val": (np.zeros(masks.shape + (3,), np.uint8), masks, NAMES)}, tile=64)
        zarr.open_group(str(path), mode="r+")["val"].attrs["complete"] = False
    result = CliRunner().invoke(main, ["stats", "--cache", str(path), "--split", split])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and words in result.stderr and "Traceback" not in result.output
