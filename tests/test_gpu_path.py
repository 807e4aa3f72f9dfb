"""The GPU path, checked without a GPU (issue 7): what a CUDA machine would do differently is
made to happen here (a CUDA-initialised process, torchrun's variables, more cores), and what
would synchronise the host with the device is counted on the CPU."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loaders.contract import AugmentConfig, cores_per_rank

from loaders.factory import build_loader
from tests.cachefab import blocky_cache
from tests.test_train import TINY_UNET
from training.train.config import resolve_config
from training.train.plots import read_metrics
from training.train.run import run_training


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("gpu_path") / "c.zarr", n_train=12, n_val=2,
                       height=128, width=256, tile=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(cache, out, **changes):
    values = dict(cache=str(cache), out=str(out), loader="torch", arch="unet", encoder="resnet18",
                  encoder_weights="none", model_kwargs=TINY_UNET, res=64, batch_size=2,
                  workers=0, lr=0.05, jitter=False, seed=0, log_every=1, plots=False)
    values.update(changes)
    return resolve_config(values)


# -- 1. DALI's source workers after CUDA is initialised ----------------------------------------
@pytest.mark.dali
def test_cpu_dali_loader_spawns_its_workers_once_cuda_is_initialised(cache, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import backend

    from loaders.dali_loader import DaliLoader

    aug = AugmentConfig(crop=(64, 64)).no_jitter()
    forked = DaliLoader(cache, "train", train=True, batch_size=2, aug=aug, device=torch.device("cpu"),
                        num_workers=1)
    assert forked.py_start_method == "fork"           # a plain process: fork is fine and fast
    # What DALI itself checks before it forks; True as soon as anything touched CUDA here.
    monkeypatch.setattr(backend, "IsDriverInitialized", lambda: True)
    loader = DaliLoader(cache, "train", train=True, batch_size=2, aug=aug, device=torch.device("cpu"),
                        num_workers=1)
    assert loader.py_start_method == "spawn"
    batch = next(iter(loader))
    assert batch.image.shape == (2, 3, 64, 64) and batch.rows.device.type == "cpu"
    # The same loader made to fork is what DALI refuses (so the patch is the real check).
    refused = DaliLoader(cache, "train", train=True, batch_size=2, aug=aug,
                         device=torch.device("cpu"), num_workers=1, py_start_method="fork")
    with pytest.raises(RuntimeError, match="fork"):
        next(iter(refused))


# -- 3. no host-device synchronisation, no per-sample loop -------------------------------------
class HostReads:
    """Counts the Python-level ways of reading a tensor's values on the host: on a GPU each of
    them would block the host until the device catches up."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


def host_item(batch=3, height=40, width=56, seed=0):
    from loaders.torch_dataset import new_tensor  # noqa: F401  (the worker's allocation path)

    rng = np.random.default_rng(seed)
    valid = np.array([[height, width], [height - 7, width - 11], [13, 17]])[:batch]
    return {
        "image": torch.from_numpy(rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)),
        "mask": torch.from_numpy(rng.integers(0, 19, (batch, height, width), dtype=np.uint8)),
        "rows": torch.arange(batch, dtype=torch.int64),
        "valid_hw": torch.from_numpy(valid).long(),
        "colour": torch.tensor([[1.1, 0.9, 1.2, 4.0], [0.8, 1.15, 0.85, -3.0], [1.0, 1.0, 0.0, 0.0]]
                               )[:batch],
    }


def per_sample_reference(item):
    """The finishing as a loop over samples (what the batched code must equal)."""
    from loaders.colour import colour_twist, normalise

    out = []
    for i in range(item["image"].shape[0]):
        pixels = item["image"][i:i + 1].permute(0, 3, 1, 2).float()
        twisted = colour_twist(pixels, *item["colour"][i:i + 1].T)
        h, w = item["valid_hw"][i].tolist()
        twisted[:, :, h:, :] = 0
        twisted[:, :, :, w:] = 0
        out.append(normalise(twisted))
    return torch.cat(out)


@pytest.mark.parametrize("channels_last", [False, True])
def test_finishing_is_batched_and_reads_nothing_back(monkeypatch, channels_last):
    from loaders import torch_loader
    from loaders.colour import constants

    item = host_item()
    expected = per_sample_reference(item)
    assert constants("cpu") is constants(torch.device("cpu"))   # made once per device
    products = []
    original = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: products.append(1) or original(*a, **k))
    reads = HostReads(monkeypatch)
    batch = torch_loader.finish_on_device(item, torch.device("cpu"), jitter=True,
                                          channels_last=channels_last)
    assert reads.calls == [] and len(products) == 1     # one matrix product for the batch
    assert batch.image.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.allclose(batch.image, expected, atol=1e-5)
    assert batch.mask.dtype == torch.int64 and batch.rows.device.type == "cpu"


def test_a_training_step_reads_nothing_back(cache, tmp_path, monkeypatch):
    from training.train.builders import build_parts, model_meta
    from training.core.device import single_process
    from training.core.engine import DataWait, train_step

    config = tiny(cache, tmp_path / "r", loss="ce+dice+focal", class_weights="none")
    env = single_process("cpu")
    from cache.reader import CacheReader

    reader = CacheReader(cache)
    parts = build_parts(config, model_meta(config, reader), reader, env, total_steps=10)
    loader = build_loader(cache, "train", "torch", train=True, batch_size=2,
                          aug=AugmentConfig(crop=(64, 64)), num_workers=0)
    batches = list(loader)
    reads = HostReads(monkeypatch)
    wait = DataWait(env.device)
    losses = [train_step(parts, iter(batches[i:i + 2]), accum=2, wait=wait) for i in (0, 2)]
    assert reads.calls == [], reads.calls
    assert all(loss.dim() == 0 and loss.requires_grad is False for loss in losses)
    assert wait.seconds() >= 0.0


def test_dice_builds_no_one_hot_and_equals_the_one_hot_formula(monkeypatch):
    from training.core.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 16, 20)
    target = torch.randint(0, 4, (2, 16, 20))           # class 4 absent
    target[0, :3] = 255
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0])

    def reference(smooth=1.0):
        counted = (target != 255).unsqueeze(1).float()
        probs = F.softmax(logits, 1) * counted
        onehot = F.one_hot(torch.where(target != 255, target, 0), 5).permute(0, 3, 1, 2) * counted
        inter = (probs * onehot).sum((0, 2, 3))
        card = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        dice = (2 * inter + smooth) / (card + smooth)
        present = (onehot.sum((0, 2, 3)) > 0).float() * weight
        return ((1 - dice) * present).sum() / present.sum()

    expected = reference()
    monkeypatch.setattr(F, "one_hot", lambda *a, **k: pytest.fail("one-hot target built"))
    got = DiceLoss(weight=weight)(logits, target)
    assert torch.allclose(got, expected, atol=1e-6)


# -- 4. loaders kept across epochs; data_time and step_time in every log line ---------------------
@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_three_short_epochs_build_each_loader_once(cache, tmp_path, monkeypatch, kind):
    """12 frames at batch 2 = 6 batches an epoch; --grad-accum 4 uses 4 of them per epoch."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    from loaders.dali_loader import DaliLoader
    from loaders.torch_loader import TorchLoader

    starts = []
    original_iter, original_build = TorchLoader.__iter__, DaliLoader._build

    def counting_iter(self):
        before = self.stream_starts
        batches = original_iter(self)
        if self.stream_starts != before:
            starts.append(("train" if self.train else "val"))
        return batches

    def counting_build(self, first_epoch):
        starts.append("train" if self.train else "val")
        return original_build(self, first_epoch)

    monkeypatch.setattr(TorchLoader, "__iter__", counting_iter)
    monkeypatch.setattr(DaliLoader, "_build", counting_build)
    config = tiny(cache, tmp_path / kind, loader=kind, grad_accum=4, iters=3, limit=1)
    result = run_training(config)
    assert result.step == 3 and result.epoch == 3
    assert sorted(starts) == ["train", "val"]           # one stream each, for three epochs
    lines = [r for r in read_metrics(tmp_path / kind / "metrics.jsonl") if r["event"] == "train"]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for line in lines:
        assert 0.0 <= line["data_time"] <= line["step_time"] and line["step_time"] > 0
    evals = [r for r in read_metrics(tmp_path / kind / "metrics.jsonl") if r["event"] == "eval"]
    assert evals and all(math.isfinite(r["val_loss"]) for r in evals)


# -- 6. cores shared among local ranks; 7. device placement --------------------------------------
def test_worker_counts_share_the_cores_among_local_ranks(monkeypatch):
    from loaders.dali_loader import default_workers
    from loaders.torch_loader import default_num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores_per_rank() == 16 and default_workers(torch.device("cuda", 0)) == (8, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cores_per_rank() == 2
    assert default_workers(torch.device("cuda", 0)) == (1, 2)   # was 8 per rank: 64 processes
    assert default_workers(torch.device("cpu")) == (1, 2) and default_num_workers() == 2


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two CUDA devices as far as device placement can tell; set_device calls recorded."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(torch.device(device)))
    return chosen


def test_torchrun_local_rank_decides_the_gpu(fake_gpus, monkeypatch):
    from training.core.device import resolve_device

    assert resolve_device("cuda:0", local_rank=1, under_torchrun=True) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1, under_torchrun=True) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)   # single process
    from cache.errors import UserError

    with pytest.raises(UserError, match="has 2 CUDA device"):
        resolve_device("cuda:5")


def test_single_process_makes_its_gpu_current(fake_gpus):
    from training.core.device import single_process

    env = single_process("cuda:1")
    assert env.device == torch.device("cuda", 1) and fake_gpus == [torch.device("cuda", 1)]


def test_init_distributed_puts_each_rank_on_its_local_gpu(fake_gpus, monkeypatch):
    from training.core import device as device_module

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(device_module.dist, "is_initialized", lambda: True)  # no rendezvous
    env = device_module.init_distributed("cuda:0")
    assert env.device == torch.device("cuda", 1) and fake_gpus == [torch.device("cuda", 1)]


# -- 9. GPU defaults ----------------------------------------------------------------------------
def test_gpu_defaults_bf16_or_fp16_and_channels_last(monkeypatch):
    from tests.test_precision import fake_cards
    from training.core.device import resolve_amp, resolve_channels_last

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    # cards as torch reports them, torch's own is_bf16_supported on top (tests/test_precision.py
    # has the rest): cuda:0 an RTX 3060 (sm_86), cuda:1 an RTX 2060 (sm_75, bf16 emulated only)
    fake_cards(monkeypatch, "rtx3060", "rtx2060", current=1)
    assert resolve_amp("auto", cuda) == "bf16" and resolve_amp("auto", cpu) is None
    assert resolve_amp("auto", torch.device("cuda", 1)) == "fp16"  # with a GradScaler (builders)
    assert resolve_amp(None, cuda) is None and resolve_amp("bf16", cpu) == "bf16"
    assert resolve_channels_last(None, cuda) and not resolve_channels_last(None, cpu)
    assert not resolve_channels_last(False, cuda)


def test_channels_last_run_on_the_cpu_matches_the_contiguous_one(cache, tmp_path):
    runs = {}
    for layout in (False, True):
        config = tiny(cache, tmp_path / str(layout), iters=2, limit=2, channels_last=layout)
        result = run_training(config)
        convs = [p for p in result.model.parameters() if p.dim() == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs) == layout
        runs[layout] = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    # the same training up to float summation order (a wrong layout would scramble channels)
    assert torch.allclose(runs[False], runs[True], atol=2e-3)
