"""The torch loader kind (loaders/torch_loader.py) and the shared colour ops (loaders/colour.py).

Frames come from tests/cachefab.py: blocks of random classes, each painted in its class
colour, so the class of every augmented image pixel can be read back from its colour and
compared with the augmented mask.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from cache.format import CacheError
from cache.errors import UserError
from loaders import AugmentConfig, build_loader
from loaders.colour import colour_twist, denormalise, normalise
from loaders.contract import MEAN, STD
from loaders.order import shard_indices
from loaders.sampling import draw_train_sample
from loaders.torch_loader import TorchLoader, nearest_indices, resize_image, resize_mask
from tests.cachefab import (CLASS_COLOURS, blocky_cache, blocky_frame, blocky_source,
                            check_train_sample, class_from_colour,
                            epoch_batches, interior, write_cache)

H, W = 256, 512
GEOMETRY = AugmentConfig(crop=(192, 320)).no_jitter()  # flips and the full 0.5-2.0 scale range


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("blocky") / "cache.zarr", n_train=7, n_val=5,
                        height=H, width=W)


def load(cache, split="train", *, train=True, batch_size=2, aug=GEOMETRY, workers=0, **kw):
    return build_loader(cache, split, "torch", train=train, batch_size=batch_size, aug=aug,
                        num_workers=workers, **kw)


def source_frame(split, row):
    return blocky_source(split, row, H, W)


# -- colour ----------------------------------------------------------------------------------
def dali_colour_twist(images: np.ndarray, params: np.ndarray, float_out: bool) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    batch = len(images)

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: list(images), layout="HWC", batch=True)
        p = fn.external_source(source=lambda: list(params), batch=True)
        return fn.color_twist(x, brightness=p[0], contrast=p[1], saturation=p[2], hue=p[3],
                              dtype=types.FLOAT if float_out else types.UINT8)

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.stack([np.asarray(out[i]) for i in range(batch)]).astype(np.float32)


@pytest.mark.dali
@pytest.mark.parametrize("float_out", [False, True])
def test_colour_twist_matches_dali(float_out):
    pytest.importorskip("nvidia.dali")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 24, 40, 3), dtype=np.uint8)
    params = np.stack([rng.uniform(0.5, 1.5, 12), rng.uniform(0.5, 1.5, 12),
                       rng.uniform(0.0, 2.0, 12), rng.uniform(-180, 180, 12)], 1).astype(np.float32)
    params[0] = (1, 1, 1, 0)
    expected = dali_colour_twist(images, params, float_out)
    p = torch.from_numpy(params)
    ours = colour_twist(torch.from_numpy(images).permute(0, 3, 1, 2).float(), p[:, 0], p[:, 1],
                        p[:, 2], p[:, 3], quantise=not float_out).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - expected).max() <= (1.0 if not float_out else 0.01)
    assert np.mean(ours != expected) < 0.01 or float_out


def test_colour_twist_semantics_without_dali():
    grey = torch.full((1, 3, 2, 2), 128.0)
    one, zero = torch.ones(1), torch.zeros(1)
    # contrast pivots on DALI's grey point 128; brightness scales; quantised to 0..255
    assert torch.equal(colour_twist(grey, one, one * 1.7, one, zero), grey)
    assert torch.equal(colour_twist(grey, one * 1.5, one, one, zero), torch.full_like(grey, 192.0))
    white = torch.full((1, 3, 1, 1), 250.0)
    assert colour_twist(white, one * 1.5, one, one, zero).max() == 255.0
    assert colour_twist(white, one * 1.5, one, one, zero, quantise=False).max() > 370
    # saturation 0 gives (nearly) grey; hue 0 / saturation 1 leave colours as they are
    red = torch.tensor([200.0, 30.0, 30.0]).view(1, 3, 1, 1)
    flat = colour_twist(red, one, one, zero, zero).flatten()
    assert float(flat.max() - flat.min()) <= 1.0
    assert torch.equal(colour_twist(red, one, one, one, zero), red)
    assert not torch.equal(colour_twist(red, one, one, one, one * 90), red)


def test_normalise_uses_imagenet_statistics():
    pixels = torch.tensor(MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(normalise(pixels), torch.zeros(2, 3, 4, 4), atol=1e-5)
    plus_std = pixels + torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(normalise(plus_std), torch.ones(2, 3, 4, 4), atol=1e-5)
    image = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    assert torch.allclose(denormalise(normalise(image)), image.float(), atol=1e-3)


# -- resizing like DALI ----------------------------------------------------------------------
SIZE_PAIRS = [(96, 61), (1024, 640), (2048, 1280), (300, 97), (97, 300), (1280, 640), (7, 7),
              (5, 1), (1, 9), (1000, 333)]


def test_nearest_indices_are_in_range_and_monotone():
    for n, o in SIZE_PAIRS:
        idx = nearest_indices(n, o)
        assert idx.shape == (o,) and idx.min() >= 0 and idx.max() <= n - 1
        assert np.all(np.diff(idx) >= 0)
        if n == o:
            assert np.array_equal(idx, np.arange(n))


@pytest.mark.dali
def test_nearest_and_linear_resize_match_dali():
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(1)
    pairs = [((n, 3), (o, 5)) for n, o in SIZE_PAIRS] + [((200, 300), (64, 100)),
                                                           ((64, 100), (200, 300))]
    masks = [rng.integers(0, 250, size=(h, w, 1), dtype=np.uint8) for (h, w), _ in pairs]
    images = [np.repeat(np.repeat(rng.integers(0, 256, size=(-(-h // 4), -(-w // 4), 3),
                                               dtype=np.uint8), 4, 0), 4, 1)[:h, :w].copy()
              for (h, w), _ in pairs]
    sizes = [np.array(out, dtype=np.float32) for _, out in pairs]

    @pipeline_def(batch_size=len(pairs), num_threads=1, device_id=None)
    def pipe():
        m = fn.external_source(source=lambda: masks, layout="HWC", batch=True)
        x = fn.external_source(source=lambda: images, layout="HWC", batch=True)
        s = fn.external_source(source=lambda: sizes, batch=True)
        return (fn.resize(m, size=s, interp_type=types.INTERP_NN, antialias=False),
                fn.resize(x, size=s, interp_type=types.INTERP_LINEAR, antialias=True))

    p = pipe()
    p.build()
    dali_masks, dali_images = p.run()
    for i, (_, (oh, ow)) in enumerate(pairs):
        ours = resize_mask(masks[i][:, :, 0], oh, ow, flip=False)
        assert np.array_equal(ours, np.asarray(dali_masks[i])[:, :, 0]), pairs[i]
        theirs = np.asarray(dali_images[i]).astype(np.int32)
        mine = resize_image(images[i], oh, ow).numpy().astype(np.int32)
        # Same filter; only the outermost pixels differ (DALI clamps at the border, torch
        # renormalises the truncated filter).
        if min(oh, ow) > 8:  # (tiny outputs are all border)
            assert np.abs(mine - theirs)[2:-2, 2:-2].max() <= 1, pairs[i]
            assert np.abs(mine - theirs).mean() < 1.5, pairs[i]


def test_mask_resize_keeps_only_source_values():
    checker = np.where((np.indices((101, 203)).sum(0) % 2) == 0, 3, 200).astype(np.uint8)
    for out in [(50, 101), (37, 61), (202, 406), (13, 300)]:
        for flip in (False, True):
            resized = resize_mask(checker, *out, flip=flip)
            assert resized.shape == out
            assert set(np.unique(resized).tolist()) <= {3, 200}
    flipped = resize_mask(checker[:, :8], 4, 8, flip=True)
    assert np.array_equal(flipped, resize_mask(checker[:, :8], 4, 8, flip=False)[:, ::-1])


# -- the loader: geometry --------------------------------------------------------------------
def test_image_and_mask_agree_and_follow_the_source(cache):
    loader = load(cache, batch_size=3)
    seen_flip = seen_up = seen_down = False
    checked = 0
    for epoch in range(3):
        for batch in epoch_batches(loader, epoch):
            assert batch.image.shape == (3, 3, 192, 320) and batch.image.dtype == torch.float32
            assert batch.mask.shape == (3, 192, 320) and batch.mask.dtype == torch.int64
            for image, mask, row in zip(batch.image, batch.mask.numpy(), batch.rows.tolist()):
                p = draw_train_sample(0, epoch, row, (H, W), GEOMETRY)
                seen_flip |= p.flip
                seen_up |= p.out_h > p.h
                seen_down |= p.out_h < p.h
                check_train_sample(image, mask, p, source_frame("train", row)[1])
                checked += 1
    assert seen_flip and seen_up and seen_down and checked == 3 * 6


def test_masks_hold_only_source_values_and_ignore(tmp_path):
    checker = np.where((np.indices((H, W)).sum(0) % 2) == 0, 4, 17).astype(np.uint8)
    images = np.stack([CLASS_COLOURS[checker]] * 4)
    path = write_cache(tmp_path / "c.zarr", {"train": (images, np.stack([checker] * 4),
                                                       [f"a/a_{i:06d}_000019" for i in range(4)])})
    loader = load(path, aug=AugmentConfig(crop=(300, 300)), batch_size=2)
    values = set()
    for epoch in range(4):
        for batch in epoch_batches(loader, epoch):
            values |= set(batch.mask.unique().tolist())
    assert values <= {4, 17, 255} and {4, 17} <= values


def test_padding_when_the_window_is_smaller_than_the_crop(cache):
    aug = AugmentConfig(crop=(400, 600), scale=(0.5, 0.5), flip_prob=0.0).no_jitter()
    batch = next(iter(load(cache, aug=aug)))
    # the whole 256x512 frame at scale 0.5 is 128x256; the rest of 400x600 is padding
    assert batch.image.shape == (2, 3, 400, 600)
    pad_value = normalise(torch.zeros(1, 3, 1, 1))[0, :, 0, 0]
    for image, mask, row in zip(batch.image, batch.mask, batch.rows.tolist()):
        assert (mask[128:] == 255).all() and (mask[:, 256:] == 255).all()
        assert (mask[:128, :256] != 255).all()
        assert torch.allclose(image[:, 128:, :], pad_value.view(3, 1, 1).expand(3, 272, 600))
        assert torch.allclose(image[:, :, 256:], pad_value.view(3, 1, 1).expand(3, 400, 344))
        _, frame_mask = source_frame("train", row)
        assert np.array_equal(mask[:128, :256].numpy(), frame_mask[1::2, 1::2])


def test_jitter_is_dalis_colour_twist_on_the_geometry(cache):
    aug = AugmentConfig(crop=(160, 700), scale=(0.6, 1.0), brightness=0.3, contrast=0.3,
                        saturation=0.3, hue=20.0)
    jittered = next(iter(load(cache, aug=aug, seed=4)))
    plain = next(iter(load(cache, aug=aug.no_jitter(), seed=4)))
    assert torch.equal(jittered.mask, plain.mask) and torch.equal(jittered.rows, plain.rows)
    ps = [draw_train_sample(4, 0, row, (H, W), aug) for row in plain.rows.tolist()]
    colour = torch.tensor([[p.brightness, p.contrast, p.saturation, p.hue] for p in ps])
    expected = colour_twist(denormalise(plain.image).round(), *colour.T)
    for i, p in enumerate(ps):
        expected[i, :, p.out_h:] = 0  # the padding stays 0 before normalisation
        expected[i, :, :, p.out_w:] = 0
    assert p.out_w < 700  # the crop overhangs: padding was exercised
    assert torch.allclose(jittered.image, normalise(expected), atol=1e-4)
    assert not torch.allclose(jittered.image, plain.image, atol=0.1)


def test_cat_max_ratio_applies_to_the_windows(tmp_path):
    mask = np.full((H, W), 10, dtype=np.uint8)  # mostly sky
    mask[200:, :] = 0
    mask[200:, 256:] = 1
    images = np.stack([CLASS_COLOURS[mask]] * 4)
    path = write_cache(tmp_path / "c.zarr", {"train": (images, np.stack([mask] * 4),
                                                       [f"a/a_{i:06d}_000019" for i in range(4)])})
    aug = AugmentConfig(crop=(96, 96), scale=(1.0, 1.0), cat_max_ratio=0.75,
                        cat_max_tries=100).no_jitter()
    for epoch in range(3):
        for batch in epoch_batches(load(path, aug=aug), epoch):
            for image, m in zip(batch.image, batch.mask):
                counts = torch.bincount(m.flatten(), minlength=256)[:255]
                assert counts.max() < 0.75 * counts.sum()
                # the mask kept from the accepted draw belongs to the image's window
                assert np.array_equal(class_from_colour(image), m.numpy())


# -- the loader: order, determinism, shards --------------------------------------------------
def test_same_seed_same_batches_in_workers_and_in_process(cache):
    aug = AugmentConfig(crop=(128, 160))
    a = epoch_batches(load(cache, aug=aug, seed=3, workers=0), epoch=1)
    b = epoch_batches(load(cache, aug=aug, seed=3, workers=2), epoch=1)
    c = epoch_batches(load(cache, aug=aug, seed=4, workers=0), epoch=1)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and torch.equal(x.mask, y.mask)
        assert torch.equal(x.rows, y.rows)
    assert any(not torch.equal(x.image, z.image) for x, z in zip(a, c))


def test_epochs_reshuffle_and_repeat(cache):
    loader = load(cache, batch_size=1, aug=AugmentConfig(crop=(64, 64)))
    orders = {e: [int(b.rows) for b in epoch_batches(loader, e)] for e in (0, 1, 2)}
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert orders[0] == shard_indices(7, seed=0, epoch=0).tolist()
    again = epoch_batches(loader, 0)
    assert [int(b.rows) for b in again] == orders[0]


def test_stream_across_epochs_equals_fresh_loaders_and_survives_abandoning(cache):
    aug = AugmentConfig(crop=(64, 96))
    streaming = load(cache, batch_size=2, aug=aug, workers=2)  # prefetches into the next epoch
    got = {}
    for epoch in (0, 1, 2):
        got[epoch] = [b.rows.tolist() for b in epoch_batches(streaming, epoch)]
    for epoch in (0, 1, 2):
        expected = shard_indices(7, seed=0, epoch=epoch)[:6].reshape(3, 2).tolist()
        assert got[epoch] == expected
    # leave epoch 3 after one batch, then ask for epoch 3 again: it starts from its beginning
    streaming.set_epoch(3)
    first = next(iter(streaming))
    again = [b for b in streaming]
    assert len(again) == 3 and torch.equal(again[0].image, first.image)
    # going back to an earlier epoch restarts the stream there
    back = epoch_batches(streaming, 1)
    assert [b.rows.tolist() for b in back] == got[1]
    # two iterations cannot share the stream: the older one stops loudly
    older = iter(streaming)
    next(older)
    newer = iter(streaming)
    next(newer)
    with pytest.raises(RuntimeError, match="newer iteration"):
        next(older)


@pytest.mark.parametrize("world", [2, 3])
def test_eval_shards_are_disjoint_and_complete(cache, world):
    rows = []
    for rank in range(world):
        loader = load(cache, "val", train=False, batch_size=2, rank=rank, world_size=world)
        batches = list(loader)
        assert len(batches) == len(loader)
        rows += [r for b in batches for r in b.rows.tolist()]
    assert sorted(rows) == list(range(5))


@pytest.mark.parametrize("world", [2, 3])
def test_train_shards_are_disjoint(cache, world):
    rows = []
    for rank in range(world):
        loader = load(cache, batch_size=1, rank=rank, world_size=world,
                      aug=AugmentConfig(crop=(32, 32)))
        batches = epoch_batches(loader, 2)
        assert len(batches) == len(loader) == 7 // world
        rows += [int(b.rows) for b in batches]
    assert len(set(rows)) == len(rows) == (7 // world) * world


@pytest.mark.parametrize("train,batch_size,expected,last", [
    (True, 2, 3, 2), (True, 3, 2, 3), (True, 7, 1, 7), (False, 2, 3, 1), (False, 5, 1, 5),
    (False, 4, 2, 1)])
def test_len_and_batch_sizes(cache, train, batch_size, expected, last):
    split = "train" if train else "val"
    loader = load(cache, split, train=train, batch_size=batch_size,
                  aug=AugmentConfig(crop=(32, 32)))
    batches = list(loader)
    assert len(loader) == len(batches) == expected
    assert len(batches[-1].rows) == last


def test_eval_gives_whole_frames_and_full_resolution_masks(cache):
    full = list(load(cache, "val", train=False, batch_size=2))
    half = list(load(cache, "val", train=False, batch_size=2, aug=AugmentConfig(eval_scale=0.5)))
    assert [b.rows.tolist() for b in full] == [[0, 1], [2, 3], [4]]
    for f, h in zip(full, half):
        assert f.image.shape[-2:] == (H, W) and h.image.shape[-2:] == (H // 2, W // 2)
        assert f.mask.shape[-2:] == h.mask.shape[-2:] == (H, W)  # masks are never resized
        for i, row in enumerate(f.rows.tolist()):
            image, mask = source_frame("val", row)
            assert np.array_equal(f.mask[i].numpy(), mask) and torch.equal(f.mask[i], h.mask[i])
            stored = torch.from_numpy(image).permute(2, 0, 1).float()
            assert torch.allclose(denormalise(f.image[i:i + 1])[0], stored, atol=1e-3)
            # at scale 0.5 an output pixel inside a block has the block's colour
            half_image = denormalise(h.image[i:i + 1])[0]
            keep = torch.from_numpy(interior(mask, radius=3)[::2, ::2])
            assert keep.float().mean() > 0.5
            assert (half_image - stored[:, ::2, ::2]).abs()[:, keep].max() <= 1.0


def test_eval_of_a_split_without_masks(tmp_path):
    images = np.stack([blocky_frame(64, 96, seed=i)[0] for i in range(3)])
    names = [f"a/a_{i:06d}_000019" for i in range(3)]
    path = write_cache(tmp_path / "c.zarr", {"test": (images, None, names)})
    batches = list(load(path, "test", train=False, batch_size=2))
    assert [b.mask for b in batches] == [None, None]
    assert batches[1].image.shape == (1, 3, 64, 96)
    with pytest.raises(UserError, match="no masks"):
        load(path, "test", train=True)


# -- the loader: refused arguments -----------------------------------------------------------
def test_missing_cache_is_a_user_error(tmp_path):
    with pytest.raises(CacheError, match="no cache there"):
        load(tmp_path / "nowhere.zarr")


def test_unknown_split_names_the_splits_there(cache):
    with pytest.raises(CacheError, match=r"no split 'tain'.*train, val"):
        load(cache, "tain")


@pytest.mark.parametrize("crop,ok", [((4 * H, 4 * W), True), ((4 * H + 1, 64), False),
                                     ((64, 4 * W + 1), False)])
def test_crop_may_overhang_but_not_absurdly(cache, crop, ok):
    if ok:
        aug = AugmentConfig(crop=crop, scale=(2.0, 2.0))
        batch = next(iter(load(cache, aug=aug, batch_size=1)))
        assert batch.image.shape[-2:] == crop
        return
    with pytest.raises(UserError, match="crop .* more than 4x"):
        load(cache, aug=AugmentConfig(crop=crop))


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch size"),
    (dict(batch_size=8), "too few for one training batch"),
    (dict(rank=2, world_size=2), "rank 2 is not in a world of size 2"),
    (dict(rank=0, world_size=0), "world of size 0"),
    (dict(workers=-1), "workers"),
])
def test_bad_loader_arguments(cache, kwargs, message):
    with pytest.raises(UserError, match=message):
        load(cache, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_a_user_error(cache):
    with pytest.raises(UserError, match="CUDA is not available"):
        load(cache, device="cuda")


def test_bad_augment_settings_and_kind(cache):
    with pytest.raises(UserError, match="crop size must be positive"):
        AugmentConfig(crop=(0, 64))
    with pytest.raises(UserError, match="unknown loader kind 'pil'"):
        build_loader(cache, "train", "pil", train=True, batch_size=1)


def test_dali_missing_is_a_user_error(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import now raises ImportError
    monkeypatch.delitem(sys.modules, "loaders.dali_loader", raising=False)
    with pytest.raises(UserError, match="DALI"):
        build_loader(cache, "train", "dali", train=True, batch_size=1)


def test_torch_loader_direct_constructor_matches_factory(cache):
    direct = TorchLoader(cache, "train", train=True, batch_size=2, aug=GEOMETRY, device="cpu",
                         seed=0, rank=0, world_size=1, num_workers=0)
    via = load(cache)
    for a, b in zip(direct, via):
        assert torch.equal(a.image, b.image) and torch.equal(a.rows, b.rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu_batches(cache):
    aug = AugmentConfig(crop=(128, 160))
    on_gpu = next(iter(load(cache, aug=aug, device="cuda", workers=2)))
    on_cpu = next(iter(load(cache, aug=aug)))
    assert on_gpu.image.is_cuda and on_gpu.mask.is_cuda and on_gpu.rows.is_cuda
    assert torch.allclose(on_gpu.image.cpu(), on_cpu.image, atol=1e-4)
    assert torch.equal(on_gpu.mask.cpu(), on_cpu.mask)


# -- scripts/bench_loader.py -----------------------------------------------------------------
def load_bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_loader.py"
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_accounts_for_the_process_tree_and_plans_kinds():
    import os
    import subprocess

    bench = load_bench_module()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        tree = bench.process_tree(os.getpid())
        assert os.getpid() in tree and child.pid in tree
    finally:
        child.kill()
        child.wait()
    rss, pss = bench.memory_mb([os.getpid()])
    assert 0 < pss <= rss
    before = bench.cpu_seconds([os.getpid()])
    sum(i * i for i in range(2_000_000))
    assert bench.cpu_seconds([os.getpid()]) > before
    assert bench.plan(["png", "dali"], cuda=True) == [
        ("png", "cpu"), ("dali", "cpu"), ("dali", "cuda")]
    assert bench.parse_kinds(" png, torch ") == ["png", "torch"]
    with pytest.raises(UserError, match="unknown kind 'pil'"):
        bench.parse_kinds("png,pil")


@pytest.mark.slow
def test_bench_script_writes_rows(cache, tmp_path):
    import json
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_loader.py"
    out = tmp_path / "rows.json"
    command = [sys.executable, str(script), "--root", str(tmp_path), "--cache", str(cache),
               "--kinds", "torch", "--res", "64", "--batch-size", "2", "--seconds", "1",
               "--warmup", "0.2", "--workers", "1", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())
    assert (row["kind"], row["device"], row["workers"]) == ("torch", "cpu", 1)
    assert row["images_per_second"] > 0 and row["cpu_percent"] > 0 and row["peak_rss_mb"] > 0
    assert row["processes"] >= 2  # the measuring process and its worker
    bad = subprocess.run([sys.executable, str(script), "--kinds", "pil"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --kinds: unknown kind 'pil'")
