"""Checkpoints: plain tensors, dicts, lists, numbers and strings, so `torch.load(...,
weights_only=True)` reads them; written atomically (a temporary file, fsync, os.replace), so a
kill at any moment leaves either the old or the new file, never a torn one.

A checkpoint is a dict:
    format, version   this module's names, checked on load
    meta              what is needed to rebuild the model and read its output: arch, encoder,
                      model_kwargs, num_classes, class_names, ignore_index, res, eval_scale, ...
    model             the (unwrapped) model's state_dict
    progress          epoch, batch_in_epoch, step, best_miou (training checkpoints)
    optimizer, scheduler, scaler, rng, config, log_window   (last.pt only)
"""
from __future__ import annotations

import os
import pickle
import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cache.errors import UserError
from training.core.model import build_model
from training.outputs.atomic import atomic_file

CHECKPOINT_FORMAT = "cityscapes-seg-checkpoint"
CHECKPOINT_VERSION = 1
# The fields that decide whether saved weights fit a model.
MODEL_IDENTITY = ("arch", "encoder", "num_classes", "model_kwargs")
ZIP_MAGIC = b"PK\x03\x04"
# What every checkpoint's meta holds (load_for_eval, evaluate and --init-from read them).
META_REQUIRED = ("arch", "encoder", "num_classes", "class_names")
# What a last.pt adds, for --resume.
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "log_window", "progress")
PROGRESS_REQUIRED = ("step", "epoch", "batch_in_epoch", "best_miou", "evaluated_step")


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` (plus format and version) to `path` atomically (training.outputs.atomic: a
    failure, a full disk included, removes the temporary file and leaves the old `path` as it
    was). Ctrl-C and SIGTERM are held back while it writes (and delivered right after): an
    interrupt inside torch.save would surface as a torn-zip RuntimeError instead of a clean
    stop."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with signals_deferred():
        with atomic_file(path, "wb") as handle:
            writer = _KeepsWriteErrors(handle)
            try:
                torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                            **payload}, writer)
            except RuntimeError:
                # torch's zip writer turns a failed write (a full disk) into "unexpected pos";
                # the OSError behind it is the one to report
                if writer.error is not None:
                    raise writer.error from None
                raise
    return path


class _KeepsWriteErrors:
    """A file for torch.save that remembers the first OSError of its writes."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


@contextmanager
def signals_deferred():
    """Hold SIGINT, SIGTERM and SIGUSR1 back for the duration and deliver them to their own
    handlers right after. (Blocking them with a signal mask is not enough: a process-directed
    signal goes to any thread that does not block it, and Python then raises in the main
    thread anyway.) Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    names = ("SIGINT", "SIGTERM", "SIGUSR1")
    held = [getattr(signal, name) for name in names if hasattr(signal, name)]
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum))
                for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending:
            signal.raise_signal(signum)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint with weights_only=True onto the CPU; refuse anything that is not ours."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    with open(path, "rb") as handle:
        if handle.read(4) != ZIP_MAGIC:    # torch.save writes a zip archive
            raise UserError(f"{path}: not a checkpoint written by `train` (not a torch.save file)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refused: it holds objects other than tensors and plain "
                        f"containers ({str(exc).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated?'})") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint written by `train` (no format={CHECKPOINT_FORMAT!r})")
    if data.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {data.get('version')} is not supported "
                        f"(this code reads version {CHECKPOINT_VERSION})")
    _check_model_part(data, path)
    return data


def _check_model_part(data: dict, path: Path) -> None:
    """The weights and the metadata that every reader needs to rebuild the model."""
    meta = data.get("meta")
    if not isinstance(meta, dict):
        raise UserError(f"{path}: checkpoint has no metadata (meta: the model's architecture, "
                        "encoder and classes), so its model cannot be rebuilt; use a best.pt "
                        "or last.pt that `train` wrote")
    missing = [key for key in META_REQUIRED if key not in meta]
    if missing:
        raise UserError(f"{path}: checkpoint metadata lacks {', '.join(missing)}, so its model "
                        "cannot be rebuilt; use a best.pt or last.pt that `train` wrote")
    if not isinstance(data.get("model"), dict):
        raise UserError(f"{path}: checkpoint holds no model weights; use a best.pt or last.pt "
                        "that `train` wrote")


def check_training_state(data: dict, path: str | os.PathLike) -> None:
    """Refuse to resume from a checkpoint that holds no training state (a best.pt copied to
    last.pt, a checkpoint from elsewhere): one line instead of a KeyError."""
    missing = [key for key in TRAINING_STATE if key not in data]
    progress = data.get("progress")
    if not missing and isinstance(progress, dict):
        missing = [f"progress.{key}" for key in PROGRESS_REQUIRED if key not in progress]
    elif not missing:
        missing = ["progress"]
    if missing:
        kind = "a best.pt (weights only)" if "scores" in data else "not a last.pt"
        raise UserError(f"{path}: cannot resume from it: {kind}, it has no {', '.join(missing)}; "
                        f"start a new run with --init-from {path} to begin from its weights")


def _identity(meta: dict) -> dict:
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in meta.get("model_kwargs", {}).items()}
    return {"arch": meta.get("arch"), "encoder": meta.get("encoder"),
            "num_classes": meta.get("num_classes"), "model_kwargs": kwargs}


def check_compatible(meta: dict, expected: dict, path: str | os.PathLike) -> None:
    """Refuse a checkpoint of another architecture, encoder, decoder settings or class count."""
    have, want = _identity(meta), _identity(expected)
    diffs = [f"{key} {have[key]!r} (this run: {want[key]!r})"
             for key in MODEL_IDENTITY if have[key] != want[key]]
    if diffs:
        raise UserError(f"{path}: checkpoint is for another model: {'; '.join(diffs)}; "
                        "use a new --out, or the options the run was started with")


def load_model_state(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """Load `state` into `model`, or say in one line how they differ."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    reshaped = [key for key in own if key in state and own[key].shape != state[key].shape]
    if missing or unexpected or reshaped:
        differences = [f"{len(keys)} {what} (first: {keys[0]!r})" for what, keys in (
            ("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
            if keys]
        raise UserError(f"{path}: the weights do not fit a {type(model).__name__} model: "
                        f"tensors {', '.join(differences)}")
    model.load_state_dict(state, strict=True)


def load_for_eval(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on `device`, meta) from best.pt or last.pt; never downloads."""
    data = load_checkpoint(path)
    meta = dict(data["meta"])
    try:
        model = build_model(meta["arch"], meta["encoder"], meta["num_classes"], None,
                            **meta.get("model_kwargs", {}))
    except UserError as exc:     # its message names train's options, which evaluate has not
        raise UserError(f"{path}: cannot rebuild the checkpoint's model here ({exc})") from None
    load_model_state(model, data["model"], path)
    meta.setdefault("progress", data.get("progress", {}))
    return model.to(device).eval(), meta


# -- RNG state, as plain tensors and numbers ----------------------------------------------------

def capture_rng() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
