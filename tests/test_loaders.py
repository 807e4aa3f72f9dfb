"""Both loader kinds against one set of checks (the `kind` fixture runs each test for "torch"
and, where DALI is installed, for "dali" in CPU-only mode), then what only one kind has: the
torch kind's resize and colour ops against DALI's, the DALI graph's colour stage, its worker
defaults and start methods, the host side alone (loaders/host_side.py), and the GPU.

Frames come from tests/cachefab.py: blocks of random classes, each painted in its class
colour, so the class of every augmented image pixel can be read back from its colour and
compared with the augmented mask. DALI runs keep crops small and use 1-2 workers.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from cache.errors import UserError
from cache.format import CacheError
from cache.reader import CacheReader
from loaders import AugmentConfig
from loaders.factory import build_loader
from loaders.colour import colour_twist, normalise
from loaders.contract import MEAN, STD
from loaders.order import shard_indices
from loaders.sampling import draw_train_sample
from tests.cachefab import (CLASS_COLOURS, blocky_cache, blocky_frame, blocky_source,
                            centre_nearest, check_train_sample, class_from_colour, denormalise,
                            epoch_batches, interior, write_cache)

H, W = 256, 512
N_TRAIN, N_VAL = 7, 5
GEOMETRY = AugmentConfig(crop=(96, 160)).no_jitter()  # flips and the full 0.5-2.0 scale range
DALI_MISSING = "DALI is not installed (nvidia-dali-cuda130, Linux x86-64 only); use --loader torch"
DEFAULT_WORKERS = {"torch": 0, "dali": 1}  # in-process torch; DALI's smallest parallel source


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("blocky") / "cache.zarr", n_train=N_TRAIN,
                        n_val=N_VAL, height=H, width=W)


@pytest.fixture(params=["torch", pytest.param("dali", marks=pytest.mark.dali)])
def kind(request):
    if request.param == "dali":
        pytest.importorskip("nvidia.dali")
    return request.param


@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali")


def load(cache, kind, split="train", *, train=True, batch_size=2, aug=GEOMETRY, workers=None,
         **kw):
    workers = DEFAULT_WORKERS[kind] if workers is None else workers
    return build_loader(cache, split, kind, train=train, batch_size=batch_size, aug=aug,
                        num_workers=workers, **kw)


def source_frame(split, row):
    return blocky_source(split, row, H, W)


def pixels_hwc(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) normalised -> (h, w, 3) float pixels on 0..255."""
    return denormalise(image[None].cpu())[0].permute(1, 2, 0).numpy()


def one_colour_cache(tmp_path, mask: np.ndarray, frames: int = 4):
    images = np.stack([CLASS_COLOURS[mask]] * frames)
    names = [f"a/a_{i:06d}_000019" for i in range(frames)]
    return write_cache(tmp_path / "c.zarr", {"train": (images, np.stack([mask] * frames), names)})


# == both kinds ==================================================================================
# -- geometry ------------------------------------------------------------------------------------
def test_image_and_mask_agree_and_follow_the_source(cache, kind):
    loader = load(cache, kind, batch_size=3, workers=2)
    seen_flip = seen_noflip = seen_up = seen_down = False
    checked = 0
    for epoch in range(2):
        for batch in epoch_batches(loader, epoch):
            assert batch.image.shape == (3, 3, 96, 160) and batch.image.dtype == torch.float32
            assert batch.mask.shape == (3, 96, 160) and batch.mask.dtype == torch.int64
            assert batch.rows.dtype == torch.int64 and batch.image.device.type == "cpu"
            for image, mask, row in zip(batch.image, batch.mask.numpy(), batch.rows.tolist()):
                p = draw_train_sample(0, epoch, row, (H, W), GEOMETRY)
                seen_flip |= p.flip
                seen_noflip |= not p.flip
                seen_up |= p.out_h > p.h
                seen_down |= p.out_h < p.h
                check_train_sample(image, mask, p, source_frame("train", row)[1])
                checked += 1
    assert seen_flip and seen_noflip and seen_up and seen_down and checked == 2 * 2 * 3


def test_masks_hold_only_source_values_and_ignore(tmp_path, kind):
    checker = np.where((np.indices((H, W)).sum(0) % 2) == 0, 4, 17).astype(np.uint8)
    loader = load(one_colour_cache(tmp_path, checker), kind, aug=AugmentConfig(crop=(300, 300)))
    values = set()
    for epoch in range(3):
        for batch in epoch_batches(loader, epoch):
            values |= set(batch.mask.unique().tolist())
    assert values <= {4, 17, 255} and {4, 17, 255} <= values


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_padding_bottom_right_stays_zero_under_jitter(cache, kind, flip_prob):
    # the whole 256x512 frame at scale 0.5 is 128x256; the rest of 200x300 is padding
    aug = AugmentConfig(crop=(200, 300), scale=(0.5, 0.5), flip_prob=flip_prob, brightness=0.4,
                        contrast=0.4, saturation=0.4, hue=30.0)
    batch = next(iter(load(cache, kind, aug=aug)))
    assert batch.image.shape == (2, 3, 200, 300)
    pad_value = normalise(torch.zeros(1, 3, 1, 1))[0, :, 0, 0]
    for image, mask, row in zip(batch.image, batch.mask, batch.rows.tolist()):
        pixels = pixels_hwc(image)
        assert np.abs(pixels[128:]).max() < 1e-3 and np.abs(pixels[:, 256:]).max() < 1e-3
        assert torch.allclose(image[:, 128:, :], pad_value.view(3, 1, 1).expand(3, 72, 300),
                              atol=1e-5)
        assert (mask[128:] == 255).all() and (mask[:, 256:] == 255).all()
        assert (mask[:128, :256] != 255).all()
        _, frame_mask = source_frame("train", row)
        expected = frame_mask[centre_nearest(H, 128)[:, None], centre_nearest(W, 256)[None, :]]
        assert np.array_equal(expected, frame_mask[1::2, 1::2])  # scale 0.5 keeps odd pixels
        if flip_prob:
            expected = expected[:, ::-1]
        assert np.array_equal(mask[:128, :256].numpy(), expected)


def test_cat_max_ratio_applies_to_the_windows(tmp_path, kind):
    mask = np.full((H, W), 10, dtype=np.uint8)  # mostly sky
    mask[200:, :] = 0
    mask[200:, 256:] = 1
    path = one_colour_cache(tmp_path, mask)
    aug = AugmentConfig(crop=(96, 96), scale=(1.0, 1.0), cat_max_ratio=0.75,
                        cat_max_tries=100).no_jitter()
    for epoch in range(2):
        for batch in epoch_batches(load(path, kind, aug=aug), epoch):
            for image, m in zip(batch.image, batch.mask):
                counts = torch.bincount(m.flatten(), minlength=256)[:255]
                assert counts.max() < 0.75 * counts.sum()
                # the mask kept from the accepted draw belongs to the image's window
                assert np.array_equal(class_from_colour(image), m.numpy())


# -- order, determinism, epochs, shards ------------------------------------------------------------
def test_same_seed_same_batches_whatever_the_workers(cache, kind):
    aug = AugmentConfig(crop=(64, 96))
    a = epoch_batches(load(cache, kind, aug=aug, seed=3, workers=2), epoch=1)
    b = epoch_batches(load(cache, kind, aug=aug, seed=3, workers=0), epoch=1)  # in-process
    c = epoch_batches(load(cache, kind, aug=aug, seed=4), epoch=1)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and torch.equal(x.mask, y.mask)
        assert torch.equal(x.rows, y.rows)
    assert any(not torch.equal(x.image, z.image) for x, z in zip(a, c))


def test_epochs_reshuffle_and_repeat(cache, kind):
    loader = load(cache, kind, batch_size=1, aug=AugmentConfig(crop=(64, 64)))
    orders = {e: [int(b.rows) for b in epoch_batches(loader, e)] for e in (0, 1, 2)}
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert orders[0] == shard_indices(N_TRAIN, seed=0, epoch=0).tolist()
    again = epoch_batches(loader, 0)
    assert [int(b.rows) for b in again] == orders[0]


def counting_builds(monkeypatch, kind) -> list:
    """Record every DALI pipeline build (the torch kind has none: an empty list)."""
    builds = []
    if kind == "dali":
        from loaders.dali_loader import DaliLoader

        real = DaliLoader._build

        def counted(self, *args, **kwargs):
            builds.append(args or kwargs)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(DaliLoader, "_build", counted)
    return builds


def test_stream_across_epochs_set_epoch_and_abandoning(cache, kind, monkeypatch):
    builds = counting_builds(monkeypatch, kind)
    aug = AugmentConfig(crop=(48, 64))
    loader = load(cache, kind, aug=aug, workers=2)  # prefetches into the next epoch
    got = {epoch: epoch_batches(loader, epoch) for epoch in (0, 1, 2)}
    if kind == "dali":
        assert len(builds) == 1  # consecutive epochs run on in one pipeline
    for epoch in (0, 1, 2):
        expected = shard_indices(N_TRAIN, seed=0, epoch=epoch)[:6].reshape(3, 2).tolist()
        assert [b.rows.tolist() for b in got[epoch]] == expected
    assert got[0][0].rows.tolist() != got[1][0].rows.tolist()
    # an arbitrary epoch (resume) on a fresh loader equals that epoch of the stream
    fresh = load(cache, kind, aug=aug)
    for x, y in zip(epoch_batches(fresh, 2), got[2]):
        assert torch.equal(x.image, y.image) and torch.equal(x.rows, y.rows)
    # leave epoch 5 after one batch, then ask for it again: it starts from its beginning
    loader.set_epoch(5)
    first = next(iter(loader))
    again = list(loader)
    assert len(again) == 3 and torch.equal(again[0].image, first.image)
    assert [b.rows.tolist() for b in again] == \
        shard_indices(N_TRAIN, seed=0, epoch=5)[:6].reshape(3, 2).tolist()
    # going back to an earlier epoch restarts there
    assert [b.rows.tolist() for b in epoch_batches(loader, 1)] == [b.rows.tolist() for b in got[1]]
    if kind == "dali":
        # loader, fresh, epoch 5 twice (abandoned, then again), epoch 1
        assert len(builds) == 5
        shm = loader._pipe.external_source_shm_statistics()
        assert sum(shm["capacities"]) > 0  # the source workers hand over through shared memory
    # an older iteration cannot continue once a newer one started
    older = iter(loader)
    next(older)
    newer = iter(loader)
    next(newer)
    with pytest.raises(RuntimeError, match="newer iteration"):
        next(older)


@pytest.mark.parametrize("world", [2, 3])
def test_eval_shards_are_disjoint_and_complete(cache, kind, world):
    rows = []
    for rank in range(world):
        loader = load(cache, kind, "val", train=False, rank=rank, world_size=world)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert [len(b.rows) for b in batches] == [b.image.shape[0] for b in batches]
        rows += [r for b in batches for r in b.rows.tolist()]
    assert sorted(rows) == list(range(N_VAL))


@pytest.mark.parametrize("world", [2, 3])
def test_train_shards_are_disjoint(cache, kind, world):
    rows = []
    for rank in range(world):
        loader = load(cache, kind, batch_size=1, rank=rank, world_size=world,
                      aug=AugmentConfig(crop=(32, 32)))
        batches = epoch_batches(loader, 2)
        assert len(batches) == len(loader) == N_TRAIN // world
        rows += [int(b.rows) for b in batches]
    assert len(set(rows)) == len(rows) == (N_TRAIN // world) * world


@pytest.mark.parametrize("train,batch_size,expected,last", [
    (True, 2, 3, 2), (True, 3, 2, 3), (True, 7, 1, 7), (False, 2, 3, 1), (False, 5, 1, 5),
    (False, 4, 2, 1)])
def test_len_and_batch_sizes(cache, kind, train, batch_size, expected, last):
    split = "train" if train else "val"
    loader = load(cache, kind, split, train=train, batch_size=batch_size,
                  aug=AugmentConfig(crop=(32, 32)))
    batches = list(loader)
    assert len(loader) == len(batches) == expected
    assert len(batches[-1].rows) == batches[-1].image.shape[0] == batches[-1].mask.shape[0] == last


# -- evaluation ------------------------------------------------------------------------------------
def test_eval_gives_whole_frames_and_full_resolution_masks(cache, kind):
    full_loader = load(cache, kind, "val", train=False)
    full = list(full_loader)
    assert [b.rows.tolist() for b in list(full_loader)] == [[0, 1], [2, 3], [4]]  # repeatable
    half = list(load(cache, kind, "val", train=False, aug=AugmentConfig(eval_scale=0.5)))
    assert [b.rows.tolist() for b in full] == [[0, 1], [2, 3], [4]]
    for f, h in zip(full, half):
        assert f.image.shape[-2:] == (H, W) and h.image.shape[-2:] == (H // 2, W // 2)
        assert f.mask.shape[-2:] == h.mask.shape[-2:] == (H, W)  # masks are never resized
        for i, row in enumerate(f.rows.tolist()):
            image, mask = source_frame("val", row)
            assert np.array_equal(f.mask[i].numpy(), mask) and torch.equal(f.mask[i], h.mask[i])
            assert np.abs(pixels_hwc(f.image[i]) - image).max() < 1e-3
            # at scale 0.5 an output pixel inside a block has the block's colour
            keep = interior(mask, radius=3)[::2, ::2]
            assert keep.mean() > 0.5
            assert np.abs(pixels_hwc(h.image[i]) - image[::2, ::2])[keep].max() <= 1.0


def test_eval_of_a_split_without_masks(tmp_path, kind):
    images = np.stack([blocky_frame(64, 96, seed=i)[0] for i in range(3)])
    names = [f"a/a_{i:06d}_000019" for i in range(3)]
    path = write_cache(tmp_path / "c.zarr", {"test": (images, None, names)})
    batches = list(load(path, kind, "test", train=False))
    assert [b.mask for b in batches] == [None, None]
    assert batches[1].image.shape == (1, 3, 64, 96) and batches[1].rows.tolist() == [2]
    with pytest.raises(UserError, match="no masks"):
        load(path, kind, "test", train=True)


# -- refused arguments -----------------------------------------------------------------------------
def test_missing_cache_and_unknown_split(cache, kind, tmp_path):
    with pytest.raises(CacheError, match="no cache there"):
        load(tmp_path / "nowhere.zarr", kind)
    with pytest.raises(CacheError, match=r"no split 'tain'.*train, val"):
        load(cache, kind, "tain")


@pytest.mark.parametrize("crop,ok", [((4 * H, 4 * W), True), ((4 * H + 1, 64), False),
                                     ((64, 4 * W + 1), False)])
def test_crop_may_overhang_but_not_absurdly(cache, kind, crop, ok):
    if ok:
        aug = AugmentConfig(crop=crop, scale=(2.0, 2.0)).no_jitter()
        batch = next(iter(load(cache, kind, aug=aug, batch_size=1)))
        assert batch.image.shape[-2:] == crop
        return
    with pytest.raises(UserError, match="crop .* more than 4x"):
        load(cache, kind, aug=AugmentConfig(crop=crop))


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch size"),
    (dict(batch_size=8), "too few for one training batch"),
    (dict(rank=2, world_size=2), "rank 2 is not in a world of size 2"),
    (dict(rank=0, world_size=0), "world of size 0"),
    (dict(workers=-1), "workers"),
])
def test_bad_loader_arguments(cache, kind, kwargs, message):
    with pytest.raises(UserError, match=message):
        load(cache, kind, **kwargs)


def test_cuda_without_cuda_is_a_user_error(cache, kind):
    # tests/conftest.py makes CUDA unavailable to every test not marked `gpu`
    with pytest.raises(UserError, match="CUDA is not available"):
        load(cache, kind, device="cuda")


def test_bad_augment_settings_and_kind(cache):
    with pytest.raises(UserError, match="crop size must be positive"):
        AugmentConfig(crop=(0, 64))
    with pytest.raises(UserError, match="unknown loader kind 'pil'"):
        build_loader(cache, "train", "pil", train=True, batch_size=1)


def test_missing_dali_is_a_user_error(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now fails
    monkeypatch.delitem(sys.modules, "loaders.dali_loader", raising=False)
    from loaders.dali_loader import DaliLoader

    with pytest.raises(UserError) as err:
        DaliLoader(cache, "train", train=True, batch_size=2, aug=GEOMETRY,
                   device=torch.device("cpu"), seed=0, rank=0, world_size=1, num_workers=1)
    assert str(err.value) == DALI_MISSING
    with pytest.raises(UserError, match="DALI is not installed"):
        build_loader(cache, "train", "dali", train=True, batch_size=1)


# == the torch kind ===============================================================================
def test_torch_loader_direct_constructor_matches_factory(cache):
    from loaders.torch_loader import TorchLoader

    direct = TorchLoader(cache, "train", train=True, batch_size=2, aug=GEOMETRY, device="cpu",
                         seed=0, rank=0, world_size=1, num_workers=0)
    via = load(cache, "torch")
    for a, b in zip(direct, via):
        assert torch.equal(a.image, b.image) and torch.equal(a.rows, b.rows)


def test_torch_jitter_is_dalis_colour_twist_on_the_geometry(cache):
    aug = AugmentConfig(crop=(160, 700), scale=(0.6, 1.0), brightness=0.3, contrast=0.3,
                        saturation=0.3, hue=20.0)
    jittered = next(iter(load(cache, "torch", aug=aug, seed=4)))
    plain = next(iter(load(cache, "torch", aug=aug.no_jitter(), seed=4)))
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


# -- colour ops, against DALI where it is installed --------------------------------------------
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
def test_colour_twist_matches_dali(dali, float_out):
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


# -- resizing like DALI ----------------------------------------------------------------------------
SIZE_PAIRS = [(96, 61), (1024, 640), (2048, 1280), (300, 97), (97, 300), (1280, 640), (7, 7),
              (5, 1), (1, 9), (1000, 333)]


def test_nearest_indices_are_in_range_and_monotone():
    from loaders.torch_dataset import nearest_indices

    for n, o in SIZE_PAIRS:
        idx = nearest_indices(n, o)
        assert idx.shape == (o,) and idx.min() >= 0 and idx.max() <= n - 1
        assert np.all(np.diff(idx) >= 0)
        if n == o:
            assert np.array_equal(idx, np.arange(n))


@pytest.mark.dali
def test_nearest_and_linear_resize_match_dali(dali):
    from nvidia.dali import fn, pipeline_def, types

    from loaders.torch_dataset import resize_image, resize_mask

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
    from loaders.torch_dataset import resize_mask

    checker = np.where((np.indices((101, 203)).sum(0) % 2) == 0, 3, 200).astype(np.uint8)
    for out in [(50, 101), (37, 61), (202, 406), (13, 300)]:
        for flip in (False, True):
            resized = resize_mask(checker, *out, flip=flip)
            assert resized.shape == out
            assert set(np.unique(resized).tolist()) <= {3, 200}
    flipped = resize_mask(checker[:, :8], 4, 8, flip=True)
    assert np.array_equal(flipped, resize_mask(checker[:, :8], 4, 8, flip=False)[:, ::-1])


# == the DALI kind ================================================================================
@pytest.mark.dali
def test_dali_jitter_is_the_shared_colour_twist_on_the_geometry(cache, dali):
    aug = AugmentConfig(crop=(96, 600), scale=(0.6, 1.0), brightness=0.6, contrast=0.6,
                        saturation=0.3, hue=20.0)
    jittered = next(iter(load(cache, "dali", aug=aug, seed=4)))
    plain = next(iter(load(cache, "dali", aug=aug.no_jitter(), seed=4)))
    assert torch.equal(jittered.mask, plain.mask) and torch.equal(jittered.rows, plain.rows)
    ps = [draw_train_sample(4, 0, row, (H, W), aug) for row in plain.rows.tolist()]
    params = torch.tensor([[p.brightness, p.contrast, p.saturation, p.hue] for p in ps])
    pixels = denormalise(plain.image)
    # DALI's twist of uint8 pixels, float output, clamped to 0..255 (not rounded)
    unclamped = colour_twist(pixels.round(), *params.T, quantise=False)
    assert (unclamped > 256).any() or (unclamped < -1).any()  # so the clamp is exercised
    expected = unclamped.clamp(0, 255)
    for i, p in enumerate(ps):
        expected[i, :, p.out_h:] = 0  # the padding stays 0 before normalisation
        expected[i, :, :, p.out_w:] = 0
    assert all(p.out_w < 600 for p in ps)  # the crop overhangs: padding was exercised
    assert (denormalise(jittered.image) - expected).abs().max() < 0.05
    assert (jittered.image - plain.image).abs().mean() > 0.05


@pytest.mark.dali
def test_dali_colour_stage_is_the_shared_twist_clamped_at_both_ends(dali):
    # The graph's colour stage alone, on pixels and parameters that overflow both ways.
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from loaders import dali_pipeline

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8) for _ in range(3)]
    images[0][:, :20] = (255, 0, 0)  # saturated colours leave 0..255 under a hue shift
    jitter = [(1.5, 1.4, 1.8, 40.0), (0.6, 0.7, 0.2, -90.0), (1.0, 1.0, 1.0, 0.0)]
    params = []
    for b, c, s, h in jitter:
        p = np.zeros(dali_pipeline.NUM_PARAMS, dtype=np.float32)
        p[[dali_pipeline.P_BRIGHTNESS, dali_pipeline.P_CONTRAST, dali_pipeline.P_SATURATION,
           dali_pipeline.P_HUE]] = b, c, s, h
        params.append(p)
    pipe = Pipeline(batch_size=3, num_threads=1, device_id=None)
    with pipe:
        image = fn.external_source(source=lambda: images, layout="HWC", dtype=types.UINT8)
        p = fn.external_source(source=lambda: params, dtype=types.FLOAT)
        pipe.set_outputs(dali_pipeline.jitter_colour(fn, types, image, p))
    pipe.build()
    (out,) = pipe.run()
    got = np.stack([np.array(out[i]) for i in range(3)])
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    unclamped = colour_twist(pixels, *torch.tensor(jitter).T, quantise=False)
    assert (unclamped > 256).any() and (unclamped < -1).any()
    expected = unclamped.clamp(0, 255).permute(0, 2, 3, 1).numpy()
    assert got.dtype == np.float32 and got.min() == 0.0 and got.max() == 255.0
    assert np.abs(got - expected).max() < 1e-3
    assert np.abs(got[2] - images[2]).max() < 1e-3  # the identity twist leaves pixels alone


@pytest.mark.parametrize("cores,cpu,cuda", [
    (1, (1, 1), (1, 2)), (2, (1, 2), (1, 2)), (4, (2, 4), (3, 2)), (6, (2, 6), (5, 2)),
    (32, (8, 8), (8, 2))])
def test_dali_default_workers_and_threads(monkeypatch, cores, cpu, cuda):
    # CPU-only mode: a DALI thread per core, one source worker per ~3 cores (the source
    # is cheap next to the operators); on a GPU the cores go to the source workers.
    from loaders.dali_loader import default_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert default_workers(torch.device("cpu")) == cpu
    assert default_workers(torch.device("cuda", 0)) == cuda


@pytest.mark.dali
def test_dali_spawned_workers_give_the_same_batches(cache, dali):
    # spawn is what a process with CUDA initialised uses: the source must pickle and import
    from loaders.dali_loader import DaliLoader

    aug = AugmentConfig(crop=(48, 64))
    spawned = DaliLoader(cache, "train", train=True, batch_size=2, aug=aug,
                         device=torch.device("cpu"), seed=1, num_workers=1, py_start_method="spawn")
    forked = load(cache, "dali", aug=aug, seed=1)
    assert spawned.py_start_method == "spawn" and forked.py_start_method == "fork"
    for a, b in zip(epoch_batches(spawned, 4), epoch_batches(forked, 4)):
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)


@pytest.mark.dali
def test_dali_refuses_a_device_it_cannot_use(cache, dali):
    with pytest.raises(UserError, match="cpu or cuda only"):
        load(cache, "dali", device="meta")


@pytest.mark.dali
def test_dali_matches_the_torch_kind(cache, dali):
    aug = AugmentConfig(crop=(96, 160))  # full augmentation, jitter included
    for epoch in (0, 3):
        ours = epoch_batches(load(cache, "dali", aug=aug, seed=7), epoch)
        theirs = epoch_batches(load(cache, "torch", aug=aug, seed=7), epoch)
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs):
            assert torch.equal(a.rows, b.rows)
            assert (a.mask == b.mask).float().mean() >= 0.98
            # linear resize and colour rounding differ by a level here and there
            diff = (a.image - b.image).abs() * torch.tensor(STD).view(1, 3, 1, 1)
            # the torch kind rounds the twist to uint8, DALI keeps it in float: <= 0.5 level
            assert diff.mean() < 0.6 and (diff > 4.0).float().mean() < 0.005


# == the host side alone (loaders/host_side.py) ===================================================
def test_torch_host_batches_are_the_loaders_unfinished_batches(cache):
    from loaders.host_side import images_in, torch_host_batches

    aug = AugmentConfig(crop=(96, 160))
    stream = torch_host_batches(cache, batch_size=2, aug=aug, seed=5, num_workers=1)
    items = [next(stream) for _ in range(4)]  # 3 batches an epoch: crosses into epoch 1
    loaded = epoch_batches(load(cache, "torch", aug=aug.no_jitter(), seed=5), 0) + \
        epoch_batches(load(cache, "torch", aug=aug.no_jitter(), seed=5), 1)[:1]
    for item, batch in zip(items, loaded):
        assert images_in(item) == 2
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (2, 96, 160, 3)
        assert torch.equal(item["rows"].cpu(), batch.rows.cpu())
        assert torch.equal(item["mask"].long(), batch.mask)
        # the uint8 pixels are what the device finishes: without jitter, normalised as is
        assert torch.allclose(normalise(item["image"].permute(0, 3, 1, 2)), batch.image,
                              atol=1e-4)


@pytest.mark.dali
def test_dali_host_batches_are_the_source_windows(cache, dali):
    from loaders.host_side import dali_host_batches, images_in

    aug = AugmentConfig(crop=(96, 160))
    stream = dali_host_batches(cache, batch_size=2, aug=aug, seed=5, num_workers=1)
    reader = CacheReader(cache)
    order = [int(r) for e in (0, 1) for r in shard_indices(N_TRAIN, seed=5, epoch=e)[:6]]
    for index in range(4):  # 3 batches an epoch: crosses into epoch 1
        image, mask, params, rows = next(stream)
        assert images_in((image, mask, params, rows)) == 2
        for i in range(2):
            row = int(np.asarray(rows[i])[0])
            assert row == order[2 * index + i]
            p = draw_train_sample(5, index // 3, row, (H, W), aug)
            window_image, window_mask = reader.read_window("train", row, p.y, p.x, p.h, p.w)
            assert np.array_equal(np.asarray(image[i]), window_image)
            assert np.array_equal(np.asarray(mask[i])[:, :, 0], window_mask)


def test_host_side_refuses_what_the_loaders_refuse(cache):
    from loaders.host_side import torch_host_batches

    with pytest.raises(UserError, match="too few for one training batch"):
        next(torch_host_batches(cache, batch_size=8, aug=GEOMETRY))


# == the GPU ======================================================================================
@pytest.mark.gpu
def test_torch_cuda_batches_match_cpu_batches(cache):
    aug = AugmentConfig(crop=(128, 160))
    on_gpu = next(iter(load(cache, "torch", aug=aug, device="cuda", workers=2)))
    on_cpu = next(iter(load(cache, "torch", aug=aug)))
    assert on_gpu.image.is_cuda and on_gpu.mask.is_cuda
    assert torch.equal(on_gpu.rows.cpu(), on_cpu.rows)
    # the colour twist rounds to grey levels: two float32 orders of one twist may land a level
    # apart on a few pixels (0.017 after normalisation), so compare at one level
    levels = (on_gpu.image.cpu() - on_cpu.image).abs() * torch.tensor(STD).view(1, 3, 1, 1)
    assert levels.max() <= 1.0 + 1e-3
    assert torch.equal(on_gpu.mask.cpu(), on_cpu.mask)


@pytest.mark.gpu
@pytest.mark.dali
def test_dali_gpu_pipeline_batches_and_memory(tmp_path, dali):
    frames = [blocky_frame(1024, 2048, seed=i, block=64) for i in range(8)]
    path = write_cache(tmp_path / "big.zarr", {"train": (
        np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames]),
        [f"a/a_{i:06d}_000019" for i in range(8)])}, tile=256)
    aug = AugmentConfig.square(640)
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    loader = load(path, "dali", batch_size=8, aug=aug, workers=2, device="cuda")
    batches = [b for _ in range(2) for b in loader]
    torch.cuda.synchronize()
    used = free_before - torch.cuda.mem_get_info()[0]
    batch = batches[-1]
    assert batch.image.is_cuda and batch.mask.is_cuda
    assert batch.image.shape == (8, 3, 640, 640) and batch.mask.dtype == torch.int64
    assert set(batch.mask.unique().tolist()) <= set(range(19)) | {255}
    # DALI's pools and the two batches held here, nothing like a leak per batch
    assert 0 < used < 8 * 2**30
    print(f"DALI GPU memory at batch 8, 640x640: {used / 2**20:.0f} MiB")
    # the same graph on the CPU gives the same masks
    on_cpu = next(iter(load(path, "dali", batch_size=8, aug=aug, workers=2)))
    first = batches[0]
    assert torch.equal(first.rows.cpu(), on_cpu.rows)
    assert (first.mask.cpu() == on_cpu.mask).float().mean() > 0.99
