"""--init-from weights: all, all but the head for another label set, the encoder for another
architecture; another encoder is refused."""
from __future__ import annotations

import pytest
import torch

from cache.errors import UserError
from cache.format import CLASS_NAMES
from training.train.checkpoint import save_checkpoint
from training.train.init_from import load_initial_weights
from training.core.model import build_model

KW = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


def meta(arch="unet", encoder="resnet18", names=tuple(CLASS_NAMES)):
    return {"arch": arch, "encoder": encoder, "model_kwargs": KW if arch == "unet" else {},
            "num_classes": len(names), "class_names": list(names), "ignore_index": 255}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(1)
    model = build_model("unet", "resnet18", 19, None, **KW)
    path = tmp_path_factory.mktemp("init") / "best.pt"
    save_checkpoint(path, {"meta": meta(), "model": model.state_dict()})
    return path, model.state_dict()


def fresh(arch="unet", encoder="resnet18", classes=19):
    torch.manual_seed(2)
    kwargs = KW if arch == "unet" else {}
    return build_model(arch, encoder, classes, None, **kwargs)


def test_the_same_model_takes_every_tensor(source):
    path, saved = source
    model = fresh()
    line = load_initial_weights(model, path, meta())
    assert line.endswith("tensors taken (all)")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize("names", [CLASS_NAMES[:8], tuple(reversed(CLASS_NAMES))],
                         ids=["8 classes", "19 other names"])
def test_another_label_set_keeps_all_but_a_fresh_head(source, names):
    path, saved = source
    model = fresh(classes=len(names))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    line = load_initial_weights(model, path, meta(names=names))
    state = model.state_dict()
    for name, tensor in state.items():
        expected = before[name] if name.startswith("segmentation_head.") else saved[name]
        assert torch.equal(tensor, expected), name
    assert "segmentation_head start afresh" in line
    assert ("8 in this cache" in line) if len(names) == 8 else ("class names differ" in line)


def test_another_architecture_takes_the_encoder(source):
    path, saved = source
    model = fresh(arch="fpn")
    line = load_initial_weights(model, path, meta(arch="fpn"))
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in state if k.startswith("encoder."))
    assert "decoder" in line and "architecture unet -> fpn" in line


def test_another_encoder_is_refused(source):
    path, _ = source
    with pytest.raises(UserError, match="encoder 'resnet18'.*this run builds 'resnet34'"):
        load_initial_weights(fresh(encoder="resnet34"), path, meta(encoder="resnet34"))
    # resnet18's tensors are a subset of resnet34's by name and shape: refused all the same
    bigger = fresh(encoder="resnet34")
    bigger_path = path.with_name("r34.pt")
    save_checkpoint(bigger_path, {"meta": meta(encoder="resnet34"), "model": bigger.state_dict()})
    with pytest.raises(UserError, match="encoders must match"):
        load_initial_weights(fresh(), bigger_path, meta())
