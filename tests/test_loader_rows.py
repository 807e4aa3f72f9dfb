"""build_loader(rows=...): a loader over a subset of a split (one cross-validation fold)."""
from __future__ import annotations

import numpy as np
import pytest

from cache.errors import UserError
from loaders.contract import AugmentConfig
from loaders.factory import build_loader
from tests.cachefab import blocky_cache

AUG = AugmentConfig(crop=(64, 64), scale=(0.5, 1.0)).no_jitter()
KINDS = ["torch", pytest.param("dali", marks=pytest.mark.dali)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("rows") / "c.zarr", n_train=8, n_val=4,
                        height=128, width=256, tile=64)


def rows_seen(loader, epochs=(0, 1)) -> list[list[int]]:
    seen = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        seen.append([int(r) for batch in loader for r in batch.rows])
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_training_reads_only_the_given_rows_and_shuffles_them(cache, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    subset = [1, 3, 4, 6, 7]
    loader = build_loader(cache, "train", kind, train=True, batch_size=2, aug=AUG,
                          rows=subset, num_workers=0)
    assert len(loader) == 2                       # 5 rows, batches of 2, last one dropped
    first, second = rows_seen(loader)
    assert set(first) <= set(subset) and set(second) <= set(subset)
    assert len(set(first)) == 4 and first != second  # no repeats; each epoch reshuffles


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_reads_each_given_row_once_in_the_given_order(cache, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    loader = build_loader(cache, "train", kind, train=False, batch_size=2, aug=AUG,
                          rows=[5, 0, 2], num_workers=0)
    assert rows_seen(loader, epochs=(0,)) == [[5, 0, 2]]


@pytest.mark.parametrize("rows,message", [([], "empty"), ([0, 8], "not in a split of 8"),
                                          ([1, 1, 2], "repeat")])
def test_bad_rows_are_user_errors(cache, rows, message):
    with pytest.raises(UserError, match=message):
        build_loader(cache, "train", "torch", train=False, batch_size=1, aug=AUG, rows=rows)


def test_too_few_rows_for_a_batch(cache):
    with pytest.raises(UserError, match="2 frames to train on"):
        build_loader(cache, "train", "torch", train=True, batch_size=4, aug=AUG,
                     rows=np.array([0, 1]))
