"""Test-time augmentation (training/core/tta.py) and benchmark-format export (training/outputs/export.py)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cache.errors import UserError
from training.outputs.export import export_predictions, prepare_export_dir
from tests.labelmaps import labelid_to_trainid
from training.outputs.labels import LABELID_TO_TRAINID, TRAINID_TO_LABELID, colorize, trainid_to_labelid
from training.core.model import input_divisor
from training.core.tta import predict_logits


def tiny_unet():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.Unet(encoder_name="resnet18", encoder_weights=None, encoder_depth=3,
                    decoder_channels=(32, 16, 8), classes=19).eval()


class MirrorSymmetricNet(torch.nn.Module):
    """Convolutions whose kernels equal their own mirror image: f(flip x) == flip f(x)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 19, 3, padding=1)
        with torch.no_grad():
            for conv in (self.a, self.b):
                conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class StrideNet(torch.nn.Module):
    """Pointwise, so padding cannot change the pixels it covers; refuses sizes not divisible by 32."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.encoder = torch.nn.Module()
        self.encoder.output_stride = 32
        self.head = torch.nn.Conv2d(3, 19, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0
        return self.head(x)


def test_single_view_equals_forward_and_bilinear_upsample():
    model = tiny_unet()
    image = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        expected = F.interpolate(model(image), size=(128, 256), mode="bilinear", align_corners=False)
    out = predict_logits(model, image, (128, 256))
    assert out.shape == (2, 19, 128, 256) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)
    same_size = predict_logits(model, image, (64, 128))
    with torch.no_grad():
        assert torch.allclose(same_size, model(image), atol=1e-6)


def test_flip_on_a_mirror_symmetric_model_changes_nothing():
    model = MirrorSymmetricNet().eval()
    image = torch.randn(1, 3, 32, 48)
    plain = predict_logits(model, image, (32, 48))
    flipped = predict_logits(model, image, (32, 48), flip=True)
    assert torch.allclose(flipped.softmax(1), plain.softmax(1), atol=1e-6)
    assert torch.equal(flipped.argmax(1), plain.argmax(1))


def test_flip_and_scales_average_softmax_probabilities():
    model = tiny_unet()
    image = torch.randn(1, 3, 64, 96)
    out = predict_logits(model, image, (64, 96), scales=(0.5, 1.0), flip=True)
    with torch.no_grad():
        views = []
        for size in ((32, 48), (64, 96)):
            x = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True) \
                if size != (64, 96) else image
            for mirrored in (False, True):
                logits = model(x.flip(-1) if mirrored else x)
                logits = logits.flip(-1) if mirrored else logits
                views.append(F.interpolate(logits, size=(64, 96), mode="bilinear",
                                           align_corners=False).softmax(1))
    expected = torch.stack(views).mean(0)
    assert torch.allclose(out.softmax(1), expected, atol=1e-5)
    assert torch.allclose(out.exp().sum(1), torch.ones(1, 64, 96), atol=1e-5)
    assert not torch.allclose(out.softmax(1), views[2], atol=1e-3)   # differs from the plain view


def test_inputs_are_padded_to_the_model_stride_and_cropped_back():
    model = StrideNet().eval()
    image = torch.randn(1, 3, 100, 140)
    out = predict_logits(model, image, (100, 140), scales=(1.0, 0.5))
    assert model.seen == [(128, 160), (64, 96)]
    assert out.shape == (1, 19, 100, 140)
    with torch.no_grad():       # pointwise model: the padded run equals an unpadded one
        direct = model.head(image)
    single = predict_logits(model, image, (100, 140))
    assert torch.allclose(single, direct, atol=1e-6)
    assert input_divisor(model) == 32 and input_divisor(tiny_unet()) == 8
    assert input_divisor(MirrorSymmetricNet()) == 1


def test_models_that_demand_divisible_input_work_on_any_size():
    import segmentation_models_pytorch as smp

    model = smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=19).eval()
    out = predict_logits(model, torch.randn(1, 3, 100, 140), (200, 280), flip=True)
    assert out.shape == (1, 19, 200, 280) and torch.isfinite(out).all()


def test_bad_scales_are_refused():
    with pytest.raises(ValueError, match="scales"):
        predict_logits(MirrorSymmetricNet(), torch.randn(1, 3, 8, 8), (8, 8), scales=())
    with pytest.raises(ValueError, match="scales"):
        predict_logits(MirrorSymmetricNet(), torch.randn(1, 3, 8, 8), (8, 8), scales=(1.0, 0.0))


# -- export -------------------------------------------------------------------------------------

def test_luts_agree_with_cityscapesscripts():
    from cityscapesscripts.helpers.labels import id2label, trainId2label

    for train_id in range(19):
        label = trainId2label[train_id]
        assert TRAINID_TO_LABELID[train_id] == label.id
        assert LABELID_TO_TRAINID[label.id] == train_id
        assert tuple(colorize(np.array([train_id]))[0]) == label.color
    assert TRAINID_TO_LABELID[255] == 0 and id2label[0].ignoreInEval
    for label_id, label in id2label.items():
        if label_id >= 0 and label.ignoreInEval:
            assert LABELID_TO_TRAINID[label_id] == 255, label.name
    assert tuple(colorize(np.array([255]))[0]) == (0, 0, 0)


def test_export_writes_official_names_and_values_that_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    preds = rng.integers(0, 19, size=(3, 64, 128))
    preds[0, :4, :4] = 255
    names = ["frankfurt/frankfurt_000000_000294", "frankfurt/frankfurt_000001_000019",
             "bad-honnef/bad-honnef_000000_000000"]
    written = export_predictions(torch.from_numpy(preds), names, tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["bad-honnef/bad-honnef_000000_000000_labelIds.png",
                     "frankfurt/frankfurt_000000_000294_labelIds.png",
                     "frankfurt/frankfurt_000001_000019_labelIds.png"]
    assert sorted(written) == sorted(tmp_path / f for f in files)
    for pred, path in zip(preds, written):
        image = Image.open(path)
        assert image.mode == "L" and image.size == (128, 64)
        label_ids = np.asarray(image)
        assert np.array_equal(labelid_to_trainid(label_ids), np.where(pred == 255, 255, pred))
        assert set(np.unique(label_ids)) <= {0, 7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25,
                                             26, 27, 28, 31, 32, 33}
    assert (np.asarray(Image.open(written[0]))[:4, :4] == 0).all()
    assert np.array_equal(trainid_to_labelid(np.array([0, 13, 18, 255, 19])), [7, 26, 33, 0, 0])


def test_official_script_finds_each_exported_prediction(tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    names = ["lindau/lindau_000000_000019", "lindau/lindau_000001_000019"]
    written = export_predictions(np.zeros((2, 8, 16), dtype=np.uint8), names, tmp_path / "results")
    args = copy.copy(official.args)
    args.predictionPath, args.predictionWalk = str(tmp_path / "results"), None
    for name, path in zip(names, written):
        gt = f"/anywhere/gtFine/val/lindau/{name.split('/')[1]}_gtFine_labelIds.png"
        assert official.getPrediction(args, gt) == str(path)


@pytest.mark.parametrize("name", ["frankfurt_000000_000294", "a/b_000000_000001",
                                  "my_city/my_city_000000_000001", "a/a_00000x_000001"])
def test_names_the_benchmark_cannot_parse_are_refused(tmp_path, name):
    with pytest.raises(UserError, match="frame name"):
        export_predictions(np.zeros((1, 4, 4), dtype=np.uint8), [name], tmp_path)


def test_prepare_export_dir_wants_a_new_or_empty_directory(tmp_path):
    assert prepare_export_dir(tmp_path / "new" / "deep").is_dir()
    (tmp_path / "empty").mkdir()
    assert prepare_export_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        prepare_export_dir(tmp_path / "full")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        prepare_export_dir(tmp_path / "file")
