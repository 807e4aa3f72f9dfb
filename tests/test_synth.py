"""The synthetic Cityscapes tree: official layout, exact labelIds, learnable and deterministic images."""
from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from PIL import Image

from cache.errors import UserError
from dataprep.discover import discover, unlabelled_splits
from dataprep.rasterize import render_trainids
from dataprep.synth import synthetic_frame, write_synthetic_tree

H, W = 256, 512
TRAIN_ID = np.array([id2label[i].trainId if i in id2label else 255 for i in range(256)], np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    names = write_synthetic_tree(root, 6, height=H, width=W, seed=3, with_test=True)
    return root, names


def test_layout_matches_discover(tree):
    root, names = tree
    found = discover(root)
    assert list(found) == ["train", "val", "test"]
    assert {split: [f.name for f in frames] for split, frames in found.items()} == names
    assert unlabelled_splits(found) == ["test"]
    assert not (root / "gtFine" / "test").exists()
    for split in ("train", "val"):
        assert len({name.split("/")[0] for name in names[split]}) >= 2  # at least two cities
        for frame in found[split]:
            city, stem = frame.name.split("/")
            assert frame.image == root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            assert frame.polygons == root / "gtFine" / split / city / f"{stem}_gtFine_polygons.json"
            assert (frame.polygons.parent / f"{stem}_gtFine_labelIds.png").is_file()
    all_names = [n for split in names.values() for n in split]
    assert len(set(all_names)) == len(all_names)  # no name is shared between splits


@pytest.mark.parametrize("frames, train, val", [(4, 2, 2), (5, 3, 2), (12, 9, 3)])
def test_split_counts(tmp_path, frames, train, val):
    names = write_synthetic_tree(tmp_path, frames, height=64, width=128)
    assert (len(names["train"]), len(names["val"])) == (train, val)
    assert names["train"] == sorted(names["train"])


@pytest.mark.parametrize("kwargs, problem", [
    (dict(frames=3), "at least 4"), (dict(frames=8, cities=("aachen",)), "cities"),
    (dict(frames=8, val_fraction=1.0), "val_fraction"), (dict(frames=8, height=16), "64x64")])
def test_bad_arguments(tmp_path, kwargs, problem):
    with pytest.raises(UserError, match=problem):
        write_synthetic_tree(tmp_path, **kwargs)


def test_images_and_labels(tree):
    root, names = tree
    for split in ("train", "val", "test"):
        for name in names[split]:
            city, stem = name.split("/")
            image = Image.open(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            assert image.mode == "RGB" and image.size == (W, H)


def test_labelids_equal_json2labelImg(tree, tmp_path):
    root, names = tree
    for split in ("train", "val"):
        city, stem = names[split][0].split("/")
        polygons = root / "gtFine" / split / city / f"{stem}_gtFine_polygons.json"
        json2labelImg(str(polygons), str(tmp_path / "ids.png"), "ids")
        expected = np.array(Image.open(tmp_path / "ids.png"))
        written = np.array(Image.open(polygons.parent / f"{stem}_gtFine_labelIds.png"))
        assert written.shape == (H, W) and np.array_equal(written, expected)
        assert np.array_equal(render_trainids(polygons), TRAIN_ID[written])


def test_polygon_files_look_real(tree):
    root, _ = tree
    docs = [json.loads(p.read_text()) for p in sorted((root / "gtFine").rglob("*_polygons.json"))]
    labels, deleted, leaving = set(), 0, 0
    for doc in docs:
        assert (doc["imgHeight"], doc["imgWidth"]) == (H, W)
        for obj in doc["objects"]:
            assert isinstance(obj["label"], str) and len(obj["polygon"]) >= 3
            assert all(len(p) == 2 and all(isinstance(v, int) for v in p) for p in obj["polygon"])
            labels.add(obj["label"])
            deleted += obj.get("deleted", 0) == 1
            xy = np.array(obj["polygon"])
            leaving += bool((xy < 0).any() or (xy[:, 0] >= W).any() or (xy[:, 1] >= H).any())
    assert {"license plate", "ego vehicle", "out of roi", "rectification border"} <= labels
    assert {"cargroup", "persongroup"} & labels
    assert deleted >= 1 and leaving >= len(docs)


def test_most_classes_appear_and_colours_differ():
    frames = [synthetic_frame(np.random.default_rng([0, 0, i]), H, W) for i in range(6)]
    pixels = np.concatenate([rgb.reshape(-1, 3) for _, _, rgb in frames[:4]]).astype(np.float64)
    classes = np.concatenate([TRAIN_ID[ids].ravel() for _, ids, _ in frames[:4]])
    present = [c for c in range(19) if (classes == c).any()]
    assert len(present) >= 16
    means = np.array([pixels[classes == c].mean(axis=0) for c in present])
    closest = min(np.linalg.norm(means[a] - means[b]) for a, b in combinations(range(len(present)), 2))
    assert closest > 20, closest
    # even the nearest class-mean colour labels most pixels of unseen frames right
    held_pixels = np.concatenate([rgb.reshape(-1, 3) for _, _, rgb in frames[4:]]).astype(np.float64)
    held_classes = np.concatenate([TRAIN_ID[ids].ravel() for _, ids, _ in frames[4:]])
    keep = np.isin(held_classes, present)
    distance = ((held_pixels[keep, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (np.array(present)[distance.argmin(1)] == held_classes[keep]).mean()
    assert accuracy > 0.6, accuracy


def test_textures_are_not_flat():
    """Classes carry texture, not only colour: buildings have windows, vegetation blotches."""
    _, ids, rgb = synthetic_frame(np.random.default_rng(7), 512, 1024)
    grey = rgb.astype(np.float64).mean(axis=2)
    building, road = grey[TRAIN_ID[ids] == 2], grey[TRAIN_ID[ids] == 0]
    assert building.std() > 2 * road.std() > 0


def test_deterministic(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    a = write_synthetic_tree(tmp_path / "a", 4, height=64, width=128, seed=5)
    b = write_synthetic_tree(tmp_path / "b", 4, height=64, width=128, seed=5)
    c = write_synthetic_tree(tmp_path / "c", 4, height=64, width=128, seed=6)
    assert a == b == c  # names depend on the count, not the seed
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")
