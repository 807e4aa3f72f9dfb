"""The options `evaluate` and `predict` share, each checked in one place (one line naming the
option), before a model is loaded or a file is written."""
from __future__ import annotations

from typing import Sequence

from cache.errors import UserError


def check_batch_and_tta(batch_size: int, tta_scales: Sequence[float]) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, got {batch_size}")
    if not tta_scales or min(tta_scales) <= 0:
        raise UserError(f"--tta: need one or more positive scales, got {tuple(tta_scales)}")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise UserError(f"--limit: must be at least 1, got {limit}")
