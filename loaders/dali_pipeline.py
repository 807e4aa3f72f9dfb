"""The DALI augmentation graph and the stateless window source that feeds it.

The CPU side (`WindowSource`, run in DALI's parallel external-source workers) only picks
the sample, draws its parameters and reads the tiles under its source window; every pixel
operation (resize, colour jitter, flip, pad, normalise) is a DALI operator, on the GPU when
the pipeline has a device id and in DALI's CPU-only mode otherwise. One graph, one set of
parameters; only placement differs.

The sample stream never ends: global sample index g of a rank belongs to epoch
`first_epoch + g // samples_per_epoch`, so the workers prefetch across epoch boundaries
and the loader (loaders/dali_loader.py) cuts the stream into epochs of `len()` batches.
Evaluation pads each rank's last batch with copies of its last frame (DALI's per-sample
source always fills whole batches); the loader trims them away.
"""
from __future__ import annotations

import os

import numpy as np

from cache.reader import CacheReader
from loaders.contract import IMAGE_PAD, MASK_PAD, MEAN, STD, AugmentConfig
from loaders.order import batch_count, shard_indices
from loaders.order import split_rows
from loaders.sampling import SampleParams, draw_train_sample, eval_sample
from loaders.workers import die_with_parent, keep_serving_on_termination

# Layout of the float32 per-sample parameter vector the source hands to the graph.
P_OUT_H, P_OUT_W, P_FLIP, P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = range(7)
NUM_PARAMS = 7
IMAGE_PAD_NORMALISED = [(IMAGE_PAD - m) / s for m, s in zip(MEAN, STD)]


class WindowSource:
    """Picklable, stateless callable of DALI's SampleInfo -> arrays named by `output_names`.

    image: uint8 (h, w, 3) source window; mask: uint8 (h, w, 1) (splits with masks);
    params: float32 (NUM_PARAMS,) (unless evaluating at scale 1); row: int64 (1,).
    Everything is a pure function of the sample index, so any worker can produce any
    sample in any order; the only per-pixel work is reading (and decoding) the window's tiles.
    """

    def __init__(self, cache: CacheReader, split: str, *, train: bool, aug: AugmentConfig,
                 batch_size: int, seed: int, first_epoch: int, rank: int, world_size: int,
                 rows=None, batches_per_epoch: int | None = None):
        info = cache.split(split)
        self.cache, self.split, self.train, self.aug = cache, split, train, aug
        self.seed, self.first_epoch, self.rank, self.world_size = seed, first_epoch, rank, world_size
        self.frame_hw = (info.height, info.width)
        self.rows = split_rows(len(info), rows)   # the cache rows this source reads
        self.num_frames = len(self.rows)
        self.has_masks = info.has_masks
        self.batches_per_epoch = batch_count(self.num_frames, batch_size=batch_size, rank=rank,
                                             world_size=world_size, train=train)
        if batches_per_epoch is not None:  # epochs cut short (DaliLoader.limit_epochs)
            self.batches_per_epoch = min(self.batches_per_epoch, batches_per_epoch)
        self.samples_per_epoch = self.batches_per_epoch * batch_size
        self._orders: dict[int, np.ndarray] = {}   # per-process memo of a pure function
        self._main_pid = self._guarded_pid = os.getpid()  # workers: see __call__

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_orders"] = {}
        return state

    def __setstate__(self, state):
        # Unpickled in a spawned DALI worker: a fresh interpreter, so the worker's signal
        # handling is installed here (forked workers inherit it; loaders/workers.py).
        self.__dict__.update(state)
        keep_serving_on_termination()

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: self.rows[shard_indices(
                self.num_frames, seed=self.seed, epoch=epoch, rank=self.rank,
                world_size=self.world_size, train=self.train)]}
        return self._orders[epoch]

    def sample_params(self, sample_index: int) -> SampleParams:
        """The sample at a global stream position: which frame, which window, which jitter."""
        epoch = self.first_epoch + sample_index // self.samples_per_epoch
        order = self.order(epoch)
        # Eval pads a rank's last batch with its last frame; the loader trims the copies.
        row = int(order[min(sample_index % self.samples_per_epoch, len(order) - 1)])
        if not self.train:
            return eval_sample(row, self.frame_hw, self.aug)
        read_mask = None
        if self.aug.cat_max_ratio and self.has_masks:
            def read_mask(y: int, x: int, h: int, w: int) -> np.ndarray:
                return self.cache.read_mask_window(self.split, row, y, x, h, w)
        return draw_train_sample(self.seed, epoch, row, self.frame_hw, self.aug,
                                 ignore_index=self.cache.ignore_index, read_mask=read_mask)

    @property
    def output_names(self) -> tuple[str, ...]:
        """What __call__ returns, in order (an unused output would only cost shared memory)."""
        names = ("image",) + (("mask",) if self.has_masks else ())
        if self.train or self.aug.eval_scale != 1.0:
            names += ("params",)
        return names + ("row",)

    def __call__(self, sample_info):
        if self._guarded_pid != os.getpid():   # first call in this (worker) process
            self._guarded_pid = os.getpid()
            if self._guarded_pid != self._main_pid:
                die_with_parent(self._main_pid)
        p = self.sample_params(sample_info.idx_in_epoch)
        image, mask = self.cache.read_window(self.split, p.row, p.y, p.x, p.h, p.w)
        outputs = {
            "image": image,
            "mask": None if mask is None else mask[:, :, None],
            "params": np.array([p.out_h, p.out_w, float(p.flip), p.brightness, p.contrast,
                                p.saturation, p.hue], dtype=np.float32),
            "row": np.array([p.row], dtype=np.int64),
        }
        return tuple(outputs[name] for name in self.output_names)

    def max_window_bytes(self) -> int:
        """Largest image+mask window a sample can need (sizes DALI's shared-memory slots)."""
        height, width = self.frame_hw
        if self.train:
            crop_h, crop_w = self.aug.crop
            lo = self.aug.scale[0]
            height = min(height, max(1, round(crop_h / lo)))
            width = min(width, max(1, round(crop_w / lo)))
        return height * width * (4 if self.has_masks else 3) + 1024


def source_nodes(source: WindowSource, py_num_workers: int, prefetch: int = 2) -> dict:
    """The external source of a pipeline being defined (inside `with pipe:`): name -> node of
    `source.output_names`, read by DALI's parallel Python workers (in this process with no
    workers: debugging, tiny splits)."""
    from nvidia.dali import fn, types

    names = source.output_names
    kinds = {"image": ("HWC", types.UINT8), "mask": ("HWC", types.UINT8),
             "params": ("", types.FLOAT), "row": ("", types.INT64)}
    parallel = {}
    if py_num_workers > 0:
        parallel = dict(parallel=True, prefetch_queue_depth=prefetch,
                        bytes_per_sample_hint=source.max_window_bytes())
    outs = fn.external_source(source=source, batch=False, num_outputs=len(names), **parallel,
                              layout=[kinds[n][0] for n in names],
                              dtype=[kinds[n][1] for n in names])
    return dict(zip(names, outs))


def build_pipeline(source: WindowSource, *, batch_size: int, device_id: int | None,
                   num_threads: int, py_num_workers: int, py_start_method: str,
                   prefetch_queue_depth: int = 2, source_prefetch: int = 2,
                   channels_last: bool = False):
    """The DALI pipeline: outputs ("image", ["mask",] "row").

    image float32 (B, 3, h, w) normalised ((B, h, w, 3) with channels_last); mask uint8
    (B, h, w, 1); row int64 (B, 1), always a CPU output. `device_id=None` selects DALI's
    CPU-only mode; otherwise the same operators run on that GPU.
    """
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=source.seed, prefetch_queue_depth=prefetch_queue_depth,
                    py_num_workers=py_num_workers, py_start_method=py_start_method,
                    exec_dynamic=True)
    with pipe:
        nodes = source_nodes(source, py_num_workers, source_prefetch)
        image, mask, params, row = (nodes.get(n) for n in ("image", "mask", "params", "row"))
        if device_id is not None:
            image = image.gpu()
            mask = None if mask is None else mask.gpu()
        graph = _train_graph if source.train else _eval_graph
        image, mask = graph(fn, types, source.aug, image, mask, params,
                            "HWC" if channels_last else "CHW")
        pipe.set_outputs(*(node for node in (image, mask, row) if node is not None))
    return pipe


def _train_graph(fn, types, aug: AugmentConfig, image, mask, params, image_layout: str):
    """Resize the window to (out_h, out_w), jitter colour, flip, pad to the crop, normalise.

    Op order and choices are the cheapest equivalent measured in CPU-only mode (640x640,
    per image, scripts/bench_loader.py and the numbers in jitter_colour): the uint8 window
    is resized straight to its output size, the colour is twisted there (never on a larger
    window, never on the padding), and one crop_mirror_normalize flips, pads, transposes
    to CHW and normalises in a single pass.
    """
    size = params[P_OUT_H:P_OUT_W + 1]
    flip = params[P_FLIP]
    mirror = fn.cast(flip, dtype=types.INT32)
    image = fn.resize(image, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
    if (aug.brightness, aug.contrast, aug.saturation, aug.hue) != (0.0, 0.0, 0.0, 0.0):
        # Before padding, so that the padding stays exactly 0 before normalisation.
        image = jitter_colour(fn, types, image, params)
    # crop_mirror_normalize mirrors *after* cropping, so a flipped sample anchors its
    # window at x = out_w - crop_w (crop_pos_x=1): the padding then lands on the right.
    # Net effect for every sample: flip the resized content, pad bottom/right.
    crop = dict(crop=aug.crop, crop_pos_x=flip, crop_pos_y=0.0, mirror=mirror,
                out_of_bounds_policy="pad")
    # The fill is written after normalisation: image padding 0 normalises to -MEAN/STD.
    image = fn.crop_mirror_normalize(image, **crop, fill_values=IMAGE_PAD_NORMALISED,
                                     mean=list(MEAN), std=list(STD), output_layout=image_layout,
                                     dtype=types.FLOAT)
    if mask is not None:
        # Nearest neighbour without antialiasing: every output label exists in the source.
        mask = fn.resize(mask, size=size, interp_type=types.INTERP_NN, antialias=False)
        mask = fn.crop_mirror_normalize(mask, **crop, fill_values=float(MASK_PAD),
                                        output_layout="HWC", dtype=types.UINT8)
    return image, mask


def jitter_colour(fn, types, image, params):
    """uint8 HWC pixels -> float HWC: DALI's colour twist, clamped to 0..255 (not rounded).

    The semantics of loaders.colour.colour_twist(quantise=False).clamp(0, 255). The twist
    reads uint8, so its contrast centre is 128. Measured per 640x640 image in CPU-only mode
    (DALI 2.4, one thread): color_twist to float ~3.4 ms; the same 3x3 matrix + offset as
    fn.coord_transform ~4.8 ms (slower, so not used); a uint8 output of either ~8.5 ms
    (DALI's float->uint8 conversion is slow). The clamp as math.min(math.max()) is one
    fused arithmetic op, ~1.1 ms, where math.clamp costs ~3 ms for the same result.
    """
    from nvidia.dali import math as dali_math

    image = fn.color_twist(image, brightness=params[P_BRIGHTNESS], contrast=params[P_CONTRAST],
                           saturation=params[P_SATURATION], hue=params[P_HUE], dtype=types.FLOAT)
    return dali_math.min(dali_math.max(image, 0.0), 255.0)


def _eval_graph(fn, types, aug: AugmentConfig, image, mask, params, image_layout: str):
    """Whole frame resized by eval_scale and normalised; the mask stays at full resolution."""
    if aug.eval_scale != 1.0:
        image = fn.resize(image, size=params[P_OUT_H:P_OUT_W + 1],
                          interp_type=types.INTERP_LINEAR, antialias=True)
    image = fn.crop_mirror_normalize(image, mean=list(MEAN), std=list(STD),
                                     output_layout=image_layout, dtype=types.FLOAT)
    return image, mask
