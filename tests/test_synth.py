"""The synthetic Cityscapes tree: official layout, the release's four gtFine files made as
cityscapesscripts makes them, test placeholders, learnable and deterministic images; and the
field's tools (torchvision, cityscapesscripts, our build) reading it."""
from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import id2label
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from PIL import Image

from cache.errors import UserError
from dataprep.discover import discover, unlabelled_splits
from dataprep.rasterize import render_trainids
from dataprep.synth import CALIBRATION_LABELS, synthetic_frame, write_synthetic_tree

H, W = 256, 512
TRAIN_ID = np.array([id2label[i].trainId if i in id2label else 255 for i in range(256)], np.uint8)
GT_FILES = ("polygons.json", "labelIds.png", "instanceIds.png", "color.png")


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
    assert unlabelled_splits(found) == ["test"]  # gtFine/test holds the release's placeholders only
    for split in ("train", "val", "test"):
        for name in names[split]:
            city, stem = name.split("/")
            for suffix in GT_FILES:
                assert (root / "gtFine" / split / city / f"{stem}_gtFine_{suffix}").is_file()
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


def gt_path(root, split, name, suffix):
    city, stem = name.split("/")
    return root / "gtFine" / split / city / f"{stem}_gtFine_{suffix}"


def test_instance_and_colour_images_equal_cityscapesscripts(tree, tmp_path):
    root, names = tree
    for split in ("train", "val", "test"):
        for name in names[split]:
            polygons = gt_path(root, split, name, "polygons.json")
            annotation = Annotation()
            annotation.fromJsonFile(str(polygons))
            expected = np.asarray(createInstanceImage(annotation, "ids"))  # json2instanceImg's image
            written = Image.open(gt_path(root, split, name, "instanceIds.png"))
            assert written.mode.startswith("I;16")  # a 16-bit PNG, as in the release
            assert np.array_equal(np.asarray(written), expected)
            json2labelImg(str(polygons), str(tmp_path / "color.png"), "color")
            colour = Image.open(gt_path(root, split, name, "color.png"))
            assert colour.mode == "RGBA"
            assert np.array_equal(np.asarray(colour), np.asarray(Image.open(tmp_path / "color.png")))
    # instances: several cars are told apart (26000, 26001, ...), a car group keeps the class id 26
    values = np.unique(np.concatenate([np.unique(np.asarray(Image.open(gt_path(root, s, n, "instanceIds.png"))))
                                       for s in ("train", "val") for n in names[s]]))
    assert {26000, 26001} <= set(values.tolist()) and (values // 1000 == 24).any()


def test_test_split_holds_the_release_placeholders(tree):
    root, names = tree
    for name in names["test"]:
        doc = json.loads(gt_path(root, "test", name, "polygons.json").read_text())
        assert {o["label"] for o in doc["objects"]} == set(CALIBRATION_LABELS)
        ids = np.asarray(Image.open(gt_path(root, "test", name, "labelIds.png")))
        assert set(np.unique(ids)) <= {0, 1, 2, 3} and (TRAIN_ID[ids] == 255).all()
        assert np.array_equal(np.asarray(Image.open(gt_path(root, "test", name, "instanceIds.png"))), ids)


def test_torchvision_reads_every_split_and_target_type(tree):
    from torchvision.datasets import Cityscapes

    root, names = tree
    for split in ("train", "val", "test"):
        dataset = Cityscapes(str(root), split=split, mode="fine",
                             target_type=["instance", "semantic", "polygon", "color"])
        assert len(dataset) == len(names[split])
        for index in range(len(dataset)):
            image, (instance, semantic, polygon, colour) = dataset[index]
            assert image.mode == "RGB" and image.size == (W, H)
            ids = np.asarray(semantic)
            assert ids.shape == (H, W) and np.asarray(colour).shape == (H, W, 4)
            inst = np.asarray(instance).astype(np.int64)
            assert np.array_equal(np.where(inst >= 1000, inst // 1000, inst), ids)
            assert polygon["imgHeight"] == H and len(polygon["objects"]) >= 3


def test_cityscapesscripts_preparation_runs_on_the_tree(tree, tmp_path, monkeypatch):
    """createTrainIdLabelImgs (reads $CITYSCAPES_DATASET) and createPanopticImgs, on a copy."""
    import shutil

    from cityscapesscripts.preparation import createPanopticImgs, createTrainIdLabelImgs

    root, names = tree
    copy = tmp_path / "cs"
    shutil.copytree(root, copy)
    monkeypatch.setenv("CITYSCAPES_DATASET", str(copy))
    createTrainIdLabelImgs.main()
    for split in ("train", "val"):
        for name in names[split]:
            written = np.asarray(Image.open(gt_path(copy, split, name, "labelTrainIds.png")))
            assert np.array_equal(written, render_trainids(gt_path(copy, split, name, "polygons.json")))
    (tmp_path / "panoptic").mkdir()
    createPanopticImgs.convert2panoptic(str(copy / "gtFine"), str(tmp_path / "panoptic"))
    doc = json.loads((tmp_path / "panoptic" / "cityscapes_panoptic_val.json").read_text())
    assert [a["image_id"] for a in doc["annotations"]] == [n.split("/")[1] for n in names["val"]]
    first = doc["annotations"][0]
    instance = np.asarray(Image.open(gt_path(copy, "val", names["val"][0], "instanceIds.png")))
    evaluated = {v for v in np.unique(instance).tolist() if not id2label[v // 1000 if v >= 1000 else v].ignoreInEval}
    assert {segment["id"] for segment in first["segments_info"]} == evaluated


def test_dataprep_build_reads_the_tree_and_leaves_test_unlabelled(tree, tmp_path):
    from cache.reader import CacheReader
    from dataprep.build import BuildOptions, build_cache

    root, names = tree
    report = build_cache(BuildOptions(root=root, out=tmp_path / "cache", workers=1))
    assert report.exit_code == 0
    reader = CacheReader(tmp_path / "cache")
    assert reader.split_names() == ["test", "train", "val"]
    assert not reader.split("test").has_masks and reader.split("train").has_masks
    assert list(reader.split("test").frames) == names["test"]
    image, _ = reader.read_frame("test", 0)
    city, stem = names["test"][0].split("/")
    assert np.array_equal(image, np.asarray(Image.open(root / "leftImg8bit" / "test" / city /
                                                       f"{stem}_leftImg8bit.png")))


def test_parallel_synth_writes_the_same_files_and_reports_each_frame(tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    write_synthetic_tree(serial, 6, height=96, width=192, seed=4, with_test=True, photo=True)
    ticks = []
    names = write_synthetic_tree(parallel, 6, height=96, width=192, seed=4, with_test=True, photo=True,
                                 workers=2, progress=lambda: ticks.append(1))
    assert len(ticks) == sum(len(v) for v in names.values()) == 8
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    assert all((serial / f).read_bytes() == (parallel / f).read_bytes() for f in files)


def test_photo_like_frames_weigh_what_real_cityscapes_pngs_weigh():
    """The point of --photo: a 2048x1024 PNG of ~2-2.5 MB at zlib's default level, as real
    leftImg8bit frames (~2.1 MB), so that decode and disk figures mean something."""
    import io

    from dataprep.synth import photo_like

    rng = np.random.default_rng(7)
    painted = synthetic_frame(rng, 1024, 2048)[2]
    buffer = io.BytesIO()
    Image.fromarray(photo_like(painted, rng)).save(buffer, format="PNG")
    assert 2.0e6 <= buffer.tell() <= 2.6e6
    assert np.abs(photo_like(painted, rng).astype(int) - painted).mean() < 6  # the same scene
