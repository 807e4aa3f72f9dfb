"""Parameters and FLOPs by torch's counter; evaluate's JSON carries them with the accuracies."""
from __future__ import annotations

import json

import pytest
from torch import nn

from tests.cachefab import blocky_cache
from tests.test_evaluate import FAST, tiny_checkpoint
from training.core.complexity import count_flops, count_parameters, model_complexity
from training.infer.evaluate import run_evaluate


def test_a_convolution_counts_two_flops_per_multiply_add():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    assert count_parameters(conv) == 8 * 3 * 3 * 3
    # 8 output channels x 3 input channels x 9 taps at each of 4 x 5 output pixels
    assert count_flops(conv, (4, 5)) == 2 * 8 * 3 * 9 * 4 * 5


def test_smp_model_flops_grow_with_the_input_and_keep_the_mode():
    from training.core.model import build_model

    model = build_model("unet", "resnet18", 19, None, encoder_depth=3,
                        decoder_channels=[16, 8, 8]).train()
    small = model_complexity(model, (64, 64))
    # 100x100 is padded to the encoder's multiple (8 at depth 3): 104x104
    padded = model_complexity(model, (100, 100))
    assert model.training
    assert small["params"] == padded["params"] == sum(p.numel() for p in model.parameters())
    assert padded["flops_input_hw"] == [104, 104]
    assert padded["flops"] == pytest.approx(small["flops"] * (104 * 104) / (64 * 64), rel=0.02)


def test_evaluate_json_reports_accuracies_params_flops_and_latency(tmp_path):
    cache = blocky_cache(tmp_path / "cache", n_train=1, n_val=2, height=64, width=128)
    ckpt = tiny_checkpoint(tmp_path / "best.pt")
    result = run_evaluate(ckpt, cache, "val", json_path=tmp_path / "eval.json", **FAST)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["params"] == result["params"] > 0 and saved["flops"] > 0
    assert saved["flops_input_hw"] == [64, 128] and saved["latency_ms"] > 0
    assert set(saved["class_accuracy"]) == set(saved["class_iou"])
    present = [v for v in saved["class_accuracy"].values() if v is not None]
    assert saved["mean_accuracy"] == pytest.approx(sum(present) / len(present))
    assert 0 <= saved["pixel_accuracy"] <= 1
