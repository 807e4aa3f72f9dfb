"""scripts/gpu_wheels.sh: what it packs for an offline GPU machine (no network, no installs).

The resolution itself needs pip and the wheelhouse (scripts/rehearse_gpu_wheels.sh rehearses
it whole); here: the rules that decide what may travel, on pip reports made up for them."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_wheels.sh"
HEADER = "# gpu_wheels: python=3.12.3 glibc=2.39 machine=x86_64"
LENT = [HEADER, "torch==2.11.0+cu130", "triton==3.6.0", "nvidia-cublas==13.1.0.3",
        "cuda-bindings==13.0.3", "numpy==2.5.2", "pip==25.0"]


def gpu_wheels(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60)


def have_file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "have.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def report(tmp_path: Path, *items: tuple[str, str, str]) -> Path:
    """A pip --report with (name, version, file name) items from a local folder."""
    install = [{"metadata": {"name": name, "version": version},
                "download_info": {"url": f"file:///wheels/{filename}",
                                  "archive_info": {"hashes": {"sha256": "ab" * 32}}}}
               for name, version, filename in items]
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"install": install}))
    return path


def select(tmp_path: Path, have: list[str], *items) -> subprocess.CompletedProcess:
    return gpu_wheels("_helper", "select", report(tmp_path, *items), have_file(tmp_path, have))


@pytest.mark.parametrize("name,version,filename", [
    ("torch", "2.14.1", "torch-2.14.1-cp312-cp312-manylinux_2_28_x86_64.whl"),
    ("torch", "2.11.0", "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl"),
    ("triton", "3.8.0", "triton-3.8.0-cp312-cp312-manylinux_2_28_x86_64.whl"),
    ("nvidia-cublas", "13.1.1.3", "nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl"),
    ("nvidia-cudnn-cu13", "9.24.0.43", "nvidia_cudnn_cu13-9.24.0.43-py3-none-any.whl"),
    ("nvidia-nccl-cu13", "2.30.7", "nvidia_nccl_cu13-2.30.7-py3-none-any.whl"),
    ("cuda-bindings", "13.5.0", "cuda_bindings-13.5.0-cp312-cp312-manylinux_2_28_x86_64.whl"),
    ("cuda-pathfinder", "1.9.1", "cuda_pathfinder-1.9.1-py3-none-any.whl"),
    ("cuda-toolkit", "13.0.3.0", "cuda_toolkit-13.0.3.0-py2.py3-none-any.whl"),
    ("torchaudio", "2.11.0", "torchaudio-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl"),
])
def test_torch_triton_and_the_cuda_libraries_never_travel(tmp_path, name, version, filename):
    done = select(tmp_path, LENT, (name, version, filename))
    assert done.returncode == 1 and done.stdout == ""
    assert "never carries" in done.stderr and name in done.stderr


def test_a_torch_that_differs_only_in_its_local_tag_stays_the_machines(tmp_path):
    # the same name==version as the list: the other side has it, nothing is packed
    done = select(tmp_path, LENT, ("torch", "2.11.0+cu130", "torch-2.11.0+cu130-cp312.whl"),
                  ("numpy", "2.5.2", "numpy-2.5.2-cp312-cp312-manylinux_2_28_x86_64.whl"))
    assert done.returncode == 0 and done.stdout == ""
    # the same release without the tag is another build: refused, not packed
    done = select(tmp_path, LENT, ("torch", "2.11.0", "torch-2.11.0-cp312-cp312-linux.whl"))
    assert done.returncode == 1 and "2.11.0+cu130" in done.stderr


def test_dali_and_its_codec_libraries_travel(tmp_path):
    items = [("nvidia-dali-cuda130", "2.4.0", "nvidia_dali_cuda130-2.4.0-py3-none-any.whl"),
             ("nvidia-nvimgcodec-cu13", "0.9.0.20", "nvidia_nvimgcodec_cu13-0.9.0.20-py3-none-any.whl"),
             ("nvidia-libnvcomp-cu13", "5.3.0.16", "nvidia_libnvcomp_cu13-5.3.0.16-py3-none-any.whl"),
             ("nvidia-nvjpeg", "13.3.2.43", "nvidia_nvjpeg-13.3.2.43-py3-none-any.whl"),
             ("nvidia-nvjpeg2k-cu13", "0.11.0.51", "nvidia_nvjpeg2k_cu13-0.11.0.51-py3-none-any.whl"),
             ("nvidia-nvtiff-cu13", "0.8.0.82", "nvidia_nvtiff_cu13-0.8.0.82-py3-none-any.whl"),
             ("zarr", "3.1.6", "zarr-3.1.6-py3-none-any.whl")]
    done = select(tmp_path, LENT, *items)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"{n}=={v}" for n, v, _ in items]
    assert lines[0].split("\t") == ["nvidia-dali-cuda130==2.4.0",
                                    "file:///wheels/nvidia_dali_cuda130-2.4.0-py3-none-any.whl",
                                    "ab" * 32]


def test_anything_but_a_wheel_is_refused(tmp_path):
    done = select(tmp_path, LENT, ("typing", "3.7.4.3", "typing-3.7.4.3.tar.gz"))
    assert done.returncode == 1 and "typing 3.7.4.3" in done.stderr
    assert "is not a wheel" in done.stderr


def test_torchvision_only_where_missing_and_then_with_torchs_local_tag(tmp_path):
    with_tv = LENT + ["torchvision==0.26.0+cu130"]
    done = select(tmp_path, with_tv, ("torchvision", "0.29.1", "torchvision-0.29.1-cp312.whl"))
    assert done.returncode == 1 and "never carries" in done.stderr
    done = select(tmp_path, LENT, ("torchvision", "0.26.0+cu130",
                                   "torchvision-0.26.0+cu130-cp312-cp312-linux_x86_64.whl"))
    assert done.returncode == 0 and done.stdout.startswith("torchvision==0.26.0+cu130\t")
    done = select(tmp_path, LENT, ("torchvision", "0.26.0", "torchvision-0.26.0-cp312.whl"))
    assert done.returncode == 1 and "+cu130" in done.stderr


def test_prepare_pins_what_the_other_side_has_and_stands_in_for_it(tmp_path):
    house, stubs = tmp_path / "house", tmp_path / "stubs"
    house.mkdir(), stubs.mkdir()
    for name in ("zarr-3.1.6-py3-none-any.whl", "typing-3.7.4.3.tar.gz",
                 "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "torchvision-0.29.1-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl",
                 "timm-1.0.30-py3-none-any.whl", "timm-1.0.31-py3-none-any.whl"):
        (house / name).write_bytes(b"")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["zarr>=3.0", "torch>=2.4"]\n')
    constraints, requirements = tmp_path / "c.txt", tmp_path / "r.txt"
    done = gpu_wheels("_helper", "prepare", have_file(tmp_path, LENT), house, stubs,
                      constraints, requirements, tmp_path)
    assert done.returncode == 0, done.stderr
    pins = constraints.read_text().splitlines()
    assert "torch==2.11.0+cu130" in pins and "numpy==2.5.2" in pins
    assert "torchvision==0.26.*" in pins           # torch 2.11 <-> torchvision 0.26
    assert "zarr==3.1.6" in pins and "typing==3.7.4.3" in pins  # the wheelhouse's versions
    assert not any(p.startswith(("torch==2.14", "torchvision==0.29", "nvidia-cublas==13.1.1",
                                 "numpy==2.4", "timm==")) for p in pins)
    assert requirements.read_text().splitlines() == ["zarr>=3.0", "torch>=2.4", "pytest",
                                                     "setuptools>=64"]
    stub = stubs / "torch-2.11.0+cu130-py3-none-any.whl"
    with zipfile.ZipFile(stub) as z:
        metadata = z.read("torch-2.11.0+cu130.dist-info/METADATA").decode()
    assert "Version: 2.11.0+cu130" in metadata and "Requires-Dist" not in metadata
    # no torch on the other side: stop, never carry one
    no_torch = [line for line in LENT if not line.startswith("torch")]
    done = gpu_wheels("_helper", "prepare", have_file(tmp_path, no_torch), house, stubs,
                      constraints, requirements, tmp_path)
    assert done.returncode == 1 and "no torch" in done.stderr


def test_target_comes_from_the_have_header_and_built_sdists_must_be_pure(tmp_path):
    done = gpu_wheels("_helper", "target", have_file(tmp_path, LENT))
    assert done.stdout.split() == ["3.12", "2.39", "x86_64"]
    done = gpu_wheels("_helper", "target", have_file(tmp_path, LENT[1:]))
    assert done.stdout.split() == ["-", "-", "-"]
    assert gpu_wheels("_helper", "pure", "typing-3.7.4.3-py3-none-any.whl",
                      "six-1.17.0-py2.py3-none-any.whl").returncode == 0
    done = gpu_wheels("_helper", "pure", "typing-3.7.4.3-py3-none-any.whl",
                      "x-1.0-cp311-cp311-linux_x86_64.whl")
    assert done.returncode == 1 and "x-1.0-cp311" in done.stderr


def test_receive_checks_each_part_and_names_the_missing(tmp_path):
    src, parts = tmp_path / "src", tmp_path / "parts"
    src.mkdir()
    blobs = {f"wheels.tar.part.00{i}": os.urandom(100) for i in range(3)}
    whole = b"".join(blobs.values())
    manifest = [f"{hashlib.sha256(whole).hexdigest()}  wheels.tar"]
    manifest += [f"{hashlib.sha256(b).hexdigest()}  {n}" for n, b in blobs.items()]
    (src / "MANIFEST").write_text("\n".join(manifest) + "\n")
    (src / "requirements.txt").write_text("pytest\n")
    for name in ("wheels.tar.part.000", "wheels.tar.part.002"):
        (src / name).write_bytes(blobs[name])
    done = gpu_wheels("receive", src, parts)
    assert done.returncode == 3 and "000 002 of 3; missing: 001" in done.stdout
    for name in list(src.glob("wheels.tar.part.*")):
        name.unlink()
    (src / "wheels.tar.part.001").write_bytes(blobs["wheels.tar.part.001"])
    done = gpu_wheels("receive", src, parts)
    assert done.returncode == 0 and "000 001 002 of 3" in done.stdout
    (parts / "wheels.tar.part.002").write_bytes(b"damaged")
    done = gpu_wheels("receive", src, parts)
    assert done.returncode == 1 and "wheels.tar.part.002 is damaged" in done.stderr
