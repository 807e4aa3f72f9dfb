"""The memory benchmarks at toy size: scripts/bench_loss_memory.py and
scripts/bench_worker_rss.py write the JSON the README's tables come from."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_loss_memory_compares_both_casts_side_by_side(tmp_path):
    out = tmp_path / "loss.json"
    done = run_script("bench_loss_memory.py", "--loss", "ce+dice", "--batch", 2, "--res", 64,
                      "--json", out)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    row = report["results"]["ce+dice"]
    per_term, shared = row["per_term_cast"], row["shared_cast"]
    assert row["same_loss"] and row["max_grad_diff"] < 1e-6
    # the shared cast keeps one float32 copy (2 x 19 x 64 x 64 x 4 bytes, ~0.6 MiB) alive
    # through the terms; the per-term casts die inside each term
    assert shared["no_grad_peak_mib"] >= per_term["no_grad_peak_mib"]
    assert per_term["peak_mib"] >= per_term["forward_peak_mib"] > 0


@pytest.mark.dali
def test_worker_rss_measures_imports_with_and_without_torch(tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "rss.json"
    done = run_script("bench_worker_rss.py", "--skip-dali", "--json", out)
    assert done.returncode == 0, done.stderr
    imports = json.loads(out.read_text())["imports"]
    assert imports["worker modules"]["torch_imported"] is False
    assert imports["worker modules + torch"]["torch_imported"] is True
    # the worker's own modules are a fraction of what torch adds to a spawned process
    assert 0 < imports["worker modules"]["rss"] < imports["worker modules + torch"]["rss"]
