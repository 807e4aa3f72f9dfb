"""`train --init-from CKPT`: start a run from another run's weights, and nothing else of it.

Coarse -> fine and transfer to another label set need the weights of a checkpoint but a new
optimiser, schedule and step count. The checkpoint's tensors are matched to the new model by
name and shape:

- same architecture, encoder and classes: every tensor is taken;
- another class count, or the same count of other class names (another label set): everything
  but the classification head is taken, and the head keeps its fresh initialisation (its
  outputs would mean other classes);
- another architecture with the same encoder: the encoder is taken, decoder and head start
  afresh;
- another encoder (nothing of it fits): refused, naming both.

What was taken and what starts afresh is said in one line at the start of the run.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from cache.errors import UserError
from training.train.checkpoint import load_checkpoint

HEAD_PREFIXES = ("segmentation_head.", "classification_head.")


def _is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


def _labels_differ(source: dict, target: dict) -> bool:
    return (int(source.get("num_classes", -1)) != int(target["num_classes"])
            or list(source.get("class_names", [])) != list(target["class_names"]))


def load_initial_weights(model: nn.Module, path: str | os.PathLike, meta: dict) -> str:
    """Copy the fitting tensors of checkpoint `path` into `model` (unwrapped, built from `meta`);
    returns the one-line summary. Refuses a checkpoint whose encoder does not fit."""
    path = Path(path)
    data = load_checkpoint(path)
    source, state = data.get("meta", {}), data["model"]
    own = model.state_dict()
    new_labels = _labels_differ(source, meta)
    taken = {name: tensor for name, tensor in state.items()
             if name in own and own[name].shape == tensor.shape
             and not (new_labels and _is_head(name))}
    encoder = [name for name in own if name.startswith("encoder.")]
    if source.get("encoder") != meta["encoder"] or not all(name in taken for name in encoder):
        raise UserError(f"--init-from {path}: its weights are for encoder {source.get('encoder')!r} "
                        f"({source.get('arch')}), this run builds {meta['encoder']!r} "
                        f"({meta['arch']}); the encoders must match (use --encoder "
                        f"{source.get('encoder')})")
    with torch.no_grad():
        for name, tensor in taken.items():
            own[name].copy_(tensor)
    fresh = [name for name in own if name not in taken]
    return _summary(path, source, meta, len(taken), len(own), fresh, new_labels)


def _summary(path: Path, source: dict, meta: dict, taken: int, total: int, fresh: list[str],
             new_labels: bool) -> str:
    parts = [f"init-from {path}: {taken} of {total} tensors taken"]
    if not fresh:
        return parts[0] + " (all)"
    groups = sorted({name.split(".", 1)[0] for name in fresh})
    parts.append(f"{', '.join(groups)} start afresh")
    if new_labels and int(source.get("num_classes", -1)) != int(meta["num_classes"]):
        parts.append(f"{source.get('num_classes')} classes in the checkpoint, "
                     f"{meta['num_classes']} in this cache")
    elif new_labels:
        parts.append("the checkpoint's class names differ from this cache's")
    if source.get("arch") != meta["arch"]:
        parts.append(f"architecture {source.get('arch')} -> {meta['arch']}")
    return "; ".join(parts)
