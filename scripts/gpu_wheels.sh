#!/usr/bin/env bash
# Carry this project's wheels to an offline GPU machine in parts small enough for one transfer
# each, and install them there. See README, "GPU".
#
#   scripts/gpu_wheels.sh have                     # there: what it has (> have.txt)
#   scripts/gpu_wheels.sh pack [--python-version X.Y] [--glibc 2.N] [--dry-run] HAVE.txt [OUT]
#   scripts/gpu_wheels.sh receive SRC [PARTS]      # there, every call: keep the carried parts
#   scripts/gpu_wheels.sh unpack PARTS [DEST]      # there, last call: verify, join, install
#
# `have` prints `pip list --format=freeze` of $PYTHON with a first line naming its Python,
# glibc and processor ("# gpu_wheels: python=3.12.3 glibc=2.39 machine=x86_64").
#
# `pack` resolves the project's dependencies (pyproject.toml), pytest and setuptools for the
# other machine and packs only the wheels it lacks:
#   - what HAVE.txt lists is the other side's and stays as it is: each line becomes a
#     constraint (name==version, local tags such as +cu130 included) and an empty stand-in
#     wheel, so the resolution takes it as installed and never packs it;
#   - torch, triton, torchaudio and the CUDA libraries (nvidia-*, cuda-*: cuda-bindings,
#     cuda-pathfinder, cuda-toolkit...) are never packed: the GPU machine's own are used, and
#     if the resolution wants one it lacks, pack stops. DALI's own libraries (nvidia-dali-*,
#     -nvimgcodec-*, -libnvcomp-*, -nvjpeg*, -nvtiff-*) are packed where missing;
#   - torchvision is packed only where HAVE has none, then the release that matches its torch
#     (torch 2.Y <-> torchvision 0.(Y+15)) with the same local tag (+cu130 ...), else pack stops;
#   - the wheels are for the other machine: its Python (--python-version, else the header
#     of HAVE.txt, else this interpreter's) and glibc (--glibc, else the header, else 2.28;
#     the same Python and glibc as here: this interpreter's own choice).
#     For this interpreter the resolution is offline, from the wheelhouse alone
#     ($WHEELHOUSE, default ~/.cache/cityscapes-pipeline/wheels); for another Python it also
#     asks the package index (pip's own settings) for the wheels the wheelhouse lacks, and
#     keeps to the wheelhouse's versions where it has the package;
#   - every sdist in the wheelhouse is built into a wheel first (pip wheel); a build that is
#     not pure Python (py3-none-any) is refused for another Python or platform, and anything
#     the resolution picks that is not a wheel stops the pack.
# OUT (default bench/gpu_wheels) then holds wheels.tar split into parts of $PART_MB MiB
# (default: one `run` carries 64 MiB, the working tree included, so 64 MiB less the tree
# and 1 MiB of room; 62 for a tree of 1 MB), MANIFEST (sha256 of every
# part and of the whole tar), wheels.txt and requirements.txt. --dry-run only resolves and
# lists what would be packed.
#
# `receive` copies the parts, MANIFEST and requirements.txt found in SRC into PARTS (default
# /tmp/gpu_wheels), checks every part there and says which are still missing (exit 3).
#
# `unpack` checks every part named in PARTS/MANIFEST, joins them, checks the whole, unpacks
# the wheels into DEST (default PARTS/wheels) and installs offline (pip --no-index, no pip
# configuration) with the other side's installed packages as constraints (`pip list` there,
# taken fresh): requirements.txt, then the checkout it is called from (pip install
# --no-build-isolation -e). Nothing is installed when a check fails.
set -euo pipefail

WHEELHOUSE=${WHEELHOUSE:-$HOME/.cache/cityscapes-pipeline/wheels}
PART_MB=${PART_MB:-}    # default: 64 MiB less the working tree and 1 MiB (see pack)
CARRY_MIB=64            # what one `run` of the device tool carries: a part, MANIFEST, the tree
if [[ -z ${PYTHON:-} ]]; then
    if command -v python >/dev/null; then PYTHON=python; else PYTHON=python3; fi
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "error: $*" >&2; exit 1; }

# pip with no configuration files and no PIP_* variables: only what the command names
pip_alone() { PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip --isolated --disable-pip-version-check "$@"; }

# The logic in Python: `helper COMMAND ARGS...` (see the commands at its end).
read -r -d '' HELPER <<'EOF' || true
import json, os, re, sys, zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

# never packed: the GPU machine's torch and CUDA stack is used as it is
TORCH_STACK = {"torch", "triton", "pytorch-triton", "torchaudio", "torchvision"}
DALI_OWN = re.compile(r"^nvidia-(dali-|nvimgcodec-|libnvcomp-|nvjpeg($|2k-)|nvtiff-)")

def protected(name):
    name = norm(name)
    if name in TORCH_STACK:
        return True
    return name.startswith(("nvidia-", "cuda-")) and not DALI_OWN.match(name)

def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)

def version_ok(version):
    try:
        from packaging.version import Version
    except ImportError:
        from pip._vendor.packaging.version import Version
    try:
        Version(version)
        return True
    except Exception:
        return False

def read_have(path):
    """{normalised name: (name, version)} and the header fields of a HAVE file."""
    have, header = {}, {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("# gpu_wheels:"):
            header = dict(w.split("=", 1) for w in line.split(":", 1)[1].split() if "=" in w)
        if not line or line.startswith(("#", "-")) or " @ " in line or "==" not in line:
            continue
        name, version = (s.strip() for s in line.split("==", 1))
        if version_ok(version):
            have[norm(name)] = (name, version)
    return have, header

def local_tag(version):
    return version.partition("+")[2]

def torchvision_for(torch_version):
    """The torchvision release line that goes with a torch release (the official table)."""
    if os.environ.get("TORCHVISION"):
        return os.environ["TORCHVISION"]
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    if major != 2:
        fail(f"torch {torch_version}: which torchvision goes with it is not known here; "
             "set TORCHVISION=0.N.* (or install torchvision on the GPU machine)")
    return f"0.{minor + 15}.*"

def dist_of(filename):
    """(normalised name, version) of a wheel or sdist file name, or None."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (norm(parts[0]), parts[1]) if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip", ".tar.bz2"):
        if filename.endswith(ext):
            name, _, version = filename[:-len(ext)].rpartition("-")
            return (norm(name), version) if name else None
    return None

def wheel_tags(filename):
    """The tags of a wheel file name: [(python, abi, platform), ...]."""
    parts = Path(filename).name[:-4].split("-")
    pys, abis, plats = parts[-3], parts[-2], parts[-1]
    return [(p, a, q) for p in pys.split(".") for a in abis.split(".") for q in plats.split(".")]

def is_pure(filename):
    return all(p.startswith("py") and a == "none" and q == "any"
               for p, a, q in wheel_tags(filename))

def stub_wheel(folder, name, version):
    """An empty wheel that stands for a package the other side has (no files, no needs)."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_wheels\n"
                              "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(Path(folder) / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)

def project_requirements(root):
    try:
        import tomllib
    except ImportError:
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((Path(root) / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + ["pytest", "setuptools>=64"]

def cmd_header():
    import platform
    libc, libc_version = platform.libc_ver()
    print(f"# gpu_wheels: python={platform.python_version()} "
          f"glibc={libc_version if libc == 'glibc' else 'none'} machine={platform.machine()}")

def cmd_target(have_path):
    """python and glibc from the HAVE header: `PY GLIBC MACHINE` ('-' where unknown)."""
    _, header = read_have(have_path)
    py = header.get("python", "-")
    py = ".".join(py.split(".")[:2]) if py != "-" else py
    print(py, header.get("glibc", "-"), header.get("machine", "-"))

def cmd_prepare(have_path, wheelhouse, stubs, constraints, requirements, root):
    have, _ = read_have(have_path)
    if "torch" not in have:
        fail(f"{have_path} lists no torch: the GPU machine must have its own torch "
             "(pack never carries torch, triton or the CUDA libraries)")
    lines = [f"{name}=={version}" for name, version in have.values()]
    for name, version in have.values():
        stub_wheel(stubs, name, version)
    if "torchvision" not in have:
        lines.append(f"torchvision=={torchvision_for(have['torch'][1])}")
    # where the wheelhouse has one version of a package, keep to it (the tested one)
    seen = {}
    for path in Path(wheelhouse).iterdir():
        dist = dist_of(path.name)
        if dist and dist[0] not in have and not protected(dist[0]):
            seen.setdefault(dist[0], set()).add(dist[1])
    lines += [f"{name}=={versions.pop()}" for name, versions in sorted(seen.items())
              if len(versions) == 1]
    Path(constraints).write_text("\n".join(lines) + "\n")
    Path(requirements).write_text("\n".join(project_requirements(root)) + "\n")

def cmd_select(report_path, have_path):
    """The wheels to pack: `name==version<TAB>url<TAB>sha256` lines; stops on what must not
    be packed."""
    have, _ = read_have(have_path)
    report = json.loads(Path(report_path).read_text())
    for item in report["install"]:
        meta, info = item["metadata"], item["download_info"]
        name, version = meta["name"], meta["version"]
        key = norm(name)
        if key in have and have[key][1] == version:
            continue  # the other side has it
        if protected(key) and not (key == "torchvision" and key not in have):
            fail(f"the resolution wants {name} {version}, which pack never carries (the GPU "
                 f"machine's own torch, triton and CUDA libraries are used); its list has "
                 f"{have[key][1] if key in have else 'none'}")
        url = info["url"]
        if not urlparse(url).path.endswith(".whl"):
            fail(f"{name} {version}: {url} is not a wheel")
        if key == "torchvision":
            want, got = local_tag(have["torch"][1]), local_tag(version)
            if want != got:
                fail(f"torchvision {version} does not match torch {have['torch'][1]} "
                     f"(local tag '+{want}'): put the matching build in the wheelhouse, e.g. "
                     f"pip download --no-deps -d $WHEELHOUSE torchvision=={version.split('+')[0]}"
                     f"+{want} --index-url https://download.pytorch.org/whl/{want}")
        sha = (info.get("archive_info", {}).get("hashes") or {}).get("sha256", "")
        print(f"{name}=={version}\t{url}\t{sha}")

def cmd_pure(*wheels):
    bad = [w for w in wheels if not is_pure(w)]
    if bad:
        fail("not pure Python (py3-none-any): " + ", ".join(Path(w).name for w in bad))

def cmd_path(url):
    print(unquote(urlparse(url).path))

commands = {"header": cmd_header, "target": cmd_target, "prepare": cmd_prepare,
            "select": cmd_select, "pure": cmd_pure, "path": cmd_path}
commands[sys.argv[1]](*sys.argv[2:])
EOF

helper() { "$PYTHON" -c "$HELPER" "$@"; }

have() {
    helper header
    "$PYTHON" -m pip --disable-pip-version-check list --format=freeze
}

# pip's options for the other machine's wheels: --python-version etc. (nothing when it is
# this interpreter)
target_options() {
    local py=$1 glibc=$2 minor n
    TARGET=()
    [[ $py == "$LOCAL_PY" && -z $GLIBC_SET ]] && return
    minor=${glibc#2.}
    TARGET=(--python-version "$py" --implementation cp --abi "cp${py/./}" --abi abi3
            --abi none)
    for ((n = minor; n >= 17; n--)); do TARGET+=(--platform "manylinux_2_${n}_x86_64"); done
    TARGET+=(--platform manylinux2014_x86_64)
    for ((n = 16; n >= 5; n--)); do TARGET+=(--platform "manylinux_2_${n}_x86_64"); done
    TARGET+=(--platform manylinux2010_x86_64 --platform manylinux1_x86_64)
}

pack() {
    local py="" glibc="" dry=0
    GLIBC_SET=""
    while [[ ${1:-} == --* ]]; do
        case $1 in
            --python-version) py=${2:?}; shift 2 ;;
            --glibc) glibc=${2:?}; GLIBC_SET=1; shift 2 ;;
            --dry-run) dry=1; shift ;;
            *) die "pack: unknown option $1" ;;
        esac
    done
    local have=${1:?usage: gpu_wheels.sh pack [options] HAVE.txt [OUT]} out=${2:-$ROOT/bench/gpu_wheels}
    [[ -f $have ]] || die "$have: no such file (scripts/gpu_wheels.sh have, on the GPU machine)"
    [[ -d $WHEELHOUSE ]] || die "$WHEELHOUSE: no wheelhouse there (set WHEELHOUSE)"
    [[ $dry == 1 || ! -e $out ]] || die "$out exists; remove it or choose another OUT"
    LOCAL_PY=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    local head_py head_glibc head_machine
    read -r head_py head_glibc head_machine < <(helper target "$have")
    [[ $head_machine == - || $head_machine == x86_64 ]] \
        || die "$have: the other machine is $head_machine; pack makes x86-64 wheels only"
    if [[ -z $py ]]; then
        if [[ $head_py != - ]]; then py=$head_py; else py=$LOCAL_PY; fi
    fi
    [[ $py =~ ^3\.[0-9]+$ ]] || die "--python-version $py: give it as 3.N"
    # another glibc than this machine's also needs wheels chosen for it
    local local_glibc
    local_glibc=$(helper header | sed -n 's/.* glibc=\([^ ]*\) .*/\1/p')
    if [[ -z $glibc && $head_glibc != - ]]; then
        if [[ $py != "$LOCAL_PY" ]]; then glibc=$head_glibc
        elif [[ $head_glibc != "$local_glibc" ]]; then glibc=$head_glibc; GLIBC_SET=1; fi
    fi
    glibc=${glibc:-2.28}
    [[ $glibc =~ ^2\.[0-9]+$ ]] || die "--glibc $glibc: give it as 2.N"
    target_options "$py" "$glibc"

    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_wheels.XXXXXX")
    WORK_DIR=$work
    trap 'rm -rf "$WORK_DIR"' EXIT
    mkdir -p "$work/stubs" "$work/built"
    helper prepare "$have" "$WHEELHOUSE" "$work/stubs" "$work/constraints.txt" \
        "$work/requirements.txt" "$ROOT"
    # sdists: built into wheels here; for another Python only pure ones will do
    local sdist built=()
    for sdist in "$WHEELHOUSE"/*.tar.gz "$WHEELHOUSE"/*.zip; do
        [[ -e $sdist ]] || continue
        pip_alone wheel --quiet --no-deps --no-index --find-links "$WHEELHOUSE" \
            -w "$work/built" "$sdist" >/dev/null \
            || die "$(basename "$sdist"): could not build a wheel from it"
    done
    built=("$work"/built/*.whl)
    if [[ -e ${built[0]} && ${#TARGET[@]} -gt 0 ]]; then
        helper pure "${built[@]}" \
            || die "an sdist builds a binary wheel, which would be for Python $LOCAL_PY here; build it on a Python $py machine and put the wheel in $WHEELHOUSE"
    fi

    local index=(--no-index) where="the wheelhouse $WHEELHOUSE"
    if [[ ${#TARGET[@]} -gt 0 ]]; then index=(); where="the wheelhouse and the package index"; fi
    echo "resolving for Python $py${TARGET[*]:+ (manylinux up to glibc $glibc)} from $where ..." >&2
    local run_pip=pip_alone
    [[ ${#index[@]} -eq 0 ]] && run_pip=pip_configured
    $run_pip install --dry-run -qq --ignore-installed --only-binary=:all: \
        "${index[@]}" "${TARGET[@]}" --report "$work/report.json" \
        --find-links "$work/stubs" --find-links "$work/built" --find-links "$WHEELHOUSE" \
        -c "$work/constraints.txt" -r "$work/requirements.txt" >/dev/null \
        || die "pip could not resolve the project for Python $py from $where (see above; a missing one: pip download -d $WHEELHOUSE NAME)"
    helper select "$work/report.json" "$have" > "$work/selected.txt"
    [[ -s $work/selected.txt ]] || die "the other side has every wheel already"

    if [[ $dry == 1 ]]; then
        echo "would pack $(wc -l < "$work/selected.txt") wheels for Python $py:"
        cut -f1 "$work/selected.txt" | sed 's/^/  /'
        return 0
    fi
    mkdir -p "$out/stage"
    local spec url sha path remote=()
    while IFS=$'\t' read -r spec url sha; do
        if [[ $url == file://* ]]; then
            cp "$(helper path "$url")" "$out/stage/"
        else
            remote+=("$spec")
        fi
    done < "$work/selected.txt"
    if [[ ${#remote[@]} -gt 0 ]]; then
        echo "downloading ${#remote[@]} wheels for Python $py ..." >&2
        pip_configured download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" \
            -d "$out/stage" "${remote[@]}" \
            || die "pip download failed for: ${remote[*]}"
    fi
    # every file is a wheel, and the one the resolution chose (sha256 where it gave one)
    for path in "$out"/stage/*; do
        [[ $path == *.whl ]] || die "$(basename "$path") is not a wheel"
    done
    (cd "$out/stage" && sha256sum *.whl) > "$work/sums.txt"
    while IFS=$'\t' read -r spec url sha; do
        [[ -z $sha ]] || grep -q "^$sha " "$work/sums.txt" \
            || die "$spec: no wheel with the sha256 the resolution chose"
    done < "$work/selected.txt"
    (cd "$out/stage" && ls *.whl) > "$out/wheels.txt"
    # installed first there: pytest and setuptools (the project's own build then needs no
    # network, --no-build-isolation), and every packed wheel at its version
    { printf '%s\n' pytest "setuptools>=64"; cut -f1 "$work/selected.txt"; } > "$out/requirements.txt"
    tar -C "$out/stage" -cf "$out/wheels.tar" .
    rm -rf "$out/stage"
    # the working tree travels with every part: what is left of 64 MiB, less 1 MiB of room
    local tree
    tree=$(tree_bytes)
    tree=${tree:-0}
    if [[ -z $PART_MB ]]; then
        PART_MB=$(( (CARRY_MIB * 1048576 - tree) / 1048576 - 1 ))
        (( PART_MB >= 8 )) || die "the working tree ($tree bytes) leaves no room for parts"
    fi
    (cd "$out" && split -b "${PART_MB}M" -d -a 3 wheels.tar wheels.tar.part.)
    (cd "$out" && sha256sum wheels.tar wheels.tar.part.* > MANIFEST)
    rm -f "$out/wheels.tar"
    local biggest
    biggest=$(du -b "$out"/wheels.tar.part.* | sort -n | tail -1 | cut -f1)
    if (( biggest + tree + 65536 > CARRY_MIB * 1048576 )); then
        echo "warning: a part ($biggest bytes) and the working tree ($tree bytes) exceed the $CARRY_MIB MiB that one call of the device tool carries; for it, pack again with a smaller PART_MB" >&2
    fi
    echo "$(wc -l < "$out/wheels.txt") wheels for Python $py in $(ls "$out"/wheels.tar.part.* | wc -l) parts of <= ${PART_MB} MiB ($(du -cb "$out"/wheels.tar.part.* | tail -1 | cut -f1) bytes): $out"
}

# bytes of what the device tool sends besides the carried paths: tracked files and untracked
# ones that git does not ignore (0 outside a git checkout)
tree_bytes() {
    (cd "$ROOT" && { git ls-files -z; git ls-files -z --others --exclude-standard; } 2>/dev/null \
        | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1) || true
}

# pip as configured here (its index, certificates, proxies), but without extra find-links
pip_configured() { env -u PIP_FIND_LINKS -u PIP_CONSTRAINT "$PYTHON" -m pip --disable-pip-version-check "$@"; }

receive() {
    local src=${1:?usage: gpu_wheels.sh receive SRC [PARTS]} parts=${2:-/tmp/gpu_wheels} f
    mkdir -p "$parts"
    for f in "$src"/wheels.tar.part.* "$src"/MANIFEST "$src"/requirements.txt "$src"/wheels.txt; do
        [[ -e $f ]] && cp "$f" "$parts/"
    done
    [[ -f $parts/MANIFEST ]] || die "$parts/MANIFEST: not there; carry it with the parts"
    local all here=() missing=() name
    all=$(grep -o 'wheels\.tar\.part\.[0-9]*$' "$parts/MANIFEST")
    for name in $all; do
        if [[ -f $parts/$name ]]; then
            (cd "$parts" && grep " $name\$" MANIFEST | sha256sum --check --quiet) \
                || die "$name is damaged; carry it again"
            here+=("${name##*.}")
        else
            missing+=("${name##*.}")
        fi
    done
    echo "parts in $parts: ${here[*]:-none} of $(wc -w <<< "$all")${missing[*]:+; missing: ${missing[*]}}"
    [[ ${#missing[@]} -eq 0 ]] || exit 3
}

unpack() {
    local parts=${1:?usage: gpu_wheels.sh unpack PARTS [DEST]} dest=${2:-}
    dest=${dest:-$parts/wheels}
    [[ -f $parts/MANIFEST ]] || die "$parts/MANIFEST: not there; carry it with the parts"
    [[ -f $parts/requirements.txt ]] || die "$parts/requirements.txt: not there; carry it with the parts"
    (cd "$parts" && grep 'part\.' MANIFEST | sha256sum --check --quiet) \
        || die "a part is missing or damaged (see above); carry it again"
    cat "$parts"/wheels.tar.part.* > "$parts/wheels.tar"
    (cd "$parts" && grep ' wheels.tar$' MANIFEST | sha256sum --check --quiet) \
        || die "the joined wheels.tar does not match MANIFEST"
    mkdir -p "$dest"
    tar -C "$dest" -xf "$parts/wheels.tar"
    rm -f "$parts/wheels.tar"
    # what is installed stays: torch and its CUDA libraries above all
    "$PYTHON" -m pip --disable-pip-version-check list --format=freeze \
        | grep -v -e '^-e ' -e ' @ ' > "$parts/constraints.txt"
    local pip=(pip_alone install --quiet --no-index --no-compile --no-cache-dir
               --find-links "$dest" -c "$parts/constraints.txt")
    "${pip[@]}" -r "$parts/requirements.txt"
    "${pip[@]}" --no-build-isolation -e "$ROOT"
    echo "installed from $(ls "$dest" | wc -l) wheels, then the checkout (pip --no-index; what was there held by $parts/constraints.txt)"
}

case ${1:-} in
    have) shift; have "$@" ;;
    pack) shift; pack "$@" ;;
    receive) shift; receive "$@" ;;
    unpack) shift; unpack "$@" ;;
    _helper) shift; helper "$@" ;;  # for tests
    *) die "usage: gpu_wheels.sh have | pack [--python-version X.Y] [--glibc 2.N] [--dry-run] HAVE.txt [OUT] | receive SRC [PARTS] | unpack PARTS [DEST]" ;;
esac
