"""Every output whole or absent, every failure one line (issue 19): training.outputs.atomic, checkpoints
on a full disk (simulated in-process, and a real 2 MB-class tmpfs where this machine lets us
mount one), evaluate's JSON and PNGs, Ctrl-C messages that name the right command."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tests.cachefab import blocky_cache
from tests.test_evaluate import FAST, H, W, tiny_checkpoint
from training.outputs import atomic
from training.train.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
REPO = Path(__file__).resolve().parents[1]


def full_disk_after(monkeypatch, calls: int, function: str = "fsync"):
    """os.<function> fails with ENOSPC from its (calls+1)-th call on, in every thread."""
    real, count, lock = getattr(os, function), [0], threading.Lock()

    def failing(*args, **kwargs):
        with lock:
            count[0] += 1
            if count[0] > calls:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, function, failing)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


# -- training.outputs.atomic ---------------------------------------------------------------------------

@pytest.mark.parametrize("writer, data", [
    (atomic.write_text, "new text"), (atomic.write_bytes, b"new bytes"),
    (atomic.write_json, {"new": 1}), (atomic.write_png, np.zeros((4, 4), np.uint8))])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch,
                                                                    writer, data):
    target = tmp_path / "out.file"
    target.write_bytes(b"old")
    full_disk_after(monkeypatch, 0)
    with pytest.raises(atomic.WriteError) as caught:
        writer(target, data)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []
    monkeypatch.undo()
    writer(target, data)
    assert target.read_bytes() != b"old" and leftovers(tmp_path) == []


def test_ctrl_c_during_a_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "scores.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_file(target, "w") as handle:
            handle.write('{"half": ')
            raise KeyboardInterrupt
    assert not target.exists() and leftovers(tmp_path) == []


def test_json_refuses_nan_before_writing(tmp_path):
    with pytest.raises(ValueError):
        atomic.write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"meta": {"arch": "unet", "encoder": "e",
                                                           "num_classes": 1, "class_names": ["a"]},
                                                  "model": {"w": torch.zeros(3)}})
    before = path.read_bytes()
    full_disk_after(monkeypatch, 0)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"meta": {}, "model": {"w": torch.ones(10_000)}})
    assert path.read_bytes() == before and leftovers(tmp_path) == []


# -- train on a full disk ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("atomic") / "c.zarr", n_train=6, n_val=1,
                        height=64, width=128, tile=64)


def train_flags(cache, out, iters=3) -> list[str]:
    return ["--cache", str(cache), "--out", str(out), "--loader", "torch", "--arch", "unet",
            "--encoder", "resnet18", "--encoder-weights", "none", "--model-arg", "encoder_depth=3",
            "--model-arg", "decoder_channels=[8,8,8]", "--res", "64", "--batch-size", "2",
            "--workers", "0", "--iters", str(iters), "--log-every", "1", "--checkpoint-every",
            "1", "--eval-every", "100", "--no-plots"]


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_a_full_disk_at_a_checkpoint_stops_train_in_one_line(cache, tmp_path, monkeypatch):
    from training.train import checkpoint
    from training.cli import main

    out = tmp_path / "run"
    real_save, saves = checkpoint.torch.save, []

    def save_then_fill(obj, handle, *args, **kwargs):       # the second checkpoint hits ENOSPC
        saves.append(1)
        if len(saves) == 2:
            handle.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fill)
    result = CliRunner().invoke(main, ["train", *train_flags(cache, out)])
    assert result.exit_code == 1
    assert one_error_line(result.output) == (
        f"error: train stopped at step 2: cannot write {out / 'last.pt'} (No space left on "
        f"device); the last good checkpoint is {out / 'last.pt'} (step 1); free some space, "
        f"then `train --out {out} --resume` continues from it")
    assert leftovers(out) == [] and load_checkpoint(out / "last.pt")["progress"]["step"] == 1
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    monkeypatch.undo()
    resumed = CliRunner().invoke(main, ["train", "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 3


@pytest.fixture
def tiny_disk(tmp_path):
    """mount(size) -> a tmpfs of that size (root, and a sandbox that allows it; else skip);
    grow(size) remounts it bigger in place."""
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(mount_point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    def grow(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    mount.grow = grow
    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_a_real_full_disk_stops_train_in_one_line_and_resume_finishes(cache, tmp_path, tiny_disk):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "training.cli", "train"]
    probe = tmp_path / "probe"          # the size of one last.pt of this run
    done = subprocess.run(command + train_flags(cache, probe, iters=1), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    size = (probe / "last.pt").stat().st_size
    disk = tiny_disk(int(1.5 * size) + 256 * 1024)     # one last.pt fits; a second beside it not
    out = disk / "run"
    done = subprocess.run(command + train_flags(cache, out), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr)
    assert line.startswith("error: train stopped at step ") and "No space left on device" in line
    assert f"`train --out {out} --resume` continues from it" in line, line
    stopped = load_checkpoint(out / "last.pt")["progress"]["step"]
    assert f"the last good checkpoint is {out / 'last.pt'} (step {stopped})" in line
    assert leftovers(out) == []
    tiny_disk.grow(4 * size + 1024 * 1024)                 # "free some space"
    done = subprocess.run(command + ["--out", str(out), "--resume"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 3


# -- evaluate ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic-eval")
    cache = blocky_cache(root / "cache", n_train=1, n_val=3, height=H, width=W)
    return root, cache, tiny_checkpoint(root / "best.pt")


def evaluate_cli(*args):
    from training.cli import main

    return CliRunner().invoke(main, ["evaluate", *map(str, args), "--device", "cpu",
                                     "--loader", "torch", "--workers", "0"])


def test_evaluate_on_a_full_disk_leaves_whole_files_only(setup, tmp_path, monkeypatch):
    _, cache, ckpt = setup
    full_disk_after(monkeypatch, 3)        # a few PNGs, then the disk is full
    export, vis, scores = tmp_path / "export", tmp_path / "vis", tmp_path / "scores.json"
    result = evaluate_cli("--checkpoint", ckpt, "--cache", cache, "--export", export,
                          "--visualize", vis, "--json", scores)
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert line.startswith("error: evaluate stopped: cannot write ") and "No space left" in line
    assert "--export needs a new or empty folder again" in line
    assert not scores.exists() and leftovers(tmp_path) == []
    pngs = [p for p in tmp_path.rglob("*.png")]
    assert 0 < len(pngs) < 9
    for png in pngs:
        Image.open(png).load()             # every file under its final name is whole


def test_evaluate_writes_no_picture_into_a_folder_it_did_not_make(setup, tmp_path):
    _, cache, ckpt = setup
    raw = tmp_path / "raw"
    (raw / "leftImg8bit" / "val").mkdir(parents=True)
    (raw / "README").write_text("the dataset")
    for option in ("--visualize", "--export"):
        result = evaluate_cli("--checkpoint", ckpt, "--cache", cache, option, raw)
        assert result.exit_code == 1
        assert one_error_line(result.output).startswith(f"error: {option} {raw}: ")
    assert sorted(p.name for p in raw.rglob("*")) == ["README", "leftImg8bit", "val"]


def test_evaluate_visualizes_into_its_own_folder_again(setup, tmp_path):
    from training.infer.evaluate import run_evaluate
    from training.outputs.folder import read_marker

    _, cache, ckpt = setup
    vis = tmp_path / "vis"
    for _ in range(2):
        run_evaluate(ckpt, cache, visualize_dir=vis, limit=1, **FAST)
    assert read_marker(vis)["kind"] == "visualize"
    assert sorted(p.name for p in (vis / "city0").iterdir()) == [
        "city0_000000_000019_color.png", "city0_000000_000019_overlay.png"]


def test_json_never_overwrites_a_users_file(setup, tmp_path):
    from training.infer.evaluate import run_evaluate

    _, cache, ckpt = setup
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    result = evaluate_cli("--checkpoint", ckpt, "--cache", cache, "--json", notes, "--limit", 1)
    assert result.exit_code == 1
    assert one_error_line(result.output).startswith(
        f"error: --json {notes}: exists and is not a scores file of `evaluate`")
    assert notes.read_text() == '{"my": "notes"}'
    scores = tmp_path / "scores.json"
    for _ in range(2):                    # its own scores file is rewritten
        run_evaluate(ckpt, cache, json_path=scores, limit=1, **FAST)
    assert json.loads(scores.read_text())["frames"] == 1


def test_export_and_visualize_cannot_share_a_folder(setup, tmp_path):
    _, cache, ckpt = setup
    result = evaluate_cli("--checkpoint", ckpt, "--cache", cache, "--export", tmp_path / "x",
                          "--visualize", tmp_path / "x")
    assert result.exit_code == 1 and "give two folders" in one_error_line(result.output)
    assert not (tmp_path / "x").exists()


def test_predictions_are_cast_to_uint8_on_the_device_with_the_same_bytes(tmp_path):
    from training.outputs.writer import PngWriter
    from training.outputs.labels import as_numpy, as_uint8_labels

    preds = torch.randint(0, 19, (2, 8, 16))
    preds[0, 0, :4] = torch.tensor([0, 18, 254, 255])
    assert as_uint8_labels(preds).dtype == np.uint8
    assert as_uint8_labels(preds).tobytes() == as_numpy(preds).astype(np.uint8).tobytes()
    names = ["berlin/berlin_000000_000019", "berlin/berlin_000001_000019"]
    for kind, batch in (("int64", preds), ("uint8", preds.to(torch.uint8))):
        writer = PngWriter("unused", "val", names, tmp_path / kind, None)
        writer.submit(batch, [0, 1])
        writer.finish()
        writer.shutdown()
    for name in ("berlin_000000_000019_labelIds.png", "berlin_000001_000019_labelIds.png"):
        assert (tmp_path / "int64" / "berlin" / name).read_bytes() == \
            (tmp_path / "uint8" / "berlin" / name).read_bytes()


# -- Ctrl-C names the command that was running ---------------------------------------------------

@pytest.mark.parametrize("command, module, function", [
    ("evaluate", "training.infer.evaluate", "run_evaluate"),
    ("predict", "training.infer.predict", "run_predict")])
def test_ctrl_c_names_the_command_that_was_interrupted(monkeypatch, tmp_path, command, module,
                                                       function):
    import importlib

    from training.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), function, interrupted)
    args = {"evaluate": ["--checkpoint", "x.pt", "--cache", str(tmp_path)],
            "predict": ["--checkpoint", "x.pt", "--input", "x.png", "--out", str(tmp_path)]}
    result = CliRunner().invoke(main, [command, *args[command]])
    assert result.exit_code == 130
    assert f"`{command}`" in result.output and "train" not in result.output, result.output
