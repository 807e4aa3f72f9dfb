"""What a new user met on a first day (issue 9): resumes from another folder and with --iters,
model-argument typos, the loader evaluate picks, the hint for too few frames."""
from __future__ import annotations

import pytest
import yaml

from cache.errors import UserError
from tests.cachefab import blocky_cache
from tests.test_train import TINY_UNET
from training.train.config import resolve_config
from training.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("first") / "c.zarr", n_train=6, n_val=1,
                        height=64, width=128, tile=64)


def test_resume_from_another_folder_with_iters(cache, tmp_path, monkeypatch):
    from dataprep.stats import compute_stats, write_stats

    write_stats(compute_stats(cache, "train"), cache)
    monkeypatch.chdir(cache.parent)                # relative paths, as a user types them
    flags = dict(cache=cache.name, out=str(tmp_path / "run"), loader="torch", arch="unet",
                 encoder="resnet18", encoder_weights="none", model_kwargs=TINY_UNET, res=64,
                 batch_size=2, workers=0, epochs=1, plots=False, log_every=1)
    run_training(resolve_config(flags))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["cache"] == str(cache.absolute())
    assert saved["class_weights"] == f"{cache.absolute() / 'stats.json'}:enet"
    assert saved["workers"] == 0 and saved["epochs"] == 1         # as asked
    assert resolve_config({"cache": "c"}).to_dict()["workers"] == "auto"  # per machine
    assert "# on this machine: cpu" in (tmp_path / "run" / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path)                    # elsewhere: the saved paths still hold
    extended = resolve_config({"out": str(tmp_path / "run"), "iters": 5}, resume=True)
    assert (extended.iters, extended.epochs) == (5, None)
    result = run_training(extended, resume=True)
    assert result.step == 5


def test_a_model_argument_typo_is_refused(cache, tmp_path):
    config = resolve_config(dict(cache=str(cache), out=str(tmp_path / "r"), arch="unet",
                                 encoder="resnet18", encoder_weights="none", res=64,
                                 model_kwargs={"encoder_dept": 3}, workers=0, loader="torch",
                                 batch_size=2))
    with pytest.raises(UserError, match="--model-arg encoder_dept: Unet has no such argument "
                                        r"\(did you mean encoder_depth\?\)"):
        run_training(config)


def test_evaluate_uses_the_loader_the_run_validated_with(monkeypatch):
    from training.infer.evaluate import evaluation_loader

    assert evaluation_loader({"loader": "torch"}) == "torch"
    assert evaluation_loader({}) == "torch"
    pytest.importorskip("nvidia.dali")
    assert evaluation_loader({"loader": "dali"}) == "dali"


def test_too_few_frames_names_the_batch_size_that_fits(cache):
    from loaders.contract import AugmentConfig
    from loaders.factory import build_loader

    with pytest.raises(UserError, match="use --batch-size 6 or less"):
        build_loader(cache, "train", "torch", train=True, batch_size=8,
                     aug=AugmentConfig(crop=(64, 64)))


def test_a_rank_sees_only_its_own_gpu(monkeypatch):
    import torch

    from training.core.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)   # per-task CUDA_VISIBLE_DEVICES
    assert resolve_device("cuda", local_rank=3, under_torchrun=True) == torch.device("cuda", 0)
