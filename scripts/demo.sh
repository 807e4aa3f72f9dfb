#!/usr/bin/env bash
# The whole job on the built-in synthetic dataset, on a CPU in a few minutes:
# synth -> build -> stats -> verify -> train -> evaluate (prints the per-class table).
# Usage: scripts/demo.sh [WORKDIR]   (default: ./demo)
#
# WORKDIR must be new, empty, or a folder an earlier demo made (it holds the marker file
# .cityscapes-demo). A rerun deletes only the demo's own subfolders there; any other
# folder is refused, so `scripts/demo.sh ~/data` never touches a user's data.
set -euo pipefail
work="${1:-demo}"
marker="$work/.cityscapes-demo"
outputs=(raw cache run predictions overlays)

if [[ -e "$work" || -L "$work" ]]; then
    if [[ -f "$marker" && ! -L "$marker" ]]; then
        for name in "${outputs[@]}"; do rm -rf -- "${work:?}/$name"; done
    elif [[ -d "$work" && ! -L "$work" && -z "$(ls -A -- "$work")" ]]; then
        :  # an empty folder: ours from now on
    else
        echo "error: $work exists and is not a demo folder (no $marker); the demo only writes into" \
             "a new or empty folder, or one it made before: choose another WORKDIR" >&2
        exit 1
    fi
fi
mkdir -p -- "$work"
echo "made by scripts/demo.sh; a rerun deletes only: ${outputs[*]}" > "$marker"
echo "demo work folder: $(cd -- "$work" && pwd)"

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

here="$(cd -- "$work" && pwd)"
cat <<EOF
demo done; what it wrote:
  raw tree      $here/raw
  cache         $here/cache (stats: $here/cache/stats.json)
  run dir       $here/run (checkpoints, metrics.jsonl, plots, eval.json)
  predictions   $here/predictions (labelIds PNGs, benchmark format)
  overlays      $here/overlays
EOF
