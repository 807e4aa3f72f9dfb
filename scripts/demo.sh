#!/usr/bin/env bash
# The whole job on the built-in synthetic dataset, on a CPU in a few minutes:
# synth -> build -> stats -> train -> evaluate (prints the per-class table).
# Usage: scripts/demo.sh [WORKDIR]   (default: ./demo; it is replaced)
set -euo pipefail
work="${1:-demo}"
rm -rf "$work"
dataprep synth --out "$work/raw" --frames 24 --height 512 --width 1024
dataprep build --root "$work/raw" --out "$work/cache"
dataprep stats --cache "$work/cache"
dataprep verify --cache "$work/cache"
train --cache "$work/cache" --out "$work/run" --loader "${LOADER:-dali}" \
      --arch unet --encoder resnet18 --encoder-weights none \
      --model-arg encoder_depth=3 --model-arg 'decoder_channels=[64,32,16]' \
      --res 256 --batch-size 8 --iters "${ITERS:-100}" --eval-every 50 \
      --optimizer adamw --lr 2e-3 --warmup 10 --loss ce+dice \
      --class-weights "$work/cache/stats.json:enet" --eval-scale 0.5
evaluate --checkpoint "$work/run/best.pt" --cache "$work/cache" --split val \
      --eval-scale 0.5 --json "$work/run/eval.json" \
      --export "$work/predictions" --visualize "$work/overlays"
