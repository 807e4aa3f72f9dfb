"""Loader workers: DALI's source workers import only what reading tiles needs, never torch;
and how many workers the torch kind starts by default.

With spawn (the GPU case) every worker is a fresh interpreter that imports whatever the
pickled `WindowSource` needs: loaders/dali_pipeline.py and, through it, `loaders`,
loaders.contract, sampling, order, workers and the cache reader. torch in that chain costs
each of up to 8 workers a few hundred MB (scripts/bench_worker_rss.py); loaders/contract.py
and loaders/__init__.py therefore keep torch (and the loader factory) out.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cachefab import blocky_cache

ROOT = Path(__file__).resolve().parents[1]
# The modules a spawned source worker imports to unpickle and run WindowSource.
WORKER_MODULES = ("loaders", "loaders.contract", "loaders.dali_pipeline", "loaders.sampling",
                  "loaders.order", "loaders.workers", "cache", "cache.reader", "cache.tiles",
                  "cache.format")


def torch_mapped(pid: int | str) -> bool:
    """Whether torch's shared libraries are mapped into a process (i.e. it imported torch)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps or "/torch/_C" in maps


def spawned_children() -> set[int]:
    """Live children of this process started by multiprocessing's spawn."""
    found = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            found |= {int(pid) for pid in (task / "children").read_text().split()}
        except OSError:
            continue
    spawned = set()
    for pid in found:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            spawned.add(pid)
    return spawned


def test_the_worker_import_chain_does_not_import_torch():
    code = ("import sys\n"
            f"for name in {WORKER_MODULES!r}: __import__(name)\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print(len(bad), ' '.join(bad[:5]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[0] == "0", f"torch imported by the worker's modules: {out}"


def test_the_console_scripts_main_module_does_not_import_torch():
    # A spawned worker first re-runs the parent's main script as __mp_main__: for `train`,
    # `evaluate`, `predict` that is `from training.cli import ...` (pyproject's scripts), so
    # training/cli.py must import torch lazily too, or every DALI worker of a run carries it.
    code = "import sys, training.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_factory_lives_in_loaders_factory_only():
    # No lazy re-export: the contract and the package stay free of the factory (and of torch),
    # and no import circle contract -> factory -> contract remains.
    import loaders
    import loaders.contract
    from loaders.factory import build_loader

    assert callable(build_loader)
    assert not hasattr(loaders, "build_loader")
    assert not hasattr(loaders.contract, "build_loader")
    with pytest.raises(AttributeError):
        loaders.contract.no_such_name  # noqa: B018


@pytest.mark.dali
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_spawned_dali_source_worker_does_not_import_torch(tmp_path):
    pytest.importorskip("nvidia.dali")
    import torch

    from loaders.contract import AugmentConfig
    from loaders.dali_loader import DaliLoader

    assert torch_mapped("self")  # the check sees torch where it is (this process)
    cache = blocky_cache(tmp_path / "cache.zarr", n_train=4, n_val=1, height=128, width=256)
    before = spawned_children()
    # spawn: what a GPU loader (or any process with CUDA initialised) starts its workers with.
    loader = DaliLoader(cache, "train", train=True, batch_size=2,
                        aug=AugmentConfig(crop=(48, 64)), device=torch.device("cpu"),
                        num_workers=1, py_start_method="spawn")
    try:
        batch = next(iter(loader))   # the worker has unpickled the source and read tiles
        assert batch.image.shape == (2, 3, 48, 64)
        workers = spawned_children() - before
        assert workers, "no spawned DALI worker found"
        for pid in workers:
            assert not torch_mapped(pid), f"DALI source worker {pid} imported torch"
    finally:
        loader.close()


# -- the torch kind's default worker count ------------------------------------------------------
@pytest.mark.parametrize("cores, local_ranks, workers", [
    (1, None, 1), (2, None, 2),        # small machines: every core (the 2-core choice as before)
    (3, None, 2), (4, None, 3), (8, None, 7), (16, None, 15),  # a core for the main process
    (64, None, 16),                     # capped
    (16, "8", 2), (16, "4", 3), (16, "2", 7), (16, "16", 1), (4, "8", 1),  # torchrun ranks
])
def test_torch_default_workers_follow_the_cores_of_the_rank(monkeypatch, cores, local_ranks,
                                                            workers):
    from loaders.torch_loader import default_num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    assert default_num_workers() == workers


def test_torch_default_workers_without_affinity_use_the_cpu_count(monkeypatch):
    from loaders.torch_loader import default_num_workers

    monkeypatch.delattr(os, "sched_getaffinity")   # not Linux
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_num_workers() == 11
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert default_num_workers() == 1


def test_the_torch_loader_starts_the_default_workers(monkeypatch, tmp_path):
    import torch

    from loaders.contract import AugmentConfig
    from loaders.torch_loader import TorchLoader

    cache = blocky_cache(tmp_path / "cache.zarr", n_train=4, n_val=1, height=64, width=128,
                         tile=64)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    loader = TorchLoader(cache, "train", train=True, batch_size=2,
                         aug=AugmentConfig(crop=(32, 32)), device=torch.device("cpu"))
    assert loader.num_workers == 3    # built, not iterated: no worker is started
