"""The training loop on blocky class-coloured caches: it learns, and its run dir is complete."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from cache.errors import UserError
from tests.cachefab import blocky_cache
from training.train.checkpoint import load_checkpoint, load_for_eval
from training.train.config import resolve_config
from training.train.run import run_training
from training.train.plots import PLOT_NAMES, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_UNET = {"encoder_depth": 3, "decoder_channels": [64, 32, 16]}
# Chance level: a constant or random predictor over 19 balanced classes scores an mIoU of
# about 1/19 (5%) at best; blocky frames are learnable, so 40 steps get far above it
# (measured 43-60% over seeds 0-4).
LEARNING_STEPS, LEARNING_MIOU = 40, 0.30


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(cache, out, **changes):
    values = dict(cache=str(cache), out=str(out), loader="torch", arch="unet", encoder="resnet18",
                  encoder_weights="none", model_kwargs=TINY_UNET, res=128, batch_size=4,
                  workers=0, lr=0.1, jitter=False, seed=0, log_every=10)
    values.update(changes)
    return resolve_config(values)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("cache") / "blocky", n_train=24, n_val=2)


@pytest.fixture(scope="module")
def learned(cache, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "learn"
    config = tiny_config(cache, out, iters=LEARNING_STEPS, eval_every=LEARNING_STEPS)
    return config, run_training(config)


def test_the_loop_learns_far_above_chance(learned):
    config, result = learned
    assert result.step == LEARNING_STEPS
    assert result.best_miou > LEARNING_MIOU, f"val mIoU {result.best_miou:.3f} after {LEARNING_STEPS} steps"
    losses = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if r["event"] == "train"]
    assert losses[-1] < 0.6 * losses[0]


def test_run_dir_holds_config_metrics_checkpoints_and_plots(learned):
    config, result = learned
    run = result.run_dir
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == [10, 20, 30, 40]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 40 and evals[0]["miou"] == result.best_miou
    assert list(evals[0]["class_iou"])[:2] == ["road", "sidewalk"] and len(evals[0]["class_iou"]) == 19
    train_line = records[0]
    assert train_line["lr"] > 0 and train_line["images_per_s"] > 0 and train_line["epoch"] > 0
    saved = resolve_config({}, str(run / "config.yaml"))
    # config.yaml holds the resolved values: what was asked, and every default made explicit
    resolved = dict(weight_decay=1e-4, class_weights=None, amp=None, channels_last=False,
                    device="cpu", epochs=None, val_batch_size=1)   # auto: 1 on the CPU
    assert saved == replace(config, **resolved)
    import yaml

    written = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("lr", "weight_decay", "device", "workers", "encoder_weights", "amp",
                "class_weights", "channels_last", "eval_every", "cache"):
        assert written[key] is not None, key      # no null where a default was used
    assert (written["amp"], written["class_weights"], written["encoder_weights"]) == ("none",) * 3
    last = load_checkpoint(run / "last.pt")
    # 24 frames / batch 4 = 6 steps an epoch: after 40 steps, epoch 6 is 4 batches in
    assert last["progress"] == {"epoch": 6, "batch_in_epoch": 4, "step": 40, "evaluated_step": 40,
                                "best_miou": result.best_miou, "best_step": 40, "total_steps": 40}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "meta"} <= set(last)
    model, meta = load_for_eval(run / "best.pt")
    assert meta["arch"] == "unet" and meta["num_classes"] == 19 and meta["ignore_index"] == 255
    assert meta["class_names"][0] == "road" and meta["progress"]["step"] == 40
    for name in PLOT_NAMES:
        assert (run / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert not list(run.glob("*.tmp*"))


def test_refuses_to_overwrite_a_run_without_resume(learned):
    config, result = learned
    with pytest.raises(UserError, match="holds a run already.*--resume"):
        run_training(config)


def test_limit_caps_steps_per_epoch_and_validation_frames(tmp_path):
    cache = blocky_cache(tmp_path / "c", n_train=8, n_val=3, height=128, width=256)
    config = tiny_config(cache, tmp_path / "run", epochs=2, limit=1, batch_size=2, plots=False,
                         val_batch_size=2)
    result = run_training(config)
    assert result.step == 2 and result.epoch == 2
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2]           # one evaluation per epoch
    assert all(r["pixels"] == 128 * 256 for r in evals)   # one frame, not the batch of two
    assert not any((tmp_path / "run" / name).exists() for name in PLOT_NAMES)


def test_iters_stop_mid_epoch_with_grad_accum(tmp_path):
    cache = blocky_cache(tmp_path / "c", n_train=8, n_val=1, height=128, width=256)
    config = tiny_config(cache, tmp_path / "run", iters=3, batch_size=1, grad_accum=2,
                         plots=False, log_every=1)
    result = run_training(config)
    progress = load_checkpoint(tmp_path / "run" / "last.pt")["progress"]
    # 8 batches of 1 = 4 steps of 2 micro-batches an epoch; 3 steps = 6 batches into epoch 0
    assert (result.step, progress["epoch"], progress["batch_in_epoch"]) == (3, 0, 6)
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in lines if r["event"] == "train"] == [0.25, 0.5, 0.75]


def test_bf16_autocast_on_cpu_and_fp16_refused(cache, tmp_path):
    config = tiny_config(cache, tmp_path / "bf16", iters=2, amp="bf16", limit=1, plots=False,
                         log_every=1)
    run_training(config)
    losses = [r["loss"] for r in read_metrics(tmp_path / "bf16" / "metrics.jsonl") if r["event"] == "train"]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA device"):
        run_training(tiny_config(cache, tmp_path / "fp16", iters=2, amp="fp16"))


def test_class_weights_and_a_loss_sum_in_a_run(cache, tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"weights": {"enet": [1.0] * 18 + [5.0],
                                             "median_frequency": [1.0] * 19}}))
    config = tiny_config(cache, tmp_path / "w", iters=2, loss="ce+dice+focal", limit=1,
                         class_weights=f"{stats}:enet", plots=False, log_every=1)
    run_training(config)
    losses = [r["loss"] for r in read_metrics(tmp_path / "w" / "metrics.jsonl") if r["event"] == "train"]
    assert len(losses) == 2 and all(losses)
    with pytest.raises(UserError, match="no weights for method 'inverse'"):
        run_training(tiny_config(cache, tmp_path / "w2", iters=2, class_weights=f"{stats}:inverse"))


def test_smoke_on_a_built_synthetic_tree_with_dali_and_stats_weights(tmp_path):
    """The whole chain: dataprep synth + build + stats, then train on it with the DALI loader
    (CPU-only mode here) and the class weights of the real stats JSON."""
    pytest.importorskip("nvidia.dali")
    from click.testing import CliRunner

    from dataprep.cli import main as dataprep
    from training.cli import main as train_cli

    runner = CliRunner()
    raw, cache, out = tmp_path / "raw", tmp_path / "cache", tmp_path / "run"
    for args in (["synth", "--out", raw, "--frames", 6, "--height", 256, "--width", 512],
                 ["build", "--root", raw, "--out", cache, "--workers", 1],
                 ["stats", "--cache", cache]):
        done = runner.invoke(dataprep, [str(a) for a in args])
        assert done.exit_code == 0, done.output
    result = runner.invoke(train_cli, [str(a) for a in [
        "train", "--cache", cache, "--out", out, "--loader", "dali", "--arch", "unet",
        "--encoder", "resnet18", "--encoder-weights", "none", "--model-arg", "encoder_depth=3",
        "--model-arg", "decoder_channels=[16,8,8]", "--res", 128, "--batch-size", 2,
        "--iters", 2, "--limit", 1, "--log-every", 1, "--loss", "ce+dice",
        "--class-weights", f"{cache}/stats.json:median_frequency", "--workers", 1, "--no-plots"]])
    assert result.exit_code == 0, result.output
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]
    evals = [r for r in records if r["event"] == "eval"]
    assert evals and 0 < evals[-1]["pixels"] <= 256 * 512       # one frame, less its void


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_on_cuda(cache, tmp_path, amp):
    if amp == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 is refused below compute capability 8.0 (tests/test_precision.py)")
    config = tiny_config(cache, tmp_path / amp, iters=3, amp=amp, device="cuda", limit=3,
                         plots=False, log_every=1)
    result = run_training(config)
    losses = [r["loss"] for r in read_metrics(tmp_path / amp / "metrics.jsonl") if r["event"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    scaler = load_checkpoint(tmp_path / amp / "last.pt")["scaler"]
    assert ("scale" in scaler) == (amp == "fp16")
    assert next(result.model.parameters()).device.type == "cuda"


def test_resume_before_the_first_checkpoint_starts_over_and_drops_stale_lines(cache, tmp_path):
    from training.outputs.folder import write_marker

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 3, "loss": 9.0}\n')
    config = tiny_config(cache, run, iters=1, limit=1, plots=False, log_every=1)
    with pytest.raises(UserError, match="did not write"):      # not marked: not ours to replace
        run_training(config, resume=True)
    write_marker(run, "run", "train")      # a run killed before its first checkpoint left these
    result = run_training(config, resume=True)
    assert result.step == 1
    assert [(r["event"], r["step"]) for r in read_metrics(run / "metrics.jsonl")] == \
        [("train", 1), ("eval", 1)]


def test_benchmark_compares_loader_kinds_with_the_replay_ceiling(cache):
    from training.throughput import benchmark_training

    config = tiny_config(cache, "unused", batch_size=2)
    report = benchmark_training(config, ("replay", "torch"), iters=2, warmup=1, rounds=2)
    replay, torch_kind = report["results"]["replay"], report["results"]["torch"]
    assert replay["loader_cost"] == 0.0 and replay["loader_only_images_per_s"] is None
    assert len(torch_kind["samples"]) == 2 and torch_kind["images_per_s"] > 0
    assert torch_kind["loader_cost"] == pytest.approx(
        1 - torch_kind["images_per_s"] / replay["images_per_s"])
    assert torch_kind["loader_only_images_per_s"] > 0
    assert (report["device"], report["res"], report["batch_size"]) == ("cpu", [128, 128], 2)
    with pytest.raises(UserError, match="--loaders 'replay,png': choose from replay, torch, dali"):
        benchmark_training(config, ("replay", "png"))
    with pytest.raises(UserError, match="--iters: must be at least 1, got 0"):
        benchmark_training(config, ("replay",), iters=0)
