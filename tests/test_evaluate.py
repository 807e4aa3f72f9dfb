"""run_evaluate end to end on a small cache with a tiny checkpoint (torch loader, CPU)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from cache.format import CLASS_NAMES
from cache.errors import UserError
from tests.cachefab import blocky_cache, blocky_frame, write_cache
from training.infer.evaluate import run_evaluate
from tests.labelmaps import labelid_to_trainid
from training.outputs.labels import trainid_to_labelid

TINY_KWARGS = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
H, W = 128, 256             # small frames: the tiny model dominates the run time
FAST = dict(loader="torch", device="cpu", num_workers=0, latency_runs=1)


def tiny_checkpoint(path: Path, **meta_changes) -> Path:
    from training.train.checkpoint import save_checkpoint
    from training.core.model import build_model

    torch.manual_seed(0)
    model = build_model("unet", "resnet18", 19, None, **TINY_KWARGS)
    with torch.no_grad():      # spread the classes so that the prediction is not one colour
        model.segmentation_head[0].bias.copy_(torch.linspace(-0.5, 0.5, 19))
    meta = {"arch": "unet", "encoder": "resnet18", "model_kwargs": TINY_KWARGS, "num_classes": 19,
            "class_names": list(CLASS_NAMES), "ignore_index": 255, "res": [128, 128],
            "eval_scale": 1.0}
    meta.update(meta_changes)
    return save_checkpoint(path, {"meta": meta, "model": model.state_dict()})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cache = blocky_cache(root / "cache", n_train=1, n_val=3, height=H, width=W)
    return root, cache, tiny_checkpoint(root / "best.pt")


@pytest.fixture(scope="module")
def full_run(setup):
    root, cache, ckpt = setup
    out = root / "full"
    console = Console(record=True, width=100)
    result = run_evaluate(ckpt, cache, "val", json_path=out / "scores.json",
                          export_dir=out / "export", visualize_dir=out / "vis", console=console,
                          **FAST)
    (out / "console.txt").write_text(console.export_text())
    return out, result


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def test_result_and_json_hold_the_agreed_keys(setup, full_run):
    _, cache, ckpt = setup
    out, result = full_run
    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for key in ("miou", "class_iou", "pixel_accuracy", "category_iou", "category_miou",
                "latency_ms", "split", "frames", "checkpoint", "confusion"):
        assert key in on_disk, key
    assert on_disk["split"] == "val" and on_disk["frames"] == 3
    assert on_disk["checkpoint"] == str(ckpt)
    assert list(on_disk["class_iou"]) == list(CLASS_NAMES)
    assert on_disk["latency_ms"] > 0 and on_disk["input_hw"] == [H, W]
    assert on_disk["pixels"] == 3 * H * W          # blocky masks have no ignore pixels
    assert 0 < on_disk["miou"] < 1


def test_the_printed_table_shows_every_class_and_the_mean(full_run):
    out, result = full_run
    text = (out / "console.txt").read_text()
    for name in CLASS_NAMES:
        assert name in text
    assert f"{100 * result['miou']:.2f}" in text and "flat" in text and "latency" in text


def test_export_holds_one_png_per_frame_and_nothing_else(setup, full_run):
    _, cache, _ = setup
    out, _ = full_run
    assert files_under(out / "export") == ["city0/city0_000000_000019_labelIds.png",
                                           "city0/city0_000002_000019_labelIds.png",
                                           "city1/city1_000001_000019_labelIds.png"]
    pictures = [name for name in files_under(out / "vis") if name != ".cityscapes-output"]
    assert len(pictures) == 6           # colour + overlay per frame, and the folder's marker
    assert pictures[:2] == ["city0/city0_000000_000019_color.png",
                            "city0/city0_000000_000019_overlay.png"]


def test_scores_equal_the_official_script_on_the_exported_pngs(setup, full_run):
    """The whole chain: cache GT as labelIds + our exported PNGs -> cityscapesscripts."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    from cache.reader import CacheReader

    root, cache, _ = setup
    out, result = full_run
    reader = CacheReader(cache)
    info = reader.split("val")
    gt_files, pred_files = [], []
    for row, frame in enumerate(info.frames):
        _, mask = reader.read_frame("val", row)
        city, stem = frame.split("/")
        gt = root / "gtFine" / city / f"{stem}_gtFine_labelIds.png"
        gt.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(trainid_to_labelid(mask)).save(gt)
        gt_files.append(str(gt))
        pred_files.append(str(out / "export" / city / f"{stem}_labelIds.png"))
    args = copy.copy(official.args)
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    theirs = official.evaluateImgLists(pred_files, gt_files, args)
    assert result["miou"] == pytest.approx(theirs["averageScoreClasses"], rel=1e-12)
    assert result["category_miou"] == pytest.approx(theirs["averageScoreCategories"], rel=1e-12)
    for name, iou in result["class_iou"].items():
        official_iou = theirs["classScores"][name]
        assert (iou is None) == np.isnan(official_iou), name
        if iou is not None:
            assert iou == pytest.approx(official_iou, rel=1e-12), name


def test_exported_prediction_is_the_models_argmax_on_the_frame(setup, full_run):
    from loaders.contract import MEAN, STD
    from training.train.checkpoint import load_for_eval

    _, cache, ckpt = setup
    out, _ = full_run
    image, _ = blocky_frame(H, W, seed=1000)          # val row 0: city0_000000
    x = (torch.from_numpy(image).permute(2, 0, 1).float()[None] - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    model, _ = load_for_eval(ckpt, "cpu")
    with torch.no_grad():
        expected = model(x).argmax(1)[0].numpy()
    exported = np.asarray(Image.open(out / "export" / "city0" / "city0_000000_000019_labelIds.png"))
    agree = (labelid_to_trainid(exported) == expected).mean()
    assert agree > 0.999          # bit-for-bit up to float ties
    assert len(np.unique(expected)) > 1


def test_dali_loader_gives_the_same_scores(setup, full_run):
    pytest.importorskip("nvidia.dali")
    _, cache, ckpt = setup
    _, torch_run = full_run
    dali_run = run_evaluate(ckpt, cache, "val", **{**FAST, "loader": "dali", "num_workers": 1})
    assert dali_run["loader"] == "dali" and dali_run["frames"] == 3
    assert dali_run["confusion"] == torch_run["confusion"]      # same pixels in, same out


def test_limit_tta_and_eval_scale(setup):
    root, cache, ckpt = setup
    out = root / "small"
    result = run_evaluate(ckpt, cache, "val", limit=2, eval_scale=0.5, tta_scales=(0.75, 1.0),
                          tta_flip=True, export_dir=out, batch_size=3, **FAST)   # a batch cut short
    assert result["frames"] == 2 and result["input_hw"] == [H // 2, W // 2]
    assert result["tta_scales"] == [0.75, 1.0] and result["tta_flip"] is True
    assert result["latency_tta_ms"] > 0
    assert result["pixels"] == 2 * H * W            # scored at the stored resolution
    pngs = files_under(out)
    assert len(pngs) == 2
    assert Image.open(out / pngs[0]).size == (W, H)


def test_split_without_masks_is_only_exported(tmp_path, setup):
    _, _, ckpt = setup
    images = np.stack([blocky_frame(H, W, seed=s)[0] for s in range(2)])
    cache = write_cache(tmp_path / "cache", {
        "test": (images, None, ["berlin/berlin_000000_000019", "bonn/bonn_000000_000019"])})
    with pytest.raises(UserError, match="no masks.*--export"):
        run_evaluate(ckpt, cache, "test", **FAST)
    result = run_evaluate(ckpt, cache, "test", export_dir=tmp_path / "export",
                          json_path=tmp_path / "test.json", **FAST)
    assert result["miou"] is None and result["class_iou"] == {} and result["frames"] == 2
    assert result["has_masks"] is False
    assert files_under(tmp_path / "export") == ["berlin/berlin_000000_000019_labelIds.png",
                                                "bonn/bonn_000000_000019_labelIds.png"]
    assert json.loads((tmp_path / "test.json").read_text())["miou"] is None


def test_user_mistakes_are_refused_before_any_work(tmp_path, setup):
    _, cache, ckpt = setup
    with pytest.raises(UserError, match="no such checkpoint"):
        run_evaluate(tmp_path / "missing.pt", cache, **FAST)
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.png").write_bytes(b"x")
    with pytest.raises(UserError, match="--export .*not empty"):
        run_evaluate(ckpt, cache, export_dir=full, visualize_dir=tmp_path / "vis", **FAST)
    assert not (tmp_path / "vis").exists() and files_under(full) == ["old.png"]
    with pytest.raises(UserError, match="--json .*directory"):
        run_evaluate(ckpt, cache, json_path=tmp_path, **FAST)
    with pytest.raises(UserError, match="--limit"):
        run_evaluate(ckpt, cache, limit=0, **FAST)
    with pytest.raises(UserError, match="eval scale"):
        run_evaluate(ckpt, cache, eval_scale=0.0, **FAST)
    with pytest.raises(UserError, match="no split 'nope'"):
        run_evaluate(ckpt, cache, "nope", **FAST)
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA device"):
        run_evaluate(ckpt, cache, amp="fp16", **FAST)
    with pytest.raises(UserError, match=r"--tta: need one or more positive scales, got \(0.0, 1.0\)"):
        run_evaluate(ckpt, cache, tta_scales=(0, 1), **FAST)


def test_frame_names_the_benchmark_cannot_use_are_refused_before_export(tmp_path, setup):
    _, _, ckpt = setup
    image, mask = blocky_frame(H, W, seed=0)
    cache = write_cache(tmp_path / "cache", {"val": (image[None], mask[None], ["a/b_1_2"])})
    with pytest.raises(UserError, match="frame name 'a/b_1_2'"):
        run_evaluate(ckpt, cache, export_dir=tmp_path / "export", **FAST)
    assert not (tmp_path / "export").exists()
    assert run_evaluate(ckpt, cache, **FAST)["frames"] == 1        # scoring alone needs no names


def test_checkpoint_for_another_label_set_is_refused(tmp_path, setup):
    _, cache, _ = setup
    renamed = list(CLASS_NAMES)
    renamed[0], renamed[1] = renamed[1], renamed[0]
    with pytest.raises(UserError, match="class names"):
        run_evaluate(tiny_checkpoint(tmp_path / "swapped.pt", class_names=renamed), cache, **FAST)
    with pytest.raises(UserError, match="ignore index"):
        run_evaluate(tiny_checkpoint(tmp_path / "ign.pt", ignore_index=0), cache, **FAST)


def test_cuda_device_without_cuda_is_refused(setup):
    _, cache, ckpt = setup
    with pytest.raises(UserError, match="--device cuda"):
        run_evaluate(ckpt, cache, **{**FAST, "device": "cuda"})


def test_cli_reports_a_user_error_in_one_line(tmp_path, setup):
    from click.testing import CliRunner

    from training.cli import evaluate

    _, cache, ckpt = setup
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    run = CliRunner().invoke(evaluate, ["--checkpoint", str(ckpt), "--cache", str(cache),
                                        "--export", str(full), "--device", "cpu"])
    assert run.exit_code == 1
    assert run.output.strip().startswith("error: --export") and "Traceback" not in run.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_scores_equal_cpu_scores(setup, full_run):
    _, cache, ckpt = setup
    _, cpu = full_run
    gpu = run_evaluate(ckpt, cache, "val", loader="torch", device="cuda", num_workers=0,
                       latency_runs=5)
    assert gpu["device"].startswith("cuda") and gpu["latency_ms"] > 0
    assert gpu["miou"] == pytest.approx(cpu["miou"], abs=2e-3)
