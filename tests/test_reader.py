"""cache.reader / cache.tiles: the contract checks and the direct tile reader against zarr."""
import pickle
import warnings

import numpy as np
import pytest
import zarr

from cache.format import FORMAT_VERSION, STATS_FILE, CacheError
from cache.reader import CacheReader
from cache.tiles import TileArray, Unsupported
from cache.writer import CODEC_NAMES, Storage
from tests.cachefab import blocky_cache, write_cache


def random_windows(rng, shape, n):
    rows, height, width = shape[:3]
    for _ in range(n):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        yield (int(rng.integers(0, rows)), int(rng.integers(0, height - h + 1)),
               int(rng.integers(0, width - w + 1)), h, w)


@pytest.mark.parametrize("codec", CODEC_NAMES)
@pytest.mark.parametrize("shard", [False, True])
def test_direct_reader_equals_zarr(tmp_path, codec, shard):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 255, (3, 150, 260, 3), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path), mode="w")
    array = group.create_array("images", **Storage(tile=64, codec=codec, shard=shard)
                               .pixel_array_spec(images.shape, 0))
    array[0], array[2] = images[0], images[2]   # row 1 never written: reads as fill value
    array[2, :64, :64] = 0                      # an all-fill tile inside a written row
    direct = TileArray(str(tmp_path / "images"))
    assert direct.sharded == shard
    for window in random_windows(rng, images.shape, 60):
        row, y, x, h, w = window
        np.testing.assert_array_equal(direct.read(*window), array[row, y:y + h, x:x + w])


def test_direct_reader_refuses_what_it_does_not_know(tmp_path):
    group = zarr.open_group(str(tmp_path), mode="w")
    group.create_array("f", shape=(2, 8, 8), chunks=(1, 4, 4), dtype="float32")
    with pytest.raises(Unsupported):
        TileArray(str(tmp_path / "f"))


def test_read_window_and_frame(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 100, 180, 3), dtype=np.uint8)
    masks = rng.integers(0, 19, (2, 100, 180), dtype=np.uint8)
    write_cache(tmp_path / "c", {"val": (images, masks, ["a/a_000000_000001", "b/b_000000_000001"])},
                tile=32)
    reader = CacheReader(tmp_path / "c")
    image, mask = reader.read_window("val", 1, 10, 20, 50, 70)
    np.testing.assert_array_equal(image, images[1, 10:60, 20:90])
    np.testing.assert_array_equal(mask, masks[1, 10:60, 20:90])
    image, mask = pickle.loads(pickle.dumps(reader)).read_frame("val", 0)
    np.testing.assert_array_equal(image, images[0])
    np.testing.assert_array_equal(mask, masks[0])


def test_split_without_masks_reads_none(tmp_path):
    images = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    write_cache(tmp_path / "c", {"test": (images, None, ["a/a_000000_000001"])}, tile=32)
    reader = CacheReader(tmp_path / "c")
    assert not reader.split("test").has_masks
    assert reader.read_window("test", 0, 0, 0, 8, 8)[1] is None


def test_contract_refusals(tmp_path):
    with pytest.raises(CacheError, match="no cache there"):
        CacheReader(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="not a Zarr v3 group"):
        CacheReader(tmp_path / "empty")
    other = zarr.open_group(str(tmp_path / "other"), mode="w")
    with pytest.raises(CacheError, match="not a Cityscapes cache"):
        CacheReader(tmp_path / "other")
    cache = blocky_cache(tmp_path / "c", n_train=2, n_val=1, height=64, width=64, tile=32)
    root = zarr.open_group(str(cache), mode="r+")
    root.attrs["version"] = 99
    with pytest.raises(CacheError, match="version 99 is not supported.*--force"):
        CacheReader(cache)
    root.attrs["version"] = 1  # a cache of the previous format (crc32 checksums)
    with pytest.raises(CacheError, match=r"version 1 is not supported by this code \(it reads version "
                       rf"{FORMAT_VERSION}\); rebuild it with `dataprep build --force`"):
        CacheReader(cache)
    root.attrs["version"] = FORMAT_VERSION
    reader = CacheReader(cache)
    with pytest.raises(CacheError, match="no split 'test'.*train, val"):
        reader.split("test")
    root["train"].attrs["complete"] = False
    with pytest.raises(CacheError, match="'train' is incomplete"):
        CacheReader(cache).split("train")
    del other


# -- what outside tools see ------------------------------------------------------------
def test_arrays_name_their_dimensions_and_outside_readers_see_no_warning(tmp_path):
    """xarray needs Zarr v3 dimension_names; zarr lists the root without warning about
    stats.json (consolidated metadata, written once a split is complete)."""
    cache = blocky_cache(tmp_path / "c", n_train=2, n_val=1, height=64, width=64, tile=32)
    (cache / STATS_FILE).write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root = zarr.open_group(str(cache), mode="r")
        assert sorted(root.group_keys()) == ["train", "val"]
        for split in ("train", "val"):
            group = root[split]
            assert {name: group[name].metadata.dimension_names for name in group.array_keys()} == {
                "images": ("frame", "y", "x", "channel"), "masks": ("frame", "y", "x"),
                "checksums": ("frame", "checksum"), "done": ("frame",)}


def test_xarray_opens_every_split(tmp_path):
    xarray = pytest.importorskip("xarray")
    cache = blocky_cache(tmp_path / "c", n_train=2, n_val=1, height=64, width=64, tile=32)
    (cache / STATS_FILE).write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = xarray.open_zarr(cache, group="train")
        val = xarray.open_zarr(cache, group="val")
    assert dict(train.sizes) == {"frame": 2, "y": 64, "x": 64, "channel": 3, "checksum": 2}
    assert val["masks"].dims == ("frame", "y", "x") and val.attrs["frames"] == ["city0/city0_000000_000019"]
    np.testing.assert_array_equal(train["images"][1].values, CacheReader(cache).read_frame("train", 1)[0])
