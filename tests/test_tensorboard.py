"""`train --tensorboard`: metrics records as TensorBoard scalars (training/train/tensorboard.py),
read back with TensorBoard's own EventAccumulator."""
from __future__ import annotations

import sys

import pytest

from cache.errors import UserError
from training.train.tensorboard import TB_DIR, TensorBoardSink, record_scalars

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


def train_cli(cache, out, *extra):
    from click.testing import CliRunner

    from training import cli

    args = ["train", "--cache", cache, "--out", out, "--loader", "torch", "--arch", "unet",
            "--encoder", "resnet18", "--model-arg", "encoder_depth=3",
            "--model-arg", "decoder_channels=[8,8,8]", "--encoder-weights", "none",
            "--res", 64, "--batch-size", 2, "--workers", 0, "--no-plots", "--log-every", 1,
            "--eval-every", 2, "--class-weights", "none", "--tensorboard", *extra]
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_a_training_run_writes_its_metrics_as_scalars(tmp_path):
    import torch

    from tests.cachefab import blocky_cache
    from training.train.plots import read_metrics

    torch.set_num_threads(1)
    cache = blocky_cache(tmp_path / "c", n_train=4, n_val=1, height=64, width=128)
    out = tmp_path / "run"
    first = train_cli(cache, out, "--iters", 2)
    assert f"tensorboard {out / TB_DIR} (watch: tensorboard --logdir" in first.stderr
    train_cli(cache, out, "--iters", 4, "--resume")     # a resumed run adds to the same file
    scalars = scalars_in(out / TB_DIR)
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    for key in ("loss", "lr", "images_per_s", "data_time", "step_time"):
        assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6))
                                           for r in train], key
    assert scalars["val/miou"] == [(r["step"], pytest.approx(r["miou"], rel=1e-6)) for r in evals]
    assert scalars["val/loss"] == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6))
                                   for r in evals]
    scored = [name for name, iou in evals[-1]["class_iou"].items() if iou is not None]
    assert scored and all(f"val_class_iou/{name}" in scalars for name in scored)


def test_without_the_package_train_stops_before_it_starts(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tests.cachefab import blocky_cache
    from training import cli

    cache = blocky_cache(tmp_path / "c", n_train=2, n_val=1, height=64, width=64)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = CliRunner().invoke(cli.main, ["train", "--cache", str(cache), "--out",
                                           str(tmp_path / "run"), "--tensorboard"])
    assert result.exit_code == 1
    assert result.output.startswith("error: --tensorboard: needs the tensorboard package")
    assert not (tmp_path / "run").exists()
