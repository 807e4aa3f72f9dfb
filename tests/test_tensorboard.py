"""`train --tensorboard`: metrics records as TensorBoard scalars (training/tensorboard.py),
read back with TensorBoard's own EventAccumulator."""
from __future__ import annotations

import sys

import pytest

from cache.errors import UserError
from training.tensorboard import TB_DIR, TensorBoardSink, record_scalars

pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")


def scalars_in(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def train_line(step: int, loss: float) -> dict:
    return {"event": "train", "step": step, "epoch": step / 10, "loss": loss, "lr": 0.01,
            "images_per_s": 42.0, "data_time": 0.001, "step_time": 0.2, "time": 1e9 + step}


EVAL_LINE = {"event": "eval", "step": 10, "epoch": 1.0, "best": True, "miou": 0.5,
             "pixel_accuracy": 0.9, "val_loss": 0.7, "class_iou": {"road": 0.8, "bus": None},
             "category_iou": {"flat": 0.95}, "confusion": [[1, 2], [3, 4]], "time": 1e9 + 11}


def test_record_scalars_names_every_number():
    assert record_scalars(train_line(3, 1.5)) == {
        "train/epoch": 0.3, "train/loss": 1.5, "train/lr": 0.01, "train/images_per_s": 42.0,
        "train/data_time": 0.001, "train/step_time": 0.2}
    assert record_scalars(EVAL_LINE) == {
        "val/epoch": 1.0, "val/miou": 0.5, "val/pixel_accuracy": 0.9, "val/loss": 0.7,
        "val_class_iou/road": 0.8, "val_category_iou/flat": 0.95}


def test_event_file_holds_each_record_at_its_step_and_time(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path)
    for step in (5, 10):
        sink(train_line(step, 10.0 / step))
    sink(EVAL_LINE)
    sink.close()
    assert sink.log_dir == tmp_path / TB_DIR
    scalars = scalars_in(sink.log_dir)
    assert scalars["train/loss"] == [(5, 2.0), (10, 1.0)]
    assert scalars["val/miou"] == [(10, 0.5)] and scalars["val/loss"] == [(10, pytest.approx(0.7))]
    assert scalars["val_class_iou/road"] == [(10, pytest.approx(0.8))]
    assert "val_class_iou/bus" not in scalars
    events = EventAccumulator(str(sink.log_dir))
    events.Reload()
    assert [e.wall_time for e in events.Scalars("train/loss")] == [1e9 + 5, 1e9 + 10]


def test_a_resumed_run_replaces_what_came_after_its_checkpoint(tmp_path):
    first = TensorBoardSink(tmp_path)
    for step in range(1, 11):                 # killed at step 10, last checkpoint at step 6
        first(train_line(step, 1.0))
    first.close()
    again = TensorBoardSink(tmp_path, start_step=6)
    for step in range(7, 9):
        again(train_line(step, 2.0))
    again.close()
    assert scalars_in(tmp_path / TB_DIR)["train/loss"] == \
        [(step, 1.0) for step in range(1, 7)] + [(7, 2.0), (8, 2.0)]


def test_without_the_package_the_option_fails_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails
    with pytest.raises(UserError, match=r"^--tensorboard: needs the tensorboard package; "
                                        r"install it with `pip install tensorboard`"):
        TensorBoardSink(tmp_path)
    assert not (tmp_path / TB_DIR).exists()
