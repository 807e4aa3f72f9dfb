"""Training throughput (forward + backward + optimiser step) with each loader kind.

    python scripts/bench_train.py --cache CACHE --res 640 --batch-size 8 \
        --arch deeplabv3plus --encoder resnet50 --loaders replay,torch,dali --iters 50 \
        --json bench/train.json

"replay" feeds one batch already on the device over and over: the ceiling a loader can
reach. loader_cost = 1 - images_per_s / ceiling (the target is under 5% with DALI on a GPU).
loader_only_images_per_s is the loader alone, nothing else running. The logic lives in
training.throughput.benchmark_training; this script only parses options and reports.

--amp auto (the default, as in `train`) picks bf16 on compute capability 8.0+, fp16 with loss
scaling on 7.x and float32 below and on the CPU; the JSON's "amp" is what was chosen and its
"precision" says on what card and why (name, capability such as "sm_75", native_bf16, reason).
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from cache.errors import report_user_errors


@click.command()
@click.option("--cache", required=True, help="Cache made by `dataprep build`.")
@click.option("--res", default="640", show_default=True, help="Crop size N or HxW.")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--arch", default="deeplabv3plus", show_default=True)
@click.option("--encoder", default="resnet50", show_default=True)
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Extra smp model argument (repeatable), e.g. encoder_depth=3.")
@click.option("--loaders", default="replay,torch,dali", show_default=True,
              help="Comma-separated: replay, torch, dali.")
@click.option("--iters", default=30, show_default=True, type=int, help="Timed steps per loader.")
@click.option("--warmup", default=5, show_default=True, type=int, help="Untimed steps first.")
@click.option("--rounds", default=1, show_default=True, type=int,
              help="Kinds take turns this many times; the median counts (shared machines).")
@click.option("--workers", default=None, type=int, help="Loader workers [loader default].")
@click.option("--device", default=None, help="cpu or cuda [cuda if available].")
@click.option("--amp", default="auto", show_default=True,
              help="auto, bf16, fp16 or none (auto: what `train` would pick on this device).")
@click.option("--threads", default=None, type=int, help="torch intra-op threads (CPU).")
@click.option("--json", "json_path", default=None, help="Write the results here.")
@report_user_errors()
def main(cache, res, batch_size, arch, encoder, model_args, loaders, iters, warmup, rounds,
         workers, device, amp, threads, json_path):
    from dataclasses import replace

    from training.throughput import benchmark_training
    from training.train.config import parse_model_args, resolve_config
    from training.core.device import choose_precision, describe_precision, resolve_device

    if threads:
        torch.set_num_threads(threads)
    config = resolve_config({
        "cache": cache, "res": res, "batch_size": batch_size, "arch": arch, "encoder": encoder,
        "encoder_weights": "none", "model_kwargs": parse_model_args(model_args),
        "workers": workers, "device": device, "amp": amp, "out": "unused"})
    precision = choose_precision(config.amp, resolve_device(config.device))  # refusals first
    config = replace(config, amp=precision.amp)
    click.echo(f"precision: {precision.reason}")
    kinds = [kind.strip() for kind in loaders.split(",") if kind.strip()]
    report = benchmark_training(config, kinds, iters=iters, warmup=warmup, rounds=rounds)
    report["amp_requested"] = amp
    report["precision"] = describe_precision(report["device"], precision.amp)
    for kind, result in report["results"].items():
        cost = result["loader_cost"]
        alone = result["loader_only_images_per_s"]
        click.echo(f"{kind:>7}: {result['images_per_s']:8.2f} img/s train"
                   f"{'' if alone is None else f', {alone:8.2f} img/s loader alone'}"
                   f"{'' if cost is None else f', loader cost {100 * cost:5.1f}%'}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
