"""The run dir and its checkpoints: opening one to resume, preparing the folder, restoring the
position, and writing last.pt and best.pt.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from cache.errors import UserError
from training.core.device import DistEnv, unwrap
from training.outputs.folder import check_output_dir, claim_output_dir, MARKER, update_marker
from training.train.checkpoint import (capture_rng, check_compatible, check_training_state,
                                       load_checkpoint, load_model_state, restore_rng,
                                       save_checkpoint)
from training.train.config import save_config
from training.train.folds import write_fold_file
from training.train.plots import truncate_metrics
from training.train.progress import LogWindow


LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"


def gather_rng_states(env: DistEnv) -> list[dict]:
    """Every rank's RNG states (all ranks must call it: it is a collective under torchrun)."""
    states = [None] * env.world_size
    if env.distributed:
        dist.all_gather_object(states, capture_rng())
    else:
        states[0] = capture_rng()
    return states


class RunDirMixin:
    """The run dir and its checkpoints: opening one to resume, preparing the folder, restoring the (a part of training.train.run.Trainer)."""

    # -- the run dir and checkpoints --------------------------------------------------------
    def _open_checkpoint(self, resume: bool) -> tuple[Path, dict] | None:
        """(path, contents) of the checkpoint to resume from, if any. --out must be new, empty,
        or a run dir of ours (training.outputs.folder; an older version's run dir is known by
        its last.pt); refuses to overwrite a run by accident, a run that lost its last.pt, and a
        checkpoint of another model. Only looks: every rank calls it."""
        run = self.run_dir
        folder = check_output_dir(run, "run", option="--out", command="train", legacy=(LAST,))
        last = run / LAST
        if last.is_file():
            if not resume:
                raise UserError(f"--out {run}: holds a run already ({LAST}); pass --resume to "
                                "continue it, or choose another --out")
            data = load_checkpoint(last)
            check_training_state(data, last)
            check_compatible(data["meta"], self.meta, last)
            return last, data
        if folder.marker is not None and folder.marker.get("checkpointed"):
            raise UserError(self._lost_checkpoint(resume))
        if folder.marker is not None and not folder.empty:
            self._note(f"{run}: the run there stopped before its first checkpoint; "
                       "starting it again from step 0")
        elif resume:      # scripts/slurm/train.sbatch: the first start passes --resume too
            self._note(f"--resume: no run in {run} yet; starting a new one at step 0")
        return None

    def _lost_checkpoint(self, resume: bool) -> str:
        """Why a run dir whose last.pt was deleted is neither resumed nor replaced."""
        run = self.run_dir
        kept = ", ".join(name for name in (BEST, METRICS) if (run / name).is_file())
        kept = f" ({kept} kept)" if kept else ""
        start_anew = (f"start a new run with another --out (--init-from {run / BEST} begins "
                      "from its best weights)" if (run / BEST).is_file()
                      else "start a new run with another --out")
        if resume:
            return (f"--resume: the run in {run} has no {LAST} any more (deleted?): nothing to "
                    f"resume from{kept}; {start_anew}")
        return (f"--out {run}: holds a run whose {LAST} is gone (deleted?); a new run there "
                f"would replace what it left{kept}: {start_anew}")

    def _machine_notes(self) -> list[str]:
        """What this machine made of the per-machine settings (comments in config.yaml)."""
        return [f"on this machine: {self.env.device}, {self.env.world_size} rank(s); loader "
                f"workers per rank: train {self.train_loader.num_workers}, val "
                f"{self.val_loader.num_workers}"]

    def _prepare_run_dir(self, resumed: bool) -> None:
        """Mark --out as a run dir before anything else goes in (an older version's run dir is
        marked on resume), then write the resolved config."""
        with self._writing(self.run_dir / MARKER):
            claim_output_dir(self.run_dir, "run", option="--out", command="train", legacy=(LAST,))
            if resumed:
                update_marker(self.run_dir, checkpointed=True)
        with self._writing(self.run_dir / "config.yaml"):
            save_config(self.config, self.run_dir, notes=self._machine_notes())
            if self.fold is not None:
                write_fold_file(self.fold, self.reader.split(self.fold.split).frames, self.run_dir)
            if not resumed:     # a run killed before its first checkpoint may have left lines
                truncate_metrics(self.run_dir / METRICS, 0)

    def _restore(self, path: Path, data: dict) -> None:
        parts = self.parts
        load_model_state(unwrap(parts.model), data["model"], path)
        parts.optimizer.load_state_dict(data["optimizer"])
        parts.scheduler.load_state_dict(data["scheduler"])
        parts.scaler.load_state_dict(data["scaler"])
        saved = data["progress"]
        self.step, self.best_miou = saved["step"], saved["best_miou"]
        self.best_step = saved.get("best_step")
        self.saved_step, self.evaluated_step = self.step, saved["evaluated_step"]
        self.good_step = self.step
        self.window = LogWindow(self.env.device, **data["log_window"])
        states = data["rng"]
        restore_rng(states[self.env.rank] if len(states) == self.env.world_size else states[0])
        self._note_inexact_resume(saved, len(states))
        if self.env.is_main:
            truncate_metrics(self.run_dir / METRICS, self.step)
        self._note(f"resumed {path} at step {self.step} (epoch {self.epoch}, "
                   f"batch {self.batch_in_epoch})")

    def _note_inexact_resume(self, saved: dict, ranks: int) -> None:
        if ranks != self.env.world_size:
            self._note(f"resume: checkpoint from {ranks} rank(s), now {self.env.world_size}; "
                       "the data shards differ, so this is not an exact continuation")
        elif (saved["epoch"], saved["batch_in_epoch"]) != (self.epoch, self.batch_in_epoch):
            self._note(f"resume: an epoch now has {self.steps_per_epoch} steps (batch size, "
                       "--grad-accum or --limit changed?); continuing from epoch "
                       f"{self.epoch}, which is not an exact continuation")

    def _save_last(self) -> None:
        """last.pt with everything an exact resume needs (all ranks take part: RNG gather)."""
        self._stop_if_diverged()       # a checkpoint of non-finite weights would be no resume
        rng = gather_rng_states(self.env)
        if self.env.is_main:
            parts = self.parts
            with self._writing(self.run_dir / LAST):
                save_checkpoint(self.run_dir / LAST, {
                    "meta": self.meta, "model": unwrap(parts.model).state_dict(),
                    "optimizer": parts.optimizer.state_dict(),
                    "scheduler": parts.scheduler.state_dict(),
                    "scaler": parts.scaler.state_dict(), "progress": self._progress(), "rng": rng,
                    "config": self.config.to_dict(), "world_size": self.env.world_size,
                    "log_window": self.window.state(),
                })
                if self.good_step is None:      # from now on the run dir has a run to resume
                    update_marker(self.run_dir, checkpointed=True)
        self.saved_step = self.good_step = self.step

    def _save_best(self, scores: dict) -> None:
        with self._writing(self.run_dir / BEST):
            save_checkpoint(self.run_dir / BEST, {
                "meta": self.meta, "model": unwrap(self.parts.model).state_dict(),
                "progress": self._progress(),
                "scores": {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"]},
                "config": self.config.to_dict(),
            })

    def _progress(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best_miou": self.best_miou, "best_step": self.best_step, "total_steps": self.total_steps,
                "evaluated_step": self.evaluated_step}
