"""`train --tensorboard`: the run's metrics records, also as TensorBoard scalars in RUN/tb.

metrics.jsonl stays the record; this sink is handed every record the run appends to it and
writes each number as a scalar at the record's step and wall time:

    train line  ->  train/loss, train/lr, train/images_per_s, train/data_time, ... train/epoch
    eval line   ->  val/miou, val/pixel_accuracy, val/loss (from val_loss), ... val/epoch,
                    val_class_iou/<class>, val_category_iou/<category>, ...

Nested mappings of numbers become one scalar per entry; lists (the confusion matrix), text,
flags and nulls (a class without a score) are left out. The writer is opened with
`purge_step`, so TensorBoard drops what a killed attempt logged after the step the run
resumes from, as metrics.jsonl does.

The writer is torch.utils.tensorboard, which needs the `tensorboard` package (an optional
extra: `pip install 'cityscapes-pipeline[tensorboard]'`); the same package serves the files
with `tensorboard --logdir RUN/tb`.
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path

from cache.errors import UserError

TB_DIR = "tb"
SKIPPED_KEYS = {"event", "step", "time", "best"}
PREFIX = {"train": "train", "eval": "val"}
RENAMED = {"val_loss": "loss"}        # val/loss sits beside train/loss in TensorBoard's view


def require_tensorboard():
    """torch's SummaryWriter class, or a UserError that says how to get it (config checks
    call this, so that a run without the package stops before it starts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard: needs the tensorboard package; install it with "
                        "`pip install tensorboard` (or the [tensorboard] extra), or leave "
                        "--tensorboard off (metrics.jsonl holds the same numbers)") from None
    return SummaryWriter


def record_scalars(record: dict) -> dict[str, float]:
    """{tag: value} of one metrics record (see the module docstring)."""
    prefix = PREFIX.get(record.get("event"), str(record.get("event")))
    scalars = {}
    for key, value in record.items():
        if key in SKIPPED_KEYS:
            continue
        if isinstance(value, dict):
            for name, item in value.items():
                if _is_number(item):
                    scalars[f"{prefix}_{key}/{name}"] = float(item)
        elif _is_number(value):
            scalars[f"{prefix}/{RENAMED.get(key, key)}"] = float(value)
    return scalars


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class TensorBoardSink:
    """Give it each metrics record (`sink(record)`); `close()` at the end of the run."""

    def __init__(self, run_dir: str | os.PathLike, start_step: int = 0):
        """`start_step`: the step the run starts or resumes from. TensorBoard drops events of
        later steps that an earlier, killed attempt left in RUN/tb (metrics.jsonl keeps the
        lines up to `start_step` too)."""
        writer_class = require_tensorboard()
        self.log_dir = Path(run_dir) / TB_DIR
        # flush_secs: a run killed with SIGKILL loses at most this much of the event file
        self.writer = writer_class(log_dir=os.fspath(self.log_dir), purge_step=start_step + 1,
                                   flush_secs=30)

    def __call__(self, record: dict) -> None:
        step, walltime = int(record["step"]), record.get("time")
        for tag, value in record_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=walltime)
        if record.get("event") == "eval":
            self.writer.flush()        # evaluations are rare and the ones people wait for

    def close(self) -> None:
        self.writer.close()
