"""`train` and `evaluate`: parse options, call one library function.

    train --cache CACHE --loader dali --res 640 --out runs/r1
    torchrun --nproc_per_node 2 -m training.cli train --cache CACHE --out runs/r1
    evaluate --checkpoint runs/r1/best.pt --cache CACHE --tta 0.75,1.0,1.25 --flip

Values are checked by training.config, the same way for flags and for --config files, so
every flag is read as text here and a mistake is reported as `error: ...` with exit status 1.
"""
from __future__ import annotations


import click

from cache.errors import UserError, report_user_errors

user_errors = report_user_errors("interrupted; `train --out RUN --resume` continues from its last.pt")


def _opt(name: str, metavar: str, help_text: str):
    return click.option(name, default=None, metavar=metavar, help=help_text)


TRAIN_OPTIONS = [
    click.option("--config", "config_file", default=None, metavar="FILE",
                 help="YAML or JSON file of these options (flags override it)."),
    _opt("--cache", "DIR", "Cache made by `dataprep build` (required)."),
    _opt("--out", "DIR", "Run dir: config, metrics.jsonl, last.pt, best.pt, plots [runs/train]."),
    _opt("--loader", "dali|torch", "Loader kind [dali]."),
    _opt("--train-split", "NAME", "Training split [train]."),
    _opt("--val-split", "NAME", "Validation split [val]."),
    _opt("--arch", "NAME", "Any smp architecture, case-insensitive: Unet, UnetPlusPlus, MAnet, "
         "Linknet, FPN, PSPNet, PAN, DeepLabV3, DeepLabV3Plus, UPerNet, Segformer, DPT "
         "[deeplabv3plus]."),
    _opt("--encoder", "NAME", "smp encoder, e.g. resnet50, efficientnet-b4, tu-convnext_tiny [resnet50]."),
    _opt("--encoder-weights", "imagenet|none", "Pretrained encoder weights [imagenet]."),
    click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                 help="Extra smp model argument, e.g. encoder_depth=3 (repeatable)."),
    _opt("--epochs", "N", "Epochs to train (or --iters) [100]."),
    _opt("--iters", "N", "Optimiser steps to train (or --epochs)."),
    _opt("--batch-size", "N", "Frames per micro-batch per rank [8]."),
    _opt("--val-batch-size", "N", "Frames per validation batch [1]."),
    _opt("--grad-accum", "N", "Micro-batches per optimiser step [1]."),
    _opt("--lr", "LR", "Base learning rate [sgd 0.01, adamw 1e-4]."),
    _opt("--weight-decay", "WD", "Weight decay [sgd 1e-4, adamw 1e-2]."),
    _opt("--momentum", "M", "SGD momentum [0.9]."),
    _opt("--optimizer", "sgd|adamw", "Optimiser [sgd]."),
    _opt("--schedule", "poly|cosine", "Learning-rate schedule [poly]."),
    _opt("--poly-power", "P", "Exponent of the poly schedule [0.9]."),
    _opt("--warmup", "STEPS", "Linear warm-up steps [0]."),
    _opt("--loss", "SPEC", "ce, focal, dice or a sum such as ce+dice, ce+0.5*dice [ce]."),
    _opt("--class-weights", "FILE[:METHOD]", "Class weights from the stats JSON of `dataprep "
         "stats` (enet, median_frequency, inverse_sqrt) [enet]."),
    _opt("--amp", "bf16|fp16|none", "Mixed precision (fp16 needs CUDA) [none]."),
    _opt("--eval-every", "STEPS", "Validate every N steps [end of every epoch]."),
    _opt("--log-every", "STEPS", "A metrics.jsonl train line every N steps [10]."),
    _opt("--checkpoint-every", "STEPS", "Also write last.pt every N steps."),
    _opt("--res", "N|HxW", "Training crop size [640]."),
    _opt("--scale", "LOW,HIGH", "Random scale range [0.5,2.0]."),
    _opt("--eval-scale", "S", "Validation frames are resized by S [1.0]."),
    _opt("--flip-prob", "P", "Horizontal flip probability [0.5]."),
    click.option("--jitter/--no-jitter", default=None, help="Colour jitter [on]."),
    _opt("--cat-max-ratio", "R", "Re-draw crops where one class covers more than R."),
    _opt("--workers", "N", "Loader workers per rank [loader's default]."),
    _opt("--device", "DEV", "cpu, cuda, cuda:1 [cuda if available]."),
    _opt("--seed", "N", "Seed of model init, sample order and augmentation [0]."),
    _opt("--limit", "N", "Smoke run: at most N steps per epoch and N validation frames."),
    click.option("--sync-bn/--no-sync-bn", default=None, help="SyncBatchNorm under DDP [off]."),
    click.option("--deterministic/--no-deterministic", default=None,
                 help="torch.use_deterministic_algorithms [off]."),
    click.option("--plots/--no-plots", default=None, help="Write PNG plots [on]."),
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
    """Train an smp model on a cache, validating and checkpointing as it goes."""
    from training.config import parse_model_args, resolve_config
    from training.run import run_training

    if model_args:
        flags["model_kwargs"] = parse_model_args(model_args)
    config = resolve_config(flags, config_file, resume=resume)
    return run_training(config, resume=resume)


def parse_scales(text: str) -> tuple[float, ...]:
    """"0.75,1.0,1.25" -> (0.75, 1.0, 1.25); run_evaluate checks the values."""
    try:
        return tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UserError(f"--tta {text!r}: expected scales like 0.75,1.0,1.25") from None


@click.command("evaluate", context_settings=HELP)
@click.option("--checkpoint", required=True, metavar="FILE", help="best.pt or last.pt of a run.")
@click.option("--cache", required=True, metavar="DIR", help="Cache made by `dataprep build`.")
@click.option("--split", default="val", show_default=True, help="Split to score (or export).")
@click.option("--loader", default="torch", show_default=True, help="Loader kind: torch or dali.")
@click.option("--batch-size", default=1, type=int, show_default=True)
@click.option("--tta", default="1.0", show_default=True, metavar="SCALES",
              help="Test-time scales, e.g. 0.75,1.0,1.25.")
@click.option("--flip", is_flag=True, help="Add mirrored views (test-time augmentation).")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write the scores here.")
@click.option("--export", "export_dir", default=None, metavar="DIR",
              help="Write predictions as benchmark labelId PNGs.")
@click.option("--visualize", "visualize_dir", default=None, metavar="DIR",
              help="Write colour overlays of the predictions.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [cuda if available].")
@click.option("--limit", default=None, type=int, help="Score only the first N frames.")
@click.option("--eval-scale", default=1.0, type=float, show_default=True,
              help="Resize frames by this factor before the model.")
@click.option("--workers", default=None, type=int, help="Loader workers.")
@click.option("--amp", default="none", show_default=True, type=click.Choice(["bf16", "fp16", "none"]),
              help="Autocast dtype (fp16 needs CUDA).")
@user_errors
def evaluate(checkpoint, cache, split, loader, batch_size, tta, flip, json_path, export_dir,
             visualize_dir, device, limit, eval_scale, workers, amp):
    """Score a checkpoint on a cache split (official Cityscapes metrics), optionally with TTA."""
    from training.evaluate import run_evaluate

    return run_evaluate(checkpoint, cache, split, loader=loader, batch_size=batch_size,
                        tta_scales=parse_scales(tta), tta_flip=flip, json_path=json_path,
                        export_dir=export_dir, visualize_dir=visualize_dir, device=device,
                        limit=limit, eval_scale=eval_scale, num_workers=workers,
                        amp=None if amp == "none" else amp)


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
              help="Frame rate of --video [the input video's, or 5 for images].")
@click.option("--images/--no-images", default=True, show_default=True,
              help="Write the colour and overlay PNGs.")
@click.option("--batch-size", default=1, type=int, show_default=True,
              help="Frames per forward pass (frames of one size are batched).")
@click.option("--tta", default="1.0", show_default=True, metavar="SCALES",
              help="Test-time scales, e.g. 0.75,1.0,1.25.")
@click.option("--flip", is_flag=True, help="Add mirrored views (test-time augmentation).")
@click.option("--eval-scale", default=None, type=float,
              help="Resize frames by this factor before the model [the checkpoint's].")
@click.option("--alpha", default=0.5, type=float, show_default=True,
              help="Weight of the colours in the overlay.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [cuda if available].")
@click.option("--amp", default="none", show_default=True, type=click.Choice(["bf16", "fp16", "none"]),
              help="Autocast dtype (fp16 needs CUDA).")
@click.option("--limit", default=None, type=int, help="Predict only the first N frames.")
@user_errors
def predict(checkpoint, input_spec, out_dir, video_path, fps, images, batch_size, tta, flip,
            eval_scale, alpha, device, amp, limit):
    """Predict images or a video with a checkpoint: colour and overlay pictures, and a video."""
    from training.predict import run_predict

    run_predict(checkpoint, input_spec, out_dir, video_path=video_path, fps=fps, images=images,
                batch_size=batch_size, tta_scales=parse_scales(tta), tta_flip=flip,
                eval_scale=eval_scale, alpha=alpha, device=device,
                amp=None if amp == "none" else amp, limit=limit)


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
