"""Latency at batch 1, as `evaluate` reports it: the model's forward alone, and the whole
test-time-augmented prediction up to the stored frame size."""
from __future__ import annotations

import statistics
import time

import torch

from loaders.sampling import eval_sample
from training.core.device import autocast_context, synchronize
from training.core.model import input_divisor
from training.core.tta import predict_logits


@torch.no_grad()
def measure_latency(model, input_hw: tuple[int, int], device: torch.device, *, runs: int,
                    warmup: int, amp: str | None = None, out_hw=None, tta_scales=(1.0,),
                    tta_flip: bool = False) -> float:
    """Median ms per frame at batch 1: the model's forward alone (out_hw=None, input padded to
    the size the model needs), or the whole TTA prediction up to out_hw."""
    h, w = input_hw
    divisor = input_divisor(model)
    padded = (-(-h // divisor) * divisor, -(-w // divisor) * divisor)
    image = torch.randn(1, 3, *(padded if out_hw is None else input_hw), device=device)
    times = []
    with autocast_context(amp, device):
        for i in range(warmup + runs):
            synchronize(device)
            start = time.perf_counter()
            if out_hw is None:
                model(image)
            else:
                predict_logits(model, image, out_hw, scales=tta_scales, flip=tta_flip)
            synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def time_model(model, frame_hw: tuple[int, int], aug, device: torch.device, *,
               runs: int | None, amp: str | None, tta_scales: tuple[float, ...],
               tta_flip: bool) -> dict:
    """input_hw, latency_ms (forward), latency_tta_ms (None without TTA) and latency_runs at
    the evaluation input size (the frame resized by aug.eval_scale).

    runs None: 50 timed passes on a GPU, 3 on the CPU (a big model takes seconds there);
    0: no timing (latencies None)."""
    sample = eval_sample(0, frame_hw, aug)
    input_hw = (sample.out_h, sample.out_w)
    runs = (50 if device.type == "cuda" else 3) if runs is None else runs
    timed = {"input_hw": list(input_hw), "latency_ms": None, "latency_tta_ms": None,
             "latency_runs": max(0, runs)}
    if runs < 1:
        return timed
    timing = dict(runs=runs, warmup=min(10, max(1, runs // 5)), amp=amp)
    timed["latency_ms"] = measure_latency(model, input_hw, device, **timing)
    if tta_flip or tta_scales != (1.0,):
        timed["latency_tta_ms"] = measure_latency(model, input_hw, device, out_hw=frame_hw,
                                                  tta_scales=tta_scales, tta_flip=tta_flip,
                                                  **timing)
    return timed
