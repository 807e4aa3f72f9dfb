"""Defaults for the dataset root and the cache: flag, else the variable, else the documented place."""
from __future__ import annotations

from pathlib import Path

import pytest

from cache.errors import UserError
from cache.location import (CACHE_VAR, DATASET_VAR, DEFAULT_CACHE, default_cache, default_root,
                            resolve_cache, resolve_root)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(DATASET_VAR, raising=False)
    monkeypatch.delenv(CACHE_VAR, raising=False)
    monkeypatch.chdir(tmp_path)


def test_root_comes_from_the_flag_then_the_variable(monkeypatch, tmp_path):
    assert default_root() == (None, f"${DATASET_VAR} is not set")
    with pytest.raises(UserError, match=rf"no dataset root: pass --root DIR or set \${DATASET_VAR}"):
        resolve_root(None)
    monkeypatch.setenv(DATASET_VAR, str(tmp_path / "cs"))
    path, source = resolve_root(None)
    assert (path, source) == (tmp_path / "cs", f"${DATASET_VAR}")
    assert resolve_root("/elsewhere") == (Path("/elsewhere"), "--root")  # the flag wins


def test_cache_comes_from_the_flag_then_the_variable_then_the_working_directory(monkeypatch, tmp_path):
    found = default_cache()
    assert found == (DEFAULT_CACHE, "default") and found.is_default
    assert found.path.absolute() == tmp_path / "cityscapes.zarr"
    monkeypatch.setenv(CACHE_VAR, "~/caches/cs.zarr")
    assert default_cache() == (Path.home() / "caches" / "cs.zarr", f"${CACHE_VAR}")
    assert resolve_cache("mine.zarr", "--out") == (Path("mine.zarr"), "--out")


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_variable_counts_as_unset(monkeypatch, value):
    monkeypatch.setenv(DATASET_VAR, value)
    monkeypatch.setenv(CACHE_VAR, value)
    assert default_root().path is None and default_cache().is_default


def test_describe_says_where_the_path_came_from(monkeypatch, tmp_path):
    assert resolve_cache(None).describe("cache") == (
        f"cache: {tmp_path / 'cityscapes.zarr'} (default ./cityscapes.zarr; --cache or ${CACHE_VAR} to change)")
    monkeypatch.setenv(CACHE_VAR, "rel.zarr")
    assert resolve_cache(None).describe("cache") == f"cache: {tmp_path / 'rel.zarr'} (from ${CACHE_VAR})"
    assert resolve_cache("x.zarr").describe("cache") == f"cache: {tmp_path / 'x.zarr'} (from --cache)"


def test_a_missing_cache_is_one_line_that_names_the_place_and_why(monkeypatch, tmp_path):
    with pytest.raises(UserError) as info:
        resolve_cache(None, must_exist=True)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'cityscapes.zarr'}: no cache there (the default")
    assert "run `dataprep build` here first" in message and "\n" not in message
    monkeypatch.setenv(CACHE_VAR, str(tmp_path / "env.zarr"))
    with pytest.raises(UserError, match=rf"env.zarr: no cache there \(from \${CACHE_VAR}; make one"):
        resolve_cache(None, must_exist=True)
    (tmp_path / "env.zarr").mkdir()
    assert resolve_cache(None, must_exist=True).path == tmp_path / "env.zarr"
