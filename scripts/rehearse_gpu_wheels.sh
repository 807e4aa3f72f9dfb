#!/usr/bin/env bash
# Rehearse README "GPU" -> "the wheels in parts" on this machine, without a GPU:
#
#   scripts/rehearse_gpu_wheels.sh [WORK]          # WORK: a new folder (default: mktemp -d)
#
#  1. a fresh virtual environment with torch alone (and its needs), from the wheelhouse
#     ($WHEELHOUSE): the stand-in for the GPU machine's image (minutes: ~3 GB of wheels);
#  2. `gpu_wheels.sh have` there -> HAVE.txt;
#  3. `gpu_wheels.sh pack HAVE.txt` here (timed): the parts, their bytes;
#  4. every part through `gpu_wheels.sh receive`, one at a time, as the calls would carry it
#     (each with MANIFEST and requirements.txt; the sum must stay under 64 MiB);
#  5. `gpu_wheels.sh unpack` into that environment, offline (timed): no index, no pip
#     configuration, no network where `unshare -n` can take it away;
#  6. imports of everything scripts/gpu_check.py needs, the gpu_and dali tests collected, and
#     the check's CPU rehearsal (timed): `versions`, `data`, then held, compare and syncs on
#     --device cpu; the whole check must stop with status 2 (no CUDA device);
#  7. `pack --dry-run --python-version $OTHER_PY` (default 3.12, the lent machine's): the
#     resolution for the other Python, asking the package index.
# Prints a summary at the end (parts, bytes, seconds); exits non-zero at the first failure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELHOUSE=${WHEELHOUSE:-$HOME/.cache/cityscapes-pipeline/wheels}
OTHER_PY=${OTHER_PY:-3.12}
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/rehearse_gpu_wheels.XXXXXX")}
# WORK holding only venv/ (a bare machine made by step 1 earlier) skips step 1
[[ ! -e $WORK || -z $(ls -A "$WORK" | grep -v '^venv$') ]] \
    || { echo "error: $WORK is not empty" >&2; exit 1; }
mkdir -p "$WORK"
# the project's interpreter resolves and packs; the base interpreter makes the bare machine
HERE_PY=${HERE_PY:-$ROOT/.venv/bin/python}
BASE_PY=$("$HERE_PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
THERE=$WORK/venv/bin/python
export WHEELHOUSE

step() { echo; echo "== $*" >&2; }
now() { date +%s.%N; }
secs() { printf '%.1f' "$(echo "$2 - $1" | bc)"; }
# pip with no configuration and no network settings: the bare machine's view
bare() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
         PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 "$@"; }
offline=()
if unshare -n true 2>/dev/null; then offline=(unshare -n); fi

step "1. the bare machine: $BASE_PY -m venv, torch alone from the wheelhouse"
t0=$(now)
if [[ -x $THERE ]]; then
    echo "(reusing $WORK/venv)"
else
    "$BASE_PY" -m venv "$WORK/venv"
    bare "$THERE" -m pip install --quiet --disable-pip-version-check --no-index \
        --find-links "$WHEELHOUSE" torch
fi
t_venv=$(secs "$t0" "$(now)")
"$THERE" -c 'import torch; print("torch", torch.__version__)'

step "2. what it has"
PYTHON=$THERE "$ROOT/scripts/gpu_wheels.sh" have > "$WORK/HAVE.txt"
head -1 "$WORK/HAVE.txt"; echo "$(grep -c == "$WORK/HAVE.txt") packages"

step "3. pack (here, offline from the wheelhouse)"
t0=$(now)
PYTHON=$HERE_PY "$ROOT/scripts/gpu_wheels.sh" pack "$WORK/HAVE.txt" "$WORK/parts"
t_pack=$(secs "$t0" "$(now)")
sed 's/^/  /' "$WORK/parts/wheels.txt"
if grep -E -i '^(torch-|triton-|nvidia_(cu|nccl|nvjitlink|nvshmem|nvtx)|cuda_)' "$WORK/parts/wheels.txt"; then
    echo "error: pack carried torch, triton or a CUDA library (above)" >&2; exit 1
fi
grep -q '^typing-' "$WORK/parts/wheels.txt" || { echo "error: typing was not packed" >&2; exit 1; }
parts=("$WORK"/parts/wheels.tar.part.*)
part_bytes=$(du -cb "${parts[@]}" | tail -1 | cut -f1)

step "4. the transfers: one part per call, with MANIFEST and requirements.txt"
tree=$(cd "$ROOT" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
       | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
for part in "${parts[@]}"; do
    carried=$(mktemp -d "$WORK/carry.XXXX")
    cp "$part" "$WORK/parts/MANIFEST" "$WORK/parts/requirements.txt" "$carried/"
    size=$(du -cb "$carried"/* | tail -1 | cut -f1)
    (( size + tree <= 64 * 1048576 )) \
        || { echo "error: $(basename "$part"): $size bytes + tree $tree > 64 MiB" >&2; exit 1; }
    echo "$(basename "$part"): $size bytes carried + working tree $tree bytes"
    "$ROOT/scripts/gpu_wheels.sh" receive "$carried" "$WORK/there" || [[ $? == 3 ]]
    rm -rf "$carried"
done

step "5. unpack and install, offline${offline[*]:+ (${offline[*]})}"
t0=$(now)
bare "${offline[@]}" env PYTHON="$THERE" "$ROOT/scripts/gpu_wheels.sh" unpack "$WORK/there"
t_unpack=$(secs "$t0" "$(now)")
bare "$THERE" -m pip list --format=freeze > "$WORK/after.txt"
# torch and its CUDA libraries are the ones the machine had
grep -i -E '^(torch|triton|nvidia-cu|nvidia-nccl|cuda-)' "$WORK/HAVE.txt" | sort > "$WORK/stack_before"
grep -i -E '^(torch|triton|nvidia-cu|nvidia-nccl|cuda-)' "$WORK/after.txt" | grep -v -i '^torchvision' \
    | sort > "$WORK/stack_after"
diff "$WORK/stack_before" "$WORK/stack_after" \
    || { echo "error: unpack changed the torch/CUDA stack (above)" >&2; exit 1; }

step "6. what gpu_check needs, and its CPU rehearsal"
t0=$(now)
(cd "$WORK" && "${offline[@]}" "$THERE" - <<'EOF'
import importlib, warnings
warnings.simplefilter("ignore")
for name in ("torch", "torchvision", "nvidia.dali", "nvidia.dali.plugin.pytorch",
             "segmentation_models_pytorch", "timm", "zarr", "numcodecs", "numpy", "pytest",
             "cityscapesscripts", "pyspng", "av", "click", "rich", "yaml", "matplotlib",
             "cache", "dataprep", "loaders", "training", "dataprep.cli", "training.cli"):
    module = importlib.import_module(name)
    print(f"  {name:28s} {getattr(module, '__version__', '')}")
EOF
)
(cd "$ROOT" && "${offline[@]}" "$THERE" -m pytest -q --collect-only -m "gpu or dali" \
    -p no:cacheprovider tests | tail -1)
check=$WORK/check
part() {
    local name=$1; shift
    "${offline[@]}" "$THERE" "$ROOT/scripts/gpu_check.py" --part "$name" --work "$check" "$@" \
        > "$WORK/part_$name.out" || { cat "$WORK/part_$name.out"; return 1; }
    grep '^RESULT ' "$WORK/part_$name.out" | cut -c8- | tee "$WORK/part_$name.json" | cut -c1-300
}
part versions
part data
cache=$check/cache
for name in held compare syncs; do
    part "$name" --device cpu --small-res 64 --cache "$cache"
done
"$THERE" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
versions = json.loads((work / "part_versions.json").read_text())
assert not versions["missing"], f"missing there: {versions['missing']}"
held = json.loads((work / "part_held.json").read_text())
assert held == {"torch": {"intact": True}, "dali": {"intact": True}}, held
compare = json.loads((work / "part_compare.json").read_text())
assert compare["ok"], compare
syncs = json.loads((work / "part_syncs.json").read_text())
assert all(syncs[k].get("steps") == 20 for k in ("torch", "dali")), syncs
print("  versions: nothing missing; held, compare, syncs: as expected on the CPU")
EOF
status=0
(cd "$ROOT" && "${offline[@]}" "$THERE" scripts/gpu_check.py --json "$WORK/gpu_check.json" \
    --work "$check" > "$WORK/gpu_check.out" 2>&1) || status=$?
[[ $status == 2 ]] || { cat "$WORK/gpu_check.out"; echo "error: gpu_check exited $status, not 2" >&2; exit 1; }
echo "  gpu_check.py without CUDA: exit 2, as it should"
t_check=$(secs "$t0" "$(now)")

step "7. the resolution for Python $OTHER_PY (dry run, asks the package index)"
t0=$(now)
PYTHON=$HERE_PY "$ROOT/scripts/gpu_wheels.sh" pack --dry-run --python-version "$OTHER_PY" \
    --glibc 2.39 "$WORK/HAVE.txt" "$WORK/parts$OTHER_PY"
t_dry=$(secs "$t0" "$(now)")

cat <<EOF

== summary ($WORK)
bare venv with torch:     ${t_venv} s
pack:                     ${t_pack} s: $(wc -l < "$WORK/parts/wheels.txt") wheels, ${#parts[@]} parts, ${part_bytes} bytes
parts:                    $(du -b "${parts[@]}" | awk '{printf "%s ", $1}')
unpack + install offline: ${t_unpack} s
imports + CPU check:      ${t_check} s
pack --dry-run $OTHER_PY:     ${t_dry} s
EOF
