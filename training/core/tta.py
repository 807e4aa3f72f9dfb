"""Whole-frame inference with optional multi-scale and horizontal-flip test-time augmentation.

How views are combined: every view's logits are upsampled (bilinear) to the output size, turned
into softmax probabilities, and the probabilities are averaged (as mmsegmentation does; averaging
raw logits would let one over-confident scale dominate). The function returns the log of that
mean, so `softmax(result)` is the averaged probability and `argmax` the prediction. With a single
view (scales=(1.0,), flip=False) the upsampled raw logits are returned unchanged: they have the
same softmax, so both cases mean the same to argmax, softmax and cross-entropy.

Inputs are padded on the bottom/right to the multiple the model needs (smp encoders with a fixed
output stride) with the normalised value of a black pixel, as the loaders pad, and the padding is
cropped off the output. The caller puts the model in eval mode.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from loaders.contract import MEAN, STD
from training.core.model import input_divisor


@functools.lru_cache(maxsize=16)
def _constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    host = (torch.tensor(MEAN, dtype=dtype), torch.tensor(STD, dtype=dtype),
            torch.tensor([-m / s for m, s in zip(MEAN, STD)], dtype=dtype))
    return tuple(t.view(1, 3, 1, 1).to(device) for t in host)


def normalisation(device: torch.device | str, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, black) as (1, 3, 1, 1) tensors on `device`: images are normalised as
    (x - mean) / std, and black is a black pixel so normalised. Made once per device and dtype
    (as loaders/colour.py does): a tensor built from Python numbers on a GPU is a blocking
    host-to-device copy, which must not happen per batch."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _constants(device, dtype)


def _pad_to_multiple(image: torch.Tensor, divisor: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    pad_h, pad_w = (-h) % divisor, (-w) % divisor
    if not (pad_h or pad_w):
        return image
    black = normalisation(image.device, image.dtype)[2]
    padded = black.expand(image.shape[0], 3, h + pad_h, w + pad_w).clone()
    padded[:, :, :h, :w] = image
    return padded


def _forward_view(model, image: torch.Tensor, scale: float, flip: bool, divisor: int,
                  out_hw: tuple[int, int]) -> torch.Tensor:
    """Logits (B, C, *out_hw), float32, of one scaled and maybe mirrored view."""
    h, w = image.shape[-2:]
    if scale != 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False,
                              antialias=scale < 1.0)
    if flip:
        image = image.flip(-1)
    vh, vw = image.shape[-2:]
    logits = model(_pad_to_multiple(image, divisor))[:, :, :vh, :vw].float()
    if flip:
        logits = logits.flip(-1)
    if tuple(logits.shape[-2:]) != tuple(out_hw):
        logits = F.interpolate(logits, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def predict_logits(model: torch.nn.Module, image: torch.Tensor, out_hw: tuple[int, int],
                   scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Logits (B, C, H, W) at out_hw=(H, W) of a normalised image batch (B, 3, h, w).

    scales are relative to the given image; flip adds the mirrored view of every scale.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"TTA scales must be positive and at least one, got {scales}")
    divisor = input_divisor(model)
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    if len(views) == 1:
        return _forward_view(model, image, *views[0], divisor, out_hw)
    mean_prob = None
    for scale, mirrored in views:
        prob = _forward_view(model, image, scale, mirrored, divisor, out_hw).softmax(1)
        mean_prob = prob if mean_prob is None else mean_prob.add_(prob)
    # tiny instead of 0 keeps the log finite where a probability underflowed
    return mean_prob.div_(len(views)).clamp_min_(torch.finfo(torch.float32).tiny).log_()
