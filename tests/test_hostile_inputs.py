"""Raw trees and prediction inputs from anywhere: special files, decompression bombs, absurd
numbers, link loops, deep folders, cut videos, name clashes, bad files among good ones. Each
gives one line naming the file, in bounded time; never a hang or a traceback.

What could hang (a FIFO) runs in a child process with a timeout, so the suite cannot."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cache.errors import UserError
from dataprep.discover import discover
from dataprep.rasterize import MAX_POINTS, BadFrame, load_polygons, render_trainids
from cache.safe_input import MAX_JSON_BYTES, BadInput, read_png, walk_files
from training.outputs.folder import MARKER

REPO = Path(__file__).resolve().parents[1]
STEM = "aachen_000000_000019"


def run_child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Python `code` in a child process; a hang fails the test instead of stalling the suite."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A few hundred bytes whose IHDR declares width x height 8-bit RGB: decoding it would need
    30 GB. The IDAT holds one row of real data and the file ends with IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    return path


def noise_png(path: Path, h: int = 32, w: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def polygons(path: Path, height=32, width=64, objects=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"imgHeight": height, "imgWidth": width, "objects": objects or [
        {"label": "road", "polygon": [[0, 16], [63, 16], [63, 31], [0, 31]]}]}))
    return path


def raw_tree(root: Path, split: str = "train", labelled: bool = True) -> tuple[Path, Path]:
    image = noise_png(root / "leftImg8bit" / split / "aachen" / f"{STEM}_leftImg8bit.png")
    gt = root / "gtFine" / split / "aachen" / f"{STEM}_gtFine_polygons.json"
    if labelled:
        polygons(gt)
    return image, gt


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert "Traceback" not in text, text
    return lines[-1]


# -- the raw tree -----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["image", "polygons"])
def test_a_fifo_in_the_raw_tree_is_named_and_never_opened(tmp_path, which):
    image, gt = raw_tree(tmp_path)
    target = image if which == "image" else gt
    target.unlink()
    os.mkfifo(target)
    out = tmp_path / "cache.zarr"
    result = subprocess.run([sys.executable, "-m", "dataprep.cli", "build", "--root", str(tmp_path),
                             "--out", str(out), "--workers", "1"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert str(target) in line and "FIFO" in line and "not a regular file" in line


def test_link_loops_and_dangling_links_in_the_raw_tree_are_one_line(tmp_path):
    image, _ = raw_tree(tmp_path)
    loop = image.parent / "aachen_000000_000020_leftImg8bit.png"
    loop.symlink_to(loop.name)                          # a link to itself
    with pytest.raises(UserError, match="loops") as info:
        discover(tmp_path)
    assert str(loop) in str(info.value)
    loop.unlink()
    city_loop = image.parent.parent / "bochum"
    city_loop.symlink_to("bochum")                      # a city folder that is a loop
    with pytest.raises(UserError, match=f"{city_loop}: a symbolic link that loops"):
        discover(tmp_path)


def test_links_that_leave_the_root_are_followed(tmp_path):
    """The common layout: ROOT/leftImg8bit is a link to a folder elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    raw_tree(elsewhere)
    root = tmp_path / "root"
    root.mkdir()
    (root / "leftImg8bit").symlink_to(elsewhere / "leftImg8bit")
    (root / "gtFine").symlink_to(elsewhere / "gtFine")
    frames = discover(root)["train"]
    assert [f.name for f in frames] == [f"aachen/{STEM}"]
    assert render_trainids(frames[0].polygons).shape == (32, 64)


def test_a_png_bomb_is_refused_from_its_header_before_decoding(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1000
    with pytest.raises(BadInput, match="declares 100000x100000 pixels"):
        read_png(bomb)
    code = ("import resource; from pathlib import Path; from dataprep.build import decode_image\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    decode_image(Path({str(bomb)!r}))\nexcept Exception as exc:\n    print(exc)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    result = run_child(code)
    message, grown_mb = result.stdout.strip().splitlines()
    assert "declares 100000x100000 pixels" in message and int(grown_mb) < 50, result.stdout


def test_a_bomb_in_an_unlabelled_split_stops_the_build_in_one_line(tmp_path):
    """No polygon file to compare with: the pixel cap is what stops it (libspng has none)."""
    image, _ = raw_tree(tmp_path, split="test", labelled=False)
    bomb_png(image)
    for storage in ("--shard", "--no-shard"):
        result = subprocess.run([sys.executable, "-m", "dataprep.cli", "build", "--root", str(tmp_path),
                                 "--out", str(tmp_path / f"c{storage}.zarr"), "--workers", "1", storage],
                                capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 1, result.stderr
        line = one_line(result.stderr)
        if storage == "--no-shard":   # with shards, planning the split's tiles refuses it first
            assert str(image) in line and "declares 100000x100000 pixels" in line


@pytest.mark.parametrize("doc, match", [
    ({"imgHeight": 10**9, "imgWidth": 2048, "objects": []}, "declares 2048x1000000000 pixels"),
    ({"imgHeight": 1e9, "imgWidth": 1e9, "objects": []}, "declares 1000000000x1000000000"),
    ({"imgHeight": "1e400", "imgWidth": 2048, "objects": []}, "not integers"),
    ({"imgHeight": 32, "imgWidth": 64, "objects": [{"label": "car", "polygon": [[0, 0], [1e308, 0], [0, 9]]}]},
     "out of range"),
])
def test_absurd_numbers_in_a_polygon_file_are_one_line(tmp_path, doc, match):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BadFrame, match=match) as info:
        render_trainids(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, match", [
    ('{"imgHeight": 32, "imgWidth": 64, "objects": [{"label": "car", "polygon": [[NaN, 0], [1, 0], [0, 1]]}]}',
     "NaN is not a number"),
    ('{"imgHeight": 32, "imgWidth": 64, "objects": [{"label": "car", "polygon": [[Infinity, 0]]}]}',
     "Infinity is not a number"),
    ('{"imgHeight": 32, "imgWidth": 64, "objects": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "not a polygon file"),
    ('{"imgHeight": ' + "9" * 5000 + ', "imgWidth": 64, "objects": []}', "not a polygon file"),
])
def test_what_json_allows_but_no_polygon_file_holds_is_one_line(tmp_path, text, match):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(BadFrame, match=match):
        load_polygons(path)


def test_huge_polygon_files_are_refused_by_size_or_points(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:                       # sparse: 1 GB that takes no disk
        f.truncate(1 << 30)
    with pytest.raises(BadFrame, match=f"more than the {MAX_JSON_BYTES:,}"):
        load_polygons(big)
    many = polygons(tmp_path / "many.json", objects=[
        {"label": "car", "polygon": [[0, 0], [1, 0], [0, 1]]}] * (MAX_POINTS // 3 + 1))
    with pytest.raises(BadFrame, match="polygon points, more than"):
        load_polygons(many)


# -- prediction inputs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.test_evaluate import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def predict_cli(*args: str):
    from training.cli import predict

    return CliRunner().invoke(predict, [*args, "--device", "cpu"])


def test_walk_files_ends_on_link_loops_and_stops_deep_folders(tmp_path):
    noise_png(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "back").symlink_to("..")              # a link to a parent
    (tmp_path / "a" / "twice").symlink_to("..")
    (tmp_path / "self.png").symlink_to("self.png")           # a loop with an image's name
    deep = tmp_path / "d"
    for _ in range(70):
        deep = deep / "d"
    noise_png(deep / "lost.png")
    files, problems = walk_files(tmp_path, (".png",))
    assert files == [tmp_path / "a" / "x.png"]
    assert sorted((p.name, why.split(";")[0]) for p, why in problems) == [
        ("d", "more than 64 folders deep"), ("self.png", "a symbolic link that loops")]


def test_a_fifo_named_as_an_image_is_reported_not_read(tmp_path):
    noise_png(tmp_path / "in" / "good.png")
    os.mkfifo(tmp_path / "in" / "pipe.png")
    code = ("from training.infer.inputs import find_inputs\n"
            f"inputs = find_inputs({str(tmp_path / 'in')!r})\n"
            "print([p.name for p in inputs.images], inputs.problems)\n"
            "try:\n"
            f"    find_inputs({str(tmp_path / 'in' / 'pipe.png')!r})\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)")
    out = run_child(code).stdout.splitlines()
    assert out[0].startswith("['good.png']") and "pipe.png: a FIFO (named pipe), not a regular file" in out[0]
    assert out[1].startswith("BadInput") and "pipe.png: a FIFO" in out[1]


def test_images_that_share_an_output_name_are_refused_before_any_work(ckpt, tmp_path):
    noise_png(tmp_path / "in" / "a.png")
    noise_png(tmp_path / "in" / "a.jpg")
    result = predict_cli("--checkpoint", str(ckpt), "--input", str(tmp_path / "in"),
                         "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    line = one_line(result.output)
    assert "a.jpg and" in line and "a.png would both be written as a_color.png" in line
    assert not (tmp_path / "out").exists()


def test_bad_files_among_good_ones_are_reported_and_the_rest_predicted(ckpt, tmp_path):
    src = tmp_path / "in"
    for name in ("a.png", "c.jpg", "e.png"):
        noise_png(src / name)
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")       # corrupt
    bomb_png(src / "d.png")                                           # too large for memory
    out = tmp_path / "out"
    result = predict_cli("--checkpoint", str(ckpt), "--input", str(src), "--out", str(out))
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("predict: skipped")]
    assert len(skipped) == 2 and str(src / "b.png") in skipped[0] and str(src / "d.png") in skipped[1]
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["complete"] is False and manifest["frames"] == 3
    assert manifest["outputs"] == [f"{k}_{kind}.png" for k in "ace" for kind in ("color", "overlay")]
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["outputs"] + ["predict.json", MARKER])
    assert [f["input"] for f in manifest["failed"]] == [str(src / "b.png"), str(src / "d.png")]
    assert "declares 100000x100000 pixels" in manifest["failed"][1]["problem"]


def test_a_single_bad_image_is_an_error(ckpt, tmp_path):
    result = predict_cli("--checkpoint", str(ckpt), "--input", str(bomb_png(tmp_path / "b.png")),
                         "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert one_line(result.output).startswith("error: no frame predicted:")
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["complete"] is False


def _clip(path: Path, frames: int = 12, faststart: bool = False) -> Path:
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            pixels = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])                # cut mid-stream
    return path


def test_a_video_cut_mid_stream_keeps_its_frames_and_is_not_complete(ckpt, tmp_path):
    clip = _clip(tmp_path / "cut.mp4", faststart=True)       # index first: it opens, then stops
    out = tmp_path / "out"
    result = predict_cli("--checkpoint", str(ckpt), "--input", str(clip), "--out", str(out))
    assert result.exit_code == 3, result.output
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["complete"] is False and 0 < manifest["frames"] < 12
    assert manifest["failed"][0]["input"] == str(clip)
    assert "cut short" in manifest["failed"][0]["problem"]
    assert len(manifest["outputs"]) == 2 * manifest["frames"]


def test_a_video_cut_before_its_index_is_refused_in_one_line(ckpt, tmp_path):
    clip = _clip(tmp_path / "cut.mp4")                       # index at the end: gone
    result = predict_cli("--checkpoint", str(ckpt), "--input", str(clip), "--out", str(tmp_path / "o"))
    assert result.exit_code == 1
    line = one_line(result.output)
    assert line.startswith(f"error: {clip}: cannot open this video")
    assert not (tmp_path / "o").exists()


def test_a_batch_that_runs_out_of_memory_is_reported_frame_by_frame(ckpt, tmp_path, monkeypatch):
    import training.infer.predict as predict

    noise_png(tmp_path / "in" / "small.png", 32, 64)
    noise_png(tmp_path / "in" / "tall.png", 96, 64)
    real = predict.predict_frames

    def tight_memory(model, frames, *args, **kwargs):
        if frames[0].shape[0] > 64:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough "
                               "memory: you tried to allocate 99999999999 bytes.")
        return real(model, frames, *args, **kwargs)

    monkeypatch.setattr(predict, "predict_frames", tight_memory)
    record = predict.run_predict(ckpt, tmp_path / "in", tmp_path / "out", device="cpu")
    assert record["frames"] == 1 and not record["complete"]
    assert record["failed"] == [{"input": str(tmp_path / "in" / "tall.png"), "problem":
                                 f"{tmp_path / 'in' / 'tall.png'}: out of memory predicting this "
                                 "64x96 frame on cpu (try --eval-scale 0.5 or --batch-size 1)"}]
