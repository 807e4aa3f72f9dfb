"""The run's plots (training/train/plots.py): what each figure shows, drawn from metrics records."""
from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
from PIL import Image

from training.train.plots import class_iou_figure, loss_figure, write_plots


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def records(with_val_loss: bool = True) -> list[dict]:
    out = []
    for step in range(10, 101, 10):
        out.append({"event": "train", "step": step, "loss": 2.0 / step ** 0.5, "lr": 0.01})
        if step % 50 == 0:
            ious = {"road": 0.9, "sidewalk": 0.0, "building": 0.5, "bus": None}
            out.append({"event": "eval", "step": step, "miou": 0.35, "pixel_accuracy": 0.8,
                        "class_iou": ious, **({"val_loss": 1.0 / step} if with_val_loss else {})})
    return out


def lines_by_label(fig) -> dict:
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}


def test_loss_plot_draws_the_validation_loss_beside_the_training_loss():
    data = records()
    fig = loss_figure([r for r in data if r["event"] == "train"],
                      [r for r in data if r["event"] == "eval"])
    lines = lines_by_label(fig)
    assert set(lines) == {"train loss", "val loss", "learning rate"}
    assert list(lines["val loss"].get_xdata()) == [50, 100]
    assert list(lines["val loss"].get_ydata()) == [1 / 50, 1 / 100]
    assert lines["val loss"].axes is lines["train loss"].axes      # same axis, same scale
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert legend == ["train loss", "val loss", "learning rate"]


def test_runs_without_val_loss_get_the_training_curves_only():
    data = records(with_val_loss=False)
    fig = loss_figure([r for r in data if r["event"] == "train"],
                      [r for r in data if r["event"] == "eval"])
    assert set(lines_by_label(fig)) == {"train loss", "learning rate"}


def test_every_class_bar_is_labelled_and_classes_at_zero_stand_out():
    fig = class_iou_figure(records()[-1])
    ax = fig.axes[0]
    labels = {round(text.xy[0]): text for text in ax.texts}
    assert [labels[i].get_text() for i in range(4)] == ["90.0", "0.0", "50.0", "n/a"]
    red = mcolors.to_rgba("tab:red")
    assert mcolors.to_rgba(labels[1].get_color()) == red             # IoU 0: red value ...
    ticks = {tick.get_text(): tick for tick in ax.get_xticklabels()}
    assert mcolors.to_rgba(ticks["sidewalk"].get_color()) == red     # ... and a red name
    assert mcolors.to_rgba(ticks["road"].get_color()) != red
    assert mcolors.to_rgba(labels[3].get_color()) != red              # no score is not zero


def test_write_plots_writes_the_three_pngs(tmp_path):
    written = write_plots(records(), tmp_path)
    assert [p.name for p in written] == ["loss.png", "miou.png", "class_iou.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.size[0] > 300 and np.asarray(image.convert("L")).std() > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class_iou.png", "loss.png", "miou.png"]
