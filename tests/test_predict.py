"""`predict` on images of any size, folders, globs and videos: pictures, video, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cache.errors import UserError
from tests.test_evaluate import tiny_checkpoint
from training.outputs.labels import colorize
from training.outputs.folder import MARKER
from training.infer.inputs import batches_of_one_size, find_inputs
from training.infer.predict import run_predict

FAST = dict(device="cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """Two cities of PNGs and a JPEG, sizes odd and even, one greyscale image."""
    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    (root / "b").mkdir()
    Image.fromarray(noise(64, 96, 0)).save(root / "a" / "a_1.png")
    Image.fromarray(noise(64, 96, 1)).save(root / "a" / "a_2.png")
    Image.fromarray(noise(77, 131, 2)).save(root / "b" / "b_1.jpg", quality=95)
    Image.fromarray(noise(40, 50, 3)[..., 0]).save(root / "b" / "grey.png")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


def expected_trainids(ckpt: Path, rgb: np.ndarray) -> np.ndarray:
    """The prediction computed here without training.infer.predict: normalise, model, argmax."""
    from loaders.contract import MEAN, STD
    from training.train.checkpoint import load_for_eval
    from training.core.tta import predict_logits

    model, _ = load_for_eval(ckpt)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    return predict_logits(model, x, rgb.shape[:2]).argmax(1)[0].numpy().astype(np.uint8)


def read_rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def test_a_folder_gives_colour_and_overlay_per_image_at_its_own_size(ckpt, image_tree, tmp_path):
    out = tmp_path / "out"
    record = run_predict(ckpt, image_tree, out, batch_size=2, **FAST)
    keys = ["a/a_1", "a/a_2", "b/b_1", "b/grey"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([f"{k}_{kind}.png" for k in keys for kind in ("color", "overlay")]
                             + ["predict.json", MARKER])
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["complete"] and manifest["frames"] == 4 == record["frames"]
    assert read_rgb(out / "b/b_1_color.png").shape == (77, 131, 3)
    assert read_rgb(out / "b/grey_overlay.png").shape == (40, 50, 3)
    source = read_rgb(image_tree / "a" / "a_2.png")
    pred = expected_trainids(ckpt, source)
    assert len(np.unique(pred)) > 1                      # not a one-colour picture
    assert np.array_equal(read_rgb(out / "a/a_2_color.png"), colorize(pred))
    blended = (source * 0.5 + colorize(pred) * 0.5).round().astype(np.uint8)
    assert np.array_equal(read_rgb(out / "a/a_2_overlay.png"), blended)


def test_an_output_folder_inside_the_input_folder_is_not_read_back(ckpt, tmp_path):
    tree = tmp_path / "frames"
    tree.mkdir()
    Image.fromarray(noise(32, 48, 5)).save(tree / "f.png")
    for _ in range(2):      # the second run must not take the first one's pictures as input
        record = run_predict(ckpt, tree, tree / "pred", **FAST)
        assert record["frames"] == 1
    assert sorted(p.name for p in (tree / "pred").iterdir()) == sorted(
        [MARKER, "f_color.png", "f_overlay.png", "predict.json"])


def test_a_glob_and_a_single_image(ckpt, image_tree, tmp_path):
    inputs = find_inputs(str(image_tree / "*" / "*_1.*"))
    assert [p.name for p in inputs.images] == ["a_1.png", "b_1.jpg"] and inputs.keys == ("a/a_1", "b/b_1")
    record = run_predict(ckpt, str(image_tree / "a" / "a_1.png"), tmp_path / "one",
                         tta_scales=(0.75, 1.0), tta_flip=True, amp="bf16", eval_scale=0.5, **FAST)
    assert (record["amp"], record["eval_scale"], record["tta_flip"]) == ("bf16", 0.5, True)
    assert read_rgb(tmp_path / "one" / "a_1_color.png").shape == (64, 96, 3)   # the input's size


def test_images_become_a_time_lapse_video(ckpt, image_tree, tmp_path):
    import av

    video = tmp_path / "lapse.mp4"
    run_predict(ckpt, str(image_tree / "a"), tmp_path / "out", video_path=video, images=False,
                fps=4, **FAST)
    assert not list((tmp_path / "out").glob("a_*"))      # --no-images: only predict.json
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == 4
    assert len(frames) == 2 and frames[0].shape == (64, 96, 3)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 5-frame 17 fps MP4 of moving noise, 66x90."""
    import av

    path = tmp_path_factory.mktemp("clip") / "drive.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=17)
        stream.width, stream.height, stream.pix_fmt = 90, 66, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(noise(66, 90, 10 + i), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_a_video_gives_pictures_per_frame_and_an_overlay_video(ckpt, clip, tmp_path):
    import av

    out, video = tmp_path / "out", tmp_path / "overlay.mp4"
    record = run_predict(ckpt, clip, out, video_path=video, batch_size=3, **FAST)
    assert record["frames"] == 5 and record["fps"] == pytest.approx(17)
    assert sorted(p.name for p in (out / "drive").glob("*_color.png")) == \
        [f"drive_{i:06d}_color.png" for i in range(5)]
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    # a second run into the same folder may rewrite what the first wrote, video included
    run_predict(ckpt, clip, out, video_path=video, limit=2, **FAST)
    assert json.loads((out / "predict.json").read_text())["frames"] == 2


def test_mistakes_are_refused_before_anything_is_written(ckpt, image_tree, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="did not write"):
        run_predict(ckpt, image_tree, foreign, **FAST)
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]
    someone_elses = tmp_path / "theirs.mp4"
    someone_elses.write_bytes(b"not ours")
    with pytest.raises(UserError, match="was not written by `predict`"):
        run_predict(ckpt, image_tree, tmp_path / "o1", video_path=someone_elses, **FAST)
    assert someone_elses.read_bytes() == b"not ours"
    for bad, match in ((tmp_path / "nothing", "no such file or folder"),
                       (image_tree / "b" / "notes.txt", "not a PNG/JPEG image"),
                       (str(tmp_path / "*.png"), "no PNG or JPEG file matches")):
        with pytest.raises(UserError, match=match):
            run_predict(ckpt, bad, tmp_path / "o2", **FAST)
    with pytest.raises(UserError, match="nothing to write"):
        run_predict(ckpt, image_tree, tmp_path / "o3", images=False, **FAST)
    broken = tmp_path / "broken" / "x.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match="x.png: not a PNG file"):
        run_predict(ckpt, broken, tmp_path / "o4", **FAST)


def test_batches_hold_frames_of_one_size_in_order():
    frames = [(str(i), np.zeros(shape)) for i, shape in
              enumerate([(4, 4, 3), (4, 4, 3), (4, 4, 3), (2, 4, 3), (4, 4, 3)])]
    keys = [[k for k, _ in batch] for batch in batches_of_one_size(frames, 2)]
    assert keys == [["0", "1"], ["2"], ["3"], ["4"]]


def test_the_command_line_reports_a_mistake_in_one_line(ckpt, image_tree, tmp_path):
    from training.cli import predict

    runner = CliRunner()
    bad = runner.invoke(predict, ["--checkpoint", str(ckpt), "--input", str(tmp_path / "none"),
                                  "--out", str(tmp_path / "o")])
    assert bad.exit_code == 1 and bad.output.strip().startswith("error: --input")
    good = runner.invoke(predict, ["--checkpoint", str(ckpt), "--input", str(image_tree / "a"),
                                   "--out", str(tmp_path / "o"), "--device", "cpu", "--limit", "1"])
    assert good.exit_code == 0, good.output
    assert (tmp_path / "o" / "a_1_color.png").is_file() and not (tmp_path / "o" / "a_2_color.png").exists()


def test_normalisation_constants_are_made_once_per_device():
    from loaders.contract import MEAN, STD
    from training.core.tta import normalisation

    first, again = normalisation("cpu"), normalisation(torch.device("cpu"))
    assert all(a is b for a, b in zip(first, again))          # cached: no tensor per batch
    mean, std, black = first
    assert mean.flatten().tolist() == pytest.approx(MEAN) and std.flatten().tolist() == pytest.approx(STD)
    assert torch.allclose(black, (torch.zeros(1, 3, 1, 1) - mean) / std)
    assert normalisation("cpu", torch.bfloat16)[0].dtype == torch.bfloat16
