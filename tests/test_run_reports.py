"""scripts/compare_runs.py and scripts/cv_summary.py on run dirs made in tmp folders."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from cache.errors import UserError
from tests.cachefab import blocky_cache
from tests.test_evaluate import FAST, tiny_checkpoint
from training.train.checkpoint import load_checkpoint, save_checkpoint
from training.infer.evaluate import run_evaluate
from training.train.folds import make_fold, write_fold_file
from training.finished_runs import comparison_row, cv_summary, missing_notes, table_cells

REPO = Path(__file__).resolve().parents[1]


def script(name: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run a: a real `evaluate --json` into a/eval.json; run b: an eval JSON written by hand;
    run c: only best.pt."""
    root = tmp_path_factory.mktemp("compare")
    cache = blocky_cache(root / "cache", n_train=1, n_val=1, height=64, width=128)
    for name in "abc":
        (root / name).mkdir()
    ckpt = tiny_checkpoint(root / "a" / "best.pt")
    run_evaluate(ckpt, cache, "val", json_path=root / "a" / "eval.json", **FAST)
    (root / "b" / "eval.json").write_text(json.dumps({
        "arch": "deeplabv3plus", "encoder": "resnet50", "input_hw": [1024, 2048], "miou": 0.8009,
        "mean_accuracy": 0.8712, "pixel_accuracy": 0.9634, "params": 43_580_000,
        "flops": 1_414_000_000_000, "latency_ms": 123.46, "tta_scales": [0.75, 1.0, 1.25],
        "tta_flip": True}))
    data = load_checkpoint(ckpt)
    save_checkpoint(root / "c" / "best.pt", {**{k: data[k] for k in ("meta", "model")},
                                              "scores": {"miou": 0.5, "pixel_accuracy": 0.75}})
    return root


def test_rows_come_from_eval_json_or_best_pt(runs):
    a, b, c = (comparison_row(str(runs / name)) for name in "abc")
    evaluated = json.loads((runs / "a" / "eval.json").read_text())
    assert (a["arch"], a["input"], a["params"], a["flops"]) == \
        ("unet", "64x128", evaluated["params"], evaluated["flops"])
    assert a["macc"] == evaluated["mean_accuracy"] and not a["missing"]
    assert table_cells([b])[0] == ["b", "deeplabv3plus", "resnet50", "1024x2048", "ms+flip", "80.09",
                                   "87.12", "96.34", "43.6", "1414.0", "123.5"]
    assert a["test_time"] == "ss" and c["test_time"] == "ss"
    assert (c["miou"], c["aacc"], c["macc"]) == (0.5, 0.75, None)
    assert table_cells([c])[0][6] == "—"
    notes = missing_notes([a, b, c])
    assert len(notes) == 1 and notes[0].startswith("c: no eval.json") and "evaluate --checkpoint" in notes[0]
    assert comparison_row(str(runs / "b" / "eval.json"))["run"] == "b"
    with pytest.raises(UserError, match="neither eval.json"):
        comparison_row(str(runs / "cache"))


def test_compare_script_prints_markdown_and_a_rich_table(runs, tmp_path):
    done = script("compare_runs.py", runs / "b", runs / "c", "--markdown", "-")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ("| Run | Architecture | Encoder | Input | Eval | mIoU | mAcc | aAcc "
                        "| Params (M) | GFLOPs | Latency (ms) |")
    assert lines[2] == ("| b | deeplabv3plus | resnet50 | 1024x2048 | ms+flip | 80.09 | 87.12 | 96.34 "
                        "| 43.6 | 1414.0 | 123.5 |")
    assert lines[3].startswith("| c | unet | resnet18 | — | ss | 50.00 | — | 75.00 |")
    assert "note: c: no eval.json" in done.stderr
    shown = script("compare_runs.py", runs / "a", runs / "b", "--markdown", tmp_path / "t.md")
    assert shown.returncode == 0 and "Runs compared" in shown.stdout and "80.09" in shown.stdout
    assert "…" not in shown.stdout and "GFLOPs" in shown.stdout     # a pipe: 80 columns, uncut
    assert (tmp_path / "t.md").read_text().count("\n") == 4
    bad = script("compare_runs.py", tmp_path / "nowhere")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


FRAMES = sorted(f"{c}/{c}_{i:06d}_000019" for c in ("aachen", "bochum", "cologne") for i in range(2))
FOLD_MIOU = [0.50, 0.60, 0.70]


def fold_run(root: Path, index: int, road_iou, steps=(5, 10)) -> Path:
    """A fold run dir: fold.json and metrics.jsonl with evaluations at `steps` (the last is
    FOLD_MIOU[index]; earlier ones score 0.9, so --pick best differs from last)."""
    run = root / f"fold{index}"
    run.mkdir(parents=True)
    write_fold_file(make_fold(FRAMES, 3, index), FRAMES, run)
    lines = [{"event": "train", "step": 1, "loss": 1.0}]
    for step in steps:
        miou = FOLD_MIOU[index] if step == steps[-1] else 0.9
        lines.append({"event": "eval", "step": step, "miou": miou,
                      "class_iou": {"road": road_iou, "sidewalk": miou}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_cv_summary_means_and_sample_std_over_folds(tmp_path):
    runs = [fold_run(tmp_path, i, road) for i, road in enumerate([0.9, None, 0.7])]
    summary = cv_summary(runs[::-1])
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2] and summary["notes"] == []
    assert summary["miou_mean"] == pytest.approx(0.6)
    assert summary["miou_std"] == pytest.approx(statistics.stdev(FOLD_MIOU))
    assert summary["class_iou"]["road"]["mean"] == pytest.approx(0.8)     # the absent fold left out
    assert summary["folds"][0]["val_cities"] == ["aachen"] and summary["folds"][0]["val_frames"] == 2
    assert cv_summary(runs, pick="best")["miou_mean"] == pytest.approx(0.9)
    partial = cv_summary(runs[:2])
    assert partial["notes"] == ["fold 2 is missing"] and partial["miou_std"] is not None
    with pytest.raises(UserError, match="no fold.json"):
        cv_summary([tmp_path])


def test_cv_script_writes_json_and_markdown(tmp_path):
    runs = [fold_run(tmp_path / "cv", i, 0.8) for i in range(3)]
    done = script("cv_summary.py", *runs, "--json", tmp_path / "s.json", "--markdown", tmp_path / "s.md")
    assert done.returncode == 0, done.stderr
    assert "3-fold cross-validation on train" in done.stdout and "60.00 ± 10.00" in done.stdout
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["miou_mean"] == pytest.approx(0.6) and len(saved["folds"]) == 3
    markdown = (tmp_path / "s.md").read_text()
    assert "| mean ± std |  |  |  | 60.00 ± 10.00 |" in markdown
    assert "| road | 80.00 | 80.00 | 80.00 | 80.00 ± 0.00 |" in markdown
