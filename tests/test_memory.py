"""training.core.memory: the peak-memory estimate of evaluation and the automatic validation batch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cache.errors import UserError
from training.core import memory
from training.core.memory import GIB, auto_val_batch, eval_memory, fitting_val_batch

SMALL = (256, 512)
FULL = (1024, 2048)


def test_estimate_grows_with_batch_and_resolution():
    one, two, three = (eval_memory("deeplabv3plus", "resnet18", SMALL, b, "fp16") for b in (1, 2, 3))
    assert one.total < two.total < three.total
    assert one.weights == two.weights and one.resident == 0
    # every tensor of the pass carries the batch: the activations grow (nearly) linearly
    assert abs((three.activations - two.activations) - (two.activations - one.activations)) \
        < 0.02 * two.activations
    bigger = eval_memory("deeplabv3plus", "resnet18", (512, 1024), 1, "fp16")
    assert bigger.activations > 2.5 * one.activations   # 4x the pixels (cast weights: fixed)


def test_estimate_of_r101_exceeds_r50_and_fp16_undercuts_fp32():
    r50 = eval_memory("deeplabv3plus", "resnet50", SMALL, 2, "fp16")
    r101 = eval_memory("deeplabv3plus", "resnet101", SMALL, 2, "fp16")
    assert r101.weights > r50.weights and r101.total > r50.total
    # at full size: on small frames the fp16 copies of the weights that autocast caches
    # outweigh what fp16 saves on the activations
    fp16, fp32 = (eval_memory("deeplabv3plus", "resnet50", FULL, 1, amp) for amp in ("fp16", None))
    assert fp16.activations < fp32.activations and fp16.total < fp32.total


def test_flip_adds_views_not_activations_and_training_adds_the_optimiser_state():
    plain = eval_memory("unet", "resnet18", SMALL, 2, "fp16")
    flipped = eval_memory("unet", "resnet18", SMALL, 2, "fp16", tta_flip=True)
    logits = 2 * 19 * SMALL[0] * SMALL[1] * 4
    # views run one after another: flip costs the probabilities it averages, about two float32
    # logit tensors, never a second set of activations
    assert plain.activations < flipped.activations <= plain.activations + 3 * logits
    sgd = eval_memory("unet", "resnet18", SMALL, 2, "fp16", optimizer="sgd")
    adamw = eval_memory("unet", "resnet18", SMALL, 2, "fp16", optimizer="adamw", ddp=True)
    assert sgd.total - plain.total == sgd.resident > 0
    assert adamw.resident == 3 * sgd.resident


def test_eval_peak_bytes_is_the_total():
    assert memory.eval_peak_bytes("unet", "resnet18", SMALL, 1, "fp16") == \
        eval_memory("unet", "resnet18", SMALL, 1, "fp16").total
    with pytest.raises(ValueError):
        memory.eval_peak_bytes("unet", "resnet18", SMALL, 1, "fp16", tta_views=3)


@pytest.mark.parametrize("arch", ["pspnet", "deeplabv3plus"])
def test_estimate_matches_the_real_cpu_pass(arch):
    """The fake-CUDA count against the same pass on real CPU tensors: the live-bytes counter
    agrees exactly, and the CPU allocator's own peak (torch.profiler) is never below it. How
    far above depends on the convolution algorithms torch picks in this process (mkldnn's
    scratch; on CUDA the cuDNN workspace, which the total adds): 0-12 % in a fresh process
    (README), more after tests that changed torch's global settings, so it is not asserted."""
    from training.core.model import build_model

    hw = (128, 256)
    estimate = eval_memory(arch, "resnet18", hw, 2, None, loss="ce", channels_last=False)
    torch.manual_seed(0)
    model = build_model(arch, "resnet18", 19, None).eval()
    counted, allocated = memory.real_cpu_peak(model, batch=2, frame_hw=hw, loss="ce")
    assert estimate.activations == counted
    assert counted <= allocated


@pytest.fixture
def gpu_of(monkeypatch):
    def patch(gib: float):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: SimpleNamespace(total_memory=int(gib * GIB)))
    return patch


def test_auto_batch_follows_the_card(gpu_of):
    chosen = {}
    for gib in (6, 12, 80):
        gpu_of(gib)
        chosen[gib] = auto_val_batch("cuda", "deeplabv3plus", "resnet50", FULL, "fp16")
    assert 1 <= chosen[6] < chosen[12] <= chosen[80] == memory.MAX_AUTO_BATCH
    for gib, batch in chosen.items():
        budget = gib * GIB * (1 - memory.FIT_MARGIN)
        assert eval_memory("deeplabv3plus", "resnet50", FULL, batch, "fp16").total <= budget
        if batch < memory.MAX_AUTO_BATCH:
            assert eval_memory("deeplabv3plus", "resnet50", FULL, batch + 1, "fp16").total > budget


def test_auto_batch_is_one_where_nothing_fits():
    assert fitting_val_batch("deeplabv3plus", "resnet50", FULL, GIB // 2, "fp16") == 1


def test_the_cpu_keeps_batch_one(gpu_of):
    from training.train.resolve import resolve_val_batch_size
    from training.train.config import TrainConfig, resolve_config
    from training.core.device import DistEnv

    assert TrainConfig().val_batch_size is None and TrainConfig().to_dict()["val_batch_size"] == "auto"
    cpu = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert resolve_val_batch_size(TrainConfig(), None, cpu) == 1
    assert auto_val_batch("cpu", "deeplabv3plus", "resnet101", FULL, None) == 1
    given = resolve_config({"cache": "c", "val_batch_size": "3"})
    assert resolve_val_batch_size(given, None, cpu) == 3
    assert resolve_config({"cache": "c", "val_batch_size": "auto"}).val_batch_size is None
    with pytest.raises(UserError, match="val-batch-size"):
        resolve_config({"cache": "c", "val_batch_size": "0"})
    # on CUDA the number chosen for the val frames goes into the config (not "auto")
    gpu_of(12)
    reader = SimpleNamespace(split=lambda name: SimpleNamespace(height=1024, width=2048),
                             num_classes=19)
    cuda = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    config = TrainConfig(cache="c", amp="fp16", channels_last=True, encoder="resnet50")
    batch = resolve_val_batch_size(config, reader, cuda)
    assert batch == fitting_val_batch("deeplabv3plus", "resnet50", FULL, 12 * GIB, "fp16",
                                      loss="ce", channels_last=True, optimizer="sgd")
    assert 1 <= batch <= memory.MAX_AUTO_BATCH


def test_evaluate_batch_size_option():
    from training.cli import _eval_batch_size

    options = dict(device=None, amp=None, tta="1.0", flip=False, eval_scale=1.0)
    assert _eval_batch_size("3", "ckpt.pt", "cache", "val", **options) == 3
    assert _eval_batch_size("auto", "ckpt.pt", "cache", "val", **options) == 1   # the CPU
    with pytest.raises(UserError, match="batch-size"):
        _eval_batch_size("many", "ckpt.pt", "cache", "val", **options)


@pytest.mark.gpu
def test_estimate_against_the_cuda_allocator():
    """On a GPU: the fake estimate against torch.cuda.max_memory_allocated() of the same pass;
    the difference is what kernels allocate inside (cuDNN workspace), which the total budgets
    as CUDNN_WORKSPACE_BYTES."""
    from training.core.model import build_model

    hw = (512, 1024)
    estimate = eval_memory("deeplabv3plus", "resnet18", hw, 2, "fp16", channels_last=False)
    model = build_model("deeplabv3plus", "resnet18", 19, None).cuda().eval()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    counter = memory.run_eval_pass(model, batch=2, frame_hw=hw, device="cuda",
                                   autocast_dtype=torch.float16)
    torch.cuda.synchronize()
    real = torch.cuda.max_memory_allocated() - base
    assert counter.peak == estimate.activations
    assert estimate.activations <= real <= estimate.activations + memory.CUDNN_WORKSPACE_BYTES
