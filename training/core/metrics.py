"""Segmentation metrics that equal the official Cityscapes evaluation.

`ConfusionMatrix` counts (ground truth trainId, predicted trainId) pairs with one `bincount` on
the tensors' device. Its scores are those of cityscapesscripts' `evalPixelLevelSemanticLabeling`
for the same predictions written as labelIds (tests/test_metrics.py runs the official script):

- GT pixels equal to `ignore_index` (the labels whose `ignoreInEval` is set) are not counted.
- A prediction outside 0..C-1 (e.g. 255, exported as labelId 0 "unlabeled") is a miss for the
  GT class and a false positive for no class; it lives in an extra "void" column.
- IoU = TP / (TP + FP + FN). A class with TP + FP + FN = 0 (absent from GT and prediction) has
  no IoU: the official script reports NaN and leaves it out of the mean; we report None (JSON
  null, so results stay valid JSON) and leave it out of the mean the same way.
- Category IoU merges the classes of each Cityscapes category ("flat", "vehicle", ...) before
  taking the IoU; the all-ignored category "void" has no score.
- Pixel accuracy (aAcc) = correct / counted pixels (the official script's own pixel accuracy is
  off by default and, in 2.3.0, inverts its ignore mask, so we do not copy it).
- Class accuracy = TP / ground-truth pixels of the class (a void prediction counts as a miss);
  None for a class absent from the ground truth. Mean accuracy (mAcc) is their mean over the
  classes present in the ground truth, as mmsegmentation's `mAcc`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from cityscapesscripts.helpers.labels import name2label


def _category_of(class_names: Sequence[str]) -> list[str | None]:
    """Cityscapes category of each class name (None for a name cityscapesscripts does not know)."""
    return [name2label[name].category if name in name2label else None for name in class_names]


def _iou(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> list[float | None]:
    denom = tp + fp + fn
    return [None if d == 0 else t / d for t, d in zip(tp.tolist(), denom.tolist())]


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


class ConfusionMatrix:
    """Rows: ground truth class, columns: predicted class, plus a last "void prediction" column.

    The counts live on the device of the first `update` (int64, no overflow for any dataset).
    """

    def __init__(self, num_classes: int = 19, ignore_index: int = 255,
                 device: str | torch.device | None = None):
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.device = None if device is None else torch.device(device)
        self.counts: torch.Tensor | None = None

    def reset(self) -> None:
        self.counts = None

    def _zeros(self, device) -> torch.Tensor:
        k = self.num_classes
        return torch.zeros((k, k + 1), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer (B, H, W) on the same device; target == ignore_index is skipped."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        k = self.num_classes
        # Bin indices are < k*(k+1)+1: int16 holds them for 19 classes and is ~1.5x faster on
        # the CPU than int64 (the GPU keeps int64). Validity is decided before the cast.
        cpu_small = target.device.type == "cpu" and k * (k + 1) < 2 ** 15
        small = torch.int16 if cpu_small else torch.int64
        counted = (target >= 0) & (target < k) & (target != self.ignore_index)
        pred = torch.where((pred >= 0) & (pred < k), pred, k).to(small)    # k: void column
        # Uncounted pixels go to one extra bin that is dropped: no boolean indexing, so no
        # device-to-host sync to learn the selection's size.
        index = torch.where(counted, target.to(small) * (k + 1) + pred, k * (k + 1))
        flat = index.flatten()
        if flat.is_cuda:   # bincount asks the GPU for max() first: a sync per batch
            bins = torch.zeros(k * (k + 1) + 1, dtype=torch.int64, device=flat.device)
            bins.index_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
        else:
            bins = torch.bincount(flat, minlength=k * (k + 1) + 1)
        if self.counts is None:
            self.counts = self._zeros(bins.device)
        self.counts += bins[: k * (k + 1)].view(k, k + 1)

    def all_reduce(self) -> None:
        """Sum the counts over all ranks (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.counts is None:   # a rank that saw no frame still takes part in the collective
            device = self.device
            if device is None:
                nccl = dist.get_backend() == "nccl"
                device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            self.counts = self._zeros(device)
        dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)

    def matrix(self) -> torch.Tensor:
        """(C, C+1) int64 counts on the CPU (zeros before any update)."""
        return self._zeros("cpu") if self.counts is None else self.counts.cpu()

    def compute(self, class_names: Sequence[str]) -> dict:
        """Scores as plain Python numbers; None where the official script reports NaN."""
        k = self.num_classes
        if len(class_names) != k:
            raise ValueError(f"{len(class_names)} class names for {k} classes")
        counts = self.matrix().double()
        square = counts[:, :k]
        tp = square.diagonal()
        fn = counts.sum(1) - tp
        fp = square.sum(0) - tp
        class_iou = dict(zip(class_names, _iou(tp, fp, fn)))
        gt_pixels = counts.sum(1)
        class_accuracy = {name: (None if g == 0 else t / g) for name, t, g in
                          zip(class_names, tp.tolist(), gt_pixels.tolist())}
        total = counts.sum().item()
        category_iou = self._category_iou(counts, class_names)
        return {
            "miou": _mean(class_iou.values()),
            "class_iou": class_iou,
            "pixel_accuracy": tp.sum().item() / total if total else None,
            "class_accuracy": class_accuracy,
            "mean_accuracy": _mean(class_accuracy.values()),
            "category_iou": category_iou,
            "category_miou": _mean(category_iou.values()),
            "pixels": int(total),
            "confusion": counts[:, :k].long().tolist(),
            "void_predictions": counts[:, k].long().tolist(),
        }

    def _category_iou(self, counts: torch.Tensor, class_names: Sequence[str]) -> dict:
        """Sum the matrix over the classes of each category, then IoU as for classes."""
        categories = _category_of(class_names)
        names = list(dict.fromkeys(c for c in categories if c is not None))
        if not names:
            return {}
        k = self.num_classes
        member = torch.zeros((k, len(names)), dtype=torch.float64)
        for i, category in enumerate(categories):
            if category is not None:
                member[i, names.index(category)] = 1.0
        merged = member.T @ counts[:, :k] @ member
        tp = merged.diagonal()
        fn = member.T @ counts.sum(1) - tp
        fp = merged.sum(0) - tp
        return dict(zip(names, _iou(tp, fp, fn)))

