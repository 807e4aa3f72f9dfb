"""Live tensor memory of the combined loss: each term casting half-precision logits itself
(as built) against one shared float32 cast before the terms (the alternative).

    python scripts/bench_loss_memory.py [--loss ce+dice] [--batch 8] [--res 640] \\
        [--dtype bf16] --json bench/loss_memory.json

Both are run side by side on the same logits with training.core.memory.LiveBytes (storage bytes
alive at each aten op; the logits and targets themselves are not counted). "shared cast"
feeds the loss `logits.float()`, made inside the measured region, which is exactly what one
cast in CombinedLoss would do (a term's own cast is a no-op on float32 input). Reports the
forward's peak, the forward+backward peak, the forward's peak under no_grad (evaluation's
val loss), the loss values and the largest gradient difference. CPU is fine: the counts are
the storages autograd and the ops keep, the same on any device.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.core.losses import build_loss  # noqa: E402
from training.core.memory import LiveBytes  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 2 ** 20


def measure(spec: str, logits: torch.Tensor, target: torch.Tensor, shared_cast: bool) -> dict:
    loss_fn = build_loss(spec, ignore_index=255)
    leaf = logits.detach().clone().requires_grad_()
    with LiveBytes() as live:
        loss = loss_fn(leaf.float() if shared_cast else leaf, target)
        forward_peak = live.peak
        loss.backward()
    with torch.no_grad(), LiveBytes() as eval_live:
        loss_fn(logits.float() if shared_cast else logits, target)
    return {"loss": loss.item(), "forward_peak_mib": round(forward_peak / MIB),
            "peak_mib": round(live.peak / MIB), "no_grad_peak_mib": round(eval_live.peak / MIB),
            "grad": leaf.grad.float()}


@click.command()
@click.option("--loss", "specs", multiple=True, default=("ce+dice", "ce+dice+focal"),
              show_default=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--classes", default=19, show_default=True)
@click.option("--res", default=640, show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bf16", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(specs, batch, classes, res, dtype, json_path):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, res, res, generator=gen).to(DTYPES[dtype])
    target = torch.randint(0, classes, (batch, res, res), generator=gen)
    target[:, : res // 16] = 255
    results = {}
    for spec in specs:
        per_term = measure(spec, logits, target, shared_cast=False)
        shared = measure(spec, logits, target, shared_cast=True)
        diff = (per_term.pop("grad") - shared.pop("grad")).abs().max().item()
        results[spec] = {"per_term_cast": per_term, "shared_cast": shared,
                         "same_loss": per_term["loss"] == shared["loss"], "max_grad_diff": diff}
        print(f"{spec:>14}  forward peak {per_term['forward_peak_mib']} vs "
              f"{shared['forward_peak_mib']} MiB, fwd+bwd {per_term['peak_mib']} vs "
              f"{shared['peak_mib']} MiB, no_grad {per_term['no_grad_peak_mib']} vs "
              f"{shared['no_grad_peak_mib']} MiB (per-term cast vs shared cast)")
    report = {"batch": batch, "classes": classes, "res": res, "dtype": dtype, "results": results}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
