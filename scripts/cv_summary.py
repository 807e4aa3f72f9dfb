"""Summarise a k-fold cross-validation: per-fold mIoU, mean ± std, and per-class IoU.

    for i in 0 1 2 3 4; do train --config my.yaml --folds 5 --fold $i --out runs/cv/fold$i; done
    python scripts/cv_summary.py runs/cv/fold* --json runs/cv/summary.json --markdown runs/cv/summary.md

Each RUN is a run dir of `train --folds K --fold I` (its fold.json names the fold and its
validation cities). The score of a fold is its last evaluation (`--pick best`: its best by
mIoU); std is the sample standard deviation over the folds (n - 1).
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from cache.errors import report_user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--pick", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="Which evaluation of each fold counts.")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write the summary here.")
@click.option("--markdown", "markdown_path", default=None, metavar="FILE",
              help="Write both tables as Markdown.")
@report_user_errors()
def main(runs, pick, json_path, markdown_path):
    """Per-fold and mean ± std mIoU and per-class IoU of cross-validation runs."""
    from rich.console import Console
    from rich.table import Table

    from dataprep.cli import print_uncut

    from training.finished_runs import cv_summary, markdown_table, pct

    summary = cv_summary(runs, pick)
    console = Console()
    fold_header = ["Fold", "Validation cities", "Frames", "Step", "mIoU"]
    fold_cells = [[str(f["fold"]), ", ".join(f["val_cities"]), str(f["val_frames"]),
                   str(f["step"]), pct(f["miou"])] for f in summary["folds"]]
    fold_cells.append(["mean ± std", "", "", "", pct(summary["miou_mean"], summary["miou_std"])])
    class_header = ["Class", *[f"fold {f['fold']}" for f in summary["folds"]], "mean ± std"]
    class_cells = [[name, *[pct(f["class_iou"].get(name)) for f in summary["folds"]],
                    pct(stats["mean"], stats["std"])] for name, stats in summary["class_iou"].items()]
    title = f"{summary['k']}-fold cross-validation on {summary['split']} ({pick} evaluation)"
    for header, cells, caption, text_columns in ((fold_header, fold_cells, title, 2),
                                                 (class_header, class_cells, None, 1)):
        table = Table(title=caption)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < text_columns else "right", no_wrap=True)
        for line in cells:
            table.add_row(*line)
        print_uncut(console, table)        # numbers are never cut, at 80 columns or in a log
    for note in summary["notes"]:
        console.print(f"note: {note}")
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(f"**{title}**\n\n" + markdown_table(fold_header, fold_cells, 2)
                                       + "\n" + markdown_table(class_header, class_cells))


if __name__ == "__main__":
    main()
