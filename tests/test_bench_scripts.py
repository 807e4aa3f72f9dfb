"""The measuring scripts: scripts/bench_loader.py (process-tree accounting, plan, rows) and
scripts/gpu_check.py (its plan, its version probe, its report without a GPU)."""
from __future__ import annotations

import importlib.util
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cache.errors import UserError
from tests.cachefab import blocky_cache

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return blocky_cache(tmp_path_factory.mktemp("blocky") / "cache.zarr", n_train=7, n_val=2)


# -- scripts/bench_loader.py -------------------------------------------------------------------
def test_bench_accounts_for_the_process_tree_and_plans_kinds():
    bench = load_script("bench_loader")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        tree = bench.process_tree(os.getpid())
        assert os.getpid() in tree and child.pid in tree
    finally:
        child.kill()
        child.wait()
    rss, pss = bench.memory_mb([os.getpid()])
    assert 0 < pss <= rss
    before, faults_before = bench.cpu_and_faults([os.getpid()])
    sum(i * i for i in range(2_000_000))
    # A fresh anonymous mapping, small pages: each first touch is a minor fault (a bytearray
    # could reuse pages the allocator already holds, after the tests before this one).
    touched = mmap.mmap(-1, 64 * 2**20)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        touched.madvise(mmap.MADV_NOHUGEPAGE)
    for offset in range(0, len(touched), 4096):
        touched[offset] = 1
    after, faults_after = bench.cpu_and_faults([os.getpid()])
    assert after > before and faults_after - faults_before >= 64 * 2**20 // 4096 // 2
    assert bench.plan(["png", "dali"], ["cpu", "host", "cuda"]) == [
        ("png", "cpu"), ("dali", "cpu"), ("dali", "host"), ("dali", "cuda")]
    assert bench.parse_kinds(" png, torch ") == ["png", "torch"]
    assert bench.parse_devices("cpu,host,cuda", cuda=False) == ["cpu", "host"]
    with pytest.raises(UserError, match="unknown kind 'pil'"):
        bench.parse_kinds("png,pil")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        bench.parse_devices("host,tpu", cuda=True)


@pytest.mark.slow
def test_bench_script_writes_whole_and_host_rows(cache, tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(SCRIPTS / "bench_loader.py"), "--root", str(tmp_path),
               "--cache", str(cache), "--kinds", "torch", "--devices", "cpu,host", "--res", "64",
               "--batch-size", "2", "--seconds", "1", "--warmup", "0.2", "--workers", "1",
               "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    whole, host = json.loads(out.read_text())
    assert [(r["kind"], r["device"], r["workers"]) for r in (whole, host)] == [
        ("torch", "cpu", 1), ("torch", "host", 1)]
    for row in (whole, host):
        assert row["images_per_second"] > 0 and row["cpu_percent"] > 0 and row["peak_rss_mb"] > 0
        assert row["processes"] >= 2  # the measuring process and its worker
        assert row["minor_faults_per_image"] >= 0 and row["gpu_memory_mb"] is None
        assert 0 <= row["main_cpu_percent"] <= row["cpu_percent"]
    bad = subprocess.run([sys.executable, str(SCRIPTS / "bench_loader.py"), "--kinds", "pil"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --kinds: unknown kind 'pil'")


# -- scripts/gpu_check.py ---------------------------------------------------------------------
def test_gpu_check_dry_run_lists_the_plan_within_the_budget():
    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--dry-run",
                           "--budget", "240"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    parts = [line.split()[0] for line in lines[:-1]]
    assert parts == ["versions", "data", "tests", "syncs", "compare", "held", "reuse",
                     "bench_loader", "bench_train"]
    seconds = [float(line.split()[-2]) for line in lines[:-1]]
    assert sum(seconds) <= 240 and min(seconds) > 0
    gpu_check = load_script("gpu_check")
    assert sum(s for _, s in gpu_check.schedule(10_000)) == sum(s for _, s in gpu_check.PARTS)
    assert sum(s for _, s in gpu_check.PARTS) <= 5 * 60  # 6 minutes with the install
    bad = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--budget", "5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --budget 5")


def test_gpu_check_version_probe_names_what_is_there(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--part", "versions",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    import torch

    assert result["torch"] == torch.__version__ and result["python"] == sys.version.split()[0]
    assert result["libraries"]["zarr"] is not None and "zarr" not in result["missing"]
    assert result["cuda_available"] == torch.cuda.is_available()


def test_gpu_check_without_cuda_reports_and_exits_2(tmp_path):
    report = tmp_path / "check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine with one
    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--json", str(report),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2
    assert "error: no CUDA device" in done.stderr
    written = json.loads(report.read_text())
    assert written["no_cuda"] is True and list(written["parts"]) == ["versions"]
    assert written["parts"]["versions"]["result"]["cuda_available"] is False
    assert "versions" in done.stdout  # the table


def test_gpu_check_reads_junit_reports_and_summarises_parts(tmp_path):
    gpu_check = load_script("gpu_check")
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_gpu"><skipped message="no"/></testcase>'
        '</testsuite></testsuites>')
    counts = gpu_check.junit_counts(report)
    assert counts == {"passed": 1, "failed": 1, "skipped": 1,
                      "failures": ["tests.test_a::test_bad"]}
    held = {"ok": True, "seconds": 3, "result": {"torch": {"intact": True},
                                                 "dali": {"error": "ImportError: no DALI"}}}
    assert gpu_check.headline("held", held) == "torch: True, dali: ImportError: no DALI"
    cost = {"ok": False, "seconds": 50, "result": {"loader_cost": {
        "replay": 0.0, "torch": 0.031, "dali": 0.072}}}
    assert gpu_check.headline("bench_train", cost) == "torch 3.1%, dali 7.2%"
    assert gpu_check.headline("tests", {"ok": False, "seconds": 1, "error": "timed out"}) == \
        "timed out"
    # a part that needs the data is recorded as failed, not run, once the data part failed
    from types import SimpleNamespace

    outcome = gpu_check.run_part(SimpleNamespace(work=tmp_path, data=None), "held", 30)
    assert outcome == {"ok": False, "seconds": 0, "error": "no data: the data part failed"}
    reuse = {"ok": True, "seconds": 20, "result": {
        "batches": 120, "delay_ms": 20.0, "torch": {"mismatched_batches": 0},
        "dali": {"mismatched_batches": 0}, "dali_zero_copy_control": {"mismatched_batches": 37},
        "control_detected": True, "ok": True}}
    assert gpu_check.headline("reuse", reuse) == (
        "mismatched batches of 120 - torch: 0, dali: 0, dali_zero_copy_control: 37; "
        "control sees reuse")


def test_gpu_check_writes_each_part_as_it_finishes(tmp_path, monkeypatch):
    """A check cut short (here: killed during `tests`) keeps on disk what it measured, and
    the report names the card's capability and the precision --amp auto picks there."""
    gpu_check = load_script("gpu_check")
    precision = {"name": "NVIDIA H100", "capability": "sm_90", "amp": "bf16"}
    outcomes = {
        "versions": {"ok": True, "seconds": 1, "result": {
            "cuda_available": True, "capability": "9.0", "precision": precision}},
        "data": {"ok": True, "seconds": 2, "result": {"raw": "r", "cache": "c"}}}
    seen = []

    def fake_run_part(args, name, seconds):
        seen.append((name, seconds))
        if name == "tests":
            raise KeyboardInterrupt  # the machine's time ran out
        return outcomes[name]

    monkeypatch.setattr(gpu_check, "run_part", fake_run_part)
    report = tmp_path / "out" / "gpu_check.json"
    args = gpu_check.parse(["--json", str(report), "--work", str(tmp_path / "work")])
    with pytest.raises(KeyboardInterrupt):
        gpu_check.check(args)
    written = json.loads(report.read_text())
    assert written["complete"] is False and list(written["parts"]) == ["versions", "data"]
    assert written["capability"] == "9.0" and written["precision"]["amp"] == "bf16"
    assert json.loads((report.parent / "gpu_check.data.json").read_text()) == \
        {"part": "data", **outcomes["data"]}
    assert sorted(p.name for p in report.parent.iterdir()) == [
        "gpu_check.data.json", "gpu_check.json", "gpu_check.versions.json"]
    # `tests` got its share and the seconds the earlier parts left unused
    shares = dict(gpu_check.PARTS)
    assert seen[2][0] == "tests" and seen[2][1] > shares["tests"] + 30


@pytest.mark.slow
def test_gpu_check_parts_rehearsed_on_the_cpu(tmp_path):
    """The parts that touch the product's loaders and training step run their plumbing on
    the CPU (--device cpu), so that API drift shows here and not first on a lent GPU."""
    cache = blocky_cache(tmp_path / "cache.zarr", n_train=9, n_val=2)
    results = {}
    for part in ("held", "compare", "syncs", "reuse"):
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / "gpu_check.py"), "--part", part, "--device", "cpu",
             "--small-res", "64", "--work", str(tmp_path), "--cache", str(cache)],
            capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        results[part] = json.loads(line[len("RESULT "):])
    assert results["held"] == {"torch": {"intact": True}, "dali": {"intact": True}}
    assert results["compare"]["ok"] and results["compare"]["mask_equal_share"] == 1.0
    assert results["reuse"]["ok"] and results["reuse"]["batches"] == 3
    for kind in ("torch", "dali"):
        assert results["reuse"][kind]["mismatched_batches"] == 0
    for kind in ("torch", "dali"):
        assert results["syncs"][kind] == {"syncs_per_step": None, "where": [], "steps": 20}
