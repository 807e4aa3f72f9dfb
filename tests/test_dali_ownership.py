"""DALI's batches stay DALI's until torch has finished with them (loaders/dali_loader.py).

On a GPU a DALI output buffer goes back to DALI's pool when its last reference goes, on the
host, in the order of DALI's stream, while kernels queued on torch's stream may not have read
it yet. The loader therefore asks DALI for outputs bound to torch's current stream, copies
them into torch's memory on that stream and holds DALI's buffers until an event recorded
after the copies has completed. Without a GPU the first tests check that protocol against a
stand-in pipeline; the CPU path (zero-copy, nothing held) is checked against DALI's own
iterator; the `gpu` test reads late on a real GPU (scripts/gpu_check.py's `reuse` part is
the long version).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from loaders import AugmentConfig
from tests.cachefab import blocky_cache

B, H, W = 2, 8, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("own") / "cache.zarr", n_train=6, n_val=2)


class FakeStream:
    """torch.cuda.current_stream's answer: what the loader must hand to DALI."""


class FakeEvent:
    def __init__(self, log):
        self.log, self.done, self.stream = log, False, None
        log.append(self)

    def record(self, stream):
        self.stream = stream

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


class FakeOutput:
    def __init__(self, tensor):
        self.tensor = tensor

    def as_tensor(self):
        return self


class FakePipe:
    """The pipeline calls DaliLoader makes, with fresh CPU tensors standing for DALI's buffers."""

    def __init__(self):
        self.calls, self.views, self.count = [], [], 0

    def schedule_run(self):
        self.calls.append("schedule_run")

    def release_outputs(self):
        self.calls.append("release_outputs")

    def share_outputs(self, **kwargs):
        self.calls.append(("share_outputs", kwargs))
        self.count += 1
        image = torch.full((B, 3, H, W), float(self.count))
        mask = torch.full((B, H, W, 1), self.count, dtype=torch.uint8)
        row = torch.arange(B, dtype=torch.int64).view(B, 1) + 10 * self.count
        self.views.append({"image": image, "mask": mask, "row": row})
        return FakeOutput(image), FakeOutput(mask), FakeOutput(row)


def stand_in_loader(cache, monkeypatch, *, gpu: bool):
    """A DaliLoader on `cache` whose pipeline is a FakePipe and, with gpu, that takes DALI's
    GPU path for device 0 (streams and events are stand-ins too)."""
    pytest.importorskip("nvidia.dali")
    from loaders import dali_loader
    from loaders.dali_loader import DaliLoader

    pipe, events, stream = FakePipe(), [], FakeStream()

    def build(self, first_epoch):
        self._pipe, self._names, self._scheduled = pipe, ["image", "mask", "row"], False
        self._first_epoch, self._position = first_epoch, 0

    monkeypatch.setattr(DaliLoader, "_build", build)
    monkeypatch.setattr(dali_loader, "_dlpack_to_torch", lambda out, device_id: out.tensor)
    monkeypatch.setattr(dali_loader, "_cuda_event", lambda: FakeEvent(events))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    loader = DaliLoader(cache, "train", train=True, batch_size=B,
                        aug=AugmentConfig(crop=(H, W)), device=torch.device("cpu"),
                        num_workers=0)
    if gpu:  # DALI's GPU path; the stand-in buffers (and so the batches) stay on the CPU
        loader.device_id = 0
    return loader, pipe, events, stream


def test_gpu_outputs_are_bound_to_torchs_stream_copied_and_held_until_read(cache, monkeypatch):
    loader, pipe, events, stream = stand_in_loader(cache, monkeypatch, gpu=True)
    batches = iter(loader)
    batch = next(batches)
    # DALI was asked for outputs on torch's current stream, not synchronised with the host
    shares = [c for c in pipe.calls if isinstance(c, tuple)]
    assert shares == [("share_outputs", {"cuda_stream": stream})]
    assert pipe.calls[0] == "schedule_run" and pipe.calls[-2:] == ["release_outputs",
                                                                    "schedule_run"]
    # the batch is torch's own copy of DALI's buffers, same values
    view = pipe.views[0]
    assert batch.image.data_ptr() != view["image"].data_ptr()
    assert torch.equal(batch.image, view["image"])
    assert batch.mask.dtype == torch.int64 and torch.equal(batch.mask, view["mask"][..., 0].long())
    assert batch.rows.tolist() == [10, 11]
    # DALI's buffers are held until an event recorded on that stream after the copies is done
    assert len(events) == 1 and events[0].stream is stream
    alive = [weakref.ref(t) for t in view.values()]
    pipe.views.clear()
    del view, batch
    gc.collect()
    assert all(ref() is not None for ref in alive), "let go of before the GPU read them"
    second = next(batches)  # the first event still pending: still held
    gc.collect()
    assert all(ref() is not None for ref in alive)
    events[0].done = True
    third = next(batches)   # polled (cudaEventQuery), no host wait: now they go
    gc.collect()
    assert all(ref() is None for ref in alive)
    assert len(loader._held) == 2 and not any(e.done for e in events[1:])
    assert second.rows.tolist() == [20, 21] and third.rows.tolist() == [30, 31]


def test_held_buffers_are_bounded_by_waiting_for_the_oldest(cache, monkeypatch):
    loader, pipe, events, _ = stand_in_loader(cache, monkeypatch, gpu=True)
    loader._held.limit = 2
    batches = iter(loader)
    for _ in range(3):  # the GPU never catches up on its own
        next(batches)
    assert len(loader._held) == 2
    assert [e.done for e in events] == [True, False, False]  # the oldest was waited for


def test_cpu_outputs_stay_zero_copy_and_nothing_is_held(cache, monkeypatch):
    loader, pipe, events, _ = stand_in_loader(cache, monkeypatch, gpu=False)
    batch = next(iter(loader))
    assert ("share_outputs", {}) in pipe.calls  # host-synchronised outputs, as before
    assert batch.image.data_ptr() == pipe.views[0]["image"].data_ptr()
    assert events == [] and len(loader._held) == 0


def test_zero_copy_control_hands_over_dalis_buffer(cache, monkeypatch):
    """gpu_check's positive control: the old hand-over, for showing that its check sees reuse."""
    loader, pipe, events, _ = stand_in_loader(cache, monkeypatch, gpu=True)
    loader._unsafe_zero_copy = True
    batch = next(iter(loader))
    assert batch.image.data_ptr() == pipe.views[0]["image"].data_ptr()
    assert events == [] and len(loader._held) == 0


@pytest.mark.dali
def test_cpu_batches_equal_dalis_own_iterator(cache):
    """The loader's own iteration over the pipeline gives exactly what DALIGenericIterator
    gave on the CPU path (the same pipeline, built twice)."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from loaders.dali_loader import DaliLoader

    def make():
        return DaliLoader(cache, "train", train=True, batch_size=2,
                          aug=AugmentConfig(crop=(48, 64)), device=torch.device("cpu"),
                          seed=7, num_workers=0, num_threads=1)

    ours = [(b.image.clone(), b.mask.clone(), b.rows.clone())
            for _, b in zip(range(3), make())]
    reference = make()
    reference._build(first_epoch=0)
    iterator = DALIGenericIterator([reference._pipe], reference._names, size=-1,
                                   auto_reset=False, prepare_first_batch=False)
    for image, mask, rows in ours:
        outputs = next(iterator)[0]
        theirs = reference._to_batch(outputs, 2)
        assert torch.equal(image, theirs.image) and torch.equal(mask, theirs.mask)
        assert torch.equal(rows, theirs.rows)


@pytest.mark.gpu
@pytest.mark.dali
def test_late_reader_on_the_gpu_reads_what_dali_produced(cache):
    """Every batch read behind a 20 ms kernel on torch's stream, dropped at once on the host,
    equals the same batch of a run that reads each batch to the end before dropping it."""
    pytest.importorskip("nvidia.dali")
    from loaders.contract import endless
    from loaders.dali_loader import DaliLoader

    def run(delay_cycles: int, n: int = 24):
        loader = DaliLoader(cache, "train", train=True, batch_size=2,
                            aug=AugmentConfig(crop=(64, 64)), device=torch.device("cuda"),
                            seed=3, num_workers=1)
        stream, sums = endless(loader), []
        for _ in range(n):
            if delay_cycles:
                torch.cuda._sleep(delay_cycles)
            batch = next(stream)
            sums.append(torch.stack([batch.image.double().sum(), batch.mask.double().sum()]))
            del batch
            if not delay_cycles:
                torch.cuda.synchronize()
        stream.close()
        return torch.stack(sums).cpu()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles = int(10_000_000 * 20 / max(start.elapsed_time(end), 1e-3))
    reference, late = run(0), run(cycles)
    assert torch.allclose(late, reference, rtol=1e-6, atol=1e-3), (late - reference).abs().max()
