"""A diverging run stops in one line, names the step and the last good checkpoint, never writes a
checkpoint of non-finite weights, and leaves metrics.jsonl strict JSON (issue 19)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cachefab import blocky_cache
from training.train import run as run_module
from training.train.checkpoint import load_checkpoint
from training.train.config import resolve_config
from training.core.device import unwrap
from training.train.guards import DIVERGED_AFTER_LOGS, Diverged
from training.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
REPO = Path(__file__).resolve().parents[1]
TINY = dict(loader="torch", arch="unet", encoder="resnet18", encoder_weights="none",
            model_kwargs={"encoder_depth": 3, "decoder_channels": [8, 8, 8]}, res=64,
            batch_size=2, workers=0, log_every=1, plots=False, seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("div") / "c.zarr", n_train=6, n_val=1,
                        height=64, width=128, tile=64)


def tiny(cache, out, **changes):
    return resolve_config({**TINY, "cache": str(cache), "out": str(out), **changes})


def strict_lines(path: Path) -> list[dict]:
    """Every line of metrics.jsonl as strict JSON (a NaN or Infinity literal fails)."""
    def refuse(name):
        raise AssertionError(f"{name} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def weights_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values()
               if t.is_floating_point())


def test_a_huge_learning_rate_stops_the_run_in_one_line(cache, tmp_path):
    out = tmp_path / "run"
    flags = ["--cache", cache, "--out", out, "--loader", "torch", "--arch", "unet", "--encoder",
             "resnet18", "--encoder-weights", "none", "--model-arg", "encoder_depth=3",
             "--model-arg", "decoder_channels=[8,8,8]", "--res", 64, "--batch-size", 2,
             "--workers", 0, "--iters", 30, "--log-every", 1, "--checkpoint-every", 1,
             "--lr", "1e6", "--no-plots"]
    done = subprocess.run([sys.executable, "-m", "training.cli", "train", *map(str, flags)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert errors[0].startswith("error: training diverged at step ")
    assert "lower --lr (this run: 1e+06)" in errors[0]
    records = strict_lines(out / "metrics.jsonl")
    assert records and records[-1]["step"] < 30
    if (out / "last.pt").is_file():       # any checkpoint written holds finite weights
        good = load_checkpoint(out / "last.pt")["progress"]["step"]
        assert f"the last good checkpoint is {out / 'last.pt'} (step {good})" in errors[0]
        assert weights_finite(out / "last.pt")
    else:
        assert "no checkpoint had been written yet" in errors[0]


def fake_losses(monkeypatch, losses):
    """Steps that change nothing and report `losses` (one per step, in order)."""
    values = iter(losses)

    def steps(parts, batches, count, accum, wait=None):
        for _ in range(count):
            yield torch.tensor(next(values))

    monkeypatch.setattr(run_module, "train_one_epoch", steps)


def test_a_loss_that_stays_non_finite_stops_the_run(cache, tmp_path, monkeypatch):
    fake_losses(monkeypatch, [1.0, 1.0] + [math.inf] * 10)
    out = tmp_path / "run"
    with pytest.raises(Diverged) as stopped:
        run_training(tiny(cache, out, iters=12, checkpoint_every=1, eval_every=100))
    step = 2 + DIVERGED_AFTER_LOGS
    assert str(stopped.value) == (
        f"training diverged at step {step}: the mean loss was not finite (inf) at "
        f"{DIVERGED_AFTER_LOGS} log lines in a row; the last good checkpoint is {out / 'last.pt'} "
        f"(step {step - 1}); train again with a lower --lr (this run: 0.01) or a --warmup, under "
        "another --out")
    losses = [r["loss"] for r in strict_lines(out / "metrics.jsonl")]
    assert losses == [1.0, 1.0] + [None] * DIVERGED_AFTER_LOGS     # null, never NaN/Infinity


def test_an_odd_non_finite_loss_is_tolerated(cache, tmp_path, monkeypatch):
    """As when fp16's GradScaler skips an overflowing step: the weights stay finite."""
    fake_losses(monkeypatch, [1.0] + [math.nan] * (DIVERGED_AFTER_LOGS - 1) + [1.0] * 3)
    out = tmp_path / "run"
    result = run_training(tiny(cache, out, iters=DIVERGED_AFTER_LOGS + 3, eval_every=100))
    assert result.step == DIVERGED_AFTER_LOGS + 3
    losses = [r.get("loss") for r in strict_lines(out / "metrics.jsonl") if r["event"] == "train"]
    assert losses.count(None) == DIVERGED_AFTER_LOGS - 1


def test_non_finite_weights_are_never_checkpointed(cache, tmp_path, monkeypatch):
    real = run_module.train_one_epoch
    done = [0]

    def poisoned(parts, batches, steps, accum, wait=None):
        for loss in real(parts, batches, steps, accum, wait):
            done[0] += 1
            if done[0] == 3:
                with torch.no_grad():
                    next(unwrap(parts.model).parameters()).fill_(math.nan)
            yield loss

    monkeypatch.setattr(run_module, "train_one_epoch", poisoned)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"training diverged at step 3: the weights are no longer "
                                       rf"finite; the last good checkpoint is .*last.pt \(step 2\)"):
        run_training(tiny(cache, out, iters=6, checkpoint_every=1, eval_every=100))
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 2
    assert weights_finite(out / "last.pt")
    strict_lines(out / "metrics.jsonl")
