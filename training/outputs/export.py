"""Predictions in the official benchmark format (pictures of them: training/outputs/overlays.py;
both written in the background during `evaluate`: training/outputs/writer.py).

The benchmark server and cityscapesscripts' `evalPixelLevelSemanticLabeling` want, per frame, a
single-channel uint8 PNG of labelIds (not trainIds) whose name starts with
`<city>_<seq>_<frame>`; we write `DIR/<city>/<city>_<seq>_<frame>_labelIds.png` and nothing else,
so that DIR can be zipped and uploaded, or given to the official script, as it is.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from cache.errors import UserError
from training.outputs.atomic import PNG_COMPRESS_LEVEL, make_parent, write_png
from training.outputs.folder import check_output_dir, claim_output_dir
from training.outputs.labels import as_numpy, as_uint8_labels, trainid_to_labelid

# "city/city_seq_frame": the city may not contain "_" (cityscapesscripts splits names on it).
_FRAME_NAME = re.compile(r"^(?P<city>[^/_]+)/(?P=city)_(?P<seq>\d+)_(?P<frame>\d+)$")


def frame_file_stem(frame_name: str) -> tuple[str, str]:
    """("city", "city_seq_frame") of a cache frame name "city/city_seq_frame"."""
    match = _FRAME_NAME.match(frame_name)
    if not match:
        raise UserError(f"frame name {frame_name!r} is not of the Cityscapes form "
                        "'city/city_000000_000000'; the benchmark needs such names")
    return match["city"], frame_name.split("/", 1)[1]


EXPORT_FOLDER = dict(kind="export", option="--export", command="evaluate --export", mark=False,
                     why=" (the benchmark wants nothing but the prediction PNGs in it)")


def check_export_dir(out_dir: str | os.PathLike) -> None:
    """Refuse a DIR that is not new or empty, writing nothing (training.outputs.folder: the
    export gets no marker, since the benchmark takes the folder as it is)."""
    check_output_dir(out_dir, **EXPORT_FOLDER)


def prepare_export_dir(out_dir: str | os.PathLike) -> Path:
    """Create DIR, or accept it if it is empty: the export must be the only thing in it."""
    return claim_output_dir(out_dir, **EXPORT_FOLDER)


def export_predictions(preds, frame_names: Sequence[str], out_dir: str | os.PathLike) -> list[Path]:
    """Write each (H, W) trainId prediction of `preds` (B, H, W) as an official labelIds PNG
    (whole or not at all: training.outputs.atomic)."""
    preds = as_numpy(preds)
    if len(preds) != len(frame_names):
        raise ValueError(f"{len(preds)} predictions for {len(frame_names)} frame names")
    written = []
    for pred, frame_name in zip(preds, frame_names):
        city, stem = frame_file_stem(frame_name)
        path = make_parent(Path(out_dir) / city / f"{stem}_labelIds.png")
        write_png(path, trainid_to_labelid(pred), compress_level=PNG_COMPRESS_LEVEL)
        written.append(path)
    return written
