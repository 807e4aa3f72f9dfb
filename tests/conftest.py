"""The test suite runs the same on a machine with a GPU as on one without.

- Every test runs on the CPU unless it is marked `gpu`: torch.cuda.is_available() reads False
  in this process and CUDA_VISIBLE_DEVICES is empty for the commands a test starts, so that
  `resolve_device(None)` and friends pick the CPU, as the assertions expect.
- `gpu` tests run only where CUDA is there (and are skipped cleanly elsewhere).
- Collection never initialises CUDA: availability is asked through NVML
  (PYTORCH_NVML_BASED_CUDA_CHECK), so DALI may still fork its workers.
- CITYSCAPES_TEST_INIT_CUDA=1 initialises CUDA before any test (scripts/gpu_check.py uses it):
  the CPU-mode DALI tests must then pass in a process where CUDA is initialised.
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA_PRESENT = torch.cuda.is_available()
_real_is_available = torch.cuda.is_available


def pytest_sessionstart(session):
    if os.environ.get("CITYSCAPES_TEST_INIT_CUDA") == "1" and CUDA_PRESENT:
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # a context, as any GPU loader or model would make


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not CUDA_PRESENT:
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_test(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is not None:
        yield
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread (for tests that train models): the test machine's 2 cores are
    shared, and OpenMP spinning on a busy core makes 2 threads several times slower than 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
