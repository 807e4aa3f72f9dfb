"""The `train` and `evaluate` command lines: options, config files, errors, offline weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.cachefab import blocky_cache
from training import cli
from training.train.config import TrainConfig, resolve_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def captured(monkeypatch):
    """Replace run_training by a recorder: these tests are about what reaches it."""
    calls = []
    monkeypatch.setattr("training.train.run.run_training",
                        lambda config, resume=False: calls.append((config, resume)) or "ran")
    return calls


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_flags_override_the_config_file(tmp_path, captured):
    config_file = tmp_path / "exp.yaml"
    config_file.write_text(yaml.safe_dump({
        "cache": "/data/cs", "arch": "Unet", "encoder": "resnet18", "iters": 500, "lr": 0.02,
        "res": "512x1024", "scale": [0.75, 1.5], "loss": "ce+dice", "model-kwargs": {"encoder_depth": 4},
        "amp": "bf16", "eval_every": 100}))
    result = invoke("train", "--config", config_file, "--iters", 20, "--res", 256, "--amp", "none",
                    "--model-arg", "decoder_channels=[64,32,16,8]", "--no-jitter", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    config, resume = captured[0]
    assert not resume
    assert (config.cache, config.arch, config.encoder, config.lr, config.loss) == \
        ("/data/cs", "Unet", "resnet18", 0.02, "ce+dice")
    assert (config.iters, config.res, config.scale, config.amp, config.eval_every) == \
        (20, (256, 256), (0.75, 1.5), None, 100)
    assert config.model_kwargs == {"encoder_depth": 4, "decoder_channels": (64, 32, 16, 8)}
    assert config.jitter is False and config.epochs is None
    assert config.encoder_weights == "imagenet" and config.optimizer == "sgd"   # defaults


def test_json_config_and_resume_reads_the_saved_config(tmp_path, captured):
    run = tmp_path / "run"
    run.mkdir()
    from training.outputs.folder import write_marker
    write_marker(run, "run", "train")     # train's own folder, killed before its first checkpoint
    (run / "config.yaml").write_text(yaml.safe_dump(
        TrainConfig(cache="/c", out=str(run), iters=7, arch="fpn").to_dict()))
    extra = tmp_path / "more.json"
    extra.write_text(json.dumps({"iters": 9}))
    assert invoke("train", "--out", run, "--resume", "--config", extra).exit_code == 0
    config, resume = captured[0]
    assert resume and (config.cache, config.arch, config.iters) == ("/c", "fpn", 9)


def test_resume_of_a_run_dir_that_is_not_there(tmp_path, captured):
    missing = tmp_path / "typo"
    result = invoke("train", "--out", missing, "--resume")
    assert result.exit_code == 1 and not captured
    assert result.stderr == (f"error: --resume: no run to resume in --out {missing} (no "
                             "config.yaml or config.json); check --out, or give --cache to start it\n")
    # with the options to start it, --resume starts the run (a job script may always pass it)
    assert invoke("train", "--out", missing, "--resume", "--cache", "c").exit_code == 0
    assert captured[0][1] is True and captured[0][0].cache == "c"


@pytest.mark.parametrize("args, message", [
    (["--iters", "5"], "cityscapes.zarr: no cache there (the default"),
    (["--cache", "c", "--iters", "5", "--epochs", "2"], "give --epochs or --iters, not both"),
    (["--cache", "c", "--res", "big"], "--res: 'big' is not a size like 640 or 512x1024"),
    (["--cache", "c", "--scale", "2,1"], "--scale: '2,1' is not a range low,high"),
    (["--cache", "c", "--optimizer", "lamb"], "--optimizer: 'lamb' is not one of: sgd, adamw"),
    (["--cache", "c", "--loss", "ce+lovasz"], "--loss 'ce+lovasz'"),
    (["--cache", "c", "--batch-size", "0"], "--batch-size: '0' is not an integer >= 1"),
    (["--cache", "c", "--model-arg", "depth"], "--model-arg 'depth': expected KEY=VALUE"),
    (["--cache", "c", "--amp", "fp8"], "--amp: 'fp8' is not one of: auto, bf16, fp16, none"),
])
def test_bad_options_are_one_line_errors(args, message, captured, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # no ./cityscapes.zarr here
    monkeypatch.delenv("CITYSCAPES_CACHE", raising=False)
    result = invoke("train", *args)
    assert result.exit_code == 1 and not captured
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1


def test_bad_config_files(tmp_path, captured):
    typo = tmp_path / "typo.yaml"
    typo.write_text("cache: c\nlearning_rat: 0.1\n")
    result = invoke("train", "--config", typo)
    assert result.exit_code == 1 and "unknown option 'learning_rat'" in result.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = invoke("train", "--config", broken)
    assert result.exit_code == 1 and f"--config {broken}: cannot parse" in result.stderr
    result = invoke("train", "--config", tmp_path / "none.yaml")
    assert result.exit_code == 1 and "no such file" in result.stderr


def test_real_cli_run_saves_the_resolved_config(tmp_path):
    torch.set_num_threads(1)
    cache = blocky_cache(tmp_path / "c", n_train=4, n_val=1, height=64, width=128)
    config_file = tmp_path / "exp.json"
    config_file.write_text(json.dumps({"iters": 50, "arch": "unet", "encoder": "resnet18",
                                       "model_kwargs": {"encoder_depth": 3, "decoder_channels": [8, 8, 8]}}))
    out = tmp_path / "run"
    result = invoke("train", "--config", config_file, "--cache", cache, "--out", out, "--iters", 1,
                    "--loader", "torch", "--encoder-weights", "none", "--res", 64, "--batch-size", 2,
                    "--workers", 0, "--no-plots")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["iters"] == 1 and saved["res"] == [64, 64] and saved["encoder_weights"] == "none"
    assert saved["model_kwargs"] == {"encoder_depth": 3, "decoder_channels": [8, 8, 8]}
    assert resolve_config({}, str(out / "config.yaml")).iters == 1
    assert "val mIoU" in result.stderr


def test_imagenet_weights_offline_fail_with_the_cause_and_the_way_out(tmp_path):
    cache = blocky_cache(tmp_path / "c", n_train=2, n_val=1, height=64, width=64)
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(empty), "TORCH_HOME": str(empty),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", "train", "--cache", str(cache), "--out",
         str(tmp_path / "run"), "--loader", "torch", "--arch", "unet", "--encoder", "resnet18",
         "--encoder-weights", "imagenet", "--res", "64", "--batch-size", "1", "--iters", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith("error: --encoder-weights imagenet: cannot get the imagenet "
                                  "weights of encoder 'resnet18' (HF_HUB_OFFLINE is set")
    assert "--encoder-weights none" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()          # nothing written for a run that never began


def test_evaluate_passes_every_option(monkeypatch):
    calls = []
    monkeypatch.setattr("training.infer.evaluate.run_evaluate",
                        lambda *a, **k: calls.append((a, k)) or {"miou": 0.5})
    result = invoke("evaluate", "--checkpoint", "b.pt", "--cache", "c", "--split", "test",
                    "--loader", "dali", "--batch-size", 2, "--tta", "0.75,1.0,1.25", "--flip",
                    "--json", "s.json", "--export", "e", "--visualize", "v", "--device", "cpu",
                    "--limit", 3, "--eval-scale", 0.5, "--workers", 1, "--amp", "bf16")
    assert result.exit_code == 0, result.output
    (args, kwargs), = calls
    assert args == ("b.pt", "c", "test")
    assert kwargs == dict(loader="dali", batch_size=2, tta_scales=(0.75, 1.0, 1.25), tta_flip=True,
                          json_path="s.json", export_dir="e", visualize_dir="v", device="cpu",
                          limit=3, eval_scale=0.5, num_workers=1, amp="bf16")
    bad = invoke("evaluate", "--checkpoint", "b.pt", "--cache", "c", "--tta", "1,x")
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --tta '1,x'")
