"""Raw-tree discovery: the official layout, labelled and unlabelled splits, coarse, and clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from cache.errors import UserError
from dataprep.discover import Frame, discover, polygon_dir, unlabelled_splits


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def add_frame(root: Path, split: str, stem: str, gt: str | None = "gtFine") -> None:
    city = stem.split("_")[0]
    touch(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
    if gt:
        touch(root / gt / split / city / f"{stem}_{gt}_polygons.json")
        touch(root / gt / split / city / f"{stem}_{gt}_labelIds.png")  # siblings are ignored


@pytest.fixture
def tree(tmp_path):
    for stem in ("bochum_000000_000313", "aachen_000001_000019", "aachen_000000_000019"):
        add_frame(tmp_path, "train", stem)
    for stem in ("lindau_000000_000019", "frankfurt_000000_000294"):
        add_frame(tmp_path, "val", stem)
    add_frame(tmp_path, "test", "berlin_000000_000019", gt=None)
    add_frame(tmp_path, "train_extra", "bad-honnef_000000_000000", gt="gtCoarse")
    touch(tmp_path / "leftImg8bit" / "train" / "aachen" / ".DS_Store")  # hidden: ignored
    return tmp_path


def test_official_layout(tree):
    found = discover(tree)
    assert list(found) == ["train", "val", "test"]  # train_extra only with coarse
    assert [f.name for f in found["train"]] == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
                                                 "bochum/bochum_000000_000313"]
    assert [f.name for f in found["val"]] == ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"]
    frame = found["train"][0]
    assert frame == Frame("aachen/aachen_000000_000019",
                          tree / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
                          tree / "gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json")
    assert all(f.polygons.is_file() for split in ("train", "val") for f in found[split])
    assert found["test"][0].polygons is None
    assert unlabelled_splits(found) == ["test"]
    with pytest.raises(AttributeError):  # frozen
        frame.name = "x"


def test_selected_splits_keep_order(tree):
    found = discover(tree, splits=["val", "train", "val"])
    assert list(found) == ["val", "train"]
    assert list(discover(tree, splits="test")) == ["test"]
    assert unlabelled_splits(discover(tree, splits=["train"])) == []


def test_coarse_train_extra(tree):
    found = discover(tree, coarse=True)
    assert list(found) == ["train", "val", "test", "train_extra"]
    extra = found["train_extra"]
    assert [f.name for f in extra] == ["bad-honnef/bad-honnef_000000_000000"]
    assert extra[0].polygons == tree / "gtCoarse/train_extra/bad-honnef/bad-honnef_000000_000000_gtCoarse_polygons.json"
    # coarse labels are for train_extra only: train keeps its fine polygons
    assert found["train"][0].polygons.parent.parent.parent.name == "gtFine"
    assert polygon_dir(tree, "train_extra") == tree / "gtCoarse" / "train_extra"
    with pytest.raises(UserError, match="train_extra.*coarse"):
        discover(tree, splits=["train_extra"])


def test_coarse_without_gtcoarse_is_unlabelled(tree):
    import shutil
    shutil.rmtree(tree / "gtCoarse")
    found = discover(tree, splits=["train_extra"], coarse=True)
    assert unlabelled_splits(found) == ["train_extra"]


def one_line_error(root, match, **kwargs):
    with pytest.raises(UserError, match=match) as info:
        discover(root, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_root(tmp_path):
    one_line_error(tmp_path / "nowhere", "does not exist")
    one_line_error(touch(tmp_path / "file"), "not a folder")


def test_root_without_leftimg8bit(tmp_path):
    (tmp_path / "gtFine").mkdir()
    one_line_error(tmp_path, "no leftImg8bit/ folder")


def test_no_frames(tmp_path):
    (tmp_path / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    one_line_error(tmp_path, "no \\*_leftImg8bit.png images found")
    one_line_error(tmp_path, "no \\*_leftImg8bit.png images found", splits=["val"])


def test_empty_split_among_others(tree):
    (tree / "leftImg8bit" / "demoVideo").mkdir()
    one_line_error(tree, "split 'demoVideo' has no")


def test_absent_split_lists_present(tree):
    message = one_line_error(tree, "split 'tset' not found", splits=["tset"])
    assert "found: train, val, test, train_extra" in message


@pytest.mark.parametrize("name", ["aachen_000000_000019.png", "aachen_000000_leftImg8bit.png",
                                  "bochum_000000_000019_leftImg8bit.png", "aachen_x_000019_leftImg8bit.png",
                                  "aachen_000000_000019_leftImg8bit.jpg"])
def test_malformed_file_name(tree, name):
    bad = touch(tree / "leftImg8bit" / "train" / "aachen" / name)
    message = one_line_error(tree, "malformed file name")
    assert str(bad) in message and "aachen_<seq>_<frame>_leftImg8bit.png" in message


def test_file_where_city_folder_expected(tree):
    touch(tree / "leftImg8bit" / "val" / "stray.png")
    one_line_error(tree, "stray.png: expected only city folders")


def test_missing_polygons_in_labelled_split(tree):
    (tree / "gtFine/train/bochum/bochum_000000_000313_gtFine_polygons.json").unlink()
    message = one_line_error(tree, "no polygon file")
    assert "bochum_000000_000313_leftImg8bit.png" in message
    # a whole city missing from gtFine is the same mistake
    add_frame(tree, "val", "munster_000000_000019", gt=None)
    one_line_error(tree, "munster_000000_000019_leftImg8bit.png: no polygon file", splits=["val"])


def test_our_caches_and_run_folders_inside_the_tree_are_passed_over(tree):
    before = discover(tree)
    # a cache placed as a city folder, a run folder as a split: what we wrote, not frames
    touch(tree / "leftImg8bit" / "train" / "cache.zarr" / "zarr.json")
    touch(tree / "leftImg8bit" / "train" / "cache.zarr" / "train" / "images" / "c" / "0")
    touch(tree / "leftImg8bit" / "runs" / ".cityscapes-output")
    touch(tree / "leftImg8bit" / "runs" / "best.pt")
    assert discover(tree) == before
    # a foreign folder of the same shape is still refused, by name
    touch(tree / "leftImg8bit" / "train" / "notes" / "todo.txt")
    with pytest.raises(UserError, match="notes/todo.txt: malformed file name"):
        discover(tree)
