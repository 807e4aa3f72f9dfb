"""The evaluation-memory table of the README: for every recipe in configs/*.yaml, the estimated
peak GPU memory (training.core.memory) of evaluating whole 2048x1024 frames, batch 1..8, and the
largest batch that fits a 6 GB card (RTX 2060) and a 12 GB card (RTX 3060), plain and with
flip TTA, for `evaluate` (no loss, no optimiser state) and for validation inside the recipe's
training run (its loss and optimiser state on the card as well). Runs on the CPU.

    python scripts/eval_memory_table.py [--amp fp16] [--json table.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.core.memory import FIT_MARGIN, GIB, MAX_AUTO_BATCH, eval_memory  # noqa: E402

# what torch reports as total_memory: the nominal size less what the driver keeps (~3%)
CARDS = {"RTX 2060 6 GB": int(0.97 * 6 * GIB), "RTX 3060 12 GB": int(0.97 * 12 * GIB)}
FRAME = (1024, 2048)


def recipes(folder: Path) -> list[dict]:
    import yaml

    out = []
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        out.append({"recipe": path.stem, "arch": data.get("arch", "deeplabv3plus"),
                    "encoder": data.get("encoder", "resnet50"),
                    "model_kwargs": data.get("model_kwargs") or {},
                    "loss": data.get("loss", "ce"), "optimizer": data.get("optimizer", "sgd")})
    return out


def row(recipe: dict, amp: str | None, flip: bool, training: bool) -> dict:
    extra = ({"loss": recipe["loss"], "optimizer": recipe["optimizer"], "channels_last": True}
             if training else {"channels_last": False})
    totals = [eval_memory(recipe["arch"], recipe["encoder"], FRAME, batch, amp, tta_flip=flip,
                          model_kwargs=recipe["model_kwargs"], **extra)
              for batch in range(1, MAX_AUTO_BATCH + 1)]
    fits = {}
    for card, total in CARDS.items():
        budget = total * (1 - FIT_MARGIN)
        fitting = [b for b, m in enumerate(totals, 1) if m.total <= budget]
        fits[card] = max(fitting) if fitting else 0
    first = totals[0]
    return {**recipe, "amp": amp, "flip": flip, "pass": "train-val" if training else "evaluate",
            "weights_gib": first.weights / GIB, "resident_gib": first.resident / GIB,
            "activations_gib_per_batch": [m.activations / GIB for m in totals],
            "peak_gib": [m.total / GIB for m in totals], "fits": fits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amp", default="fp16", choices=["fp16", "bf16", "none"])
    parser.add_argument("--configs", default=str(Path(__file__).resolve().parent.parent / "configs"))
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    amp = None if args.amp == "none" else args.amp
    rows = []
    print(f"peak GiB at {FRAME[1]}x{FRAME[0]}, {args.amp}, batch 1..{MAX_AUTO_BATCH}; "
          f"fits: largest batch within (1 - {FIT_MARGIN}) of the card (0: none)")
    for recipe in recipes(Path(args.configs)):
        for training in (False, True):
            for flip in (False, True):
                r = row(recipe, amp, flip, training)
                rows.append(r)
                peaks = " ".join(f"{p:5.2f}" for p in r["peak_gib"])
                fits = " ".join(f"{card.split()[1]}:{b}" for card, b in r["fits"].items())
                print(f"{recipe['recipe']:36s} {r['pass']:9s} flip={int(flip)} "
                      f"{peaks}  {fits}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
