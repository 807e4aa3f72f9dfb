"""What `evaluate` prints: score tables whose numbers are never cut (80 columns, a narrow
terminal, a pipe into a log) and where it wrote its files."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cache.format import CLASS_NAMES
from tests.cachefab import blocky_cache
from tests.test_evaluate import tiny_checkpoint
from training.infer.evaluate import print_outputs, print_scores

REPO = Path(__file__).resolve().parents[1]
LONG = "/data/experiments/cityscapes/2026-12-02/deeplabv3plus_resnet101_os8_bf16_poly/best.pt"


def result_for(checkpoint: str = LONG) -> dict:
    class_iou = {name: (i * 0.0537) % 1 for i, name in enumerate(CLASS_NAMES)}
    class_iou["train"], class_iou["bus"] = 0.0, None
    return {"has_masks": True, "split": "val", "frames": 500, "checkpoint": checkpoint,
            "class_iou": class_iou, "miou": 0.4321, "category_iou": {"flat": 0.987654},
            "category_miou": 0.987654, "pixel_accuracy": 0.9, "latency_ms": 12.3,
            "input_hw": [1024, 2048], "device": "cuda:0",
            "export_dir": "/data/experiments/cityscapes/2026-12-02/benchmark_export_of_best",
            "visualize_dir": None}


def pairs_of(text: str) -> list[tuple[str, str]]:
    """(first cell, second cell) of every table row in `text`."""
    pairs = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 2 and cells[0]:
            pairs.append((cells[0], cells[1]))
    return pairs


def rows_of(text: str) -> dict[str, str]:
    return dict(pairs_of(text))


@pytest.mark.parametrize("width", [80, 40])
def test_scores_are_never_cut_at_any_width(width):
    result = result_for()
    out = io.StringIO()                        # like a pipe: no terminal, no colours
    console = Console(file=out, width=width)
    print_scores(result, console)
    print_outputs(result, "runs/a/scores.json", console)
    text = out.getvalue()
    rows = rows_of(text)
    for name, iou in result["class_iou"].items():
        shown = "-" if iou is None else f"{100 * iou:.2f}"
        if width >= 80:
            assert rows[name] == shown
        assert shown in {cell for cell in rows.values()}, name
    assert ("mean", "43.21") in pairs_of(text) and rows["flat"] == "98.77"
    lines = text.splitlines()
    assert f"val: 500 frames of {LONG}" in lines               # the path in one piece
    assert "scores: runs/a/scores.json" in lines
    assert f"benchmark PNGs: {result['export_dir']}" in lines
    assert not any(line.startswith("overlays") for line in lines)
    assert "\x1b[" not in text


def test_evaluate_in_a_pipe_prints_whole_tables_and_where_it_wrote(tmp_path):
    cache = blocky_cache(tmp_path / "cache", n_train=1, n_val=2, height=64, width=128)
    checkpoint = tiny_checkpoint(tmp_path / "best.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("COLUMNS", None)
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", "evaluate", "--checkpoint", str(checkpoint),
         "--cache", str(cache), "--device", "cpu", "--json", str(tmp_path / "s.json"),
         "--export", str(tmp_path / "export"), "--visualize", str(tmp_path / "vis")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    scores = json.loads((tmp_path / "s.json").read_text())
    rows = rows_of(done.stdout)
    for name, iou in scores["class_iou"].items():
        assert rows[name] == ("-" if iou is None else f"{100 * iou:.2f}")
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines if "│" in line) <= 80
    for line in (f"scores: {tmp_path / 's.json'}", f"benchmark PNGs: {tmp_path / 'export'}",
                 f"overlays: {tmp_path / 'vis'}"):
        assert line in lines
