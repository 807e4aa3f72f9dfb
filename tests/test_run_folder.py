"""Never overwrite what we did not create (issue 19): output folders are claimed with a marker,
a folder that is not ours is refused in one line, a run that lost its last.pt is not replaced,
and `--resume` needs something to resume from."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from cache.errors import UserError
from tests.cachefab import blocky_cache
from training.train.checkpoint import load_checkpoint, save_checkpoint
from training.train.config import resolve_config
from training.outputs.folder import (MARKER, check_output_dir, claim_output_dir, read_marker,
                                     write_marker)
from training.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(loader="torch", arch="unet", encoder="resnet18", encoder_weights="none",
            model_kwargs={"encoder_depth": 3, "decoder_channels": [8, 8, 8]}, res=64,
            batch_size=2, workers=0, iters=2, limit=1, log_every=1, plots=False, seed=0)


def tiny(cache, out, **changes):
    return resolve_config({**TINY, "cache": str(cache), "out": str(out), **changes})


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("folder") / "c.zarr", n_train=4, n_val=1,
                        height=64, width=128, tile=64)


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    """A finished run dir, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_training(tiny(cache, out))
    return out


def copy_run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def train_cli(*args) -> tuple[int, str]:
    from training.cli import main

    result = CliRunner().invoke(main, ["train", *map(str, args)])
    return result.exit_code, result.output


def cli_flags(cache, out) -> list[str]:
    return ["--cache", cache, "--out", out, "--loader", "torch", "--arch", "unet", "--encoder",
            "resnet18", "--encoder-weights", "none", "--model-arg", "encoder_depth=3",
            "--model-arg", "decoder_channels=[8,8,8]", "--res", 64, "--batch-size", 2,
            "--workers", 0, "--iters", 2, "--limit", 1, "--log-every", 1, "--no-plots"]


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# -- the shared rule (training.outputs.folder) -------------------------------------------------

def test_new_empty_and_own_folders_are_taken_and_marked(tmp_path):
    new = claim_output_dir(tmp_path / "a" / "b", "visualize", option="--visualize")
    assert read_marker(new)["kind"] == "visualize"
    (tmp_path / "empty").mkdir()
    assert read_marker(claim_output_dir(tmp_path / "empty", "visualize"))["kind"] == "visualize"
    (new / "city").mkdir()
    (new / "city" / "x_color.png").write_bytes(b"ours")
    assert claim_output_dir(new, "visualize") == new          # ours: taken again


def test_a_folder_not_ours_is_refused_and_left_untouched(tmp_path):
    raw = tmp_path / "raw"
    (raw / "leftImg8bit").mkdir(parents=True)
    (raw / "README").write_text("the user's")
    before = snapshot(raw)
    with pytest.raises(UserError, match=r"--visualize .*raw: holds files that `evaluate "
                                        r"--visualize` did not write \(README, leftImg8bit; "
                                        rf"no {MARKER}\)"):
        claim_output_dir(raw, "visualize", option="--visualize", command="evaluate --visualize")
    assert snapshot(raw) == before and not (raw / MARKER).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        claim_output_dir(tmp_path / "file", "visualize")


def test_a_folder_of_another_kind_is_refused(tmp_path):
    run = claim_output_dir(tmp_path / "run", "run", command="train")
    (run / "last.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=r"is a folder of `train` \(run\), not a visualize folder"):
        check_output_dir(run, "visualize", option="--visualize")


def test_an_unmarked_folder_is_only_ever_taken_new_or_empty(tmp_path):
    out = claim_output_dir(tmp_path / "export", "export", mark=False)
    assert list(out.iterdir()) == []                        # nothing but the results
    (out / "a.png").write_bytes(b"x")
    with pytest.raises(UserError, match="folder is not empty"):
        claim_output_dir(out, "export", mark=False)


# -- train --out -------------------------------------------------------------------------------

def test_the_marker_is_written_first_and_says_a_checkpoint_exists(finished):
    marker = read_marker(finished)
    assert marker["kind"] == "run" and marker["by"] == "train" and marker["checkpointed"] is True


def test_train_refuses_a_users_folder_in_one_line(cache, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    (mine / "loss.png").write_bytes(b"my plot")
    before = snapshot(mine)
    for extra in ([], ["--resume"]):
        code, output = train_cli(*cli_flags(cache, mine), *extra)
        assert code == 1
        assert one_error_line(output).startswith(f"error: --out {mine}: holds files that `train` "
                                                 "did not write")
    assert snapshot(mine) == before


def test_a_run_whose_last_pt_was_deleted_is_never_replaced(finished, tmp_path, cache):
    out = copy_run(finished, tmp_path)
    (out / "last.pt").unlink()                 # "to save space"
    before = snapshot(out)
    code, output = train_cli(*cli_flags(cache, out))
    assert code == 1
    line = one_error_line(output)
    assert f"--out {out}: holds a run whose last.pt is gone" in line
    assert "best.pt, metrics.jsonl kept" in line and f"--init-from {out / 'best.pt'}" in line
    code, output = train_cli("--out", out, "--resume")
    assert code == 1
    assert one_error_line(output).startswith(f"error: --resume: the run in {out} has no last.pt "
                                             "any more (deleted?): nothing to resume from")
    assert snapshot(out) == before


def test_best_pt_as_last_pt_is_refused_naming_the_file(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    shutil.copy(out / "best.pt", out / "last.pt")
    code, output = train_cli("--out", out, "--resume")
    assert code == 1
    assert one_error_line(output).startswith(
        f"error: {out / 'last.pt'}: cannot resume from it: a best.pt (weights only), it has no "
        "optimizer, scheduler, scaler, rng, log_window; start a new run with --init-from")


def test_checkpoints_without_metadata_are_refused_naming_the_file(finished, tmp_path, cache):
    from training.cli import main

    data = load_checkpoint(finished / "best.pt")
    bare = save_checkpoint(tmp_path / "bare.pt", {"model": data["model"]})
    partial = save_checkpoint(tmp_path / "partial.pt",
                              {"model": data["model"], "meta": {"arch": "unet"}})
    for path, words in ((bare, "checkpoint has no metadata"),
                        (partial, "checkpoint metadata lacks encoder, num_classes, class_names")):
        result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(path), "--cache",
                                           str(cache), "--device", "cpu"])
        assert result.exit_code == 1
        assert one_error_line(result.output).startswith(f"error: {path}: {words}")
        with pytest.raises(UserError, match=words):
            run_training(tiny(cache, tmp_path / "r", init_from=str(path)))


def test_an_older_run_dir_without_marker_resumes_and_is_marked(finished, tmp_path, cache):
    out = copy_run(finished, tmp_path)
    (out / MARKER).unlink()                    # as written before markers
    with pytest.raises(UserError, match="holds a run already"):
        run_training(tiny(cache, out))
    result = run_training(resolve_config({"out": str(out), "iters": 3}, resume=True), resume=True)
    assert result.step == 3 and read_marker(out)["checkpointed"] is True


def test_resume_into_a_new_folder_starts_a_run_as_the_slurm_script_does(cache, tmp_path):
    out = tmp_path / "fresh"
    code, output = train_cli(*cli_flags(cache, out), "--resume")
    assert code == 0, output
    assert f"--resume: no run in {out} yet; starting a new one at step 0" in output
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 2


def test_a_run_killed_before_its_first_checkpoint_starts_again(cache, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    write_marker(out, "run", "train")
    (out / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 3.0}) + "\n")
    code, output = train_cli(*cli_flags(cache, out))
    assert code == 0, output
    assert "stopped before its first checkpoint; starting it again from step 0" in output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2]                # train and eval lines of the new run only
