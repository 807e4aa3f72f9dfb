"""The workflows end to end on the synthetic set: `dataprep synth` + `dataprep build --coarse`,
then coarse -> fine with --init-from, and k folds by city with their summary."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from cache.reader import CacheReader
from training.train.checkpoint import load_checkpoint
from training.train.plots import read_metrics

TINY = ["--loader", "torch", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none",
        "--model-arg", "encoder_depth=3", "--model-arg", "decoder_channels=[16,8,8]",
        "--res", "128", "--batch-size", "2", "--workers", "0", "--no-plots", "--device", "cpu",
        "--log-every", "1", "--lr", "0.05"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def invoke(command, args: list[str]):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def add_coarse_split(tree: Path) -> None:
    """train_extra as the release has it (leftImg8bit/train_extra, gtCoarse/train_extra), made
    from the synthetic train frames: their polygons stand in for coarse ones."""
    for image in (tree / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"):
        city, stem = image.parent.name, image.name[: -len("_leftImg8bit.png")]
        extra_stem = stem.replace("_000", "_900", 1)        # other frame names, same city
        (tree / "leftImg8bit" / "train_extra" / city).mkdir(parents=True, exist_ok=True)
        (tree / "gtCoarse" / "train_extra" / city).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, tree / "leftImg8bit" / "train_extra" / city / f"{extra_stem}_leftImg8bit.png")
        shutil.copy(tree / "gtFine" / "train" / city / f"{stem}_gtFine_polygons.json",
                    tree / "gtCoarse" / "train_extra" / city / f"{extra_stem}_gtCoarse_polygons.json")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from dataprep.cli import main as dataprep

    root = tmp_path_factory.mktemp("workflows")
    invoke(dataprep, ["synth", "--out", root / "tree", "--frames", "10", "--height", "256",
                      "--width", "512"])
    add_coarse_split(root / "tree")
    invoke(dataprep, ["build", "--root", root / "tree", "--out", root / "cache.zarr", "--coarse",
                      "--workers", "1"])
    invoke(dataprep, ["stats", "--cache", root / "cache.zarr", "--split", "train_extra"])
    return root / "cache.zarr"


def test_coarse_then_fine_with_init_from(cache, tmp_path):
    from training.cli import train

    coarse, fine = tmp_path / "coarse", tmp_path / "fine"
    invoke(train, ["--cache", cache, "--out", coarse, "--train-split", "train_extra",
                   "--class-weights", "enet", "--iters", "2", *TINY])
    assert yaml.safe_load((coarse / "config.yaml").read_text())["train_split"] == "train_extra"
    phase_one = load_checkpoint(coarse / "best.pt")["model"]
    out = invoke(train, ["--cache", cache, "--out", fine, "--init-from", coarse / "best.pt",
                         "--iters", "3", *TINY]).output
    assert f"init-from {coarse / 'best.pt'}" in out and "(all)" in out
    saved = yaml.safe_load((fine / "config.yaml").read_text())
    assert saved["init_from"] == str(coarse / "best.pt") and saved["train_split"] == "train"
    last = load_checkpoint(fine / "last.pt")
    assert last["progress"]["step"] == 3 and last["scheduler"]["last_epoch"] == 3   # a new schedule
    first = [r for r in read_metrics(fine / "metrics.jsonl") if r["event"] == "train"][0]
    assert first["step"] == 1 and first["lr"] < 0.05                               # poly from 0.05
    assert not all(torch.equal(phase_one[k], v) for k, v in last["model"].items())  # it trained on
    # --resume continues from the run's own last.pt; the --init-from weights are not loaded again
    more = invoke(train, ["--out", fine, "--resume", "--iters", "4"]).output
    assert "init-from" not in more and "at step 3" in more
    assert load_checkpoint(fine / "last.pt")["progress"]["step"] == 4


def test_init_from_refuses_another_encoder(cache, tmp_path):
    from training.cli import train

    invoke(train, ["--cache", cache, "--out", tmp_path / "a", "--iters", "1", *TINY])
    result = CliRunner().invoke(train, [str(a) for a in ["--cache", cache, "--out", tmp_path / "b",
                                        "--init-from", tmp_path / "a" / "last.pt", "--iters", "1",
                                        *TINY, "--encoder", "resnet34"]])
    assert result.exit_code == 1 and "encoders must match" in result.output
    assert not (tmp_path / "b" / "last.pt").exists()


def test_two_folds_by_city_and_their_summary(cache, tmp_path):
    from training.cli import train
    from training.finished_runs import cv_summary

    runs = []
    for fold in (0, 1):
        runs.append(tmp_path / f"fold{fold}")
        shown = invoke(train, ["--cache", cache, "--out", runs[-1], "--folds", "2", "--fold", fold,
                               "--iters", "2", *TINY]).output
        assert f"fold {fold} of 2: validating on" in shown
    records = [json.loads((run / "fold.json").read_text()) for run in runs]
    val_cities = [set(r["val_cities"]) for r in records]
    assert val_cities[0] and val_cities[1] and not val_cities[0] & val_cities[1]
    assert all(f.split("/")[0] in val_cities[0] for f in records[0]["val_frames"])
    # validation ran on the fold's frames of the train split, whole: their labelled pixels
    reader = CacheReader(cache)
    rows = [reader.split("train").frames.index(name) for name in records[0]["val_frames"]]
    labelled = sum(int((reader.read_frame("train", row)[1] != 255).sum()) for row in rows)
    evals = [r for r in read_metrics(runs[0] / "metrics.jsonl") if r["event"] == "eval"]
    assert evals[-1]["pixels"] == labelled
    summary = cv_summary(runs)
    assert summary["k"] == 2 and [f["fold"] for f in summary["folds"]] == [0, 1]
    assert summary["miou_mean"] == pytest.approx((summary["folds"][0]["miou"] + summary["folds"][1]["miou"]) / 2)
