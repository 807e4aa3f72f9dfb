"""--amp auto picks what the run's own card does natively, and says why.

No GPU needed: the cards are described the way torch reports them (get_device_properties,
get_device_capability, get_device_name), and torch's own `is_bf16_supported` runs unpatched
on top, with only its tensor probe faked to succeed, as it does on a real CUDA card: its
default (including_emulation=True) then says True on an RTX 2060 too, the trap that
`--amp auto` fell into (bf16 there runs every convolution on cuDNN's slow fallback).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from cache.errors import UserError
from training.train.builders import build_grad_scaler
from training.train.resolve import resolve_defaults
from training.train.config import TrainConfig
from training.core.device import (DistEnv, Precision, autocast_context, choose_precision,
                             describe_precision, resolve_amp)
from training.train.report import banner_lines

GiB = 1 << 30
CARDS = {   # name, (major, minor), memory: as torch.cuda.get_device_properties reports them
    "rtx2060": ("NVIDIA GeForce RTX 2060", (7, 5), 6 * GiB),
    "rtx3060": ("NVIDIA GeForce RTX 3060", (8, 6), 12 * GiB),
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB),
    "gtx1080": ("NVIDIA GeForce GTX 1080", (6, 1), 8 * GiB),
}
CUDA0, CPU = torch.device("cuda", 0), torch.device("cpu")


def fake_cards(monkeypatch, *cards: str, current: int = 0) -> None:
    """This process sees `cards` (keys of CARDS) as cuda:0, cuda:1, ...; `current` is the
    current device. Nothing touches a real GPU."""
    props = [SimpleNamespace(name=CARDS[c][0], major=CARDS[c][1][0], minor=CARDS[c][1][1],
                             total_memory=CARDS[c][2], multi_processor_count=30)
             for c in cards]

    def index(device=None) -> int:
        if device is None:
            return current
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return current if device.index is None else device.index

    def properties(device=None):
        return props[index(device)]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: (properties(device).major, properties(device).minor))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: properties(device).name)
    monkeypatch.setattr(torch.version, "hip", None)
    # torch.cuda.is_bf16_supported stays torch's own; its last resort makes a bf16 tensor on
    # the current device, which succeeds on any real CUDA card (emulation)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True,
                        raising=False)


AUTO = {   # card: (amp, reason) of --amp auto on its cuda:0
    "rtx2060": ("fp16", "fp16 + loss scaling: NVIDIA GeForce RTX 2060, sm_75, has no native bf16"),
    "rtx3060": ("bf16", "bf16: NVIDIA GeForce RTX 3060, sm_86"),
    "h100": ("bf16", "bf16: NVIDIA H100 80GB HBM3, sm_90"),
    "gtx1080": (None, "float32: NVIDIA GeForce GTX 1080, sm_61, has no tensor cores"),
}


@pytest.mark.parametrize("card", list(AUTO))
def test_auto_picks_what_the_card_does_natively_and_says_why(monkeypatch, card):
    fake_cards(monkeypatch, card)
    assert choose_precision("auto", CUDA0) == Precision(*AUTO[card])
    assert resolve_amp("auto", CUDA0) == AUTO[card][0]


def test_torch_default_bf16_check_says_yes_on_turing_which_auto_must_not_follow(monkeypatch):
    fake_cards(monkeypatch, "rtx2060")
    assert torch.cuda.is_bf16_supported()                     # emulation counts by default
    assert not torch.cuda.is_bf16_supported(including_emulation=False)
    assert resolve_amp("auto", CUDA0) == "fp16"               # the old code said bf16 here


def test_cpu_stays_float32_bf16_allowed_fp16_refused():
    assert choose_precision("auto", CPU) == Precision(None, "float32 on the CPU")
    assert choose_precision(None, CPU) == Precision(None, "float32 on the CPU")
    assert choose_precision("bf16", CPU) == Precision("bf16", "bf16 on the CPU")
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA device"):
        choose_precision("fp16", CPU)
    assert isinstance(autocast_context("auto", CPU), nullcontext)
    assert autocast_context("bf16", CPU).fast_dtype == torch.bfloat16


@pytest.mark.parametrize("current", [0, 1])
def test_the_runs_own_card_decides_not_the_current_one(monkeypatch, current):
    fake_cards(monkeypatch, "rtx3060", "rtx2060", current=current)
    assert resolve_amp("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_amp("auto", torch.device("cuda", 1)) == "fp16"
    with pytest.raises(UserError, match="RTX 2060"):
        resolve_amp("bf16", torch.device("cuda", 1))


@pytest.mark.parametrize("card, capability", [("rtx2060", "7.5"), ("gtx1080", "6.1")])
def test_bf16_refused_on_a_card_without_it_in_training_evaluate_and_predict(monkeypatch, card,
                                                                           capability):
    fake_cards(monkeypatch, card)
    expected = (f"--amp bf16: {CARDS[card][0]} (compute capability {capability}) has no native "
                "bf16, Ampere (8.0) and later do; use --amp fp16 (or auto)")
    for check in (choose_precision, resolve_amp, autocast_context, build_grad_scaler):
        with pytest.raises(UserError) as caught:
            check("bf16", CUDA0)
        assert str(caught.value) == expected and "\n" not in expected
    assert describe_precision(CUDA0, "bf16")["reason"] == expected


def test_explicit_choices_on_cuda(monkeypatch):
    fake_cards(monkeypatch, "rtx3060", "gtx1080", "h100")
    ampere, pascal, hopper = (torch.device("cuda", i) for i in range(3))
    assert choose_precision("fp16", ampere) == Precision(
        "fp16", "fp16 + loss scaling: NVIDIA GeForce RTX 3060, sm_86")
    assert choose_precision("bf16", hopper) == Precision("bf16",
                                                         "bf16: NVIDIA H100 80GB HBM3, sm_90")
    assert choose_precision(None, ampere) == Precision(None,
                                                       "float32: NVIDIA GeForce RTX 3060, sm_86")
    # fp16 on Pascal runs (autocast works there); it saves memory, not time
    assert choose_precision("fp16", pascal) == Precision(
        "fp16", "fp16 + loss scaling: NVIDIA GeForce GTX 1080, sm_61, has no tensor cores: it "
        "saves memory, not time")
    with pytest.raises(UserError, match="'fp8' is not one of: auto, bf16, fp16, none"):
        choose_precision("fp8", ampere)


@pytest.mark.parametrize("card, dtype", [("rtx2060", torch.float16), ("rtx3060", torch.bfloat16),
                                         ("h100", torch.bfloat16), ("gtx1080", None)])
def test_autocast_follows_the_choice(monkeypatch, card, dtype):
    fake_cards(monkeypatch, card)
    context = autocast_context("auto", CUDA0)
    if dtype is None:
        assert isinstance(context, nullcontext)
    else:
        assert isinstance(context, torch.autocast) and context.fast_dtype == dtype
        assert context.device == "cuda" and context._enabled


@pytest.mark.parametrize("card", list(AUTO))
def test_grad_scaler_on_exactly_when_fp16(monkeypatch, card):
    fake_cards(monkeypatch, card)
    assert build_grad_scaler("auto", CUDA0).is_enabled() == (AUTO[card][0] == "fp16")
    assert not build_grad_scaler(None, CUDA0).is_enabled()
    assert build_grad_scaler("fp16", CUDA0).is_enabled()
    if card in ("rtx3060", "h100"):
        assert not build_grad_scaler("bf16", CUDA0).is_enabled()


def test_grad_scaler_off_on_the_cpu():
    assert not build_grad_scaler("auto", CPU).is_enabled()
    assert not build_grad_scaler("bf16", CPU).is_enabled()
    assert not build_grad_scaler(None, CPU).is_enabled()


def _trainer(config: TrainConfig, device: torch.device):
    loader = SimpleNamespace(rows=list(range(8)), num_workers=2, device=device)
    config = replace(config, eval_every=config.eval_every or 20)   # the trainer resolves it
    return SimpleNamespace(config=config, env=DistEnv(0, 1, 0, device), train_loader=loader,
                           val_loader=loader, total_steps=20, steps_per_epoch=4, step=0,
                           run_dir="runs/x")


@pytest.mark.parametrize("card", [*AUTO, "cpu"])
def test_saved_config_holds_the_choice_and_the_banner_says_why(monkeypatch, card):
    device = CPU
    if card != "cpu":
        fake_cards(monkeypatch, card)
        device = CUDA0
    reader = SimpleNamespace(path="/data/cs.zarr")
    # other machine-dependent defaults (e.g. a validation batch sized to the card's memory)
    # would need a real cache and card: not this test's business
    import training.train.resolve
    monkeypatch.setattr(training.train.resolve, "resolve_val_batch_size", lambda *a: 1, raising=False)
    config = resolve_defaults(TrainConfig(cache="/data/cs.zarr", class_weights="none", amp="auto",
                                          iters=20), reader, DistEnv(0, 1, 0, device))
    amp, reason = AUTO[card] if card != "cpu" else (None, "float32 on the CPU")
    assert config.amp == amp                         # config.yaml holds the resolved precision
    layout = "NCHW" if card == "cpu" else "channels_last"
    device_line = [line for line in banner_lines(_trainer(config, device))
                   if line.startswith("  device")]
    assert device_line == [f"  device      {device}; {reason}; {layout}"]
    # a resumed run's config (already resolved) reads the same
    assert banner_lines(_trainer(replace(config), device)) == banner_lines(_trainer(config, device))


def test_describe_precision_for_gpu_check(monkeypatch):
    fake_cards(monkeypatch, "rtx2060", "h100")
    assert describe_precision("cuda:0") == {
        "device": "cuda:0", "name": "NVIDIA GeForce RTX 2060", "capability": "sm_75",
        "native_bf16": False, "amp": "fp16", "loss_scaling": True,
        "reason": "fp16 + loss scaling: NVIDIA GeForce RTX 2060, sm_75, has no native bf16"}
    hopper = describe_precision(torch.device("cuda", 1))
    assert (hopper["capability"], hopper["native_bf16"], hopper["amp"],
            hopper["loss_scaling"]) == ("sm_90", True, "bf16", False)


def test_describe_precision_on_the_cpu():
    assert describe_precision("cpu") == {
        "device": "cpu", "name": "cpu", "capability": None, "native_bf16": False, "amp": None,
        "loss_scaling": False, "reason": "float32 on the CPU"}


# -- scripts/bench_train.py: --amp auto by default, the card and the choice in its JSON ----------
def _bench_train():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bench_train(monkeypatch, tmp_path, *args):
    """bench_train's main with benchmark_training replaced: what config it got, and its JSON."""
    import json

    from click.testing import CliRunner

    import training.throughput

    got = {}

    def benchmark(config, kinds, **_):
        got["config"] = config
        return {"device": str(config.device or "cpu"), "amp": config.amp, "results": {}}

    monkeypatch.setattr(training.throughput, "benchmark_training", benchmark)
    out = tmp_path / "train.json"
    result = CliRunner().invoke(_bench_train().main, ["--cache", str(tmp_path), "--json", str(out),
                                                      *args])
    report = json.loads(out.read_text()) if out.exists() else None
    return result, got.get("config"), report


def test_bench_train_defaults_to_auto_and_records_the_card(monkeypatch, tmp_path):
    fake_cards(monkeypatch, "rtx2060")
    result, config, report = _run_bench_train(monkeypatch, tmp_path, "--device", "cuda:0")
    assert result.exit_code == 0, result.output
    assert config.amp == "fp16" and report["amp"] == "fp16" and report["amp_requested"] == "auto"
    assert report["precision"] == {
        "device": "cuda:0", "name": "NVIDIA GeForce RTX 2060", "capability": "sm_75",
        "native_bf16": False, "amp": "fp16", "loss_scaling": True,
        "reason": "fp16 + loss scaling: NVIDIA GeForce RTX 2060, sm_75, has no native bf16"}
    assert "precision: fp16 + loss scaling: NVIDIA GeForce RTX 2060" in result.output


def test_bench_train_refuses_bf16_on_turing_before_it_builds_anything(monkeypatch, tmp_path):
    fake_cards(monkeypatch, "rtx2060")
    result, config, report = _run_bench_train(monkeypatch, tmp_path, "--device", "cuda",
                                              "--amp", "bf16")
    assert result.exit_code == 1 and config is None and report is None
    assert "error: --amp bf16: NVIDIA GeForce RTX 2060 (compute capability 7.5)" in result.output


def test_bench_train_on_the_cpu_is_float32(monkeypatch, tmp_path):
    result, config, report = _run_bench_train(monkeypatch, tmp_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert config.amp is None and report["precision"]["capability"] is None
    assert report["precision"]["reason"] == "float32 on the CPU"
