"""Two CPU ranks under torchrun (gloo): one run dir, metrics over both shards, equal weights."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cachefab import blocky_cache
from training.train.checkpoint import load_checkpoint
from training.train.plots import read_metrics

REPO = Path(__file__).resolve().parents[1]
H, W = 128, 256
N_VAL = 3            # odd: rank 0 scores 2 frames, rank 1 one; the sum must cover all 3

# The real `python -m training.cli train` entry point; each rank then saves the weights it
# ended with, so that the test can compare ranks (only rank 0 writes the run dir itself).
RANK_WEIGHTS = """
import os, sys, torch
from training.cli import main

result = main(["train", *sys.argv[1:]], standalone_mode=False)
torch.save(result.model.state_dict(), os.path.join(os.environ["WEIGHTS_DIR"], f"rank{os.environ['RANK']}.pt"))
"""


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cache = blocky_cache(root / "cache", n_train=16, n_val=N_VAL, height=H, width=W)
    script = root / "rank_weights.py"
    script.write_text(RANK_WEIGHTS)
    out = root / "run"
    # 16 frames / 2 ranks / batch 2 = 4 micro-batches per rank an epoch = 2 steps of 2
    args = ["--cache", str(cache), "--out", str(out), "--loader", "torch", "--arch", "unet",
            "--encoder", "tu-mobilenetv3_small_050", "--encoder-weights", "none",
            "--model-arg", "encoder_depth=3", "--model-arg", "decoder_channels=[16,8,8]",
            "--res", "128", "--batch-size", "2", "--grad-accum", "2", "--iters", "4",
            "--log-every", "1", "--workers", "0", "--device", "cpu", "--lr", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WEIGHTS_DIR": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, out


def test_both_ranks_end_with_identical_weights(ddp_run):
    root, out = ddp_run
    rank0, rank1 = torch.load(root / "rank0.pt"), torch.load(root / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:     # parameters (DDP) and BatchNorm buffers (broadcast before eval)
        assert torch.equal(rank0[name], rank1[name]), name
    saved = load_checkpoint(out / "last.pt")
    for name in rank0:
        assert torch.equal(saved["model"][name], rank0[name]), name
    assert len(saved["rng"]) == 2 and saved["world_size"] == 2


def test_one_run_dir_written_by_rank_zero_only(ddp_run):
    _, out = ddp_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]  # not twice
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    # the confusion matrix is summed over ranks: every validation frame is counted once
    assert all(r["pixels"] == N_VAL * H * W for r in evals)
    # images/s counts both ranks: 2 ranks x 2 micro-batches x 2 frames per step
    assert all(r["images_per_s"] > 0 for r in records if r["event"] == "train")
    names = {p.name for p in out.iterdir()}
    assert {".cityscapes-output", "config.yaml", "metrics.jsonl", "last.pt", "best.pt",
            "loss.png", "miou.png", "class_iou.png"} == names
    progress = load_checkpoint(out / "last.pt")["progress"]
    assert (progress["step"], progress["epoch"], progress["batch_in_epoch"]) == (4, 2, 0)
