"""`dataprep`: build, stats, verify, synth. Each command parses options, shows progress and
calls one library function; a UserError becomes `error: ...` on stderr and exit status 1."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cache.errors import report_user_errors
from cache.writer import CODEC_NAMES, DEFAULT_CODEC, DEFAULT_MASK_CODEC, DEFAULT_SHARD, DEFAULT_TILE

console = Console(stderr=True)


user_errors = report_user_errors("interrupted; run the same command again to resume")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def _rate(task) -> str:
    speed = task.finished_speed or task.speed
    return f"{speed:.1f} frames/s" if speed else ""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Cityscapes raw tree -> exact trainId masks -> tiled Zarr v3 cache."""


@main.command()
@click.option("--root", required=True, type=click.Path(path_type=Path),
              help="Raw Cityscapes tree (the folder holding leftImg8bit/ and gtFine/).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache directory to write.")
@click.option("--splits", default=None, help="Comma-separated splits (default: every split present).")
@click.option("--workers", type=int, default=None, help="Worker processes (default: all cores).")
@click.option("--limit", type=int, default=None, help="Only the first N frames of each split (smoke runs).")
@click.option("--force", is_flag=True, help="Rebuild the chosen splits even if complete, or if made "
              "with other options.")
@click.option("--coarse", is_flag=True, help="Also build train_extra from gtCoarse polygons.")
@click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="stop: the first bad frame stops the build (error names the file; the split stays "
              "incomplete and the next run resumes). skip: bad frames are left out of the split, "
              "listed at the end, and the exit status is 3.")
@click.option("--tile", type=int, default=DEFAULT_TILE, show_default=True, help="Tile size in pixels.")
@click.option("--codec", type=click.Choice(CODEC_NAMES), default=DEFAULT_CODEC, show_default=True,
              help="Compression of the image tiles: none reads fastest (a training window costs ~5x "
              "less CPU than with zstd-1) but takes ~3x the disk of the PNGs; zstd-1 (~2.3x) for a "
              "small disk.")
@click.option("--mask-codec", type=click.Choice(CODEC_NAMES), default=DEFAULT_MASK_CODEC,
              show_default=True, help="Compression of the mask tiles.")
@click.option("--shard/--no-shard", default=DEFAULT_SHARD, show_default=True,
              help="One file per frame and array (tiles stay separately readable), or one file per tile.")
@user_errors
def build(root, out, splits, workers, limit, force, coarse, on_error, tile, codec, mask_codec, shard):
    """Decode every frame once and store uint8 tiles (and trainId masks) in a Zarr cache.

    Resumable: after an interruption (even kill -9) run the same command again; it finishes
    the remaining frames. A complete split is not rebuilt unless --force. Exit status: 0 done,
    1 error, 3 done but with frames skipped by --on-error skip.
    """
    from cache.writer import Storage
    from dataprep.build import BuildOptions, build_cache

    options = BuildOptions(root=root, out=out, workers=workers, limit=limit, force=force,
                           coarse=coarse, on_error=on_error, storage=Storage(tile, codec, shard, mask_codec),
                           splits=tuple(s.strip() for s in splits.split(",") if s.strip()) if splits else None)
    events = _RichEvents(_progress())
    try:
        report = build_cache(options, events)
    finally:
        events.close()
    for split in report.splits:
        content = "images + masks" if split.has_masks else "images only (no polygons: no masks array)"
        state = "already complete" if split.already_complete else f"{split.rows_written} rows written"
        console.print(f"{split.name}: {split.frames} frames, {content}, {state}")
    if report.skipped:
        console.print(f"[bold red]{len(report.skipped)} bad frames were left out:[/]")
        for name, problem in report.skipped.items():
            click.echo(f"  skipped {name}: {problem}", err=True)
    console.print(f"cache: {report.out}")
    sys.exit(report.exit_code)


class _RichEvents:
    """Build events shown with rich; the bar starts with the first split, so that an error in
    the options or the tree is the only thing printed."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks = {}

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def close(self) -> None:
        if self.tasks:
            self.progress.stop()

    def split_started(self, split: str, total: int, done: int) -> None:
        if not self.tasks:
            self.progress.start()
        self.tasks[split] = self.progress.add_task(split, total=total, completed=done, rate="")

    def row_done(self, split: str) -> None:
        task_id = self.tasks[split]
        self.progress.advance(task_id)
        self.progress.update(task_id, rate=_rate(self.progress.tasks[task_id]))

    def split_finished(self, split: str) -> None:
        task_id = self.tasks[split]
        self.progress.update(task_id, rate=_rate(self.progress.tasks[task_id]))


@main.command()
@click.option("--cache", required=True, type=click.Path(path_type=Path), help="Cache directory.")
@click.option("--split", default="train", show_default=True, help="Split to count.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON (default: CACHE/stats.json).")
@user_errors
def stats(cache, split, json_path):
    """Per-class pixel counts, frequencies, frame counts and class weights (enet,
    median_frequency, inverse_sqrt) of a split; `train --class-weights FILE[:method]` reads the JSON."""
    from dataprep.stats import compute_stats, open_labelled_split, write_stats

    total = len(open_labelled_split(cache, split)[1])  # a bad split fails before the progress bar
    with _progress() as progress:
        task = progress.add_task(f"stats {split}", total=total, rate="")
        result = compute_stats(cache, split, progress=lambda: progress.advance(task))
    path = write_stats(result, cache, json_path)
    Console().print(_stats_table(result))
    console.print(f"ignored pixels: {100 * result['ignored_fraction']:.2f}%   frames: {result['frames']}"
                  f"   written: {path}")


def _stats_table(result: dict) -> Table:
    table = Table(title=f"class statistics of split {result['split']!r}")
    for column in ("trainId", "class", "pixels", "freq %", "frames", "enet", "median freq", "inv sqrt"):
        table.add_column(column, justify="left" if column == "class" else "right")
    weights = result["weights"]
    for i, name in enumerate(result["class_names"]):
        table.add_row(str(i), name, f"{result['pixel_counts'][i]:,}", f"{100 * result['frequencies'][i]:.3f}",
                      str(result["frame_counts"][i]), f"{weights['enet'][i]:.3f}",
                      f"{weights['median_frequency'][i]:.3f}", f"{weights['inverse_sqrt'][i]:.3f}")
    return table


@main.command()
@click.option("--cache", required=True, type=click.Path(path_type=Path), help="Cache directory.")
@click.option("--workers", type=int, default=None, help="Worker processes (default: all cores).")
@user_errors
def verify(cache, workers):
    """Re-read every row of every split: checksums, done flags, mask values, attributes.
    Exit status 1 if anything is wrong (each bad row is named by its frame)."""
    from cache.reader import CacheReader
    from cache.verify import verify_cache

    CacheReader(cache)  # not a cache, or of another version: one error line, no progress bar
    with _progress() as progress:
        task = progress.add_task("verify", total=None, rate="")
        report = verify_cache(cache, workers=workers, progress=lambda: progress.advance(task))
    for fault in report.faults:
        click.echo(f"fault: {fault}", err=True)
    rows = sum(report.rows_checked.values())
    if report.ok:
        console.print(f"ok: {rows} rows in {len(report.rows_checked)} splits checked")
        return
    click.echo(f"error: {len(report.faults)} faults in {cache} "
               f"({len(report.bad_frames())} bad frames); rebuild with `dataprep build --force`", err=True)
    sys.exit(1)


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Where to write the raw tree.")
@click.option("--frames", required=True, type=int, help="Labelled frames in total (train + val).")
@click.option("--height", type=int, default=1024, show_default=True)
@click.option("--width", type=int, default=2048, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--with-test", is_flag=True, help="Also write an unlabelled test split (images only).")
@user_errors
def synth(out, frames, height, width, seed, with_test):
    """Write a synthetic Cityscapes tree in the official layout (for tests, demos and benchmarks)."""
    from dataprep.synth import write_synthetic_tree

    with console.status(f"writing {frames} synthetic frames to {out}"):
        names = write_synthetic_tree(out, frames, height=height, width=width, seed=seed, with_test=with_test)
    for split, frame_names in names.items():
        console.print(f"{split}: {len(frame_names)} frames")
    console.print(f"raw tree: {out}")


if __name__ == "__main__":
    main()
