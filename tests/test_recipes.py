"""configs/*.yaml: each names the mIoU it aims at with its source, and trains (smoke run: one
step at 64 px with no pretrained weights) through `train --config`, on CPU."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from tests.cachefab import blocky_frame, write_cache
from training.train.checkpoint import load_checkpoint
from training.train.config import read_config_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
PHASE_ONE, PHASE_TWO = "deeplabv3plus_r101_coarse.yaml", "deeplabv3plus_r101_fine.yaml"  # chained below
AIMS_AT = re.compile(r"^# Aims at[^:]*: (\d+(?:\.\d+)?) % (?:val|test-set) mIoU", re.M)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """train, val and train_extra splits of 64x128 blocky frames in two cities, with stats.json."""
    from dataprep.stats import compute_stats, write_stats

    splits = {}
    for split, n, base in (("train", 4, 0), ("val", 1, 100), ("train_extra", 4, 200)):
        pairs = [blocky_frame(64, 128, seed=base + i, block=16) for i in range(n)]
        frames = sorted(f"city{i % 2}/city{i % 2}_{base + i:06d}_000019" for i in range(n))
        splits[split] = (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), frames)
    path = write_cache(tmp_path_factory.mktemp("recipes") / "cache", splits, tile=64)
    write_stats(compute_stats(path, "train"), path)
    return path


def smoke_args(recipe: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    length = ["--iters", "1"] if "iters" in read_config_file(recipe) else ["--epochs", "1"]
    return ["--config", str(recipe), "--cache", str(cache), "--out", str(out), "--limit", "1",
            *length, "--encoder-weights", "none", "--res", "64", "--batch-size", "2",
            "--amp", "none", "--loader", "torch", "--workers", "0", "--warmup", "0",
            "--no-plots", "--device", "cpu", *extra]


def train(args: list[str]):
    from training.cli import train as train_command

    return CliRunner().invoke(train_command, args, catch_exceptions=False)


def test_there_are_the_five_recipes_and_each_names_its_target():
    names = {p.name for p in RECIPES}
    assert len(names) == 6, names                         # coarse->fine is two phases
    for recipe in RECIPES:
        text = recipe.read_text()
        aim = AIMS_AT.search(text) or (recipe.name == PHASE_TWO and re.search(r"aims at (\d+\.\d+) %", text))
        assert aim, f"{recipe.name} does not say which mIoU it aims at"
        assert re.search(r"mmsegmentation|ECCV|Chen et al", text), f"{recipe.name} names no source"
        assert "train --config configs/" + recipe.name in text.replace("\\\n", "")
        yaml.safe_load(text)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name not in (PHASE_ONE, PHASE_TWO)],
                         ids=lambda r: r.stem)
def test_recipe_trains_a_smoke_step(recipe, cache, tmp_path):
    out = tmp_path / recipe.stem
    result = train(smoke_args(recipe, cache, out))
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    wanted = read_config_file(recipe)
    for key in ("arch", "encoder", "loss", "optimizer", "schedule", "train_split", "model_kwargs"):
        if key in wanted:
            assert str(saved[key]).lower() == str(wanted[key]).lower(), key
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 1


def test_coarse_then_fine_recipes_chain_through_init_from(cache, tmp_path):
    configs = REPO / "configs"
    coarse = tmp_path / "coarse"
    first = train(smoke_args(configs / PHASE_ONE, cache, coarse))
    assert first.exit_code == 0, first.output
    fine = tmp_path / "fine"
    result = train(smoke_args(configs / PHASE_TWO, cache, fine, "--init-from", str(coarse / "best.pt")))
    assert result.exit_code == 0, result.output
    assert "tensors taken (all)" in result.output
    saved = yaml.safe_load((fine / "config.yaml").read_text())
    assert saved["init_from"] == str(coarse / "best.pt") and saved["train_split"] == "train"
    coarse_saved = yaml.safe_load((coarse / "config.yaml").read_text())
    assert coarse_saved["train_split"] == "train_extra"
    assert coarse_saved["class_weights"] == f"{cache / 'stats.json'}:enet"
