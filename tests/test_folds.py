"""K folds grouped by city: deterministic, disjoint, covering, balanced; fold.json."""
from __future__ import annotations

import pytest

from cache.errors import UserError
from training.train.folds import city_folds, make_fold, read_fold_file, write_fold_file

# 6 cities of 5, 4, 3, 3, 2, 1 frames (18), names sorted as a cache stores them
SIZES = {"aachen": 5, "bochum": 4, "cologne": 3, "darmstadt": 3, "erfurt": 2, "jena": 1}
FRAMES = sorted(f"{city}/{city}_{i:06d}_000019" for city, n in SIZES.items() for i in range(n))


def test_folds_partition_the_rows_by_whole_cities():
    k = 3
    seen_val = []
    for index in range(k):
        fold = make_fold(FRAMES, k, index)
        val_cities = {FRAMES[r].split("/")[0] for r in fold.val_rows}
        train_cities = {FRAMES[r].split("/")[0] for r in fold.train_rows}
        assert val_cities == set(fold.val_cities) and train_cities == set(fold.train_cities)
        assert not val_cities & train_cities                       # no city on both sides
        assert sorted(fold.val_rows + fold.train_rows) == list(range(len(FRAMES)))
        seen_val += fold.val_rows
    assert sorted(seen_val) == list(range(len(FRAMES)))            # each row validated once


def test_folds_are_balanced_greedily_and_deterministic():
    # largest first to the emptiest fold: aachen(5)->0, bochum(4)->1, cologne(3)->2,
    # darmstadt(3)->2 (3 < 4), erfurt(2)->1 (4 < 5), jena(1)->0 (5 < 6 = 6: fold 0 first)
    assert city_folds(FRAMES, 3) == [("aachen", "jena"), ("bochum", "erfurt"),
                                     ("cologne", "darmstadt")]
    assert [len(make_fold(FRAMES, 3, i).val_rows) for i in range(3)] == [6, 6, 6]
    assert city_folds(list(FRAMES), 3) == city_folds(tuple(FRAMES), 3)


def test_bad_fold_requests_are_user_errors():
    with pytest.raises(UserError, match="only 6 cities"):
        make_fold(FRAMES, 7, 0)
    with pytest.raises(UserError, match="at least 2 folds"):
        make_fold(FRAMES, 1, 0)
    with pytest.raises(UserError, match="--fold 3: must be between 0 and 2"):
        make_fold(FRAMES, 3, 3)
    with pytest.raises(UserError, match="no city folder"):
        make_fold(["loose_000000_000019", "a/a_000000_000019"], 2, 0)


def test_fold_file_records_the_validation_frames(tmp_path):
    fold = make_fold(FRAMES, 2, 1, split="train")
    write_fold_file(fold, FRAMES, tmp_path)
    record = read_fold_file(tmp_path)
    assert record["k"] == 2 and record["index"] == 1 and record["split"] == "train"
    assert record["val_frames"] == [FRAMES[r] for r in fold.val_rows]
    assert record["val_cities"] == list(fold.val_cities)
    assert record["train_frames"] == len(FRAMES) - len(fold.val_rows)
    assert read_fold_file(tmp_path / "nothing") is None
    (tmp_path / "fold.json").write_text("{torn")
    with pytest.raises(UserError, match="not a JSON file"):
        read_fold_file(tmp_path)
