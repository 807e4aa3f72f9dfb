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

import functools
import math

import torch

from loaders.contract import MEAN, STD

GREY = 128.0  # DALI's contrast centre for uint8 inputs ("half range")

RGB_TO_YIQ = ((0.299, 0.587, 0.114),
              (0.596, -0.274, -0.321),
              (0.211, -0.523, 0.311))


@functools.lru_cache(maxsize=8)
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """The fixed matrices and ImageNet statistics, made once per device: a tensor built from
    Python numbers on a GPU is a blocking host-to-device copy, so it must not happen per batch."""
    rgb_to_yiq64 = torch.tensor(RGB_TO_YIQ, dtype=torch.float64)
    # The rows of Rgb2Yiq do not sum to exactly (1, 0, 0), so the inverse is not the
    # textbook YIQ matrix: saturation 0 gives a faintly tinted grey, as in DALI.
    host = {"yiq_to_rgb": torch.linalg.inv(rgb_to_yiq64).float(), "rgb_to_yiq": rgb_to_yiq64.float(),
            "mean": torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1),
            "inv_std": 1.0 / torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)}
    return {name: value.to(device) for name, value in host.items()}


def constants(device: torch.device | str) -> dict[str, torch.Tensor]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _constants(device)


def twist_matrices(brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                   hue_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrices (B, 3, 3), offsets (B,)) of the per-sample affine colour map, in float32.
    Batched tensor arithmetic on the parameters' device: no host round trip."""
    device = brightness.device
    brightness, contrast, saturation, hue_deg = (
        t.to(dtype=torch.float32).reshape(-1) for t in (brightness, contrast, saturation, hue_deg))
    hue_rad = hue_deg * (math.pi / 180.0)
    cos, sin = torch.cos(hue_rad) * saturation, torch.sin(hue_rad) * saturation
    ones, zeros = torch.ones_like(cos), torch.zeros_like(cos)
    # Hue rotation times saturation scaling of the I/Q plane (the Y axis is kept).
    iq = torch.stack([ones, zeros, zeros, zeros, cos, sin, zeros, -sin, cos], dim=1).view(-1, 3, 3)
    const = constants(device)
    matrices = (brightness * contrast)[:, None, None] * (const["yiq_to_rgb"] @ iq @ const["rgb_to_yiq"])
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
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    colour = torch.stack([t.reshape(-1).float() for t in (brightness, contrast, saturation, hue_deg)],
                         dim=1).to(images.device)
    return colour_twist_into(out, images.permute(0, 2, 3, 1), colour, quantise=quantise)


def colour_twist_into(out: torch.Tensor, pixels: torch.Tensor, colour: torch.Tensor, *,
                      quantise: bool = True, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Twist channels-last `pixels` (B, H, W, 3) (uint8 or float, 0..255) into `out`, a float32
    (B, 3, H, W) tensor in contiguous or channels_last memory format; returns `out`.

    colour: (B, 4) brightness, contrast, saturation, hue (degrees). One batched matrix product
    for the whole batch (no loop over samples), written straight into `out`; `scratch`, a
    float32 tensor of B*H*W*3 elements, holds the float copy of the pixels (a worker reuses one
    across batches: on a CPU, fresh batch-sized tensors cost more in page faults than the
    arithmetic).
    """
    batch, height, width, _ = pixels.shape
    if out.dtype != torch.float32 or tuple(out.shape) != (batch, 3, height, width):
        raise ValueError("colour_twist_into needs a float32 (B, 3, H, W) output")
    matrices, offsets = twist_matrices(colour[:, 0], colour[:, 1], colour[:, 2], colour[:, 3])
    count = height * width
    if scratch is None:
        scratch = torch.empty(batch * count * 3, dtype=torch.float32, device=out.device)
    if out.is_contiguous(memory_format=torch.channels_last):
        # (B, HW, 3) @ M^T: pixels, scratch and out are all channels-last, no transpose pass.
        src = scratch[:batch * count * 3].view(batch, count, 3)
        src.copy_(pixels.reshape(batch, count, 3))
        torch.baddbmm(offsets.view(batch, 1, 1), src, matrices.transpose(1, 2),
                      out=out.permute(0, 2, 3, 1).view(batch, count, 3))
    elif out.is_contiguous():
        src = scratch[:batch * count * 3].view(batch, 3, count)
        src.view(batch, 3, height, width).copy_(pixels.permute(0, 3, 1, 2))
        torch.baddbmm(offsets.view(batch, 1, 1), matrices, src, out=out.view(batch, 3, count))
    else:
        raise ValueError("colour_twist_into: `out` must be contiguous or channels_last")
    if quantise:
        # Values are >= 0 after the clamp, so floor(x + 0.5) is round-half-away-from-zero.
        out.clamp_(0.0, 255.0).add_(0.5).floor_()
    return out


def clear_padding_(images: torch.Tensor, valid_hw: torch.Tensor) -> torch.Tensor:
    """Zero each sample's padding (outside its top-left out_h x out_w window) in place, for the
    whole batch at once. valid_hw: (B, 2) int64 on the images' device.

    Padding must stay 0 before normalisation, but the colour twist moves 0 (contrast pulls it
    towards grey), so the padded area is cleared again after the twist.
    """
    _, _, height, width = images.shape
    device = images.device
    inside_y = torch.arange(height, device=device) < valid_hw[:, :1]      # (B, H)
    inside_x = torch.arange(width, device=device) < valid_hw[:, 1:]       # (B, W)
    inside = inside_y[:, None, :, None] & inside_x[:, None, None, :]      # (B, 1, H, W)
    return images.mul_(inside)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(x - MEAN) / STD per channel, for float or uint8 images (B, 3, H, W) on 0..255."""
    return normalise_(images.to(torch.float32, copy=True))


def normalise_(images: torch.Tensor) -> torch.Tensor:
    """`normalise` in place on a float32 (B, 3, H, W) tensor; returns it."""
    const = constants(images.device)
    return images.sub_(const["mean"]).mul_(const["inv_std"])
