"""Losses, class weights, the model factory, the schedule, the optimiser and checkpoint files."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cache.errors import UserError
from training.train.checkpoint import (capture_rng, check_compatible, load_checkpoint, load_for_eval,
                                 restore_rng, save_checkpoint)
from training.train.builders import build_optimizer, lr_factor
from training.train.config import resolve_config
from training.core.losses import (CrossEntropy, DiceLoss, FocalLoss, build_loss, load_class_weights,
                             parse_loss_spec, split_weights_spec)
from training.core.model import (build_model, canonical_arch, check_input_size,
                            hub_unreachable_reason, nearest_multiple)

IGNORE = 255


def random_batch(seed=0, classes=5, shape=(2, 8, 8), ignored=0.3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], classes, *shape[1:], generator=gen, requires_grad=True)
    target = torch.randint(0, classes, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < ignored] = IGNORE
    return logits, target


# -- losses ------------------------------------------------------------------------------------

def test_cross_entropy_matches_torch_and_ignores_255():
    logits, target = random_batch()
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    for w in (None, weight):
        ours = CrossEntropy(IGNORE, w)(logits, target)
        ref = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE)
        assert torch.allclose(ours, ref, atol=1e-6)
    # changing the logits of ignored pixels changes nothing
    moved = logits.detach().clone()
    moved[(target == IGNORE).unsqueeze(1).expand_as(moved)] += 100.0
    assert torch.allclose(CrossEntropy(IGNORE)(moved, target), CrossEntropy(IGNORE)(logits, target))


@pytest.mark.parametrize("name", ["ce", "focal", "dice", "ce+dice"])
def test_all_ignored_batch_gives_zero_loss_with_a_graph(name):
    logits, target = random_batch()
    target[:] = IGNORE
    loss = build_loss(name, ignore_index=IGNORE)(logits, target)
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_focal_with_gamma_zero_is_cross_entropy_and_down_weights_easy_pixels():
    logits, target = random_batch(seed=1)
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    ce = CrossEntropy(IGNORE, weight)(logits, target)
    assert torch.allclose(FocalLoss(IGNORE, weight, gamma=0.0)(logits, target), ce, atol=1e-6)
    assert FocalLoss(IGNORE, weight, gamma=2.0)(logits, target) < ce


def test_dice_is_zero_for_a_perfect_prediction_and_high_for_a_wrong_one():
    _, target = random_batch(seed=2)
    perfect = F.one_hot(torch.where(target == IGNORE, 0, target), 5).permute(0, 3, 1, 2) * 50.0
    assert DiceLoss(IGNORE, smooth=0.0)(perfect.float(), target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = perfect.roll(1, dims=1)
    assert DiceLoss(IGNORE, smooth=0.0)(wrong.float(), target).item() > 0.95


def test_class_weights_change_dice_and_focal():
    logits, target = random_batch(seed=3)
    heavy = torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0])
    for cls in (DiceLoss, FocalLoss):
        assert not torch.allclose(cls(IGNORE, heavy)(logits, target), cls(IGNORE)(logits, target))


def test_loss_spec_sums_terms_with_factors():
    logits, target = random_batch(seed=4)
    combined = build_loss("ce+0.5*dice", ignore_index=IGNORE)(logits, target)
    expected = CrossEntropy(IGNORE)(logits, target) + 0.5 * DiceLoss(IGNORE)(logits, target)
    assert torch.allclose(combined, expected)
    assert parse_loss_spec("CE + Focal") == [(1.0, "ce"), (1.0, "focal")]
    for bad in ("lovasz", "ce+", "-1*ce", "x*dice"):
        with pytest.raises(UserError, match="--loss"):
            parse_loss_spec(bad)


def test_losses_are_float32_under_bf16_autocast():
    logits, target = random_batch(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = build_loss("ce+dice+focal", ignore_index=IGNORE)(logits.bfloat16(), target)
    assert loss.dtype == torch.float32


class LiveLogitCopies(TorchDispatchMode):
    """Counts the float32 tensors of the logits' (B, C, H, W) size alive at once: each op's
    new storage is tracked until its tensor dies (autograd's saved tensors keep theirs alive)."""

    def __init__(self, logits_shape):
        super().__init__()
        self.nbytes = math.prod(logits_shape) * 4
        self.live: set[int] = set()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() == self.nbytes and key not in self.live:
                self.live.add(key)
                weakref.finalize(t, self.live.discard, key)
                self.peak = max(self.peak, len(self.live))
        return out


@pytest.mark.parametrize("grad", [True, False])
def test_combined_loss_keeps_few_float32_copies_alive(grad):
    # Half-precision logits (autocast) are cast to float32 by each term, and each copy dies
    # with its term: ce+dice then holds at most the saved log-softmax, the softmax and Dice's
    # masked probabilities (2 without a graph). One cast shared by the terms would add one.
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 16, 16, generator=gen).bfloat16().requires_grad_(grad)
    target = torch.randint(0, 5, (2, 16, 16), generator=gen)
    target[:, :3] = IGNORE
    loss_fn = build_loss("ce+dice", ignore_index=IGNORE)
    counter = LiveLogitCopies(logits.shape)
    with torch.set_grad_enabled(grad), counter:
        loss = loss_fn(logits, target)
    assert counter.peak == (3 if grad else 2)
    expected = CrossEntropy(IGNORE)(logits, target) + DiceLoss(IGNORE)(logits, target)
    assert torch.equal(loss, expected)


def test_class_weights_file(tmp_path):
    stats = tmp_path / "stats.json"
    table = {"enet": [float(i + 1) for i in range(19)], "median_frequency": [0.5] * 19}
    stats.write_text(json.dumps({"weights": table}))
    assert load_class_weights(str(stats), 19) == table["enet"]
    assert load_class_weights(f"{stats}:median_frequency", 19) == [0.5] * 19
    assert split_weights_spec("/a/b/stats.json") == (tmp_path.__class__("/a/b/stats.json"), "enet")
    with pytest.raises(UserError, match="no weights for method 'inverse_sqrt'.*enet, median_frequency"):
        load_class_weights(f"{stats}:inverse_sqrt", 19)
    with pytest.raises(UserError, match="must be 5 finite numbers"):
        load_class_weights(str(stats), 5)
    with pytest.raises(UserError, match="no such file"):
        load_class_weights(str(tmp_path / "missing.json"), 19)
    stats.write_text(json.dumps({"frames": 3}))
    with pytest.raises(UserError, match="no 'weights' table"):
        load_class_weights(str(stats), 19)


# -- model factory -----------------------------------------------------------------------------

def test_build_model_any_case_and_aliases():
    assert canonical_arch("DeepLabV3Plus") == "deeplabv3plus"
    assert canonical_arch("unet++") == "unetplusplus"
    assert canonical_arch("UPerNet") == "upernet"
    model = build_model("FPN", "resnet18", 7, None, decoder_pyramid_channels=32,
                        decoder_segmentation_channels=32)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7, 64, 64)


def test_build_model_errors_name_the_option():
    with pytest.raises(UserError, match="--arch 'segnet': unknown architecture; choose one of: .*Unet"):
        build_model("segnet", "resnet18", 19)
    with pytest.raises(UserError, match="--encoder 'resnet9000': unknown encoder"):
        build_model("unet", "resnet9000", 19)
    with pytest.raises(UserError, match="--encoder-weights foo: not available"):
        build_model("unet", "resnet18", 19, "foo")
    with pytest.raises(UserError, match="smp cannot build this model"):
        build_model("dpt", "resnet18", 19)


def test_a_crop_the_model_cannot_take_is_refused_with_one_that_it_can():
    fpn = build_model("fpn", "resnet18", 19)
    check_input_size(fpn, (64, 96))
    with pytest.raises(UserError, match=r"--res 60x100: FPN needs a height and width divisible "
                                        r"by 32; try --res 64x96 \(or --res 64x128\)$"):
        check_input_size(fpn, (60, 100))
    with pytest.raises(UserError, match=r"--res 641: FPN .* try --res 640 \(or --res 672\)$"):
        check_input_size(fpn, (641, 641))          # the nearest size first, then the next up
    with pytest.raises(UserError, match=r"--res 670: FPN .* try --res 672$"):
        check_input_size(fpn, (670, 670))          # nearest is the next one up: said once
    with pytest.raises(UserError, match=r"--res 10x40: FPN .* try --res 32 \(or --res 32x64\)$"):
        check_input_size(fpn, (10, 40))            # never below one stride
    with pytest.raises(RuntimeError, match="divisible by 32"):     # what it spares the user
        fpn(torch.zeros(1, 3, 60, 100))
    unet = build_model("unet", "resnet18", 19, encoder_depth=3, decoder_channels=(16, 8, 8))
    check_input_size(unet, (60, 100))       # Unet resizes its skips: any size works
    assert unet(torch.zeros(1, 3, 60, 100)).shape[-2:] == (60, 100)


def test_nearest_multiple():
    assert [nearest_multiple(n, 32) for n in (641, 656, 671, 1, 16, 47, 48)] == \
        [640, 672, 672, 32, 32, 32, 64]


@pytest.fixture
def hub_at_a_closed_port(tmp_path, monkeypatch):
    """The hub's endpoint on a local port nobody listens on (refused at once, no network used),
    an empty hub cache, and any backoff sleep of huggingface_hub turned into a test failure."""
    import socket

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    without_proxies(monkeypatch)      # the probe must meet the closed port, not a proxy

    sleeps = []

    def no_backoff(seconds):
        sleeps.append(seconds)
        raise AssertionError(f"huggingface_hub retried (sleep {seconds} s)")

    monkeypatch.setattr(_http.time, "sleep", no_backoff)
    return port, sleeps


def test_unreachable_hub_fails_at_once_without_retries(hub_at_a_closed_port):
    with pytest.raises(UserError) as caught:
        build_model("unet", "resnet18", 19, "imagenet", encoder_depth=3,
                    decoder_channels=(8, 8, 8))
    port, sleeps = hub_at_a_closed_port
    message = str(caught.value)
    assert sleeps == [], "huggingface_hub took its retry path"
    assert message.startswith("--encoder-weights imagenet: cannot get the imagenet weights of "
                              f"encoder 'resnet18' (cannot reach 127.0.0.1:{port}")
    assert "--encoder-weights none" in message and "not cached under" in message


def test_unreachable_hub_still_loads_cached_weights(hub_at_a_closed_port):
    import segmentation_models_pytorch as smp
    from huggingface_hub import constants
    from safetensors.torch import save_file

    settings = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]
    repo = "models--" + settings["repo_id"].replace("/", "--")
    snapshot = Path(constants.HF_HUB_CACHE) / repo / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    torch.manual_seed(5)
    weights = smp.encoders.get_encoder("resnet18", weights=None).state_dict()
    save_file(weights, snapshot / "model.safetensors")
    model = build_model("unet", "resnet18", 19, "imagenet")
    loaded = model.encoder.state_dict()
    assert all(torch.equal(loaded[name], weights[name]) for name in weights)
    assert not constants.HF_HUB_OFFLINE        # offline only for the build


def test_hub_probe_gives_up_on_a_hanging_connect(monkeypatch):
    import threading

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    release, answered = threading.Event(), threading.Event()
    class Hanging:                 # a connect that answers only when the test is over
        def __init__(self, *args, **kwargs):
            release.wait(30)
            answered.set()

        def close(self):
            pass

    monkeypatch.setattr("socket.create_connection", Hanging)
    reason = hub_unreachable_reason(timeout=0.2)
    gave_up_first = not answered.is_set()     # it returned while the connect still hung
    release.set()
    assert reason.endswith("(no answer within 0.2 s)") and gave_up_first
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable_reason() == "HF_HUB_OFFLINE is set"


def without_proxies(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_behind_a_proxy_the_probe_connects_to_the_proxy(monkeypatch, hub_at_a_closed_port):
    import socket

    port, _ = hub_at_a_closed_port
    without_proxies(monkeypatch)
    assert hub_unreachable_reason().startswith(f"cannot reach 127.0.0.1:{port}")
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(1)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert hub_unreachable_reason() is None          # the hub is reached through it
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert hub_unreachable_reason().startswith(f"cannot reach 127.0.0.1:{port}")


def test_reachable_hub_is_not_probed_offline(monkeypatch):
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    without_proxies(monkeypatch)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable_reason() is None


# -- schedule and optimiser --------------------------------------------------------------------

def test_lr_schedules():
    poly = [lr_factor(s, total=100, warmup=10, schedule="poly", power=0.9) for s in range(100)]
    assert poly[0] == pytest.approx(0.1) and poly[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(poly[9:], poly[10:])) and poly[-1] < 0.05
    cosine = [lr_factor(s, total=100, warmup=0, schedule="cosine", power=0.9) for s in range(101)]
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and cosine[100] == pytest.approx(0.0)


def test_optimizer_decays_only_weights(tmp_path):
    model = build_model("unet", "resnet18", 19, None, encoder_depth=3, decoder_channels=(16, 8, 8))
    for name, kind in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        config = resolve_config({"cache": str(tmp_path), "optimizer": name})
        optimizer = build_optimizer(model, config)
        assert isinstance(optimizer, kind)
        decay, no_decay = optimizer.param_groups
        assert decay["weight_decay"] == config.resolved_weight_decay > 0
        assert no_decay["weight_decay"] == 0 and all(p.ndim == 1 for p in no_decay["params"])
        assert decay["lr"] == config.resolved_lr


# -- checkpoint files --------------------------------------------------------------------------

def tiny_meta(**changes):
    meta = {"arch": "unet", "encoder": "resnet18", "num_classes": 19,
            "model_kwargs": {"encoder_depth": 3, "decoder_channels": (16, 8, 8)},
            "class_names": [f"c{i}" for i in range(19)], "ignore_index": 255, "res": [64, 64]}
    meta.update(changes)
    return meta


def test_checkpoint_round_trip_and_load_for_eval(tmp_path):
    meta = tiny_meta()
    model = build_model("unet", "resnet18", 19, None, **meta["model_kwargs"])
    path = save_checkpoint(tmp_path / "best.pt", {"meta": meta, "model": model.state_dict()})
    assert not (tmp_path / "best.pt.tmp").exists()
    torch.load(path, weights_only=True)          # plain types only
    loaded, loaded_meta = load_for_eval(path, "cpu")
    assert not loaded.training and loaded_meta["class_names"] == meta["class_names"]
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    assert torch.equal(loaded(x), model(x))


def test_checkpoint_refusals(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
    torn = tmp_path / "torn.pt"
    torn.write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(torn)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="not a checkpoint written by `train`"):
        load_checkpoint(foreign)
    text = tmp_path / "stats.json"
    text.write_text('{"weights": {}}')
    with pytest.raises(UserError, match=r"stats.json: not a checkpoint written by `train` \(not a torch.save file\)"):
        load_checkpoint(text)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "cityscapes-seg-checkpoint", "version": 1, "x": pickle.PickleError()}, evil)
    with pytest.raises(UserError, match="refused: it holds objects other than tensors"):
        load_checkpoint(evil)
    meta = tiny_meta()
    check_compatible(meta, tiny_meta(), "ck.pt")
    with pytest.raises(UserError, match=r"ck.pt: checkpoint is for another model: arch 'unet' \(this run: 'fpn'\)"):
        check_compatible(meta, tiny_meta(arch="fpn"), "ck.pt")
    with pytest.raises(UserError, match="num_classes 19 \\(this run: 7\\)"):
        check_compatible(meta, tiny_meta(num_classes=7), "ck.pt")


def test_load_for_eval_refuses_weights_of_another_shape(tmp_path):
    other = build_model("unet", "resnet18", 7, None, encoder_depth=3, decoder_channels=(16, 8, 8))
    path = save_checkpoint(tmp_path / "x.pt", {"meta": tiny_meta(), "model": other.state_dict()})
    with pytest.raises(UserError, match=r"the weights do not fit a Unet model: tensors 2 of "
                                        r"another shape \(first: 'segmentation_head.0.weight'\)"):
        load_for_eval(path)
    deeper = build_model("unet", "resnet18", 19, None, encoder_depth=4, decoder_channels=(16, 8, 8, 8))
    path = save_checkpoint(tmp_path / "y.pt", {"meta": tiny_meta(), "model": deeper.state_dict()})
    with pytest.raises(UserError, match=r"tensors \d+ unexpected \(first: '"):
        load_for_eval(path)
    unknown = save_checkpoint(tmp_path / "z.pt", {"meta": tiny_meta(arch="nosuch"),
                                                  "model": other.state_dict()})
    with pytest.raises(UserError, match=r"z.pt: cannot rebuild the checkpoint's model here "
                                        r"\(--arch 'nosuch': unknown architecture"):
        load_for_eval(unknown)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    meta = {"arch": "Unet", "encoder": "resnet18", "num_classes": 19, "class_names": ["c"] * 19}
    save_checkpoint(tmp_path / "r.pt", {"rng": capture_rng(), "meta": meta, "model": {}})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]
