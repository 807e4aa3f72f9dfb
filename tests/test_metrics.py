"""ConfusionMatrix scores equal cityscapesscripts' official pixel-level evaluation."""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cache.format import CLASS_NAMES
from training.outputs.export import export_predictions
from training.core.metrics import ConfusionMatrix

H, W = 256, 512
TRAIN, BUS, MOTORCYCLE = 16, 15, 17          # trainIds the fixtures keep absent on purpose


def nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def official_labelid_to_trainid() -> np.ndarray:
    """Built here from cityscapesscripts itself, independently of training.outputs.export."""
    from cityscapesscripts.helpers.labels import labels

    lut = np.full(256, 255, dtype=np.uint8)
    for label in labels:
        if label.id >= 0 and not label.ignoreInEval:
            lut[label.id] = label.trainId
    return lut


def random_frames(seed: int, n: int = 4):
    """GT labelIds (all 34 ids, incl. ignored ones; 'train' and 'bus' never, 'motorcycle' only
    in frame 0) and trainId predictions (60 % right, some 255 "void", 'bus' predicted, 'train'
    and 'motorcycle' never)."""
    rng = np.random.default_rng(seed)
    ids = [i for i in range(34) if i not in (28, 31)]            # labelIds of bus, train
    gts, preds = [], []
    to_train = official_labelid_to_trainid()
    for f in range(n):
        frame_ids = ids if f == 0 else [i for i in ids if i != 32]   # motorcycle only in frame 0
        blocks = rng.choice(frame_ids, size=(H // 16, W // 16))
        gt = np.kron(blocks, np.ones((16, 16), dtype=np.int64)).astype(np.uint8)
        gt_train = to_train[gt].astype(np.int64)
        guess = rng.choice([c for c in range(19) if c not in (TRAIN, MOTORCYCLE)], size=gt.shape)
        keep = (rng.random(gt.shape) < 0.6) & (gt_train != 255) & (gt_train != MOTORCYCLE)
        pred = np.where(keep, gt_train, guess)
        pred[rng.random(gt.shape) < 0.03] = 255
        gts.append(gt)
        preds.append(pred.astype(np.uint8))
    return gts, preds


def run_official(gt_files, pred_files) -> dict:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = copy.copy(official.args)
    args.evalInstLevelScore = False        # needs instanceIds PNGs; not what we compare
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    return official.evaluateImgLists([str(p) for p in pred_files], [str(g) for g in gt_files], args)


@pytest.fixture(scope="module")
def official_and_ours(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    gts, preds = random_frames(seed=7)
    names = [f"{city}/{city}_{i:06d}_000019" for i, city in
             enumerate(["frankfurt", "frankfurt", "lindau", "munster"])]
    gt_files = []
    for gt, name in zip(gts, names):
        path = root / "gtFine" / f"{name}_gtFine_labelIds.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gt).save(path)
        gt_files.append(path)
    pred_files = export_predictions(np.stack(preds), names, root / "results")
    official = run_official(gt_files, pred_files)

    cm = ConfusionMatrix(19, 255)
    to_train = official_labelid_to_trainid()
    for gt, pred in zip(gts, preds):
        target = torch.from_numpy(to_train[gt].astype(np.int64))[None]
        cm.update(torch.from_numpy(pred.astype(np.int64))[None], target)
    return official, cm.compute(CLASS_NAMES), gts, preds


def test_class_iou_equals_official(official_and_ours):
    official, ours, _, _ = official_and_ours
    for name in CLASS_NAMES:
        theirs = nan_to_none(official["classScores"][name])
        if theirs is None:
            assert ours["class_iou"][name] is None, name
        else:
            assert ours["class_iou"][name] == pytest.approx(theirs, rel=1e-12, abs=1e-15), name
    # the fixture really exercises the corner cases
    assert ours["class_iou"]["train"] is None                    # no GT, no prediction: NaN there
    assert ours["class_iou"]["bus"] == 0.0                       # predicted, never in GT
    assert ours["class_iou"]["motorcycle"] == 0.0                # in GT, never predicted
    assert 0.2 < ours["class_iou"]["road"] < 0.9


def test_miou_and_categories_equal_official(official_and_ours):
    official, ours, _, _ = official_and_ours
    assert ours["miou"] == pytest.approx(official["averageScoreClasses"], rel=1e-12)
    for category, score in official["categoryScores"].items():
        if category == "void":          # every label of it is ignored: NaN, no key for us
            assert math.isnan(score) and category not in ours["category_iou"]
        else:
            assert ours["category_iou"][category] == pytest.approx(score, rel=1e-12), category
    assert ours["category_miou"] == pytest.approx(official["averageScoreCategories"], rel=1e-12)
    assert len(ours["category_iou"]) == 7


def test_confusion_equals_official_matrix_on_evaluated_labels(official_and_ours):
    from cityscapesscripts.helpers.labels import trainId2label

    official, ours, gts, preds = official_and_ours
    matrix = np.array(official["confMatrix"], dtype=np.int64)
    label_ids = [trainId2label[t].id for t in range(19)]
    assert np.array_equal(np.array(ours["confusion"]), matrix[np.ix_(label_ids, label_ids)])
    # void predictions are exported as labelId 0 "unlabeled": column 0 of the official matrix
    assert ours["void_predictions"] == matrix[label_ids, 0].tolist()
    assert sum(ours["void_predictions"]) > 0


def test_pixel_accuracy_counts_only_evaluated_pixels(official_and_ours):
    _, ours, gts, preds = official_and_ours
    to_train = official_labelid_to_trainid()
    valid = correct = 0
    for gt, pred in zip(gts, preds):
        target = to_train[gt]
        valid += int((target != 255).sum())
        correct += int(((target == pred) & (target != 255)).sum())
    assert ours["pixels"] == valid
    assert ours["pixel_accuracy"] == pytest.approx(correct / valid, rel=1e-12)


def test_hand_example_ignore_and_absent_classes():
    target = torch.tensor([[[0, 0, 1, 255],
                            [2, 2, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1, 0],          # the 0 over ignore counts nowhere
                          [2, 0, 255, 3]]])      # 255: a miss for class 2, no one's false positive
    cm = ConfusionMatrix(num_classes=5, ignore_index=255)
    cm.update(pred, target)
    names = ["road", "sidewalk", "building", "wall", "fence"]
    out = cm.compute(names)
    # road: tp 1, fp 1 (a 2 predicted 0), fn 1 -> 1/3; sidewalk: tp 1, fp 1 -> 1/2
    # building: tp 1, fn 2 (one as 0, one void) -> 1/3; wall: predicted only over ignore -> None
    assert out["class_iou"] == pytest.approx({"road": 1 / 3, "sidewalk": 1 / 2, "building": 1 / 3,
                                              "wall": None, "fence": None})
    assert out["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert out["pixels"] == 6
    assert out["pixel_accuracy"] == pytest.approx(3 / 6)
    assert out["void_predictions"] == [0, 0, 1, 0, 0]
    # road + sidewalk are "flat": tp 3, fn 0 ... the 2 predicted 0 is a false positive
    assert out["category_iou"]["flat"] == pytest.approx(3 / 4)
    assert out["category_iou"]["construction"] == pytest.approx(1 / 3)


def test_updates_accumulate_and_reset_clears():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.integers(0, 19, (2, 32, 32)))
    pred = torch.from_numpy(rng.integers(0, 19, (2, 32, 32)))
    once, twice = ConfusionMatrix(), ConfusionMatrix()
    once.update(pred, target)
    twice.update(pred[:1], target[:1])
    twice.update(pred[1:], target[1:])
    assert torch.equal(once.matrix(), twice.matrix())
    assert once.matrix().sum() == 2 * 32 * 32
    # brute force per class
    for c in range(19):
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        assert once.compute(CLASS_NAMES)["class_iou"][CLASS_NAMES[c]] == pytest.approx(tp / (tp + fp + fn))
    once.reset()
    empty = once.compute(CLASS_NAMES)
    assert empty["miou"] is None and empty["pixel_accuracy"] is None and empty["pixels"] == 0
    assert all(v is None for v in empty["class_iou"].values())


def test_wrong_shapes_and_names_are_refused():
    cm = ConfusionMatrix()
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="class names"):
        cm.compute(["road"])


def test_names_outside_cityscapes_have_no_categories():
    cm = ConfusionMatrix(num_classes=2)
    cm.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    out = cm.compute(["cat", "dog"])
    assert out["category_iou"] == {} and out["category_miou"] is None
    assert out["class_iou"] == pytest.approx({"cat": 0.5, "dog": 0.0})


def _reduce_worker(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cm = ConfusionMatrix(num_classes=3)
    if rank == 0:                       # rank 1 saw no frame at all
        cm.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 1]]]))
    cm.all_reduce()
    results[rank] = cm.matrix().tolist()
    dist.destroy_process_group()


def test_all_reduce_sums_over_ranks_including_an_empty_one(tmp_path):
    import torch.multiprocessing as mp

    cm = ConfusionMatrix(num_classes=3)
    cm.all_reduce()                       # no process group: a no-op
    assert cm.counts is None
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_reduce_worker, args=(2, os.fspath(tmp_path / "init"), results), nprocs=2)
        expected = [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
        assert results[0] == expected and results[1] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_counts_equal_cpu_counts():
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.integers(0, 20, (2, 64, 64)))
    target[target == 19] = 255
    pred = torch.from_numpy(rng.integers(0, 19, (2, 64, 64)))
    cpu, gpu = ConfusionMatrix(), ConfusionMatrix()
    cpu.update(pred, target)
    gpu.update(pred.cuda(), target.cuda())
    assert gpu.counts.is_cuda
    assert torch.equal(cpu.matrix(), gpu.matrix())


def test_stray_values_never_wrap_into_a_class():
    """Predictions far outside 0..C-1 are void (not wrapped into a class by a narrow cast)."""
    cm = ConfusionMatrix(num_classes=4, ignore_index=255)
    target = torch.tensor([[[3, 3, 3, 70000 + 1]]])
    pred = torch.tensor([[[3, 65536 + 3, -1, 1]]])
    cm.update(pred, target)
    assert cm.matrix()[3].tolist() == [0, 0, 0, 1, 2]          # 1 right, 2 void, stray GT skipped
    assert cm.matrix().sum() == 3


def test_an_ignore_index_inside_the_class_range_is_honoured():
    cm = ConfusionMatrix(num_classes=3, ignore_index=0)
    cm.update(torch.tensor([[[1, 1, 2]]]), torch.tensor([[[0, 1, 2]]]))
    assert cm.matrix().sum() == 2
    assert cm.compute(["road", "sidewalk", "building"])["class_iou"]["road"] is None
