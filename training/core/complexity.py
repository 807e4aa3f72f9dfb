"""A model's size and cost as published comparisons report them: parameters and FLOPs.

FLOPs come from torch's own counter (torch.utils.flop_counter.FlopCounterMode, no extra
dependency): one forward pass at batch 1 and the given input size, counting the matrix products
and convolutions (2 per multiply-add, as torch counts them; fvcore- and mmcv-based tables count
multiply-adds, i.e. half of this). Element-wise work (activations, normalisation, resizing) is
not counted, in any of these tools.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from training.core.model import input_divisor


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (what a published "Params" column counts)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_hw: tuple[int, int], device=None) -> int:
    """FLOPs of one forward pass at batch 1 and `input_hw`, padded up to the multiple the model
    needs (as evaluation pads). The model's train/eval mode is kept; it runs in eval mode."""
    divisor = input_divisor(model)
    h, w = (-(-int(side) // divisor) * divisor for side in input_hw)
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, h, w, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_complexity(model: nn.Module, input_hw: tuple[int, int]) -> dict:
    """{"params", "flops", "flops_input_hw"} of `model` at `input_hw` (height, width)."""
    divisor = input_divisor(model)
    padded = [-(-int(side) // divisor) * divisor for side in input_hw]
    return {"params": count_parameters(model), "flops": count_flops(model, input_hw),
            "flops_input_hw": padded}
