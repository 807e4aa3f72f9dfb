"""The run's record: metrics.jsonl (one JSON object a line) and the PNG plots drawn from it.

Lines have "event": "train" (step, epoch, loss, lr, images_per_s) or "eval" (step, epoch,
miou, pixel_accuracy, class_iou, category_iou, val_loss, ...). Plots (matplotlib, Agg backend):
loss.png (train loss, val loss where the eval lines have it, and lr by step), miou.png (val
mIoU and pixel accuracy by step) and class_iou.png (per-class IoU of the best evaluation, each
bar labelled with its value).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

PLOT_NAMES = ("loss.png", "miou.png", "class_iou.png")


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    """Append one line and flush it to the OS, so that a killed run keeps what it logged."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record, allow_nan=False) + "\n")
        handle.flush()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete lines (a torn last line from a kill is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep the records up to `step` (on resume: what came after the checkpoint is redone)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    os.replace(tmp, path)


def _figure():
    matplotlib.use("Agg", force=True)
    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure atomically and free it."""
    try:
        tmp = path.with_name(path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
        return path
    finally:
        plt.close(fig)


def plot_loss(train: list[dict], path: Path, evals: list[dict] = ()) -> Path:
    return _save(loss_figure(train, evals), path)


def loss_figure(train: list[dict], evals: list[dict] = ()):
    """Train loss (and the validation loss of eval lines that have `val_loss`) on one log
    axis, the learning rate on a second one."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    # a non-finite loss is logged as null (metrics.jsonl stays JSON): a gap in the curve
    ax.plot([r["step"] for r in train], [math.nan if r["loss"] is None else r["loss"] for r in train],
            color="tab:blue", label="train loss")
    val = [r for r in evals if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], color="tab:red",
                marker="o", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    losses = [r["loss"] for r in train if r["loss"] is not None] + [r["val_loss"] for r in val]
    ax.set_yscale("log" if all(v > 0 for v in losses) else "linear")
    lr_axis = ax.twinx()
    lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange",
                 alpha=0.6, label="learning rate")
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    extra = lr_axis.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper right")
    return fig


def plot_miou(evals: list[dict], path: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in evals]
    for key, label in (("miou", "val mIoU"), ("pixel_accuracy", "pixel accuracy")):
        values = [float("nan") if r.get(key) is None else 100 * r[key] for r in evals]
        ax.plot(steps, values, marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_class_iou(record: dict, path: Path) -> Path:
    return _save(class_iou_figure(record), path)


def class_iou_figure(record: dict):
    """One bar per class with its IoU written on it: a class at 0 shows "0.0" and its name in
    red; one with no score (absent from ground truth and prediction) shows "n/a"."""
    plt = _figure()
    names = list(record["class_iou"])
    scores = list(record["class_iou"].values())
    values = [0.0 if v is None else 100 * v for v in scores]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 4))
    bars = ax.bar(range(len(names)), values, color="tab:green")
    for bar, score, value in zip(bars, scores, values):
        if score is None:
            bar.set_hatch("//")
        text = "n/a" if score is None else f"{value:.1f}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, value), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", rotation=90,
                    fontsize=8, color="tab:red" if score == 0 else "0.2",
                    fontweight="bold" if score == 0 else "normal")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    for tick, score in zip(ax.get_xticklabels(), scores):
        if score == 0:                        # a class the model never gets right
            tick.set_color("tab:red")
    ax.set_ylabel("IoU %")
    ax.set_ylim(0, 112)                       # room for the value over a bar at 100
    ax.set_yticks(range(0, 101, 20))
    miou = record.get("miou")
    ax.set_title(f"step {record['step']}: mIoU {'n/a' if miou is None else f'{100 * miou:.1f}'}")
    ax.grid(axis="y", alpha=0.3)
    return fig


def write_plots(records: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """The plots the records allow (loss needs train lines; the others eval lines)."""
    out_dir = Path(out_dir)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    written = []
    if train:
        written.append(plot_loss(train, out_dir / "loss.png", evals))
    if evals:
        written.append(plot_miou(evals, out_dir / "miou.png"))
        scored = [r for r in evals if r.get("miou") is not None] or evals
        best = max(scored, key=lambda r: (r.get("miou") or 0.0, r["step"]))
        written.append(plot_class_iou(best, out_dir / "class_iou.png"))
    return written
