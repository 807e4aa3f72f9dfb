"""The PNG baseline loader (loaders/png_baseline.py) over a small synthetic raw tree."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cache.errors import UserError
from dataprep.synth import write_synthetic_tree
from loaders.colour import normalise
from loaders.contract import AugmentConfig
from loaders.order import shard_indices
from cache.labels import LABELID_TO_TRAINID
from loaders.png_baseline import build_png_loader, find_pairs

H, W = 128, 256
IDENTITY = AugmentConfig(crop=(H, W), scale=(1.0, 1.0), flip_prob=0.0).no_jitter()


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_synthetic_tree(root, 7, height=H, width=W, seed=0)  # 5 train, 2 val
    return root


def stored(raw, split, index):
    """(RGB uint8, labelIds uint8) of the index-th frame of a split, read with PIL."""
    image, label, _ = find_pairs(raw, split)[index]
    return np.asarray(Image.open(image).convert("RGB")), np.asarray(Image.open(label))


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def test_lut_follows_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels

    lut = LABELID_TO_TRAINID
    assert lut.shape == (256,) and lut.dtype == np.uint8
    for label in labels:
        if label.id >= 0:
            expected = label.trainId if 0 <= label.trainId < 255 else 255
            assert lut[label.id] == expected, label.name
    assert lut[7] == 0 and lut[26] == 13 and lut[0] == 255 and lut[200] == 255
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))


def test_identity_augmentation_reproduces_the_files(raw):
    loader = build_png_loader(raw, "train", batch_size=5, aug=IDENTITY, num_workers=0)
    (batch,) = batches(loader)
    assert batch.rows.tolist() == shard_indices(5, seed=0, epoch=0).tolist()
    lut = LABELID_TO_TRAINID
    for image, mask, row in zip(batch.image, batch.mask, batch.rows.tolist()):
        rgb, label_ids = stored(raw, "train", row)
        assert torch.equal(mask, torch.from_numpy(lut[label_ids]).long())
        expected = normalise(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None])[0]
        assert torch.allclose(image, expected, atol=1e-4)
    assert batch.mask.dtype == torch.int64 and batch.image.dtype == torch.float32


def test_train_ids_files_are_used_when_label_ids_are_absent(raw, tmp_path):
    lut = LABELID_TO_TRAINID
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    for label in copy.glob("gtFine/train/*/*_gtFine_labelIds.png"):
        ids = np.asarray(Image.open(label))
        Image.fromarray(lut[ids]).save(str(label).replace("_labelIds.png", "_trainIds.png"))
        label.unlink()
    assert not any(is_ids for _, _, is_ids in find_pairs(copy, "train"))
    a = batches(build_png_loader(raw, "train", batch_size=5, aug=IDENTITY, num_workers=0))[0]
    b = batches(build_png_loader(copy, "train", batch_size=5, aug=IDENTITY, num_workers=0))[0]
    assert torch.equal(a.mask, b.mask) and torch.equal(a.image, b.image)


def test_flip_mirrors_image_and_mask(raw):
    flipped = AugmentConfig(crop=(H, W), scale=(1.0, 1.0), flip_prob=1.0).no_jitter()
    a = batches(build_png_loader(raw, "val", batch_size=2, aug=IDENTITY, num_workers=0))[0]
    b = batches(build_png_loader(raw, "val", batch_size=2, aug=flipped, num_workers=0))[0]
    assert torch.equal(a.rows, b.rows)
    assert torch.equal(a.mask.flip(-1), b.mask) and torch.equal(a.image.flip(-1), b.image)


def test_random_scale_crop_keeps_source_labels(raw):
    lut = LABELID_TO_TRAINID
    aug = AugmentConfig(crop=(100, 300), scale=(0.5, 2.0)).no_jitter()
    loader = build_png_loader(raw, "train", batch_size=2, aug=aug, num_workers=0)
    assert len(loader) == 2
    for epoch in range(4):
        for batch in batches(loader, epoch):
            assert batch.image.shape == (2, 3, 100, 300) and batch.mask.shape == (2, 100, 300)
            for mask, row in zip(batch.mask, batch.rows.tolist()):
                source_values = set(np.unique(lut[stored(raw, "train", row)[1]]).tolist())
                assert set(mask.unique().tolist()) <= source_values | {255}


def test_padding_when_the_scaled_frame_is_smaller_than_the_crop(raw):
    lut = LABELID_TO_TRAINID
    aug = AugmentConfig(crop=(100, 300), scale=(0.5, 0.5), flip_prob=0.0).no_jitter()
    (batch,) = batches(build_png_loader(raw, "val", batch_size=2, aug=aug, num_workers=0))
    pad = normalise(torch.zeros(1, 3, 1, 1))[0]
    for image, mask, row in zip(batch.image, batch.mask, batch.rows.tolist()):
        # the 128x256 frame at scale 0.5 is 64x128, at the top left; the rest is padding
        assert (mask[64:] == 255).all() and (mask[:, 128:] == 255).all()
        assert torch.allclose(image[:, 64:], pad.expand(3, 36, 300), atol=1e-5)
        assert torch.allclose(image[:, :, 128:], pad.expand(3, 100, 172), atol=1e-5)
        labels = Image.fromarray(lut[stored(raw, "val", row)[1]]).resize((128, 64), Image.NEAREST)
        assert np.array_equal(mask[:64, :128].numpy(), np.asarray(labels))


def test_jitter_changes_colour_only(raw):
    jitter = AugmentConfig(crop=(96, 96), brightness=0.4, contrast=0.4, saturation=0.4, hue=30.0)
    a = batches(build_png_loader(raw, "train", batch_size=2, aug=jitter, num_workers=0), 1)
    plain = jitter.no_jitter()
    b = batches(build_png_loader(raw, "train", batch_size=2, aug=plain, num_workers=0), 1)
    for x, y in zip(a, b):
        assert torch.equal(x.mask, y.mask) and torch.equal(x.rows, y.rows)
        assert not torch.allclose(x.image, y.image, atol=0.05)


def test_seeded_order_and_workers(raw):
    aug = AugmentConfig(crop=(64, 128))
    in_process = batches(build_png_loader(raw, "train", batch_size=2, aug=aug, seed=5,
                                          num_workers=0), 3)
    workers = batches(build_png_loader(raw, "train", batch_size=2, aug=aug, seed=5,
                                       num_workers=2), 3)
    for x, y in zip(in_process, workers):
        assert torch.equal(x.image, y.image) and torch.equal(x.mask, y.mask)
    loader = build_png_loader(raw, "train", batch_size=1, aug=aug, seed=5, num_workers=0)
    orders = [[int(b.rows) for b in batches(loader, e)] for e in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2]
    assert orders[0] == shard_indices(5, seed=5, epoch=0).tolist()


def test_bad_arguments(raw, tmp_path):
    with pytest.raises(UserError, match="leftImg8bit/test"):
        build_png_loader(raw, "test", batch_size=1, aug=IDENTITY)
    with pytest.raises(UserError, match="batch size"):
        build_png_loader(raw, "train", batch_size=0, aug=IDENTITY)
    with pytest.raises(UserError, match="fewer than one batch of 6"):
        build_png_loader(raw, "train", batch_size=6, aug=IDENTITY)
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    next(copy.glob("gtFine/val/*/*_gtFine_labelIds.png")).unlink()
    with pytest.raises(UserError, match="no .*_gtFine_labelIds.png"):
        build_png_loader(copy, "val", batch_size=1, aug=IDENTITY)


def test_repeat_runs_consecutive_epochs_in_one_pass(raw):
    aug = AugmentConfig(crop=(32, 32))
    once = build_png_loader(raw, "train", batch_size=2, aug=aug, num_workers=0)
    thrice = build_png_loader(raw, "train", batch_size=2, aug=aug, num_workers=0, repeat=3)
    assert len(once) == 2 and len(thrice) == 6
    thrice.set_epoch(1)  # epochs 3, 4, 5
    rows = [b.rows.tolist() for b in thrice]
    expected = []
    for epoch in (3, 4, 5):
        expected += [b.rows.tolist() for b in batches(once, epoch)]
    assert rows == expected
    with pytest.raises(UserError, match="repeat"):
        build_png_loader(raw, "train", batch_size=1, aug=aug, repeat=0)
