"""`dataprep`: build, stats, verify, synth. Each command parses options, shows progress and
calls one library function; a UserError becomes `error: ...` on stderr and exit status 1."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cache.errors import report_user_errors
from cache.writer import CODEC_NAMES, DEFAULT_CODEC, DEFAULT_MASK_CODEC, DEFAULT_SHARD, DEFAULT_TILE

console = Console(stderr=True)


user_errors = report_user_errors("interrupted; run the same command again to resume")
# stats and verify keep nothing of an interrupted run: the same command starts them over
stats_errors = report_user_errors("interrupted; nothing was written (stats.json is written at the "
                                  "end); run `dataprep stats` again to count from the start")
verify_errors = report_user_errors("interrupted; nothing was checked to the end (verify keeps no "
                                   "progress); run `dataprep verify` again to check from the start")
WAIT_HELP = ("If another process holds the cache (a build, or readers such as train), wait for it "
             "instead of stopping with an error that names it.")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def _advance(progress: Progress, task_id) -> None:
    """One more frame done: advance the bar and show its rate."""
    progress.advance(task_id)
    progress.update(task_id, rate=_rate(progress.tasks[task_id]))


def _rate(task) -> str:
    speed = task.finished_speed or task.speed
    return f"{speed:.1f} frames/s" if speed else ""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Cityscapes raw tree -> exact trainId masks -> tiled Zarr v3 cache."""


@main.command()
@click.option("--root", type=click.Path(path_type=Path), default=None,
              help="Raw Cityscapes tree (the folder holding leftImg8bit/ and gtFine/). "
              " [default: $CITYSCAPES_DATASET]")
@click.option("--out", "--cache", "out", type=click.Path(path_type=Path), default=None,
              help="Cache directory to write.  [default: $CITYSCAPES_CACHE, else ./cityscapes.zarr]")
@click.option("--splits", default=None, help="Comma-separated splits.  [default: every split present]")
@click.option("--workers", type=int, default=None, help="Worker processes.  [default: all cores]")
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
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Store the --scale-splits downscaled by this factor (0.5: 2048x1024 -> 1024x512, a "
              "quarter of the disk; images antialiased bilinear, masks nearest).")
@click.option("--scale-splits", default="train,train_extra", show_default=True,
              help="Comma-separated splits that --scale applies to (val and test stay full-size for "
              "official-grade evaluation unless named here).")
@click.option("--wait", is_flag=True, help=WAIT_HELP)
@user_errors
def build(root, out, splits, workers, limit, force, coarse, on_error, tile, codec, mask_codec, shard,
          scale, scale_splits, wait):
    """Decode every frame once and store uint8 tiles (and trainId masks) in a Zarr cache.

    \b
    Example:  dataprep build --root /data/cityscapes     (cache: ./cityscapes.zarr)

    Resumable: after an interruption (even kill -9) run the same command again; it finishes
    the remaining frames. A complete split is not rebuilt unless --force. One writer at a
    time: while a build runs, another build (or train, stats, verify on the same cache) is
    refused with a line naming it, or waits with --wait. Exit status: 0 done, 1 error, 3 done
    but with frames skipped by --on-error skip.
    """
    from cache.location import resolve_cache, resolve_root
    from cache.writer import Storage
    from dataprep.build import BuildOptions, build_cache

    root, out = _announce(resolve_root(root), "dataset"), _announce(resolve_cache(out, "--out"), "cache")
    options = BuildOptions(root=root, out=out, workers=workers, limit=limit, force=force,
                           coarse=coarse, on_error=on_error, storage=Storage(tile, codec, shard, mask_codec),
                           splits=tuple(s.strip() for s in splits.split(",") if s.strip()) if splits else None,
                           scale=scale, scale_splits=tuple(s.strip() for s in scale_splits.split(",") if s.strip()),
                           wait=wait)
    events = _RichEvents(_progress())
    try:
        report = build_cache(options, events)
    finally:
        events.close()
    for split in report.splits:
        content = "images + masks" if split.has_masks else "images only (unlabelled: no masks array)"
        state = "already complete" if split.already_complete else f"{split.rows_written} rows written"
        if split.scale != 1.0:
            state += f", stored at {split.stored_size[1]}x{split.stored_size[0]} (--scale {split.scale:g})"
        console.print(f"{split.name}: {split.frames} frames, {content}, {state}", soft_wrap=True)
    if report.skipped:
        console.print(f"[bold red]{len(report.skipped)} bad frames were left out:[/]")
        for name, problem in report.skipped.items():
            click.echo(f"  skipped {name}: {problem}", err=True)
    console.print(f"cache: {Path(report.out).absolute()}", markup=False, highlight=False)
    sys.exit(report.exit_code)


def _announce(location, what: str) -> Path:
    """Print where a path came from when no flag gave it (a default must never be silent)."""
    if not location.source.startswith("--"):
        console.print(location.describe(what), markup=False, highlight=False, soft_wrap=True)
    return location.path


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
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Cache directory.  [default: $CITYSCAPES_CACHE, else ./cityscapes.zarr]")
@click.option("--split", default="train", show_default=True, help="Split to count.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON.  [default: CACHE/stats.json]")
@click.option("--wait", is_flag=True, help=WAIT_HELP)
@stats_errors
def stats(cache, split, json_path, wait):
    """Per-class pixel counts, frequencies, frame counts and class weights (enet,
    median_frequency, inverse_sqrt) of a split; `train --class-weights FILE[:method]` reads the JSON.

    \b
    Example:  dataprep stats            (the cache of `dataprep build`; writes CACHE/stats.json)
    """
    from cache.location import resolve_cache
    from dataprep.stats import compute_stats, lock_for_stats, open_labelled_split, write_stats

    cache = _announce(resolve_cache(cache, must_exist=True), "cache")
    # writing CACHE/stats.json makes this a writer: the lock is exclusive from the start
    with lock_for_stats(cache, json_path, wait=wait, on_wait=console.print):
        total = len(open_labelled_split(cache, split)[1])  # a bad split fails before the progress bar
        with _progress() as progress:
            task = progress.add_task(f"stats {split}", total=total, rate="")
            result = compute_stats(cache, split, progress=lambda: _advance(progress, task))
        path = write_stats(result, cache, json_path)
    print_uncut(Console(), _stats_table(result))
    console.print(f"ignored pixels: {100 * result['ignored_fraction']:.2f}%   frames: {result['frames']}"
                  f"   written: {path.absolute()}", soft_wrap=True)


def _stats_table(result: dict) -> Table:
    """Compact numbers (pixels '2.04 G') and light rules: 77 columns with 10-digit counts."""
    from dataprep.stats import compact_number

    table = Table(title=f"class statistics of split {result['split']!r}", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True)
    for column in ("trainId", "class", "pixels", "freq %", "frames", "enet", "median freq", "inv sqrt"):
        table.add_column(column, justify="left" if column == "class" else "right", no_wrap=True)
    weights = result["weights"]
    for i, name in enumerate(result["class_names"]):
        table.add_row(str(i), name, compact_number(result["pixel_counts"][i]),
                      f"{100 * result['frequencies'][i]:.3f}", str(result["frame_counts"][i]),
                      *(compact_number(float(weights[m][i])) for m in ("enet", "median_frequency", "inverse_sqrt")))
    return table


def print_uncut(out: Console, table: Table) -> None:
    """Print a table whole: where the console (a narrow terminal, or 80 columns for a pipe)
    is narrower than the table, widen it rather than let rich cut or fold the numbers."""
    needed = out.measure(table, options=out.options.update(max_width=10_000)).maximum
    if out.width < needed:
        out.width = needed
    out.print(table)


@main.command()
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Cache directory.  [default: $CITYSCAPES_CACHE, else ./cityscapes.zarr]")
@click.option("--workers", type=int, default=None, help="Worker processes.  [default: all cores]")
@click.option("--wait", is_flag=True, help=WAIT_HELP)
@verify_errors
def verify(cache, workers, wait):
    """Re-read every row of every split: checksums, done flags, mask values, attributes.
    Exit status 1 if anything is wrong (each bad row is named by its frame).

    \b
    Example:  dataprep verify --cache /data/cityscapes.zarr --workers 4
    """
    from cache.location import resolve_cache
    from cache.reader import CacheReader
    from cache.verify import rows_to_check, verify_cache

    cache = _announce(resolve_cache(cache, must_exist=True), "cache")
    # not a cache, or of another version: one error line, no progress bar; the reader's shared
    # lock keeps a build out until verify has finished
    reader = CacheReader(cache, wait=wait, on_wait=console.print)  # noqa: F841 (holds the lock)
    with _progress() as progress:
        task = progress.add_task("verify", total=rows_to_check(cache), rate="")
        report = verify_cache(cache, workers=workers, progress=lambda: _advance(progress, task))
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
@click.option("--with-test", is_flag=True, help="Also write a test split: images, and in gtFine/test "
              "the real release's placeholders (polygons of ego vehicle, rectification border and out "
              "of roi only), which `dataprep build` treats as unlabelled.")
@click.option("--photo", is_flag=True, help="Photo-like images (softened edges, sensor noise, PNGs at "
              "the default level): ~2.3 MB per 2048x1024 frame like the real leftImg8bit, so that "
              "decode and disk figures are realistic. Slower to write.")
@click.option("--workers", type=int, default=None, help="Worker processes.  [default: all cores]")
@user_errors
def synth(out, frames, height, width, seed, with_test, photo, workers):
    """Write a synthetic Cityscapes tree in the official layout (for tests, demos and benchmarks).

    \b
    Example:  dataprep synth --out data/synth --frames 3475 --photo   (Cityscapes' train + val size)
    """
    from dataprep.synth import write_synthetic_tree

    from dataprep.synth import synthetic_frame_count

    total = synthetic_frame_count(frames, with_test=with_test)  # bad counts fail before the bar
    with _progress() as progress:
        task = progress.add_task("synth", total=total, rate="")
        names = write_synthetic_tree(out, frames, height=height, width=width, seed=seed, with_test=with_test,
                                     photo=photo, workers=workers, progress=lambda: _advance(progress, task))
    for split, frame_names in names.items():
        console.print(f"{split}: {len(frame_names)} frames")
    console.print(f"raw tree: {out}")


if __name__ == "__main__":
    main()
