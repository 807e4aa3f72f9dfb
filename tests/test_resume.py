"""A run killed with SIGKILL and resumed ends with exactly the weights of a run never stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cache.errors import UserError
from tests.cachefab import blocky_cache
from training.train.checkpoint import load_checkpoint
from training.train.config import resolve_config
from training.train.run import run_training
from training.train.plots import read_metrics

REPO = Path(__file__).resolve().parents[1]
# 12 frames / batch 2 = 6 steps an epoch. last.pt is written at steps 4 and 8
# (--checkpoint-every 4), 6 (epoch end, after its evaluation) and 10 (the end). The killed
# run dies right after step 5, so it resumes from step 4: mid-epoch, 4 batches to skip.
ITERS, KILL_AFTER, CHECKPOINT_EVERY = 10, 5, 4

# Runs the real training, but SIGKILLs itself once step KILL_AFTER is done (logged, not
# checkpointed): a kill at a known point rather than a race with a timer.
KILLER = """
import json, os, signal, sys
from training.train import run
from training.train.config import resolve_config

kill_after = int(sys.argv[2])
original = run.Trainer._after_step

def after_step(self):
    original(self)
    if self.step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

run.Trainer._after_step = after_step
run.run_training(resolve_config(json.loads(sys.argv[1])))
"""


def cli_flags(cache: Path, out: Path) -> list[str]:
    return ["--cache", str(cache), "--out", str(out), "--loader", "torch", "--arch", "unet",
            "--encoder", "tu-mobilenetv3_small_050", "--encoder-weights", "none",
            "--model-arg", "encoder_depth=3", "--model-arg", "decoder_channels=[16,8,8]",
            "--res", "128", "--batch-size", "2", "--iters", str(ITERS), "--log-every", "1",
            "--checkpoint-every", str(CHECKPOINT_EVERY), "--workers", "0", "--seed", "7",
            "--deterministic", "--no-plots", "--lr", "0.05"]


def as_values(flags: list[str]) -> dict:
    """The same options as a resolve_config dict (for the in-process killer)."""
    values, model_kwargs, i = {}, {}, 0
    while i < len(flags):
        key = flags[i][2:].replace("-", "_")
        if key in ("deterministic",):
            values[key], i = True, i + 1
        elif key == "no_plots":
            values["plots"], i = False, i + 1
        elif key == "model_arg":
            name, _, text = flags[i + 1].partition("=")
            model_kwargs[name] = json.loads(text)
            i += 2
        else:
            values[key], i = flags[i + 1], i + 2
    values["model_kwargs"] = model_kwargs
    return values


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def trajectory(run_dir: Path) -> list[tuple]:
    """What must match between runs (time and images/s may differ)."""
    return [(r["event"], r["step"], r.get("loss"), r.get("lr"), r.get("miou"))
            for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cache = blocky_cache(root / "cache", n_train=12, n_val=1, height=128, width=256)
    straight, killed = root / "straight", root / "killed"
    done = run(["-m", "training.cli", "train", *cli_flags(cache, straight)])
    assert done.returncode == 0, done.stderr
    died = run(["-c", KILLER, json.dumps(as_values(cli_flags(cache, killed))), str(KILL_AFTER)])
    assert died.returncode == -signal.SIGKILL, died.stderr
    at_kill = {"progress": load_checkpoint(killed / "last.pt")["progress"],
               "steps_logged": [r["step"] for r in read_metrics(killed / "metrics.jsonl")]}
    (killed / "last.pt.tmp").write_bytes(b"torn write of a later checkpoint")
    resumed = run(["-m", "training.cli", "train", "--out", str(killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    return straight, killed, at_kill, resumed


def test_the_kill_happened_mid_epoch_after_a_checkpoint(runs):
    _, _, at_kill, resumed = runs
    assert at_kill["progress"]["step"] == CHECKPOINT_EVERY
    assert at_kill["progress"]["batch_in_epoch"] == CHECKPOINT_EVERY and at_kill["progress"]["epoch"] == 0
    assert at_kill["steps_logged"][-1] == KILL_AFTER        # step 5 was done, then lost
    assert f"at step {CHECKPOINT_EVERY} (epoch 0, batch {CHECKPOINT_EVERY})" in resumed.stderr


def test_resumed_run_ends_with_identical_weights_and_state(runs):
    straight, killed, _, _ = runs
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["progress"] == b["progress"] and a["progress"]["step"] == ITERS
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == ITERS
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_resumed_log_equals_the_uninterrupted_log(runs):
    straight, killed, _, _ = runs
    expected = trajectory(straight)
    assert [s for e, s, *_ in expected if e == "train"] == list(range(1, ITERS + 1))
    assert [s for e, s, *_ in expected if e == "eval"] == [6, ITERS]
    assert trajectory(killed) == expected


def test_resume_refuses_a_checkpoint_of_another_model(runs):
    straight, _, _, _ = runs
    config = resolve_config({"out": str(straight), "arch": "fpn"}, resume=True)
    with pytest.raises(UserError, match="checkpoint is for another model: arch 'unet' \\(this run: 'fpn'\\)"):
        run_training(config, resume=True)


def test_resuming_a_finished_run_changes_nothing(runs):
    straight, _, _, _ = runs
    before = trajectory(straight)
    weights = load_checkpoint(straight / "last.pt")["model"]
    result = run_training(resolve_config({"out": str(straight)}, resume=True), resume=True)
    assert result.step == ITERS and trajectory(straight) == before
    after = load_checkpoint(straight / "last.pt")["model"]
    assert all(torch.equal(after[name], weights[name]) for name in weights)


def test_resuming_with_another_epoch_length_says_it_is_not_exact(runs, tmp_path, capsys):
    import shutil

    run_dir = Path(shutil.copytree(runs[0], tmp_path / "copy"))
    before = trajectory(run_dir)
    # --limit 2: epochs of 2 steps instead of 6, so step 10 is no longer epoch 1, batch 4
    config = resolve_config({"out": str(run_dir), "limit": "2"}, resume=True)
    result = run_training(config, resume=True)
    assert (result.step, result.epoch) == (ITERS, ITERS // 2)
    assert "an epoch now has 2 steps" in capsys.readouterr().err
    assert trajectory(run_dir) == before
