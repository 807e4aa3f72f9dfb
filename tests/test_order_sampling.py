"""Pure functions shared by every loader: sample order (loaders/order.py) and sample
parameters (loaders/sampling.py)."""
from __future__ import annotations

import numpy as np
import pytest

from loaders.contract import AugmentConfig
from loaders.order import batch_count, epoch_permutation, shard_indices
from loaders.sampling import _accept, draw_train_sample, eval_sample


# -- order -----------------------------------------------------------------------------------
def test_permutation_is_seeded_per_epoch():
    a = epoch_permutation(50, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_permutation(50, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_permutation(50, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_permutation(50, seed=4, epoch=0))


@pytest.mark.parametrize("n,world", [(10, 2), (10, 3), (7, 3), (5, 1), (2, 3)])
def test_eval_shards_are_disjoint_and_complete(n, world):
    shards = [shard_indices(n, seed=1, epoch=5, rank=r, world_size=world, train=False)
              for r in range(world)]
    together = np.concatenate(shards)
    assert sorted(together.tolist()) == list(range(n))  # each frame exactly once
    for shard in shards:
        assert np.all(np.diff(shard) > 0)  # stored order


@pytest.mark.parametrize("n,world", [(10, 2), (10, 3), (7, 3), (12, 4)])
def test_train_shards_are_disjoint_and_equal_sized(n, world):
    for epoch in range(3):
        shards = [shard_indices(n, seed=2, epoch=epoch, rank=r, world_size=world)
                  for r in range(world)]
        together = np.concatenate(shards)
        assert len(set(together.tolist())) == len(together)
        assert {len(s) for s in shards} == {n // world}


def test_train_dropped_frames_change_with_the_epoch():
    dropped = set()
    for epoch in range(20):
        kept = set(np.concatenate([shard_indices(7, seed=0, epoch=epoch, rank=r, world_size=3)
                                   for r in range(3)]).tolist())
        dropped |= set(range(7)) - kept
    assert len(dropped) > 1


@pytest.mark.parametrize("bad_rank,world", [(-1, 2), (2, 2), (0, 0)])
def test_bad_rank_is_refused(bad_rank, world):
    with pytest.raises(ValueError, match="rank"):
        shard_indices(10, seed=0, epoch=0, rank=bad_rank, world_size=world)


@pytest.mark.parametrize("n,bs,world,train,expected", [
    (10, 3, 1, True, 3), (10, 3, 1, False, 4), (10, 2, 3, True, 1), (10, 2, 3, False, 2),
    (2, 4, 1, True, 0), (2, 4, 1, False, 1), (9, 3, 1, True, 3)])
def test_batch_count(n, bs, world, train, expected):
    assert batch_count(n, batch_size=bs, rank=0, world_size=world, train=train) == expected


# -- sampling --------------------------------------------------------------------------------
FRAME = (1024, 2048)


@pytest.mark.parametrize("crop", [(640, 640), (512, 1024), (1500, 3000), (32, 48)])
def test_windows_lie_inside_the_frame_and_outputs_fit_the_crop(crop):
    aug = AugmentConfig(crop=crop)
    for row in range(200):
        p = draw_train_sample(7, 0, row, FRAME, aug)
        assert 0 <= p.y and p.y + p.h <= FRAME[0]
        assert 0 <= p.x and p.x + p.w <= FRAME[1]
        assert 1 <= p.out_h <= crop[0] and 1 <= p.out_w <= crop[1]
        assert p.h >= 1 and p.w >= 1


def test_scale_range_is_respected_and_used():
    aug = AugmentConfig(crop=(256, 256), scale=(0.75, 1.5))
    scales = []
    for row in range(300):
        p = draw_train_sample(0, 0, row, FRAME, aug)
        # the window is crop / scale (rounded) whenever it fits in the frame
        scale = p.out_h / p.h
        assert 0.75 * 0.99 <= scale <= 1.5 * 1.01
        scales.append(scale)
    assert min(scales) < 0.8 and max(scales) > 1.4


def test_window_larger_than_frame_is_clamped_and_output_shrinks():
    # At scale 0.5 a 640 crop wants a 1280 window; a 512-high frame gives only 512 rows,
    # which resize to 256 rows: the other 384 are padding.
    aug = AugmentConfig(crop=(640, 640), scale=(0.5, 0.5))
    p = draw_train_sample(0, 0, 0, (512, 4096), aug)
    assert (p.h, p.out_h) == (512, 256)
    assert (p.w, p.out_w) == (1280, 640)


def test_same_inputs_same_parameters_and_epoch_changes_them():
    aug = AugmentConfig()
    a = draw_train_sample(5, 2, 9, FRAME, aug)
    assert a == draw_train_sample(5, 2, 9, FRAME, aug)
    assert a != draw_train_sample(5, 3, 9, FRAME, aug)
    assert a != draw_train_sample(5, 2, 10, FRAME, aug)


def test_colour_parameters_stay_in_their_ranges():
    aug = AugmentConfig(brightness=0.3, contrast=0.2, saturation=0.1, hue=10.0)
    ps = [draw_train_sample(0, 0, row, FRAME, aug) for row in range(300)]
    for name, lo, hi in (("brightness", 0.7, 1.3), ("contrast", 0.8, 1.2),
                         ("saturation", 0.9, 1.1), ("hue", -10.0, 10.0)):
        values = np.array([getattr(p, name) for p in ps])
        assert values.min() >= lo and values.max() <= hi
        assert values.max() - values.min() > 0.5 * (hi - lo)  # actually drawn, not constant
    flips = np.mean([p.flip for p in ps])
    assert 0.35 < flips < 0.65


def test_no_jitter_and_no_flip_give_identity_colour():
    aug = AugmentConfig(flip_prob=0.0).no_jitter()
    for row in range(20):
        p = draw_train_sample(0, 0, row, FRAME, aug)
        assert (p.brightness, p.contrast, p.saturation, p.hue, p.flip) == (1, 1, 1, 0, False)


def _half_sky_mask():
    """Top half class 10 only; bottom half classes 0 and 1 mixed."""
    mask = np.full((512, 512), 10, dtype=np.uint8)
    mask[256:, :256] = 0
    mask[256:, 256:] = 1
    return mask


def test_cat_max_ratio_redraws_until_accepted():
    mask = _half_sky_mask()
    calls = []

    def read_mask(y, x, h, w):
        calls.append((y, x, h, w))
        return mask[y:y + h, x:x + w]

    aug = AugmentConfig(crop=(128, 128), scale=(1.0, 1.0), cat_max_ratio=0.75, cat_max_tries=50)
    redrawn = 0
    for row in range(40):
        calls.clear()
        p = draw_train_sample(0, 0, row, mask.shape, aug, read_mask=read_mask)
        assert calls[-1] == (p.y, p.x, p.h, p.w)  # the accepted window is the last one read
        assert _accept(mask[p.y:p.y + p.h, p.x:p.x + p.w], 0.75, 255)
        redrawn += len(calls) > 1
    assert redrawn > 0  # pure-sky windows were drawn and refused


def test_cat_max_ratio_gives_up_after_the_tries():
    mask = np.full((256, 256), 3, dtype=np.uint8)  # one class everywhere: never accepted
    calls = []
    aug = AugmentConfig(crop=(64, 64), cat_max_ratio=0.5, cat_max_tries=7)
    draw_train_sample(0, 0, 0, mask.shape, aug,
                      read_mask=lambda y, x, h, w: calls.append(1) or mask[y:y + h, x:x + w])
    assert len(calls) == 7


def test_cat_max_ratio_ignores_the_ignore_index():
    window = np.full((10, 10), 255, dtype=np.uint8)
    window[:, :5] = 1
    window[:, 5:6] = 2
    # without 255: class 1 has 50/60 > 0.75 -> refused; with 255 counted it would pass
    assert not _accept(window, 0.75, 255)
    window[:, 5:8] = 2  # now 50/80 = 0.625
    assert _accept(window, 0.75, 255)


def test_without_read_mask_cat_max_ratio_reads_nothing_and_keeps_the_draw():
    aug = AugmentConfig(cat_max_ratio=0.5)
    plain = draw_train_sample(0, 0, 3, FRAME, AugmentConfig())
    assert draw_train_sample(0, 0, 3, FRAME, aug) == plain


def test_eval_sample_is_the_whole_frame():
    p = eval_sample(4, (1024, 2048), AugmentConfig(eval_scale=0.5))
    assert (p.y, p.x, p.h, p.w, p.out_h, p.out_w, p.flip) == (0, 0, 1024, 2048, 512, 1024, False)
    assert (p.brightness, p.contrast, p.saturation, p.hue) == (1, 1, 1, 0)
