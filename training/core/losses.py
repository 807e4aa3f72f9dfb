"""Segmentation losses that honour the ignore index and optional per-class weights.

`--loss` is a sum of terms: "ce", "focal", "dice", "ce+dice", "ce+0.5*dice". Each term is
computed in float32 whatever the autocast dtype of the logits, over the pixels whose target is
not `ignore_index`; a batch with no counted pixel gives a zero loss that still has a graph.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import UserError

LOSS_NAMES = ("ce", "focal", "dice")
DEFAULT_WEIGHT_METHOD = "enet"


def parse_loss_spec(spec: str) -> list[tuple[float, str]]:
    """"ce+0.5*dice" -> [(1.0, "ce"), (0.5, "dice")]."""
    terms = []
    for part in str(spec).lower().replace(" ", "").split("+"):
        weight, _, name = part.rpartition("*")
        try:
            factor = float(weight) if weight else 1.0
        except ValueError:
            factor = math.nan
        if name not in LOSS_NAMES or not math.isfinite(factor) or factor <= 0:
            raise UserError(f"--loss {spec!r}: {part!r} is not a loss term; use a sum of "
                            f"{', '.join(LOSS_NAMES)} such as ce+dice or ce+0.5*dice")
        terms.append((factor, name))
    return terms


class CrossEntropy(nn.Module):
    def __init__(self, ignore_index: int = 255, weight: torch.Tensor | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Mean over counted pixels as F.cross_entropy's "mean" does, but an all-ignored batch
        # gives 0 instead of NaN, without a device-to-host sync to test for it.
        per_pixel = F.cross_entropy(logits.float(), target, weight=self.weight,
                                    ignore_index=self.ignore_index, reduction="none")
        counted = target != self.ignore_index
        safe_target = torch.where(counted, target, 0)
        pixel_weight = counted.float() if self.weight is None else self.weight[safe_target] * counted
        return per_pixel.sum() / pixel_weight.sum().clamp_min(1e-12)


class FocalLoss(nn.Module):
    """Lin et al.: -w_c (1 - p_t)^gamma log p_t, averaged like weighted cross-entropy."""

    def __init__(self, ignore_index: int = 255, weight: torch.Tensor | None = None,
                 gamma: float = 2.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.gamma = gamma
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        counted = target != self.ignore_index
        safe_target = torch.where(counted, target, 0)
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        pixel_weight = counted.float()
        if self.weight is not None:
            pixel_weight = pixel_weight * self.weight[safe_target]
        focal = -((1.0 - log_p.exp()).clamp_min(0.0) ** self.gamma) * log_p
        return (focal * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)


class DiceLoss(nn.Module):
    """1 - mean soft Dice over the classes present in the batch's targets (class-weighted).

    Ignored pixels count neither in the prediction nor in the target. Classes absent from the
    target are left out, as in smp's DiceLoss, so that a batch without a class does not push
    its probability down through the Dice term (cross-entropy does that already).
    """

    def __init__(self, ignore_index: int = 255, weight: torch.Tensor | None = None,
                 smooth: float = 1.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Per-class sums without a one-hot target: an int64 (B, C, H, W) one-hot is ~0.5 GB
        # at batch 8, 640x640, 19 classes. The probability of each pixel's own class and the
        # pixel counts per class are scattered into C bins instead (no host sync either).
        num_classes = logits.shape[1]
        counted = target != self.ignore_index
        safe_target = torch.where(counted, target, 0)
        probs = F.softmax(logits.float(), dim=1) * counted.unsqueeze(1)
        own = probs.gather(1, safe_target.unsqueeze(1)).reshape(-1)
        bins = safe_target.reshape(-1)
        zeros = probs.new_zeros(num_classes)
        intersection = zeros.index_add(0, bins, own)
        target_sum = zeros.index_add(0, bins, counted.reshape(-1).to(probs.dtype))
        cardinality = probs.sum((0, 2, 3)) + target_sum
        dice = (2.0 * intersection + self.smooth) / (cardinality + self.smooth)
        present = (target_sum > 0).float()
        if self.weight is not None:
            present = present * self.weight
        return ((1.0 - dice) * present).sum() / present.sum().clamp_min(1e-12)


class CombinedLoss(nn.Module):
    def __init__(self, terms: list[tuple[float, nn.Module]]):
        super().__init__()
        self.factors = [factor for factor, _ in terms]
        self.terms = nn.ModuleList(module for _, module in terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Each term casts half-precision logits to float32 itself, on purpose: autograd keeps
        # no cast (it saves the softmax / log-softmax outputs), so a term's copy dies when the
        # term returns and two copies never coexist. Casting once here would keep one copy
        # alive across all terms: for ce+dice, bf16, batch 8, 19 classes, 640x640 the
        # forward's peak of live tensors rises from 766 to 1003 MiB (503 to 741 under no_grad)
        # and the forward+backward peak stays 1228 MiB (scripts/bench_loss_memory.py;
        # tests/test_losses_model.py::test_combined_loss_keeps_few_float32_copies_alive).
        return sum(f * term(logits, target) for f, term in zip(self.factors, self.terms))


LOSS_CLASSES = {"ce": CrossEntropy, "focal": FocalLoss, "dice": DiceLoss}


def build_loss(spec: str, *, ignore_index: int = 255,
               class_weights: torch.Tensor | None = None) -> nn.Module:
    """The sum of terms named in `spec`, all with the same ignore index and class weights."""
    terms = [(factor, LOSS_CLASSES[name](ignore_index=ignore_index, weight=class_weights))
             for factor, name in parse_loss_spec(spec)]
    return CombinedLoss(terms)


def split_weights_spec(spec: str) -> tuple[Path, str]:
    """"CACHE/stats.json:median_freq" -> (path, "median_freq"); no method -> enet."""
    path, sep, method = str(spec).rpartition(":")
    if not sep or "/" in method or "\\" in method or not method or method.endswith(".json"):
        return Path(spec), DEFAULT_WEIGHT_METHOD
    return Path(path), method


def load_class_weights(spec: str, num_classes: int) -> list[float]:
    """Per-class weights from the `weights` table of the stats JSON written by `dataprep stats`."""
    path, method = split_weights_spec(spec)
    where = f"--class-weights {path}"
    if not path.is_file():
        raise UserError(f"{where}: no such file (write it with `dataprep stats`)")
    try:
        table = json.loads(path.read_text()).get("weights")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{where}: not a stats JSON file") from None
    if not isinstance(table, dict) or not table:
        raise UserError(f"{where}: no 'weights' table (is it the stats.json of `dataprep stats`?)")
    if method not in table:
        raise UserError(f"{where}: no weights for method {method!r} (it has: {', '.join(sorted(table))})")
    weights = table[method]
    ok = isinstance(weights, list) and len(weights) == num_classes and all(
        isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
    if not ok or not any(weights):
        raise UserError(f"{where}: weights {method!r} must be {num_classes} finite numbers >= 0, "
                        "not all zero")
    return [float(w) for w in weights]
