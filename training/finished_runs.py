"""Tables over finished runs: model comparison (scripts/compare_runs.py) and cross-validation
summaries (scripts/cv_summary.py).

Where the numbers come from:
- comparison: the run's `evaluate --json` file (RUN/eval.json by default, or a JSON file given
  directly): architecture, encoder, input size, mIoU, mAcc, aAcc, params, FLOPs, latency. A run
  without one falls back to best.pt (architecture, encoder, training-time mIoU and aAcc) and the
  table says what is missing and the command that fills it in.
- cross-validation: each fold run's fold.json (written by `train --folds K --fold I`) and the
  evaluations in its metrics.jsonl (the last one, or the best by mIoU).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from cache.errors import UserError
from training.train.checkpoint import load_checkpoint
from training.train.folds import read_fold_file
from training.train.plots import read_metrics

EVAL_NAME = "eval.json"
COMPARE_COLUMNS = (("run", "Run"), ("arch", "Architecture"), ("encoder", "Encoder"),
                   ("input", "Input"), ("test_time", "Eval"), ("miou", "mIoU"), ("macc", "mAcc"),
                   ("aacc", "aAcc"),
                   ("params", "Params (M)"), ("gflops", "GFLOPs"), ("latency", "Latency (ms)"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON file ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


def _from_eval_json(name: str, path: Path) -> dict:
    data = _read_json(path)
    if "miou" not in data:
        raise UserError(f"{path}: no 'miou' (is it the JSON of `evaluate --json`?)")
    hw = data.get("input_hw") or data.get("output_hw")
    scales = data.get("tta_scales") or [1.0]
    # published tables keep single-scale ("ss") and multi-scale + flip ("ms+flip") apart
    test_time = ("ms" if len(scales) > 1 or scales[0] != 1.0 else "ss") + \
        ("+flip" if data.get("tta_flip") else "")
    return {"run": name, "source": str(path), "arch": data.get("arch"),
            "encoder": data.get("encoder"), "input": f"{hw[0]}x{hw[1]}" if hw else None,
            "miou": data.get("miou"), "macc": data.get("mean_accuracy"),
            "aacc": data.get("pixel_accuracy"), "params": data.get("params"),
            "flops": data.get("flops"), "latency": data.get("latency_ms"),
            "device": data.get("device"), "test_time": test_time, "missing": []}


def _from_checkpoint(name: str, run: Path) -> dict:
    data = load_checkpoint(run / "best.pt")
    meta, scores = data.get("meta", {}), data.get("scores", {})
    missing = ["mAcc", "params", "FLOPs", "latency"]
    return {"run": name, "source": str(run / "best.pt"), "arch": meta.get("arch"),
            "encoder": meta.get("encoder"), "input": None, "miou": scores.get("miou"),
            "macc": None, "aacc": scores.get("pixel_accuracy"), "params": None, "flops": None,
            "latency": None, "device": None, "test_time": "ss", "missing": missing}


def comparison_row(spec: str, eval_name: str = EVAL_NAME) -> dict:
    """One table row from a run dir (its eval JSON, else its best.pt) or an eval JSON file."""
    path = Path(spec)
    if path.is_file():
        return _from_eval_json(path.parent.name or path.stem, path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run dir or eval JSON file")
    if (path / eval_name).is_file():
        return _from_eval_json(path.name, path / eval_name)
    if (path / "best.pt").is_file():
        return _from_checkpoint(path.name, path)
    raise UserError(f"{path}: neither {eval_name} (from `evaluate --json`) nor best.pt")


def missing_notes(rows: Sequence[dict], eval_name: str = EVAL_NAME) -> list[str]:
    """One line per row that lacks columns, with the command that fills them in."""
    notes = []
    for row in rows:
        if row["missing"]:
            run = Path(row["source"]).parent
            notes.append(f"{row['run']}: no {eval_name}, so {', '.join(row['missing'])} are "
                         f"missing and mIoU/aAcc are best.pt's validation scores; run `evaluate "
                         f"--checkpoint {run}/best.pt --cache CACHE --json {run}/{eval_name}`")
    return notes


def format_cell(key: str, value) -> str:
    if value is None:
        return "—"
    if key in ("miou", "macc", "aacc"):
        return f"{100 * value:.2f}"
    if key == "params":
        return f"{value / 1e6:.1f}"
    if key == "gflops":
        return f"{value / 1e9:.1f}"
    if key == "latency":
        return f"{value:.1f}"
    return str(value)


def table_cells(rows: Sequence[dict]) -> list[list[str]]:
    """The comparison table's cells as text, in COMPARE_COLUMNS order."""
    return [[format_cell(key, row.get("flops") if key == "gflops" else row.get(key))
             for key, _ in COMPARE_COLUMNS] for row in rows]


def markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]],
                   right_from: int = 1) -> str:
    """A GitHub Markdown table; columns from `right_from` on are right-aligned."""
    align = [":---" if i < right_from else "---:" for i in range(len(header))]
    lines = [header, align, *cells]
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |"
                     for line in lines) + "\n"


# -- cross-validation ---------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std None below two values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fold_result(run: str | Path, pick: str = "last") -> dict:
    """A fold run's fold.json and its last (or best) evaluation in metrics.jsonl."""
    run = Path(run)
    fold = read_fold_file(run)
    if fold is None:
        raise UserError(f"{run}: no fold.json; not a run of `train --folds K --fold I`")
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "eval"]
    if not evals:
        raise UserError(f"{run}: no evaluation in metrics.jsonl yet")
    chosen = evals[-1] if pick == "last" else max(evals, key=lambda r: r["miou"] or -1.0)
    return {"run": str(run), "k": fold["k"], "fold": fold["index"], "split": fold["split"],
            "val_cities": fold["val_cities"], "val_frames": len(fold["val_frames"]),
            "step": chosen["step"], "miou": chosen["miou"], "class_iou": chosen["class_iou"]}


def cv_summary(runs: Sequence[str | Path], pick: str = "last") -> dict:
    """Per-fold mIoU and per-class IoU, their mean and sample std over the folds, and notes on
    folds that are missing or given twice."""
    folds = sorted((fold_result(run, pick) for run in runs), key=lambda f: f["fold"])
    if not folds:
        raise UserError("give the run dirs of the folds")
    kinds = {(f["k"], f["split"]) for f in folds}
    if len(kinds) > 1:
        raise UserError(f"these runs come from different fold sets (K, split): {sorted(kinds)}")
    k = folds[0]["k"]
    indices = [f["fold"] for f in folds]
    notes = [f"fold {i} is missing" for i in range(k) if i not in indices]
    notes += [f"fold {i} is given {indices.count(i)} times" for i in sorted(set(indices))
              if indices.count(i) > 1]
    names = list(folds[0]["class_iou"])
    miou_mean, miou_std = _mean_std([f["miou"] for f in folds])
    per_class = {name: dict(zip(("mean", "std"), _mean_std([f["class_iou"].get(name) for f in folds])))
                 for name in names}
    return {"k": k, "split": folds[0]["split"], "pick": pick, "folds": folds,
            "miou_mean": miou_mean, "miou_std": miou_std, "class_iou": per_class, "notes": notes}


def pct(value, std=None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")
