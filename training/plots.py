"""The run's record: metrics.jsonl (one JSON object a line) and the PNG plots drawn from it.

Lines have "event": "train" (step, epoch, loss, lr, images_per_s) or "eval" (step, epoch,
miou, pixel_accuracy, class_iou, category_iou, ...). Plots (matplotlib, Agg backend):
loss.png (train loss and lr by step), miou.png (val mIoU and pixel accuracy by step) and
class_iou.png (per-class IoU of the best evaluation).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

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
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_loss(train: list[dict], path: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.set_yscale("log" if all(r["loss"] > 0 for r in train) else "linear")
    lr_axis = ax.twinx()
    lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange", alpha=0.6)
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    ax.grid(alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


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
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_class_iou(record: dict, path: Path) -> Path:
    plt = _figure()
    names = list(record["class_iou"])
    values = [0.0 if v is None else 100 * v for v in record["class_iou"].values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 4))
    bars = ax.bar(range(len(names)), values, color="tab:green")
    for bar, value in zip(bars, record["class_iou"].values()):
        if value is None:                     # absent from GT and prediction: no score
            bar.set_hatch("//")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_ylabel("IoU %")
    ax.set_ylim(0, 100)
    miou = record.get("miou")
    ax.set_title(f"step {record['step']}: mIoU {'n/a' if miou is None else f'{100 * miou:.1f}'}")
    ax.grid(axis="y", alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_plots(records: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """The plots the records allow (loss needs train lines; the others eval lines)."""
    out_dir = Path(out_dir)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    written = []
    if train:
        written.append(plot_loss(train, out_dir / "loss.png"))
    if evals:
        written.append(plot_miou(evals, out_dir / "miou.png"))
        scored = [r for r in evals if r.get("miou") is not None] or evals
        best = max(scored, key=lambda r: (r.get("miou") or 0.0, r["step"]))
        written.append(plot_class_iou(best, out_dir / "class_iou.png"))
    return written
