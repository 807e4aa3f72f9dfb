"""`train` and `evaluate`: parse options, call one library function.

    train --cache CACHE --loader dali --res 640 --out runs/r1
    torchrun --nproc_per_node 2 -m training.cli train --cache CACHE --out runs/r1
    evaluate --checkpoint runs/r1/best.pt --cache CACHE --tta 0.75,1.0,1.25 --flip

Values are checked by training.train.config, the same way for flags and for --config files, so
every flag is read as text here and a mistake is reported as `error: ...` with exit status 1.
"""
from __future__ import annotations


import click

from cache.errors import UserError, report_user_errors

# Ctrl-C: each command names what it leaves and the command that goes on from there.
user_errors = report_user_errors("interrupted; `train --out RUN --resume` continues from its last.pt")
evaluate_errors = report_user_errors(
    "interrupted; the PNGs already written are whole and no scores JSON was written: run the "
    "same `evaluate` command again (--export wants a new or empty folder)")
predict_errors = report_user_errors(
    "interrupted; the pictures already written are whole: run the same `predict` command again")


def _opt(name: str, metavar: str, help_text: str):
    return click.option(name, default=None, metavar=metavar, help=help_text)


TRAIN_OPTIONS = [
    click.option("--config", "config_file", default=None, metavar="FILE",
                 help="YAML or JSON file of these options (flags override it)."),
    _opt("--cache", "DIR", "Cache made by `dataprep build`.  "
         "[default: $CITYSCAPES_CACHE, else ./cityscapes.zarr]"),
    _opt("--out", "DIR", "Run dir: config, metrics.jsonl, last.pt, best.pt, plots.  "
         "[default: runs/train]"),
    _opt("--loader", "dali|torch", "Loader kind.  [default: dali]"),
    _opt("--train-split", "NAME", "Training split.  [default: train]"),
    _opt("--val-split", "NAME", "Validation split.  [default: val]"),
    _opt("--arch", "NAME", "Any smp architecture, case-insensitive: Unet, UnetPlusPlus, MAnet, "
         "Linknet, FPN, PSPNet, PAN, DeepLabV3, DeepLabV3Plus, UPerNet, Segformer, DPT.  "
         "[default: deeplabv3plus]"),
    _opt("--encoder", "NAME", "smp encoder, e.g. resnet50, efficientnet-b4, tu-convnext_tiny.  "
         "[default: resnet50]"),
    _opt("--encoder-weights", "imagenet|none", "Pretrained encoder weights.  [default: imagenet]"),
    click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                 help="Extra smp model argument, e.g. encoder_depth=3 (repeatable)."),
    _opt("--epochs", "N", "Epochs to train (or --iters).  [default: 100]"),
    _opt("--iters", "N", "Optimiser steps to train (or --epochs)."),
    _opt("--batch-size", "N", "Frames per micro-batch per rank.  [default: 8]"),
    _opt("--val-batch-size", "N|auto", "Frames per validation batch; auto is 1 on the CPU and "
         "on CUDA the largest batch up to 8 whose estimated peak memory fits the card (the "
         "number goes into config.yaml).  [default: auto]"),
    _opt("--grad-accum", "N", "Micro-batches per optimiser step.  [default: 1]"),
    _opt("--lr", "LR", "Base learning rate.  [default: sgd 0.01, adamw 1e-4]"),
    _opt("--weight-decay", "WD", "Weight decay.  [default: sgd 1e-4, adamw 1e-2]"),
    _opt("--momentum", "M", "SGD momentum.  [default: 0.9]"),
    _opt("--optimizer", "sgd|adamw", "Optimiser.  [default: sgd]"),
    _opt("--schedule", "poly|cosine", "Learning-rate schedule.  [default: poly]"),
    _opt("--poly-power", "P", "Exponent of the poly schedule.  [default: 0.9]"),
    _opt("--warmup", "STEPS", "Linear warm-up steps.  [default: 0]"),
    _opt("--loss", "SPEC", "ce, focal, dice or a sum such as ce+dice, ce+0.5*dice.  [default: ce]"),
    _opt("--class-weights", "none|FILE[:METHOD]", "Loss weights per class from a stats JSON of "
         "`dataprep stats` (METHOD: enet, median_frequency, inverse_sqrt; default enet), or none. "
         "By default the cache's own stats.json with the ENet rule if `dataprep stats` wrote it, "
         "else none; the run's first lines say which.  [default: auto]"),
    _opt("--amp", "auto|bf16|fp16|none", "Mixed precision: auto is bf16 on a GPU with native "
         "bf16 (compute capability 8.0+: RTX 30xx, A100, H100), fp16 with loss scaling on 7.x "
         "(RTX 20xx, T4, V100), none (float32) on older GPUs and the CPU; bf16 is refused on a "
         "GPU without native bf16. The run's first lines say which and why.  [default: auto]"),
    click.option("--channels-last/--no-channels-last", default=None,
                 help="channels_last memory format for images and model.  "
                 "[default: on with CUDA, off on CPU]"),
    _opt("--eval-every", "STEPS", "Validate every N steps.  [default: end of every epoch]"),
    _opt("--log-every", "STEPS", "A metrics.jsonl train line every N steps.  [default: 10]"),
    _opt("--checkpoint-every", "STEPS", "Also write last.pt every N steps."),
    _opt("--res", "N|HxW", "Training crop size.  [default: 640]"),
    _opt("--scale", "LOW,HIGH", "Random scale range.  [default: 0.5,2.0]"),
    _opt("--eval-scale", "S", "Validation frames are resized by S.  [default: 1.0]"),
    _opt("--flip-prob", "P", "Horizontal flip probability.  [default: 0.5]"),
    click.option("--jitter/--no-jitter", default=None, help="Colour jitter.  [default: on]"),
    _opt("--cat-max-ratio", "R", "Re-draw crops where one class covers more than R."),
    _opt("--workers", "N", "Loader workers per rank.  [default: loader's default]"),
    _opt("--device", "DEV", "cpu, cuda, cuda:1.  [default: cuda if available]"),
    _opt("--seed", "N", "Seed of model init, sample order and augmentation.  [default: 0]"),
    _opt("--limit", "N", "Smoke run: at most N steps per epoch and N validation frames."),
    click.option("--sync-bn/--no-sync-bn", default=None,
                 help="SyncBatchNorm under DDP.  [default: off]"),
    click.option("--deterministic/--no-deterministic", default=None,
                 help="torch.use_deterministic_algorithms.  [default: off]"),
    click.option("--plots/--no-plots", default=None, help="Write PNG plots.  [default: on]"),
    click.option("--tensorboard/--no-tensorboard", default=None,
                 help="Also write TensorBoard event files into RUN/tb (needs the tensorboard "
                 "package).  [default: off]"),
    _opt("--init-from", "CKPT", "Start from the weights (only) of a checkpoint: new optimiser, "
         "schedule and step count; another label set gets a fresh head."),
    _opt("--folds", "K", "Cross-validation: split the train split into K folds of whole cities."),
    _opt("--fold", "I", "With --folds: validate on fold I (0-based), train on the others."),
    click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt."),
]


def _apply(options):
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function
    return decorate


HELP = {"help_option_names": ["-h", "--help"]}


@click.command("train", context_settings=HELP)
@_apply(TRAIN_OPTIONS)
@user_errors
def train(config_file, model_args, resume, **flags):
    """Train an smp model on a cache, validating and checkpointing as it goes.

    \b
    Examples:
      train --loader dali --res 640
      train --arch unet --encoder resnet18 --iters 200 --limit 20 --out runs/smoke
      train --out runs/train --resume
      train --config exp.yaml --lr 0.02 --tensorboard

    The first trains on the default cache with its stats.json class weights; --resume
    continues the run in --out from its last.pt; flags override a --config file.
    """
    from training.train.config import parse_model_args, resolve_config
    from training.train.run import run_training

    if model_args:
        flags["model_kwargs"] = parse_model_args(model_args)
    notes: list[str] = []
    config = resolve_config(flags, config_file, resume=resume, notes=notes)
    for note in notes:
        click.echo(note, err=True)
    from training.train.preempt import Preempted

    try:
        return run_training(config, resume=resume)
    except Preempted as stop:          # SIGTERM/SIGUSR1: checkpointed; the job may be requeued
        click.echo(str(stop), err=True)
        raise SystemExit(stop.exit_status) from None
    except KeyboardInterrupt:
        from pathlib import Path

        if (Path(config.out) / "last.pt").is_file():
            click.echo(f"interrupted; `train --out {config.out} --resume` continues from its "
                       f"last checkpoint ({config.out}/last.pt)", err=True)
        else:
            click.echo(f"interrupted before the first checkpoint of {config.out}; the same "
                       "command starts it again", err=True)
        raise SystemExit(130) from None


def parse_scales(text: str) -> tuple[float, ...]:
    """"0.75,1.0,1.25" -> (0.75, 1.0, 1.25); run_evaluate checks the values."""
    try:
        return tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UserError(f"--tta {text!r}: expected scales like 0.75,1.0,1.25") from None


@click.command("evaluate", context_settings=HELP)
@click.option("--checkpoint", required=True, metavar="FILE", help="best.pt or last.pt of a run.")
@click.option("--cache", default=None, metavar="DIR", help="Cache made by `dataprep build`.  "
              "[default: $CITYSCAPES_CACHE, else ./cityscapes.zarr]")
@click.option("--split", default="val", show_default=True, metavar="NAME",
              help="Split to score (or export).")
@click.option("--loader", default=None, metavar="torch|dali",
              help="Loader kind.  [default: the one the run validated with]")
@click.option("--batch-size", default="auto", show_default=True, metavar="N|auto",
              help="Frames per forward pass; auto: 1 on the CPU, on CUDA the largest batch up "
              "to 8 whose estimated peak memory (model, frame size, --amp, --tta, --flip) fits "
              "the card.")
@click.option("--tta", default="1.0", show_default=True, metavar="SCALES",
              help="Test-time scales, e.g. 0.75,1.0,1.25.")
@click.option("--flip", is_flag=True, help="Add mirrored views (test-time augmentation).")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write the scores here.")
@click.option("--export", "export_dir", default=None, metavar="DIR",
              help="Write predictions as benchmark labelId PNGs.")
@click.option("--visualize", "visualize_dir", default=None, metavar="DIR",
              help="Write per frame the prediction in the official colours and a sheet of "
              "image, prediction, ground truth and errors with a legend.")
@click.option("--device", default=None, metavar="DEV",
              help="cpu, cuda, cuda:1.  [default: cuda if available]")
@click.option("--limit", default=None, type=int, metavar="N", help="Score only the first N frames.")
@click.option("--eval-scale", default=1.0, type=float, show_default=True,
              help="Resize frames by this factor before the model.")
@click.option("--workers", default=None, type=int, metavar="N",
              help="Loader workers.  [default: loader's default]")
@click.option("--amp", default="none", show_default=True, type=click.Choice(["bf16", "fp16", "none"]),
              help="Autocast dtype (fp16 needs CUDA).")
@evaluate_errors
def evaluate(checkpoint, cache, split, loader, batch_size, tta, flip, json_path, export_dir,
             visualize_dir, device, limit, eval_scale, workers, amp):
    """Score a checkpoint on a cache split (official Cityscapes metrics), optionally with TTA.

    \b
    Examples:
      evaluate --checkpoint runs/train/best.pt --json runs/train/val.json
      evaluate --checkpoint runs/train/best.pt --tta 0.75,1.0,1.25 --flip
      evaluate --checkpoint runs/train/best.pt --visualize overlays --limit 20
      evaluate --checkpoint runs/train/best.pt --split test --export results

    The last writes the test split in the benchmark server's format.
    """
    from cache.location import resolve_cache
    from training.infer.evaluate import run_evaluate

    if cache is None:
        found = resolve_cache(None, must_exist=True)
        click.echo(found.describe("cache"), err=True)
        cache = str(found.path)
    batch_size = _eval_batch_size(batch_size, checkpoint, cache, split, device=device,
                                  amp=None if amp == "none" else amp, tta=tta, flip=flip,
                                  eval_scale=eval_scale)
    return run_evaluate(checkpoint, cache, split, loader=loader, batch_size=batch_size,
                        tta_scales=parse_scales(tta), tta_flip=flip, json_path=json_path,
                        export_dir=export_dir, visualize_dir=visualize_dir, device=device,
                        limit=limit, eval_scale=eval_scale, num_workers=workers,
                        amp=None if amp == "none" else amp)


def _eval_batch_size(value, checkpoint, cache, split, *, device, amp, tta, flip,
                     eval_scale) -> int:
    """evaluate --batch-size: a number as given, or auto (training.infer.evaluate.auto_eval_batch)."""
    if str(value).strip().lower() != "auto":
        try:
            return int(str(value))
        except ValueError:
            raise UserError(f"--batch-size: {value!r} is not an integer or auto") from None
    from training.infer.evaluate import auto_eval_batch

    try:
        scales = parse_scales(tta)
    except UserError:
        scales = ()      # run_evaluate reports it
    return auto_eval_batch(checkpoint, cache, split, device=device, amp=amp, tta_scales=scales,
                           tta_flip=flip, eval_scale=eval_scale)


@click.command("predict", context_settings=HELP)
@click.option("--checkpoint", required=True, metavar="FILE", help="best.pt or last.pt of a run.")
@click.option("--input", "input_spec", required=True, metavar="PATH",
              help="A PNG/JPEG image, a folder of them (searched recursively), a quoted glob "
                   "such as 'frames/*.png', or a video file (.mp4, .mkv, .mov, .avi, ...).")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Folder for KEY_color.png, KEY_overlay.png and predict.json.")
@click.option("--video", "video_path", default=None, metavar="FILE.mp4",
              help="Also write the overlays, in input order, as an H.264 video.")
@click.option("--fps", default=None, type=float,
              help="Frame rate of --video.  [default: the input video's, or 5 for images]")
@click.option("--images/--no-images", default=True, show_default=True,
              help="Write the colour and overlay PNGs.")
@click.option("--batch-size", default=1, type=int, show_default=True,
              help="Frames per forward pass (frames of one size are batched).")
@click.option("--tta", default="1.0", show_default=True, metavar="SCALES",
              help="Test-time scales, e.g. 0.75,1.0,1.25.")
@click.option("--flip", is_flag=True, help="Add mirrored views (test-time augmentation).")
@click.option("--eval-scale", default=None, type=float,
              help="Resize frames by this factor before the model.  [default: the checkpoint's]")
@click.option("--alpha", default=0.5, type=float, show_default=True,
              help="Weight of the colours in the overlay.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1.  [default: cuda if available]")
@click.option("--amp", default="none", show_default=True, type=click.Choice(["bf16", "fp16", "none"]),
              help="Autocast dtype (fp16 needs CUDA).")
@click.option("--limit", default=None, type=int, help="Predict only the first N frames.")
@predict_errors
def predict(checkpoint, input_spec, out_dir, video_path, fps, images, batch_size, tta, flip,
            eval_scale, alpha, device, amp, limit):
    """Predict images or a video with a checkpoint: colour and overlay pictures, and a video.

    An input that cannot be read is reported in one line and left out; the others are
    predicted, and the exit status is then 3."""
    from training.infer.predict import EXIT_FAILED_INPUTS, run_predict

    record = run_predict(checkpoint, input_spec, out_dir, video_path=video_path, fps=fps,
                         images=images, batch_size=batch_size, tta_scales=parse_scales(tta),
                         tta_flip=flip, eval_scale=eval_scale, alpha=alpha, device=device,
                         amp=None if amp == "none" else amp, limit=limit)
    if record["failed"]:
        raise SystemExit(EXIT_FAILED_INPUTS)


@click.group(context_settings=HELP)
def main():
    """Train and evaluate segmentation models on a Cityscapes cache."""


main.add_command(train)
main.add_command(evaluate)
main.add_command(predict)


def train_main():
    """Console script `train`."""
    train.main(prog_name="train")


def evaluate_main():
    """Console script `evaluate`."""
    evaluate.main(prog_name="evaluate")


def predict_main():
    """Console script `predict`."""
    predict.main(prog_name="predict")


if __name__ == "__main__":
    main()
