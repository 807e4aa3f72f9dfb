"""SIGTERM / SIGUSR1 to a real `train` process: last.pt at the current step, exit status 75, and
`--resume` ends with exactly the weights of a run never stopped; the SLURM script requeues."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cachefab import blocky_cache
from training.train.checkpoint import load_checkpoint
from training.train.plots import read_metrics
from training.train.preempt import REQUEUE_EXIT_STATUS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# 12 frames / batch 2 = 6 steps an epoch, an evaluation at every epoch end; no --checkpoint-every,
# so the stop's last.pt is the only one mid-epoch. Each step sleeps STEP_SLEEP seconds (a hook in
# the child), so the signal, sent once step SIGNAL_AT is logged, lands well before the end.
ITERS, SIGNAL_AT, STEP_SLEEP = 14, 3, 0.15
SLURM_ITERS = 30

SLOW_TRAIN = f"""
import sys, time
from training import cli
from training.train import run
original = run.Trainer._after_step
def after_step(self):
    original(self)
    time.sleep({STEP_SLEEP})
run.Trainer._after_step = after_step
cli.train.main(args=sys.argv[1:], prog_name="train")
"""


def flags(cache: Path, out: Path) -> list[str]:
    return ["--cache", str(cache), "--out", str(out), "--loader", "torch", "--arch", "unet",
            "--encoder", "tu-mobilenetv3_small_050", "--encoder-weights", "none",
            "--model-arg", "encoder_depth=3", "--model-arg", "decoder_channels=[16,8,8]",
            "--res", "128", "--batch-size", "2", "--iters", str(ITERS), "--log-every", "1",
            "--workers", "1", "--seed", "3", "--deterministic", "--no-plots", "--lr", "0.05"]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def wait_for_step(run_dir: Path, process: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]
        if steps and steps[-1] >= step:
            return
        if process.poll() is not None:
            raise AssertionError(f"train ended early: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {timeout} s")


def same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name], y[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    cache = blocky_cache(root / "cache", n_train=12, n_val=1, height=128, width=256)
    done = subprocess.run([sys.executable, "-m", "training.cli", "train", *flags(cache, root / "straight")],
                          cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return cache, root / "straight"


@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGUSR1, True),
                                        (signal.SIGTERM, True)],
                         ids=["SIGTERM to train", "SIGUSR1 to train and its loader worker",
                              "SIGTERM to train and its loader worker (scancel)"])
def test_a_stop_signal_checkpoints_exits_75_and_resumes_exactly(straight, tmp_path, sig, group):
    cache, reference = straight
    out = tmp_path / "stopped"
    child = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *flags(cache, out)], cwd=REPO,
                             env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    wait_for_step(out, child, SIGNAL_AT)
    if group:       # as torchrun forwards it: the loader worker gets it too, and runs on
        os.killpg(child.pid, sig)
    else:
        child.send_signal(sig)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == REQUEUE_EXIT_STATUS, stderr
    stopped = load_checkpoint(out / "last.pt")["progress"]
    assert SIGNAL_AT <= stopped["step"] < ITERS
    assert f"stopped by {signal.Signals(sig).name} at step {stopped['step']}" in stderr
    assert "Traceback" not in stderr
    logged = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "train"]
    assert logged[-1] == stopped["step"]                      # stopped right after that step
    resumed = subprocess.run([sys.executable, "-m", "training.cli", "train", "--out", str(out), "--resume"],
                             cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / "last.pt")["progress"] == load_checkpoint(reference / "last.pt")["progress"]
    same_weights(out / "last.pt", reference / "last.pt")
    trajectory = [(r["event"], r["step"], r.get("loss"), r.get("miou")) for r in read_metrics(out / "metrics.jsonl")]
    assert trajectory == [(r["event"], r["step"], r.get("loss"), r.get("miou"))
                          for r in read_metrics(reference / "metrics.jsonl")]


SHIMS = {
    # scontrol: the job's first node, and a requeue written down instead of done
    "scontrol": '#!/bin/bash\nif [[ $1 == show ]]; then echo localhost; else echo "$*" >> "$SHIM_LOG"; fi\n',
    # srun: one task on this machine (its options dropped); exec keeps the pid the script signals
    "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
}


def test_the_slurm_script_forwards_the_warning_and_requeues(straight, tmp_path):
    """scripts/slurm/train.sbatch with srun and scontrol stand-ins and the real torchrun: SIGUSR1
    to the script -> train checkpoints and stops -> the script requeues; the requeued run ends
    its work."""
    cache, _ = straight
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in SHIMS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    log, out = tmp_path / "scontrol.log", tmp_path / "slurm-run"
    env = {**environment(), "SHIM_LOG": str(log), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "1", "SLURM_CPUS_PER_TASK": "1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000),
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # no sleep hook inside torchrun's worker: a longer run leaves the signal time to land
    command = ["bash", str(REPO / "scripts" / "slurm" / "train.sbatch"), *flags(cache, out),
               "--iters", str(SLURM_ITERS)]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    wait_for_step(out, job, SIGNAL_AT)
    job.send_signal(signal.SIGUSR1)                 # SLURM's --signal=B:USR1@120
    output, _ = job.communicate(timeout=180)
    assert job.returncode == 0, output
    assert log.read_text().split() == ["requeue", "4242"], output
    stopped = load_checkpoint(out / "last.pt")["progress"]["step"]
    assert SIGNAL_AT <= stopped < SLURM_ITERS
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed {out / 'last.pt'} at step {stopped}" in again.stdout + again.stderr
    assert log.read_text().split() == ["requeue", "4242"]      # no second requeue
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == SLURM_ITERS


# Rank 1 alone gets SIGUSR1 once step 2 is done (after that step's stop check): the ranks must
# agree at step 3 and both stop there, with no rank left waiting in a collective.
ONE_RANK_SIGNALLED = """
import os, signal, sys
from training import cli
from training.train import run
original = run.Trainer._after_step
def after_step(self):
    original(self)
    if self.step == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGUSR1)
run.Trainer._after_step = after_step
cli.train.main(args=sys.argv[1:], prog_name="train")
"""


def test_under_torchrun_the_ranks_agree_to_stop_at_the_same_step(straight, tmp_path):
    cache, _ = straight
    script, out = tmp_path / "one_rank.py", tmp_path / "ddp"
    script.write_text(ONE_RANK_SIGNALLED)
    args = [*flags(cache, out), "--workers", "0", "--iters", "6", "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    stopped = subprocess.run([*torchrun, str(script), *args], cwd=REPO, env=environment(),
                             capture_output=True, text=True, timeout=300)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and output.count("stopped by SIGUSR1 at step 3") == 2, output[-3000:]
    assert f"exitcode  : {REQUEUE_EXIT_STATUS}" in output
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 3
    resumed = subprocess.run([*torchrun, "-m", "training.cli", "train", "--out", str(out), "--resume"],
                             cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 6


@pytest.mark.dali
def test_sigterm_to_a_dali_run_and_its_source_workers_checkpoints_and_exits_75(straight, tmp_path):
    """A scheduler's SIGTERM reaches DALI's source workers too: they keep serving while the
    run finishes its step and checkpoints (loaders/workers.py)."""
    pytest.importorskip("nvidia.dali")
    cache, _ = straight
    out = tmp_path / "dali"
    args = [*flags(cache, out)]
    args[args.index("--loader") + 1] = "dali"
    child = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *args], cwd=REPO,
                             env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    wait_for_step(out, child, SIGNAL_AT)
    os.killpg(child.pid, signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == REQUEUE_EXIT_STATUS, stderr
    step = load_checkpoint(out / "last.pt")["progress"]["step"]
    assert f"stopped by SIGTERM at step {step}" in stderr and "Traceback" not in stderr
