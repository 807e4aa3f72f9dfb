"""Compare runs as published tables do: architecture, encoder, input, mIoU, mAcc, aAcc, params,
FLOPs and latency, as a rich table and as Markdown.

    evaluate --checkpoint runs/a/best.pt --cache CACHE --json runs/a/eval.json   # per run, once
    python scripts/compare_runs.py runs/a runs/b runs/c --markdown compare.md
    python scripts/compare_runs.py runs/*/eval.json --markdown -                 # Markdown on stdout

Each RUN is a run dir (its eval.json, else its best.pt) or an `evaluate --json` file; see
training.finished_runs for where each number comes from. FLOPs are torch's count (2 per
multiply-add) at the evaluated input size; latency is batch 1 on the device `evaluate` ran on.
"""
from __future__ import annotations

from pathlib import Path

import click

from cache.errors import report_user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--eval-name", default="eval.json", show_default=True,
              help="Name of the `evaluate --json` file inside each run dir.")
@click.option("--markdown", "markdown_path", default=None, metavar="FILE",
              help="Also write the table as Markdown ('-': print it instead of the rich table).")
@report_user_errors()
def main(runs, eval_name, markdown_path):
    """Compare runs (run dirs or eval JSON files) in one table."""
    from rich.console import Console
    from rich.table import Table

    from dataprep.cli import print_uncut

    from training.finished_runs import (COMPARE_COLUMNS, comparison_row, markdown_table,
                                      missing_notes, table_cells)

    rows = [comparison_row(run, eval_name) for run in runs]
    header = [title for _, title in COMPARE_COLUMNS]
    cells = table_cells(rows)
    markdown = markdown_table(header, cells, right_from=5)
    console = Console(stderr=markdown_path == "-")
    if markdown_path == "-":
        click.echo(markdown, nl=False)
    else:
        table = Table(title="Runs compared")
        for i, title in enumerate(header):
            table.add_column(title, justify="right" if i >= 5 else "left", no_wrap=True)
        for line in cells:
            table.add_row(*line)
        print_uncut(console, table)        # numbers are never cut, at 80 columns or in a log
        if markdown_path:
            Path(markdown_path).write_text(markdown)
            console.print(f"Markdown table in {markdown_path}")
    for note in missing_notes(rows, eval_name):
        console.print(f"note: {note}", soft_wrap=True)


if __name__ == "__main__":
    main()
