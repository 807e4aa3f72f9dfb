#!/usr/bin/env bash
# Carry this project's wheels to an offline GPU machine in parts small enough for one transfer
# each, and install them there. See README, "GPU".
#
#   scripts/gpu_wheels.sh pack   [HAVE.txt] [OUT]   # here: the wheels the other side lacks
#   scripts/gpu_wheels.sh unpack PARTS [DEST]       # there: verify, join, install
#
# pack resolves the project's dependencies (and pytest) offline from the wheelhouse
# ($WHEELHOUSE, default ~/.cache/cityscapes-pipeline/wheels; fill it with `pip download -d`),
# leaves out what HAVE.txt (`pip list --format=freeze` on the other side) already has at the
# same version, and writes OUT (default bench/gpu_wheels) = wheels.tar split into parts of
# $PART_MB MiB (default 56), MANIFEST (sha256 of every part and of the whole tar) and
# requirements.txt. The resolution is for this interpreter: the other side must run the same
# Python minor version on Linux x86-64.
#
# unpack checks every part named in PARTS/MANIFEST, joins them, checks the whole, unpacks
# the wheels into DEST (default PARTS/wheels) and installs offline: requirements.txt (pytest,
# setuptools), then the checkout it is called from (pip install --no-build-isolation -e).
# Nothing is installed when a check fails.
set -euo pipefail

WHEELHOUSE=${WHEELHOUSE:-$HOME/.cache/cityscapes-pipeline/wheels}
PART_MB=${PART_MB:-56}  # one carried path per call: 64 MiB minus the working tree
PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "error: $*" >&2; exit 1; }

# The wheel files pip would install for the project from the wheelhouse alone, as
# "name==version<TAB>path" lines.
resolve() {
    local report
    report=$(mktemp)
    "$PYTHON" -m pip install --dry-run --quiet --ignore-installed --no-index \
        --no-build-isolation --find-links "$WHEELHOUSE" --report "$report" "$ROOT" pytest \
        "setuptools>=64" \
        >/dev/null \
        || die "pip could not resolve the project from $WHEELHOUSE (pip download -d $WHEELHOUSE <what is missing>)"
    "$PYTHON" - "$report" <<'EOF'
import json, sys
from urllib.parse import unquote, urlparse
for item in json.load(open(sys.argv[1]))["install"]:
    meta, url = item["metadata"], item["download_info"]["url"]
    if url.endswith(".whl"):
        print(f"{meta['name']}=={meta['version']}\t{unquote(urlparse(url).path)}")
EOF
    rm -f "$report"
}

# Lines of `resolve` whose name==version is not in HAVE (names compared as pip normalises them).
missing_from() {
    local have=$1
    "$PYTHON" -c '
import re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = set()
if sys.argv[1] != "-":
    for line in open(sys.argv[1]):
        if "==" in line:
            name, version = line.strip().split("==", 1)
            have.add((norm(name), version))
for line in sys.stdin:
    spec, path = line.rstrip("\n").split("\t")
    name, version = spec.split("==", 1)
    if (norm(name), version) not in have:
        print(path)
' "$have"
}

pack() {
    local have=${1:--} out=${2:-$ROOT/bench/gpu_wheels}
    [[ $have == - || -f $have ]] || die "$have: no such file (pip list --format=freeze from the GPU machine)"
    [[ -d $WHEELHOUSE ]] || die "$WHEELHOUSE: no wheelhouse there (set WHEELHOUSE)"
    [[ -e $out ]] && die "$out exists; remove it or choose another OUT"
    mkdir -p "$out/stage"
    resolve | missing_from "$have" | while read -r path; do
        cp "$path" "$out/stage/"
    done
    [[ -n $(ls "$out/stage") ]] || die "the other side has every wheel already"
    (cd "$out/stage" && ls *.whl) > "$out/wheels.txt"
    # installed first: the project's own build then needs no network (--no-build-isolation)
    printf '%s\n' pytest "setuptools>=64" > "$out/requirements.txt"
    tar -C "$out/stage" -cf "$out/wheels.tar" .
    rm -rf "$out/stage"
    (cd "$out" && split -b "${PART_MB}M" -d -a 3 wheels.tar wheels.tar.part.)
    (cd "$out" && sha256sum wheels.tar wheels.tar.part.* > MANIFEST)
    rm -f "$out/wheels.tar"
    echo "$(wc -l < "$out/wheels.txt") wheels in $(ls "$out"/wheels.tar.part.* | wc -l) parts of <= ${PART_MB} MiB: $out"
}

unpack() {
    local parts=${1:?usage: gpu_wheels.sh unpack PARTS [DEST]} dest=${2:-}
    dest=${dest:-$parts/wheels}
    [[ -f $parts/MANIFEST ]] || die "$parts/MANIFEST: not there; carry it with the parts"
    (cd "$parts" && grep 'part\.' MANIFEST | sha256sum --check --quiet) \
        || die "a part is missing or damaged (see above); carry it again"
    cat "$parts"/wheels.tar.part.* > "$parts/wheels.tar"
    (cd "$parts" && grep ' wheels.tar$' MANIFEST | sha256sum --check --quiet) \
        || die "the joined wheels.tar does not match MANIFEST"
    mkdir -p "$dest"
    tar -C "$dest" -xf "$parts/wheels.tar"
    rm -f "$parts/wheels.tar"
    "$PYTHON" -m pip install --no-index --find-links "$dest" -r "$parts/requirements.txt"
    "$PYTHON" -m pip install --no-index --find-links "$dest" --no-build-isolation -e "$ROOT"
}

case ${1:-} in
    pack) shift; pack "$@" ;;
    unpack) shift; unpack "$@" ;;
    *) die "usage: gpu_wheels.sh pack [HAVE.txt] [OUT] | unpack PARTS [DEST]" ;;
esac
