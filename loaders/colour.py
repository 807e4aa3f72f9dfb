"""On-device colour jitter and normalisation with the semantics of DALI's `fn.color_twist`.

DALI's colour twist (dali/operators/image/color/color_twist.h) is one affine map per sample:

    out = brightness * (contrast * M @ rgb + grey * (1 - contrast)),
    M   = Yiq2Rgb @ Hue(hue) @ diag(1, saturation, saturation) @ Rgb2Yiq

with DALI's rounded Rgb2Yiq constants and Yiq2Rgb their exact inverse (older DALI releases
used a rounded inverse; DALI 2.4, which we match, inverts), hue a rotation of the I/Q
plane by `hue` degrees, and `grey` = 128 for integer inputs (0.5 for float inputs, which
is why the DALI kind must twist uint8 pixels, not float ones). With a uint8 output DALI
saturates to 0..255 and rounds half away from zero. Measured against DALI 2.4 in CPU-only
mode: identical uint8 output, float output within 1e-3 (tests/test_torch_loader.py).
"""
from __future__ import annotations

import math

import torch

from loaders.contract import MEAN, STD

GREY = 128.0  # DALI's contrast centre for uint8 inputs ("half range")

RGB_TO_YIQ = ((0.299, 0.587, 0.114),
              (0.596, -0.274, -0.321),
              (0.211, -0.523, 0.311))


def twist_matrices(brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                   hue_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrices (B, 3, 3), offsets (B,)) of the per-sample affine colour map, in float32."""
    device = brightness.device
    f32 = dict(dtype=torch.float32, device=device)
    brightness, contrast, saturation, hue_deg = (
        t.to(**f32).reshape(-1) for t in (brightness, contrast, saturation, hue_deg))
    batch = brightness.shape[0]
    hue_rad = hue_deg * (math.pi / 180.0)
    cos, sin = torch.cos(hue_rad) * saturation, torch.sin(hue_rad) * saturation
    # Hue rotation times saturation scaling of the I/Q plane (the Y axis is kept).
    iq = torch.zeros(batch, 3, 3, **f32)
    iq[:, 0, 0] = 1.0
    iq[:, 1, 1], iq[:, 1, 2] = cos, sin
    iq[:, 2, 1], iq[:, 2, 2] = -sin, cos
    rgb_to_yiq64 = torch.tensor(RGB_TO_YIQ, dtype=torch.float64)
    # The rows of Rgb2Yiq do not sum to exactly (1, 0, 0), so the inverse is not the
    # textbook YIQ matrix: saturation 0 gives a faintly tinted grey, as in DALI.
    yiq_to_rgb = torch.linalg.inv(rgb_to_yiq64).to(**f32)
    rgb_to_yiq = rgb_to_yiq64.to(**f32)
    matrices = (brightness * contrast)[:, None, None] * (yiq_to_rgb @ iq @ rgb_to_yiq)
    offsets = (GREY - GREY * contrast) * brightness
    return matrices, offsets


def colour_twist(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor, hue_deg: torch.Tensor, *,
                 quantise: bool = True) -> torch.Tensor:
    """DALI's `fn.color_twist` on float images (B, 3, H, W) holding values on 0..255.

    brightness, contrast, saturation: factors (1 = unchanged); hue_deg: rotation in degrees;
    each a (B,) tensor. quantise=True reproduces DALI's uint8 output (saturate to 0..255,
    round half up) and is what the DALI kind does on its uint8 pixels; False gives the
    unclamped float result (DALI's `dtype=FLOAT` output for uint8 input).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"colour_twist expects (B, 3, H, W) images, got {tuple(images.shape)}")
    return colour_twist_(images.to(torch.float32, copy=True).contiguous(), brightness, contrast,
                         saturation, hue_deg, quantise=quantise)


def colour_twist_(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  saturation: torch.Tensor, hue_deg: torch.Tensor, *,
                  quantise: bool = True) -> torch.Tensor:
    """`colour_twist` in place on a contiguous float32 (B, 3, H, W) tensor; returns it.

    One sample at a time through a scratch buffer the size of one image: on the CPU a
    fresh batch-sized float tensor costs more in page faults than the arithmetic does.
    """
    if images.dtype != torch.float32 or not images.is_contiguous() or images.dim() != 4:
        raise ValueError("colour_twist_ needs a contiguous float32 (B, 3, H, W) tensor")
    device = images.device
    matrices, offsets = twist_matrices(brightness.to(device), contrast.to(device),
                                       saturation.to(device), hue_deg.to(device))
    batch, channels, height, width = images.shape
    flat = images.view(batch, channels, height * width)
    scratch = torch.empty((channels, height * width), dtype=torch.float32, device=device)
    for i in range(batch):
        torch.addmm(offsets[i].expand(channels, 1), matrices[i], flat[i], out=scratch)
        if quantise:
            # Values are >= 0 after the clamp, so floor(x + 0.5) is round-half-away-from-zero.
            scratch.clamp_(0.0, 255.0).add_(0.5).floor_()
        flat[i].copy_(scratch)
    return images


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(x - MEAN) / STD per channel, for float or uint8 images (B, 3, H, W) on 0..255."""
    return normalise_(images.to(torch.float32, copy=True))


def normalise_(images: torch.Tensor) -> torch.Tensor:
    """`normalise` in place on a float32 (B, 3, H, W) tensor; returns it."""
    mean = torch.tensor(MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return images.sub_(mean).mul_(inv_std)


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """Undo `normalise`: back to float pixels on 0..255 (used by tests, plots and demos)."""
    mean = torch.tensor(MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return images.to(torch.float32) * std + mean
